"""topoflow.triton: the Triton model repository written from an exported model folder. Its config.pbtxt is
parsed strictly as protobuf text format against the fields of Triton's ModelConfig that it uses (their names,
numbers and types copied from triton-inference-server/common protobuf/model_config.proto): an unknown field,
a wrong type or enum value fails the parse, as it fails Triton's. The tensors it declares are those the ONNX
graph has, with Triton's batch dimension implied."""

from __future__ import annotations

import json

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from topoflow import CLASSES
from topoflow.triton import LABELS, MAX_BATCH, write_repository

FIELD = descriptor_pb2.FieldDescriptorProto
# message -> (field, number, type, repeated, message or enum type): the used subset of model_config.proto
MODEL_CONFIG = {
    "ModelInput": [("name", 1, FIELD.TYPE_STRING, False, None), ("data_type", 2, FIELD.TYPE_ENUM, False, "DataType"),
                   ("dims", 4, FIELD.TYPE_INT64, True, None)],
    "ModelOutput": [("name", 1, FIELD.TYPE_STRING, False, None), ("data_type", 2, FIELD.TYPE_ENUM, False, "DataType"),
                    ("dims", 3, FIELD.TYPE_INT64, True, None), ("label_filename", 4, FIELD.TYPE_STRING, False, None)],
    "ModelDynamicBatching": [("preferred_batch_size", 1, FIELD.TYPE_INT32, True, None),
                             ("max_queue_delay_microseconds", 2, FIELD.TYPE_UINT64, False, None)],
    "ModelConfig": [("name", 1, FIELD.TYPE_STRING, False, None), ("platform", 2, FIELD.TYPE_STRING, False, None),
                    ("max_batch_size", 4, FIELD.TYPE_INT32, False, None),
                    ("input", 5, FIELD.TYPE_MESSAGE, True, "ModelInput"),
                    ("output", 6, FIELD.TYPE_MESSAGE, True, "ModelOutput"),
                    ("dynamic_batching", 11, FIELD.TYPE_MESSAGE, False, "ModelDynamicBatching")],
}
DATA_TYPES = {"TYPE_INVALID": 0, "TYPE_BOOL": 1, "TYPE_INT32": 8, "TYPE_INT64": 9, "TYPE_FP16": 10, "TYPE_FP32": 11,
              "TYPE_FP64": 12, "TYPE_STRING": 13}


def model_config_class():
    """A ModelConfig message class holding the fields above (package inference, as Triton's)."""
    proto = descriptor_pb2.FileDescriptorProto(name="model_config_subset.proto", package="inference", syntax="proto3")
    enum = proto.enum_type.add(name="DataType")
    for name, number in DATA_TYPES.items():
        enum.value.add(name=name, number=number)
    for message, fields in MODEL_CONFIG.items():
        m = proto.message_type.add(name=message)
        for name, number, kind, repeated, type_name in fields:
            m.field.add(name=name, number=number, type=kind, type_name=f".inference.{type_name}" if type_name else None,
                        label=FIELD.LABEL_REPEATED if repeated else FIELD.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


ModelConfig = model_config_class()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export folders of the three (untrained) models: name -> folder."""
    from topoflow.config import Config
    from topoflow.export import export
    from topoflow.models import build
    from topoflow.preprocessing import Preprocessing

    rng = np.random.default_rng(0)
    pre = Preprocessing(rng.normal(size=14), rng.normal(size=14) + 3, rng.normal(size=19), rng.random(19) + 0.5)
    folders = {}
    for name in ("hlf", "gru", "inclusive"):
        cfg = Config()
        cfg.train.model, cfg.train.gru_units = name, 8
        folders[name] = tmp_path_factory.mktemp("export") / name
        export(build(cfg.train), str(folders[name]), cfg.storage, pre, cfg, {"loss": [1.0]})
    return folders


@pytest.mark.parametrize("model", ["hlf", "gru", "inclusive"])
def test_repository_declares_the_graphs_tensors_batched(exported, model, tmp_path):
    import onnxruntime as ort

    folder = exported[model]
    card = json.loads((folder / "model_card.json").read_text())
    write_repository(folder / "model.onnx", tmp_path, card, name="classifier")
    repo = tmp_path / "classifier"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "classifier/1/model.onnx", f"classifier/{LABELS}", "classifier/config.pbtxt"]
    assert (repo / "1/model.onnx").read_bytes() == (folder / "model.onnx").read_bytes()
    assert (repo / LABELS).read_text().splitlines() == list(CLASSES) == card["classes"]

    config = text_format.Parse((repo / "config.pbtxt").read_text(), ModelConfig())
    assert (config.name, config.platform) == ("classifier", "onnxruntime_onnx")
    assert config.max_batch_size == MAX_BATCH > 0
    widths = {"hlf": [14], "particles": [-1, 19]}
    assert {i.name: list(i.dims) for i in config.input} == {k: widths[k] for k in card["inputs"]}
    assert {i.data_type for i in [*config.input, *config.output]} == {DATA_TYPES["TYPE_FP32"]}
    (out,) = config.output
    assert (out.name, list(out.dims), out.label_filename) == ("probabilities", [3], LABELS)
    batching = config.dynamic_batching
    assert batching.max_queue_delay_microseconds > 0 and batching.preferred_batch_size
    assert all(0 < b <= config.max_batch_size for b in batching.preferred_batch_size)

    # what Triton's ONNX Runtime backend checks at load: [batch] + dims is the graph's shape, -1 where dynamic
    graph = ort.InferenceSession(str(repo / "1/model.onnx"))
    declared = {i.name: [-1, *i.dims] for i in config.input}
    assert {i.name: [d if isinstance(d, int) else -1 for d in i.shape] for i in graph.get_inputs()} == declared
    assert [[d if isinstance(d, int) else -1 for d in o.shape] for o in graph.get_outputs()] == [[-1, *out.dims]]


@pytest.mark.parametrize("damage, problem", [
    ('max_batch_size: "many"', "max_batch_size"),
    ("data_type: TYPE_FLOAT32", "TYPE_FLOAT32"),
    ("dims: [ 14 ]\n  allow_ragged: true", "allow_ragged"),
])
def test_the_parser_is_strict(exported, tmp_path, damage, problem):
    """The check above would catch a config Triton refuses."""
    card = json.loads((exported["hlf"] / "model_card.json").read_text())
    write_repository(exported["hlf"] / "model.onnx", tmp_path, card)
    text = (tmp_path / "topoflow/config.pbtxt").read_text()
    old = {"max_batch_size": f"max_batch_size: {MAX_BATCH}", "TYPE_FLOAT32": "data_type: TYPE_FP32",
           "allow_ragged": "dims: [ 14 ]"}[problem]
    with pytest.raises(text_format.ParseError, match=problem):
        text_format.Parse(text.replace(old, damage, 1), ModelConfig())
