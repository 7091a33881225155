"""Training throughput (samples/s) of the three models on this machine, and side by side:
(a) the GRU on the original fixed 801-step padded input vs. topoflow's batches cut to their longest
sequence; (b) the inclusive model fed by the streaming pipeline vs. the same batches in memory.

Data: a prepared dataset with realistic sequence lengths (20-200 particles), as in
``input_pipeline.py``. Then (a) at equal AUC: the GRU trained for whole epochs on a prepared
generated dataset (``--data``, by default the one ``make run`` leaves in out/prepared), once per
input layout with the same seed, timed end to end and scored on the test split.

    python benchmarks/training_throughput.py [--events 8000] [--batch-size 128] [--data out/prepared]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from input_pipeline import write_prepared
from topoflow import CLASSES, dataset, storage
from topoflow.config import StorageConfig, TrainConfig
from topoflow.evaluate import metrics
from topoflow.models import INPUTS, build
from topoflow.tf import import_tensorflow


def timed_fit(model, data, steps: int, warmup: int = 4) -> float:
    """samples/s over ``steps`` training steps after ``warmup`` steps of different sequence lengths,
    by which Keras has traced a shape-generic step (tracing excluded)."""
    it = iter(data)
    for _ in range(warmup):
        x, y = next(it)
        model.train_on_batch(x, y)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(it)
        model.train_on_batch(x, y)
        n += len(y)
    return n / (time.perf_counter() - t0)


def gru_epochs(url: str, sc: StorageConfig, bs: int, epochs: int, layout: str) -> tuple[float, dict]:
    """samples/s of ``epochs`` whole GRU epochs (tracing and all) with one input layout: ``801``
    (the original's fixed padding), ``cut`` (to each batch's longest) or ``bucket``; and test AUCs."""
    tf = import_tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    train = dataset.tf_dataset(storage.join(url, "train"), sc, bs, shuffle=True, bucket=layout == "bucket",
                               inputs=("particles",))
    steps = int(train.cardinality())
    if layout == "801":
        train = train.map(lambda x, y: ({"particles": tf.pad(
            x["particles"], [[0, 0], [0, dataset.MAX_PARTICLES - tf.shape(x["particles"])[1]], [0, 0]])}, y))
    model = build(TrainConfig(model="gru"), total_steps=steps * epochs)
    t0 = time.perf_counter()
    model.fit(train, epochs=epochs, verbose=0, shuffle=False)
    rate = dataset.num_rows(storage.join(url, "train"), sc) * epochs / (time.perf_counter() - t0)
    labels, probs = [], []
    for x, y in dataset.iter_batches(storage.join(url, "test"), sc, 1024, inputs=("particles",)):
        probs.append(model.predict_on_batch(x))
        labels.append(y.argmax(axis=1))
    return rate, metrics(np.concatenate(labels), np.concatenate(probs))["auc"]


def equal_auc_table(url: str, sc: StorageConfig, bs: int, epochs: int) -> None:
    runs = {layout: gru_epochs(url, sc, bs, epochs, layout) for layout in ("801", "cut", "bucket")}
    print(f"\n(a) at equal AUC: GRU, {epochs} epochs on {url} (generated events), batch {bs}\n")
    print("| GRU input | samples/s | speed-up | " + " | ".join(f"AUC {c}" for c in CLASSES) + " |")
    print("|---|---:|---:|" + "---:|" * len(CLASSES))
    names = {"801": "fixed 801 steps (original)", "cut": "cut to longest (topoflow)",
             "bucket": "cut to longest + length bucketing (topoflow)"}
    for layout, (rate, auc) in runs.items():
        print(f"| {names[layout]} | {rate:,.0f} | {rate / runs['801'][0]:.1f}× | "
              + " | ".join(f"{auc[c]:.4f}" for c in CLASSES) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--data", default="out/prepared", help="prepared generated dataset for (a) at equal AUC")
    ap.add_argument("--epochs", type=int, default=10, help="GRU epochs per input layout for (a) at equal AUC")
    args = ap.parse_args()
    tf = import_tensorflow()
    sc, bs = StorageConfig(), args.batch_size
    work = Path(tempfile.mkdtemp(prefix="topoflow-bench-train-"))
    try:
        write_prepared(work / "train", args.events)
        url = str(work / "train")
        rows = []
        for name in ("hlf", "gru", "inclusive"):
            stream = dataset.tf_dataset(url, sc, bs, shuffle=True, inputs=INPUTS[name]).repeat()
            rows.append((f"{name}, streamed, batches cut to their longest sequence",
                         timed_fit(build(TrainConfig(model=name)), stream, args.steps)))
        memory = list(dataset.iter_batches(url, sc, bs, shuffle=True))[: args.steps + 4]
        inclusive_memory = timed_fit(build(TrainConfig(model="inclusive")), memory, args.steps)
        gru_inputs = [({"particles": x["particles"]}, y) for x, y in memory]
        padded = [({"particles": np.pad(x["particles"], ((0, 0), (0, 801 - x["particles"].shape[1]), (0, 0)))}, y)
                  for x, y in gru_inputs[:16]]
        gru_cut = timed_fit(build(TrainConfig(model="gru")), gru_inputs, args.steps)
        bucketed = [({"particles": x["particles"]}, y) for x, y in
                    dataset.iter_batches(url, sc, bs, shuffle=True, bucket=True, inputs=("particles",))][: args.steps + 4]
        gru_bucket = timed_fit(build(TrainConfig(model="gru")), bucketed, args.steps)
        gru_801 = timed_fit(build(TrainConfig(model="gru")), padded, len(padded) - 1, warmup=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ntraining throughput, batch {bs}, {tf.config.list_physical_devices('GPU') and 'GPU' or 'CPU'}\n")
    print("| model and input | samples/s |")
    print("|---|---:|")
    for label, rate in rows:
        print(f"| {label} | {rate:,.0f} |")
    print(f"| gru, in memory, fixed 801 steps (original) | {gru_801:,.0f} |")
    print(f"| gru, in memory, cut to longest (topoflow) | {gru_cut:,.0f} |")
    print(f"| gru, in memory, cut to longest + length bucketing (topoflow) | {gru_bucket:,.0f} |")
    print(f"| inclusive, in memory | {inclusive_memory:,.0f} |")
    print(f"\n(a) vs. 801 steps: cut to longest {gru_cut / gru_801:.1f}× faster, with bucketing "
          f"{gru_bucket / gru_801:.1f}× (target ≥ 3×)")
    print(f"(b) streamed vs. in memory (inclusive): {rows[2][1] / inclusive_memory:.2f} (target ≥ 0.9)")
    if Path(args.data).exists() or "://" in args.data:
        equal_auc_table(args.data, sc, bs, args.epochs)
    else:
        print(f"\n(a) at equal AUC skipped: no prepared dataset at {args.data} (run `make run` first, or pass --data)")


if __name__ == "__main__":
    main()
