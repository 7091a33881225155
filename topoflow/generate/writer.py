"""Delphes-format ROOT output: a TTree ``Delphes`` (written with ``mktree``, not RNTuple) whose
branches carry Delphes' names (``Jet.PT`` with counter ``Jet_size``, …)."""

from __future__ import annotations

import awkward as ak
import uproot


def write(path: str, arrays: dict[str, ak.Array]) -> None:
    """Write the ``Collection.Field`` arrays of :func:`topoflow.generate.detector.simulate`."""
    collections: dict[str, dict[str, ak.Array]] = {}
    for name, values in arrays.items():
        coll, leaf = name.split(".", 1)
        collections.setdefault(coll, {})[leaf] = values
    data = {coll: ak.zip(fields) for coll, fields in collections.items()}
    with uproot.recreate(path) as f:
        f.mktree("Delphes", {k: v.type for k, v in data.items()},
                 counter_name=lambda c: c + "_size", field_name=lambda outer, inner: outer + "." + inner)
        f["Delphes"].extend(data)
