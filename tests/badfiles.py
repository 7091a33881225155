"""Makers of broken inputs, each from a real Delphes sample: the cases ingestion must refuse clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

from topoflow.features import FIELDS


def truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def empty(dst: Path) -> Path:
    dst.write_bytes(b"")
    return dst


def not_root(dst: Path) -> Path:
    dst.write_bytes(b"PAR1" + bytes(200))
    return dst


def corrupt_basket(src: Path, dst: Path, branch: str = "EFlowTrack.PT") -> Path:
    """Overwrite the middle of one compressed basket: the file opens, reading that branch fails."""
    shutil.copy(src, dst)
    b = uproot.open(src)["Delphes"][branch]
    seek, size = int(b.member("fBasketSeek")[0]), int(b.member("fBasketBytes")[0])
    data = bytearray(dst.read_bytes())
    lo, hi = seek + size // 3, seek + 2 * size // 3
    data[lo:hi] = np.random.default_rng(0).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def flat_copy(src: Path, dst: Path, drop: str | None = None, tree: str = "Delphes", nan_entry: int | None = None) -> Path:
    """An uproot-written copy of the needed collections: ``drop`` one (``Jet``) or one branch
    (``Jet.BTag``), rename the tree, or put a NaN into the first track of entry ``nan_entry``."""
    t = uproot.open(src)["Delphes"]
    data = {}
    for c, fs in FIELDS.items():
        if c == drop:
            continue
        cols = {k: t[f"{c}.{k}"].array() for k in fs if f"{c}.{k}" != drop}
        if c == "EFlowTrack":
            cols["Charge"] = t["EFlowTrack.Charge"].array()
            if nan_entry is not None:
                pt = cols["PT"]
                flat = ak.to_numpy(ak.flatten(pt)).copy()
                flat[int(ak.sum(ak.num(pt)[:nan_entry]))] = np.nan
                cols["PT"] = ak.unflatten(flat, ak.num(pt))
        data[c] = ak.zip(cols)
    with uproot.recreate(dst) as f:
        f.mktree(tree, {k: v.type for k, v in data.items()},
                 counter_name=lambda c: c + "_size", field_name=lambda o, i: o + "." + i)
        f[tree].extend(data)
    return dst
