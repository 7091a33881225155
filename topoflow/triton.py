"""The exported model as a Triton Inference Server model repository, for KServe's Triton runtime
(``deploy.runtime: triton``, storageUri ``<export>/triton``)::

    <name>/config.pbtxt  <name>/classes.txt  <name>/1/model.onnx

Triton serves the ONNX graph of :mod:`topoflow.onnx_export` with ONNX Runtime and batches concurrent requests
itself (dynamic batching), the way HEP's SONIC serves trigger models. Its clients send model inputs, already
scaled by the export's ``preprocessing.json``: unlike ``topoflow serve``, Triton knows nothing of raw events.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from topoflow.config import ServeConfig
from topoflow.onnx_export import OUTPUT

VERSION = "1"  # Triton serves the highest numbered version folder; an export holds exactly one model
# Batch as `topoflow serve` does (its defaults), so that both runtimes trade latency for throughput alike
MAX_BATCH = ServeConfig.model_fields["max_batch_events"].default
MAX_QUEUE_DELAY_US = round(ServeConfig.model_fields["max_wait_ms"].default * 1000)
PREFERRED_BATCHES = (MAX_BATCH // 4, MAX_BATCH)
LABELS = "classes.txt"


def write_repository(onnx_path: Path, folder: Path, card: dict, name: str = "topoflow") -> None:
    """Write the Triton model repository for ``onnx_path`` under ``folder`` (the model named ``name``).

    The inputs are those the model card lists (the hlf model has no ``particles``, the gru model no ``hlf``),
    FP32, with the batch dimension implied by ``max_batch_size``: ``hlf`` [14], ``particles`` [-1, 19]
    (events end-padded with zero rows to a common length L); the output ``probabilities`` [3] is labelled
    with the card's classes, so Triton's classification extension names them. One request holds at most
    ``MAX_BATCH`` events (Triton refuses larger ones).

    Triton's dynamic batcher joins only requests whose non-batch dimensions agree, so requests of particle
    sequences are batched together only when they have the same L. Clients that want batching should pad to
    a common length (e.g. the longest event they send, or a few fixed buckets): padding is cheap, because the
    graph counts each event's real rows and cuts the padding before the GRU.
    """
    model = Path(folder) / name
    (model / VERSION).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, model / VERSION / "model.onnx")
    (model / LABELS).write_text("".join(f"{c}\n" for c in card["classes"]))
    (model / "config.pbtxt").write_text(config_text(card, name))


def config_text(card: dict, name: str) -> str:
    """``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``) for the model ``card`` describes."""
    inputs = "".join(_tensor("input", tensor, [-1 if d is None else d for d in shape[1:]])
                     for tensor, shape in card["inputs"].items())
    output = _tensor("output", OUTPUT, [len(card["classes"])], f'  label_filename: "{LABELS}"\n')
    batches = ", ".join(map(str, PREFERRED_BATCHES))
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {MAX_BATCH}\n{inputs}{output}'
            f"dynamic_batching {{\n  preferred_batch_size: [ {batches} ]\n"
            f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n}}\n")


def _tensor(kind: str, name: str, dims: list[int], extra: str = "") -> str:
    return (f'{kind} {{\n  name: "{name}"\n  data_type: TYPE_FP32\n  dims: [ {", ".join(map(str, dims))} ]\n'
            f"{extra}}}\n")
