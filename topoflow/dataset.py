"""Training input: batches streamed from a prepared dataset at any fsspec URL, with bounded memory.

Particle sequences are stored unpadded; each batch is padded at the *end* to its own longest
sequence (so Masking works and short batches are cheap), optionally after grouping sequences of
similar length (bucketing). Only one window of rows is held at a time, so datasets larger than
memory train fine.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from topoflow import CLASSES, datasource, storage
from topoflow.config import StorageConfig
from topoflow.features import HLF_NAMES, PARTICLE_NAMES
from topoflow.preprocessing import MAX_PARTICLES, pad

INPUTS = ("hlf", "particles")


def pad_particles(particles: pa.ListArray, max_len: int = MAX_PARTICLES) -> np.ndarray:
    """:func:`topoflow.preprocessing.pad` for an Arrow list column of particle rows."""
    rows = np.asarray(particles.flatten().flatten().to_numpy(), dtype=np.float32).reshape(-1, len(PARTICLE_NAMES))
    return pad(rows, np.diff(particles.offsets.to_numpy()), max_len)


def _to_arrays(batch: pa.RecordBatch, inputs, max_len: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    n = batch.num_rows
    x = {}
    if "hlf" in inputs:
        x["hlf"] = np.asarray(batch.column("hlf").flatten().to_numpy(), dtype=np.float32).reshape(n, len(HLF_NAMES))
    if "particles" in inputs:
        x["particles"] = pad_particles(batch.column("particles"), max_len)
    return x, np.eye(len(CLASSES), dtype=np.float32)[batch.column("label").to_numpy()]


def iter_batches(
    url: str, cfg: StorageConfig, batch_size: int, *, shuffle: bool = False, seed: int = 0,
    bucket: bool = False, window_batches: int = 16, max_particles: int = MAX_PARTICLES,
    inputs: tuple[str, ...] = INPUTS, parts: int = 1, keep: tuple[int, ...] = (0,),
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """One pass over the dataset: ``({"hlf", "particles"}, one-hot labels)`` per batch; only the
    ``inputs`` named are read (the HLF model never decodes particle lists).

    ``parts``: each batch is cut into that many near-equal slices and only the slices ``keep`` are
    yielded, in turn: the replicas of a distributed run each train on their slice of the same global
    batches, so any number of them computes what one process computes.

    ``shuffle``: file order and rows inside each window of ``window_batches`` batches are
    permuted (seeded). ``bucket``: rows of a window are sorted by length before being cut into
    batches, whose order is then shuffled, so that little padding is computed.
    """
    rng = np.random.default_rng(seed)
    files = datasource.parquet_files(url, cfg)
    if shuffle:
        files = [files[i] for i in rng.permutation(len(files))]
    fs, _ = storage.filesystem(url, cfg)
    window = batch_size * window_batches

    def cut(rows: pa.Table, final: bool):
        """Yield the full batches of a window (all of it when ``final``); return the rest."""
        if shuffle or bucket:
            order = rng.permutation(rows.num_rows) if shuffle else np.arange(rows.num_rows)
            if bucket:
                lengths = np.asarray(rows.column("n_particles").to_numpy())[order]
                order = order[np.argsort(lengths, kind="stable")]
            rows = rows.take(order)
        full = rows.num_rows - rows.num_rows % batch_size
        starts = list(range(0, full, batch_size))
        if bucket and shuffle:
            starts = [starts[i] for i in rng.permutation(len(starts))]
        usable = rows.num_rows if final else full
        if usable > full:
            starts.append(full)  # the one short batch comes last
        for s in starts:
            batch = rows.slice(s, batch_size)
            bounds = np.cumsum([0] + [batch.num_rows // parts + (i < batch.num_rows % parts) for i in range(parts)])
            for i in keep:
                part = batch.slice(bounds[i], bounds[i + 1] - bounds[i]).combine_chunks().to_batches()
                part = part[0] if part else pa.RecordBatch.from_pylist([], rows.schema)  # fewer rows than replicas
                yield _to_arrays(part, inputs, max_particles)
        return rows.slice(usable)

    import pyarrow.parquet as pq

    columns = ["label", "n_particles", *inputs]
    pending: list[pa.RecordBatch] = []
    held = 0
    for path in files:
        with storage.storage_errors(url), fs.open(path) as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                pending.append(b)
                held += b.num_rows
                if held >= window:
                    rest = yield from cut(pa.Table.from_batches(pending), final=False)
                    pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield from cut(pa.Table.from_batches(pending, schema=pending[0].schema), final=True)


def num_rows(url: str, cfg: StorageConfig) -> int:
    """Events in a dataset, from its manifest (or the Parquet footers for data written by others)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url, cfg)
    if fs.exists(storage.join(path, storage.MANIFEST)):
        return int(storage.read_manifest(url, cfg)["rows"])
    total = 0
    for p in datasource.parquet_files(url, cfg):
        with fs.open(p) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def tf_dataset(url: str, cfg: StorageConfig, batch_size: int, *, shuffle: bool = False, seed: int = 0,
               bucket: bool = False, max_particles: int = MAX_PARTICLES, inputs: tuple[str, ...] = INPUTS,
               first_epoch: int = 0, parts: int = 1, keep: tuple[int, ...] = (0,), threads: int | None = None):
    """A ``tf.data.Dataset`` of ``({"hlf", "particles"}, labels)`` streaming from ``url``, prefetched.
    Epoch ``k`` (counted from ``first_epoch``, for resumed training) shuffles with seed ``seed + k``,
    so a resumed run sees the same data order as an uninterrupted one. ``parts``, ``keep``: slices of each
    batch, see :func:`iter_batches`. ``threads``: the size of tf.data's own thread pool (``train.threads``;
    None: a thread per core, too many in a pod limited to fewer or beside other workers)."""
    from topoflow.tf import import_tensorflow

    tf = import_tensorflow()
    epoch = iter(range(first_epoch, 1 << 30))

    def generator():
        yield from iter_batches(url, cfg, batch_size, shuffle=shuffle, seed=seed + next(epoch), bucket=bucket,
                                max_particles=max_particles, inputs=inputs, parts=parts, keep=keep)

    specs = {"hlf": tf.TensorSpec((None, len(HLF_NAMES)), tf.float32),
             "particles": tf.TensorSpec((None, None, len(PARTICLE_NAMES)), tf.float32)}
    signature = ({k: specs[k] for k in inputs}, tf.TensorSpec((None, len(CLASSES)), tf.float32))
    batches = -(-num_rows(url, cfg) // batch_size)  # every batch is full but the last
    ds = tf.data.Dataset.from_generator(generator, output_signature=signature)
    if threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        ds = ds.with_options(options)
    return ds.apply(tf.data.experimental.assert_cardinality(batches * len(keep))).prefetch(tf.data.AUTOTUNE)
