"""The fitted preprocessing: one versioned JSON artifact that preparation writes and training,
evaluation and serving load, so that a served model sees exactly the transform it was trained with.

HLF are min-max scaled to [0, 1] (as the original); particle features are standardised with means
and standard deviations over real particles only (padding never enters the statistics).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from topoflow import CLASSES
from topoflow.errors import BadInputError
from topoflow.features import HLF_NAMES, PARTICLE_NAMES

FORMAT, VERSION = "topoflow-preprocessing", 1
FILE_NAME = "preprocessing.json"
MAX_PARTICLES = 801  # the original's fixed sequence length: the most rows a model sees per event


def pad(rows: np.ndarray, counts: np.ndarray, max_len: int = MAX_PARTICLES) -> np.ndarray:
    """(events, longest, 19) float32 from the particle rows of all events back to back: zero rows
    appended at the end. Longer events keep their last ``max_len`` rows (the lepton is last and
    the farthest particles come first)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = len(counts)
    length = int(min(counts.max(initial=0), max_len))
    out = np.zeros((n, length, len(PARTICLE_NAMES)), dtype=np.float32)
    event = np.repeat(np.arange(n), counts)
    pos = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)  # index inside the event
    pos -= np.repeat(np.maximum(counts - length, 0), counts)  # truncation drops the first rows
    keep = pos >= 0
    out[event[keep], pos[keep]] = rows[keep]
    return out


@dataclass
class Moments:
    """Count, mean and sum of squared deviations per feature, mergeable across partitions (Chan et al.)."""

    n: float
    mean: np.ndarray
    m2: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> Moments:
        width = x.shape[1]
        if len(x) == 0:
            return cls(0.0, np.zeros(width), np.zeros(width), np.full(width, np.inf), np.full(width, -np.inf))
        mean = x.mean(axis=0)
        return cls(float(len(x)), mean, ((x - mean) ** 2).sum(axis=0), x.min(axis=0), x.max(axis=0))

    def merge(self, other: Moments) -> Moments:
        n = self.n + other.n
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * other.n / n
        m2 = self.m2 + other.m2 + delta**2 * self.n * other.n / n
        return Moments(n, mean, m2, np.minimum(self.low, other.low), np.maximum(self.high, other.high))

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1.0))

    def to_list(self) -> list:
        return [self.n, self.mean.tolist(), self.m2.tolist(), self.low.tolist(), self.high.tolist()]

    @classmethod
    def from_list(cls, v: list) -> Moments:
        return cls(v[0], *(np.asarray(a, dtype=np.float64) for a in v[1:]))


@dataclass
class Preprocessing:
    """The serving contract: what a client sends for one event, and what happens to it before the model.

    A client sends raw features exactly as ``topoflow ingest`` writes them, unscaled:

    - ``hlf``: the 14 high-level features in the order of :data:`~topoflow.features.HLF_NAMES`;
    - ``particles``: one row of the 19 features of :data:`~topoflow.features.PARTICLE_NAMES` per
      particle, unpadded, sorted as ingestion sorts them (by decreasing ΔR to the selected lepton,
      the lepton itself last).

    The transform min-max scales the HLF with ``hlf_min``/``hlf_max`` (a feature constant in
    training is only shifted) and standardises each particle row with ``particle_mean``/``particle_std``; the rows are
    then padded with zero rows at the *end*, to the longest event of the batch (at most 801 rows: a
    longer event keeps its last, nearest ones; :func:`pad`), and the models mask the padding.
    :meth:`topoflow.export.Exported.model_inputs` does all of it. The parameters were fitted on the
    training split only (``fitted_on`` says where).

    On disk it is ``preprocessing.json`` (:meth:`to_json`): ``format`` "topoflow-preprocessing",
    ``version`` 1, the class order, and per input the feature names, method and parameters.
    :meth:`from_json` refuses another format or version, so a server never applies a transform it
    does not understand; :meth:`fingerprint` identifies the transform itself.
    """

    hlf_min: np.ndarray
    hlf_max: np.ndarray
    particle_mean: np.ndarray
    particle_std: np.ndarray
    fitted_on: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(cls, hlf: Moments, particles: Moments, fitted_on: dict[str, Any]) -> Preprocessing:
        return cls(hlf.low, hlf.high, particles.mean, particles.std(), fitted_on)

    def transform_hlf(self, hlf: np.ndarray) -> np.ndarray:
        span = self.hlf_max - self.hlf_min
        return ((hlf - self.hlf_min) / np.where(span > 0, span, 1.0)).astype(np.float32)

    def transform_particles(self, rows: np.ndarray) -> np.ndarray:
        return ((rows - self.particle_mean) / np.where(self.particle_std > 0, self.particle_std, 1.0)).astype(np.float32)

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "version": VERSION, "classes": list(CLASSES),
            "hlf": {"names": list(HLF_NAMES), "method": "minmax", "min": self.hlf_min.tolist(),
                    "max": self.hlf_max.tolist()},
            "particles": {"names": list(PARTICLE_NAMES), "method": "standard", "mean": self.particle_mean.tolist(),
                          "std": self.particle_std.tolist(), "padding": "zero rows appended at the end, masked"},
            "fitted_on": self.fitted_on,
        }, indent=2, sort_keys=True)

    def fingerprint(self) -> str:
        """A short sha256 of what the transform does (format, version, fitted parameters), not of where
        it was fitted: a model matches any copy of the dataset it was trained on, and no other."""
        artifact = json.loads(self.to_json())
        del artifact["fitted_on"]
        return hashlib.sha256(json.dumps(artifact, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str, where: str = "preprocessing artifact") -> Preprocessing:
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT or d.get("version") != VERSION:
                raise BadInputError(where, f"not a {FORMAT} v{VERSION} artifact (format {d.get('format')!r}, "
                                    f"version {d.get('version')!r})", "re-run topoflow prepare with this topoflow")
            arrays = [np.asarray(v, dtype=np.float64) for v in
                      (d["hlf"]["min"], d["hlf"]["max"], d["particles"]["mean"], d["particles"]["std"])]
        except (ValueError, KeyError, TypeError) as e:
            raise BadInputError(where, f"unreadable preprocessing artifact: {e}", "re-run topoflow prepare") from e
        if [len(a) for a in arrays] != [len(HLF_NAMES)] * 2 + [len(PARTICLE_NAMES)] * 2:
            raise BadInputError(where, "preprocessing artifact has the wrong number of features",
                                "re-run topoflow prepare")
        return cls(*arrays, fitted_on=d.get("fitted_on", {}))

    @classmethod
    def load(cls, dataset_url: str, cfg) -> Preprocessing:
        """The artifact of a prepared dataset (``<url>/preprocessing.json``)."""
        from topoflow import storage

        fs, path = storage.filesystem(dataset_url, cfg)
        p = storage.join(path, FILE_NAME)
        with storage.storage_errors(dataset_url):
            if not fs.exists(p):
                raise BadInputError(dataset_url, f"no {FILE_NAME}: not a prepared dataset",
                                    "run topoflow prepare on the ingested dataset first")
            return cls.from_json(fs.cat(p).decode(), f"{dataset_url}/{FILE_NAME}")
