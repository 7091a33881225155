"""Raw JSON events (what a client sends the server) become exactly the arrays ingestion reads: the
real Delphes samples, turned into JSON and back, give the same selection and features; malformed
events are refused naming the JSON path of what is wrong."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from conftest import SAMPLES
from topoflow import delphes, events, features
from topoflow.config import StorageConfig


@pytest.fixture(scope="module")
def real(delphes_dir):
    """The ttbar sample's arrays as delphes.read_batches yields them, and the same events as JSON."""
    info = delphes.probe(str(delphes_dir / SAMPLES["ttbar"]), StorageConfig())
    (_, arrays), = delphes.read_batches(info, StorageConfig(), 0, info.entries, info.entries)
    return arrays, json.loads(json.dumps(events.from_arrays(arrays)))


def test_json_events_give_the_features_of_the_file(real):
    arrays, js = real
    want, got = features.compute(arrays), features.compute(events.to_arrays(js))
    assert len(want.events) > 0
    for name in ("events", "counts", "hlf", "particles"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def test_objects_and_columns_are_the_same_events(real):
    """A collection given as a list of objects equals it given as an object of lists; MissingET may
    be a single object."""
    _, js = real
    rows = copy.deepcopy(js[:5])
    for event in rows:
        for c in ("Jet", "Electron", "EFlowTrack"):
            cols = event[c]
            event[c] = [dict(zip(cols, values)) for values in zip(*cols.values())]
        event["MissingET"] = {k: v[0] for k, v in event["MissingET"].items()}
    a, b = events.to_arrays(js[:5]), events.to_arrays(rows)
    for name in a:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
        np.testing.assert_array_equal(a[name].counts, b[name].counts, err_msg=name)


def _broken(js, change):
    event = copy.deepcopy(js[0])
    change(event)
    return [js[1], event]


@pytest.mark.parametrize("change, where, problem", [
    (lambda e: e.pop("EFlowPhoton"), "events[1]", "missing collection 'EFlowPhoton'"),
    (lambda e: e["Jet"].pop("BTag"), "events[1].Jet.BTag", "missing field"),
    (lambda e: e["Jet"]["PT"].__setitem__(0, "55"), "events[1].Jet.PT[0]", "expected a number, got a string"),
    (lambda e: e["Jet"]["PT"].__setitem__(0, True), "events[1].Jet.PT[0]", "expected a number, got true/false"),
    (lambda e: e["EFlowTrack"]["Z"].__setitem__(2, float("nan")), "events[1].EFlowTrack.Z[2]", "not a finite"),
    (lambda e: e["Jet"]["Eta"].pop(), "events[1].Jet", "different lengths"),
    (lambda e: e.__setitem__("Muon", [{"PT": 30.0, "Eta": 0.0, "Phi": 0.0}]), "events[1].Muon[0]",
     "missing field 'Charge'"),
    (lambda e: e.__setitem__("Muon", 3), "events[1].Muon", "expected a list of objects or an object of lists"),
], ids=["collection", "field", "string", "bool", "nan", "lengths", "object-field", "type"])
def test_malformed_events_name_the_json_path(real, change, where, problem):
    with pytest.raises(events.EventsError) as e:
        events.to_arrays(_broken(real[1], change))
    assert e.value.where == where and problem in e.value.problem, str(e.value)


def test_not_a_list_of_objects():
    with pytest.raises(events.EventsError, match=r"^events: expected a list of events, got an object"):
        events.to_arrays({"Jet": []})
    with pytest.raises(events.EventsError, match=r"^events\[0\]: expected an object of collections, got a list"):
        events.to_arrays([[]])
