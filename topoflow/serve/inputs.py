"""What a client may send ``topoflow serve``, checked and turned into the raw features that
:meth:`topoflow.export.Exported.predict` takes.

- V2 feature tensors, as ingestion writes them (unscaled): ``hlf`` FP32 ``[n, 14]``, ``particles`` FP32
  ``[n, L, 19]`` padded with zero rows at the end (L ≤ 801), optional ``lengths`` INT32/INT64 ``[n]``
  (default: up to each event's last row that is not all zeros). A model takes the tensors its card
  names (the hlf model only ``hlf``, the gru model only ``particles``).
- Raw events, the Delphes collections of :mod:`topoflow.events`: the V2 input ``events`` (BYTES, each
  element the JSON text of one event or of a list of events; ``events[i]`` in messages counts events
  across elements), or V1 ``{"instances": [event, ...]}``. They go through the selection and
  features of ingestion; events without an isolated lepton get no probabilities.

Anything else is kserve's :class:`~kserve.errors.InvalidInput` (HTTP 400, gRPC INVALID_ARGUMENT)
whose message names the input or the JSON path (``input 'hlf': ...``, ``instances[3].Jet[1].PT: ...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest

from topoflow.config import ServeConfig
from topoflow.events import EventsError, to_arrays
from topoflow.export import unpad
from topoflow.features import HLF_NAMES, PARTICLE_NAMES, EventError, Features, compute
from topoflow.preprocessing import MAX_PARTICLES

EVENTS = "events"
TENSORS = {  # name -> (datatypes, shape; None: any size)
    "hlf": (("FP32",), (None, len(HLF_NAMES))),
    "particles": (("FP32",), (None, None, len(PARTICLE_NAMES))),
    "lengths": (("INT32", "INT64"), (None,)),
}
_DIMS = {"hlf": "n, 14", "particles": "n, L, 19", "lengths": "n"}


@dataclass
class Parsed:
    """A checked request: the features of its events, or its raw events, whose features
    :func:`features` computes (and checks) together with those of concurrent requests."""

    n: int  # events in the request
    v2: InferRequest | None  # None: a V1 request
    given: Features | None = None  # feature tensors: every event scored
    events: list | None = None  # raw events (JSON)
    where: str = ""  # the raw events' JSON path in the request, for messages


def parse(payload: Any, inputs: tuple[str, ...], sc: ServeConfig) -> Parsed:
    """Check ``payload`` (V1: the decoded JSON body; V2 REST or gRPC: an InferRequest) for a model
    taking ``inputs`` within the limits of ``sc``."""
    if isinstance(payload, InferRequest):
        return _v2(payload, inputs, sc)
    if isinstance(payload, dict):
        if "instances" not in payload:
            raise InvalidInput('missing "instances": send {"instances": [event, ...]}, one raw event (its Delphes '
                               "collections) per instance; feature tensors go to /v2/models/NAME/infer")
        return _raw(payload["instances"], "instances", sc, None)
    raise InvalidInput(f'expected a JSON object {{"instances": [event, ...]}} (Content-Type: application/json), '
                       f"got {type(payload).__name__}")


def features(requests: list[Parsed]) -> list[Features]:
    """Each request's features (``events`` indexing the request). The raw events of all requests are
    checked and go through the selection in one call, as its cost is mostly per call; a problem is an
    InvalidInput naming its JSON path in the first request's terms (run a failing list again one
    request at a time to learn which request it is)."""
    raw = [r for r in requests if r.events is not None]
    computed = iter(_split(_compute([e for r in raw for e in r.events], raw[0].where), [r.n for r in raw])
                    if raw else [])
    return [r.given if r.events is None else next(computed) for r in requests]


def _compute(events: list, where: str) -> Features:
    try:
        return compute(to_arrays(events, where))
    except EventsError as e:
        raise InvalidInput(str(e)) from e
    except EventError as e:
        raise InvalidInput(f"{where}[{e.index}]: {e.problem}") from e


def _split(f: Features, sizes: list[int]) -> list[Features]:
    """The features of events back to back, cut into requests of ``sizes`` events."""
    starts = np.cumsum([0, *sizes])
    bounds = np.searchsorted(f.events, starts)
    row_bounds = np.concatenate([[0], np.cumsum(f.counts)])[bounds]
    return [Features(f.events[a:b] - start, f.hlf[a:b], f.particles[ra:rb], f.counts[a:b])
            for start, a, b, ra, rb in zip(starts, bounds, bounds[1:], row_bounds, row_bounds[1:])]


def tensors_taken(inputs: tuple[str, ...]) -> list[str]:
    """The feature tensors a model with ``inputs`` takes: its inputs, and ``lengths`` with ``particles``."""
    return [*inputs, *(["lengths"] if "particles" in inputs else [])]


def _v2(request: InferRequest, inputs: tuple[str, ...], sc: ServeConfig) -> Parsed:
    given: dict[str, InferInput] = {}
    for tensor in request.inputs:
        if tensor.name in given:
            raise InvalidInput(f"input {tensor.name!r} given twice")
        given[tensor.name] = tensor
    takes = tensors_taken(inputs)
    for name in given:
        if name not in (EVENTS, *takes):
            raise InvalidInput(f"unknown input {name!r}: this model takes {EVENTS!r} (raw events as JSON, BYTES) "
                               f"or the feature tensors {takes}")
    if EVENTS in given:
        if len(given) > 1:
            raise InvalidInput(f"input {EVENTS!r} (raw events) cannot come with feature tensors {sorted(given)}")
        return _raw(_events(given[EVENTS], sc), EVENTS, sc, request)
    missing = [name for name in inputs if name not in given]
    if missing:
        raise InvalidInput(f"missing input {missing[0]!r}: this model takes {list(inputs)} "
                           f"(or raw events as {EVENTS!r})")
    arrays = {name: _tensor(tensor, sc) for name, tensor in given.items()}
    sizes = {name: len(a) for name, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise InvalidInput(f"the inputs disagree on the number of events n: {sizes}")
    n = len(next(iter(arrays.values())))
    if "particles" in arrays:
        rows, counts = _unpad(arrays["particles"], arrays.get("lengths"))
    else:
        rows, counts = np.zeros((0, len(PARTICLE_NAMES)), np.float32), np.zeros(n, np.int64)
    hlf = arrays.get("hlf", np.zeros((n, len(HLF_NAMES)), np.float32))  # a model without hlf ignores it
    return Parsed(n, request, given=Features(np.arange(n), hlf, rows, counts))


def _tensor(tensor: InferInput, sc: ServeConfig) -> np.ndarray:
    """A feature tensor, checked: datatype, shape (before its data are read), size limits, finite values."""
    where = f"input {tensor.name!r}"
    datatypes, dims = TENSORS[tensor.name]
    if tensor.datatype not in datatypes:
        raise InvalidInput(f"{where}: datatype {tensor.datatype}, expected {' or '.join(datatypes)}")
    shape = list(tensor.shape)
    if len(shape) != len(dims) or any(d < 0 or (want is not None and d != want) for d, want in zip(shape, dims)):
        raise InvalidInput(f"{where}: shape {shape}, expected [{_DIMS[tensor.name]}]")
    _check_count(shape[0], where, sc)
    if tensor.name == "particles" and shape[1] > MAX_PARTICLES:
        raise InvalidInput(f"{where}: {shape[1]} rows per event, at most {MAX_PARTICLES} (the lepton and up to "
                           "450 tracks, 150 photons and 200 neutral hadrons)")
    try:
        array = tensor.as_numpy()
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidInput(f"{where}: the data do not make a {tensor.datatype} tensor of shape {shape}: {e}") from e
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"{where}: not a finite number at {np.argwhere(~np.isfinite(array))[0].tolist()}")
    return array


def _unpad(particles: np.ndarray, lengths: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        return unpad(particles, lengths)
    except ValueError as e:
        raise InvalidInput(f"input 'lengths': {e} of 'particles'") from e


def _events(tensor: InferInput, sc: ServeConfig) -> list:
    """The raw events of the V2 input ``events``: BYTES, each element the JSON text of one event or of a list."""
    where = f"input {EVENTS!r}"
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"{where}: datatype {tensor.datatype}, expected BYTES (JSON text of events)")
    if len(tensor.shape) != 1 or tensor.shape[0] < 0:
        raise InvalidInput(f"{where}: shape {list(tensor.shape)}, expected [k]: one JSON text per element")
    _check_count(tensor.shape[0], where, sc)
    try:
        elements = tensor.as_numpy()
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"{where}: the data do not make a BYTES tensor of shape {list(tensor.shape)}: {e}") from e
    events = []
    for i, text in enumerate(elements):
        if not isinstance(text, (str, bytes)):
            raise InvalidInput(f"{where}, element {i}: expected the JSON text of an event, got {type(text).__name__}")
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise InvalidInput(f"{where}, element {i}: not JSON: {e}") from e
        events.extend(value if isinstance(value, list) else [value])
    return events


def _raw(events: Any, where: str, sc: ServeConfig, request: InferRequest | None) -> Parsed:
    if not isinstance(events, list):
        raise InvalidInput(f"{where}: expected a list of events, got {type(events).__name__}")
    _check_count(len(events), where, sc)
    return Parsed(len(events), request, events=events, where=where)


def _check_count(n: int, where: str, sc: ServeConfig) -> None:
    if n > sc.max_events_per_request:
        raise InvalidInput(f"{where}: {n} events, more than serve.max_events_per_request={sc.max_events_per_request}: "
                           "split them over several requests")
