"""ONNX inference cost per event (µs, ONNX Runtime on one core) of the inclusive model: Keras' own
ONNX export (tf2onnx: Masking + GRU become a ``Loop``) against topoflow.onnx_export's graph (the
native ``GRU`` op, which stops each event at its length through ``sequence_lens``).

Events have realistic particle counts (median ≈ 87, tail to ≈ 250); weights are random (timing
only). Rows: one event per call at its own length, one event padded to 801 rows (the original fixed
input), and batches of 64 events padded to their longest, as topoflow's pipeline cuts them.

    python benchmarks/onnx_inference.py [--events 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from topoflow.config import TrainConfig
from topoflow.tf import import_tensorflow


def realistic_lengths(n: int, rng) -> np.ndarray:
    """Particle counts with median ≈ 87 and a tail to ≈ 250 (gamma-shaped, like the Delphes samples)."""
    return np.clip(rng.gamma(6.0, 15.4, size=n).round(), 1, 250).astype(int)


def padded(lengths, rng, pad_to=None) -> dict[str, np.ndarray]:
    particles = np.zeros((len(lengths), pad_to or max(lengths), 19), "float32")
    for i, n in enumerate(lengths):
        particles[i, :n] = rng.normal(size=(n, 19))
    return {"hlf": rng.normal(size=(len(lengths), 14)).astype("float32"), "particles": particles}


def us_per_event(sess, batches: list[dict], repeats: int = 5, min_s: float = 0.1) -> float:
    """Wall time per event of running every batch once (repeated to last ≥ ``min_s``), best of
    ``repeats``: the least disturbed by other processes on a shared machine."""
    sess.run(None, batches[0])  # warm-up: first-run allocations
    best = float("inf")
    for _ in range(repeats):
        events, t0 = 0, time.perf_counter()
        while not events or time.perf_counter() - t0 < min_s:
            for b in batches:
                sess.run(None, b)
            events += sum(len(b["hlf"]) for b in batches)
        best = min(best, (time.perf_counter() - t0) / events * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=512, help="events per measurement")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (1: per-core numbers)")
    args = parser.parse_args()
    import_tensorflow()
    import onnxruntime as ort

    from topoflow.models import build
    from topoflow.onnx_export import to_onnx

    rng = np.random.default_rng(0)
    model = build(TrainConfig(model="inclusive"))
    for w in model.weights:
        w.assign(rng.normal(scale=0.3, size=w.shape).astype("float32"))
    model.predict_on_batch(padded([3], rng))  # Keras exports only a model that has been called
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    with tempfile.TemporaryDirectory() as tmp:
        keras_path, ours_path = Path(tmp) / "keras.onnx", Path(tmp) / "topoflow.onnx"
        with warnings.catch_warnings():  # tf2onnx probes np.object, which numpy 2 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            model.export(str(keras_path), format="onnx", verbose=False)
        to_onnx(model, ours_path)
        sessions = {name: ort.InferenceSession(str(p), opts) for name, p in
                    (("Keras export (tf2onnx Loop)", keras_path), ("topoflow.onnx_export (GRU op)", ours_path))}

    lengths = realistic_lengths(args.events, rng)
    singles = [padded([n], rng) for n in lengths]
    batches = [padded(lengths[i:i + 64], rng) for i in range(0, len(lengths), 64)]
    by_length = np.sort(lengths)
    bucketed = [padded(by_length[i:i + 64], rng) for i in range(0, len(lengths), 64)]
    typical = padded([87], rng)
    cases = [("batch 1, each event at its own length", singles), ("batch 1, 87 particles", [typical]),
             ("batch 1, 87 particles padded to 801", [dict(typical, particles=np.pad(
                 typical["particles"], [(0, 0), (0, 801 - 87), (0, 0)]))]),
             ("batch 64, each padded to its longest event", batches),
             ("batch 64 of events sorted by length", bucketed)]
    names = list(sessions)
    print(f"Inclusive model, {args.events} events (particles: median {np.median(lengths):.0f}, "
          f"max {lengths.max()}), ONNX Runtime {ort.__version__}, {args.threads} intra-op thread(s); µs/event\n")
    print(f"| case | {' | '.join(names)} | speed-up |\n|---|---:|---:|---:|")
    for label, data in cases:
        old, new = us_per_event(sessions[names[0]], data), us_per_event(sessions[names[1]], data)
        print(f"| {label} | {old:,.0f} | {new:,.1f} | {old / new:,.1f}x |")
    stepped = {name: sum(b["particles"].shape[0] * b["particles"].shape[1] for b in bs) / len(lengths)
               for name, bs in (("as they come", batches), ("sorted", bucketed))}
    print(f"\nGRU steps per event in batches of 64 (ONNX Runtime steps every event until the batch's longest "
          f"ends): {', '.join(f'{v:.0f} {k}' for k, v in stepped.items())}; {lengths.mean():.0f} real particles")


if __name__ == "__main__":
    main()
