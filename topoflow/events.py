"""Raw events as JSON (what a client sends ``topoflow serve``) → the arrays :func:`topoflow.features.compute`
takes, so that a served event goes through exactly the selection and features of ingestion.

An event is an object holding every collection of :data:`~topoflow.features.INPUT_FIELDS`, under
Delphes' names, each either a list of objects (one per candidate) or, faster to read, an object of
equal-length lists (columnar); ``MissingET`` may also be one object::

    {"Electron": [{"PT": 41.2, "Eta": 0.3, "Phi": 1.1, "Charge": -1}], "Muon": [],
     "Jet": {"PT": [55.0, 31.7], "Eta": [0.1, -1.9], "BTag": [1, 0]},
     "MissingET": {"MET": 38.0, "Phi": -2.0},
     "EFlowTrack": [{"PT": 41.0, "Eta": 0.3, "Phi": 1.1, "X": 0, "Y": 0, "Z": 0.02, "Charge": -1}, ...],
     "EFlowPhoton": [...], "EFlowNeutralHadron": [...]}

Other keys are ignored. Anything else (a missing collection or field, a value that is not a finite
number, lists of different lengths) is an :class:`EventsError` naming where, e.g.
``events[3].Jet[1].PT``.
"""

from __future__ import annotations

from typing import Any

import awkward as ak
import numpy as np

from topoflow.features import INPUT_FIELDS, Branches, Jagged, jagged


class EventsError(ValueError):
    """A malformed event: ``where`` is the JSON path of the offending value."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


def to_arrays(events: Any, where: str = "events") -> Branches:
    """``{"Collection.Field": Jagged}`` for a list of JSON events (see the module docstring)."""
    if not isinstance(events, list):
        raise EventsError(where, f"expected a list of events, got {_kind(events)}")
    values: dict[str, list[float]] = {f"{c}.{f}": [] for c, fs in INPUT_FIELDS.items() for f in fs}
    counts: dict[str, list[int]] = {c: [] for c in INPUT_FIELDS}
    for i, event in enumerate(events):
        at = f"{where}[{i}]"
        if not isinstance(event, dict):
            raise EventsError(at, f"expected an object of collections, got {_kind(event)}")
        for collection, fields in INPUT_FIELDS.items():
            if collection not in event:
                raise EventsError(at, f"missing collection {collection!r} (give [] when it is empty)")
            columns = _columns(event[collection], fields, f"{at}.{collection}", collection == "MissingET")
            counts[collection].append(len(columns[fields[0]]))
            for f in fields:
                values[f"{collection}.{f}"].extend(columns[f])
    out = {}
    for name, flat in values.items():
        collection = name.split(".")[0]
        array = np.asarray(flat, dtype=np.float64)
        if not np.isfinite(array).all():
            raise EventsError(_locate(name, counts[collection], int(np.flatnonzero(~np.isfinite(array))[0]), where),
                              "not a finite number")
        out[name] = Jagged(array, np.asarray(counts[collection], dtype=np.int64))
    return out


def _columns(value: Any, fields: tuple[str, ...], at: str, single_ok: bool) -> dict[str, list]:
    """One collection of one event as a list per field, each value checked to be a number."""
    if single_ok and isinstance(value, dict) and not any(isinstance(v, list) for v in value.values()):
        value = [value]  # MissingET given as one object
    if isinstance(value, list):
        for j, obj in enumerate(value):
            if type(obj) is not dict:
                raise EventsError(f"{at}[{j}]", f"expected an object with fields {list(fields)}, got {_kind(obj)}")
            if missing := [f for f in fields if f not in obj]:
                raise EventsError(f"{at}[{j}]", f"missing field {missing[0]!r}")
        columns = {f: [obj[f] for obj in value] for f in fields}
        path = "{at}[{j}].{f}"
    elif isinstance(value, dict):
        for f in fields:
            if not isinstance(value.get(f), list):
                raise EventsError(f"{at}.{f}", "missing field" if value.get(f) is None else
                                  f"expected a list of numbers, got {_kind(value[f])}")
        if len(lengths := {len(value[f]) for f in fields}) > 1:
            raise EventsError(at, f"the fields {list(fields)} have different lengths {sorted(lengths)}")
        columns, path = {f: value[f] for f in fields}, "{at}.{f}[{j}]"
    else:
        raise EventsError(at, f"expected a list of objects or an object of lists, got {_kind(value)}")
    for f, column in columns.items():
        if not set(map(type, column)) <= {int, float}:  # fast check; the slow one says where
            for j, v in enumerate(column):
                if type(v) not in (int, float):
                    raise EventsError(path.format(at=at, j=j, f=f), f"expected a number, got {_kind(v)}")
    return columns


def _locate(name: str, counts: list[int], index: int, where: str) -> str:
    """Where flat value ``index`` of branch ``name`` is: its event, and its candidate in the collection."""
    ends = np.cumsum(counts)
    event = int(np.searchsorted(ends, index, side="right"))
    collection, field = name.split(".")
    return f"{where}[{event}].{collection}.{field}[{index - (ends[event] - counts[event])}]"


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(v), type(v).__name__)


def from_arrays(arrays: dict[str, ak.Array | Jagged]) -> list[dict]:
    """The JSON events (columnar) of the arrays :func:`topoflow.delphes.read_batches` yields: what a
    client reading Delphes files sends. ``to_arrays(from_arrays(a))`` holds the values of ``a``."""
    arrays = jagged(arrays)
    lists = {name: np.split(arrays[name].values.astype(np.float64), np.cumsum(arrays[name].counts)[:-1])
             for c, fs in INPUT_FIELDS.items() for name in (f"{c}.{f}" for f in fs)}
    return [{c: {f: lists[f"{c}.{f}"][i].tolist() for f in fs} for c, fs in INPUT_FIELDS.items()}
            for i in range(len(arrays["MissingET.MET"]))]
