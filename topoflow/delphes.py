"""Reading Delphes trees: open a file at any URL, check it, and stream the needed branches in batches.

Real Delphes files (split TClonesArray branches ``Jet/Jet.PT``) and uproot-written ones (flat
``Jet.PT`` with a ``Jet_size`` counter) both expose leaves as ``Collection.Field``, so one set of
names reads both. Batches come out under canonical names: the muon collection is always ``Muon``
and the track charge is always ``EFlowTrack.Charge``.
"""

from __future__ import annotations

import difflib
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import awkward as ak
import numpy as np
import uproot

from topoflow.config import StorageConfig
from topoflow.errors import BadInputError, StorageError
from topoflow.features import FIELDS
from topoflow.storage import filesystem, fs_options, protocol, storage_errors

TREE = "Delphes"


# What a damaged file raises while being decoded (zlib: a corrupt compressed basket).
_DECODE_ERRORS = (OSError, ValueError, zlib.error, uproot.deserialization.DeserializationError)

# Charged leptons and the negative hyperons have negative charge for a positive PDG id.
_NEGATIVE_FOR_POSITIVE_PID = np.array([11, 13, 15, 3112, 3312, 3334])


@dataclass(frozen=True)
class FileInfo:
    """What probing a file found: its size in events and which optional branches it has."""

    url: str
    entries: int
    muon: str  # "Muon" or "MuonTight"
    track_charge: str  # "EFlowTrack.Charge" or "EFlowTrack.PID"


@contextmanager
def open_tree(url: str, cfg: StorageConfig):
    """Open ``url`` and give its ``Delphes`` TTree, or an error that says what is wrong with the file."""
    options = fs_options(url, cfg)
    if protocol(url) == "s3":
        options["handler"] = uproot.source.fsspec.FSSpecSource
    try:
        with storage_errors(url):
            file = uproot.open(url, **options)
    except FileNotFoundError as e:
        raise BadInputError(url, "file not found", "check the path; globs must match at least one file") from e
    except StorageError:
        raise
    except _DECODE_ERRORS as e:
        raise _diagnose(url, cfg, e) from e
    if TREE not in file:
        raise BadInputError(
            url,
            f"no TTree {TREE!r} in this file; it holds {sorted(k.split(';')[0] for k in file.keys())!r}",
            "is this a Delphes output file? ingestion reads the Delphes tree only",
        )
    with file:
        yield file[TREE]


def _diagnose(url: str, cfg: StorageConfig, error: Exception) -> BadInputError:
    """Tell an empty, non-ROOT, truncated or corrupt file apart from the first bytes and the size."""
    try:
        fs, path = filesystem(url, cfg)
        size = fs.size(path)
        with fs.open(path, "rb") as f:
            head = f.read(4)
    except Exception:  # the original error is the better report when even this fails
        return BadInputError(url, f"cannot read the file: {error}", "check the file and the storage")
    if size == 0:
        return BadInputError(url, "empty file (0 bytes)", "re-copy or regenerate it, or use --on-bad-file skip")
    if head != b"root":
        return BadInputError(
            url, f"not a ROOT file: first four bytes are {head!r}", "point the dataset at Delphes .root files"
        )
    return BadInputError(
        url,
        f"truncated or corrupt ROOT file ({size} bytes): {_first_lines(error)}",
        "re-copy the file (an interrupted transfer truncates it), or use --on-bad-file skip",
    )


def _first_lines(error: Exception) -> str:
    """uproot's message without its own "for file path" trailer (our error names the file)."""
    return " ".join(ln for ln in str(error).splitlines() if not ln.startswith(("for file path", "in file")))


def probe(url: str, cfg: StorageConfig, muon_collection: str = "auto") -> FileInfo:
    """Open ``url`` and check that every needed branch is there, before any Spark work starts."""
    with open_tree(url, cfg) as tree:
        muon = muon_collection
        if muon == "auto":
            muon = "MuonTight" if "MuonTight.PT" in tree else "Muon"
        charge = "EFlowTrack.Charge" if "EFlowTrack.Charge" in tree else "EFlowTrack.PID"
        missing = [b for b in _branch_names(muon, charge) if b not in tree]
        names = [k.split("/")[-1] for k in tree.keys()]
        entries = int(tree.num_entries)
    if missing:
        hints = {m: difflib.get_close_matches(m, names, n=3) for m in missing}
        hint = "; ".join(f"{m}: closest {h!r}" if h else m for m, h in hints.items())
        fix = "topoflow needs the Delphes collections listed in SPEC.md: write them in the Delphes card's output"
        if any(m.startswith(("Muon.", "MuonTight.")) for m in missing):
            fix += "; for the muons set ingest.muon_collection (Muon or MuonTight)"
        raise BadInputError(url, f"missing branch(es) in tree {TREE!r}: {hint}", fix)
    return FileInfo(url=url, entries=entries, muon=muon, track_charge=charge)


def _branch_names(muon: str, charge: str) -> list[str]:
    names = [f"{c if c != 'Muon' else muon}.{f}" for c, fs in FIELDS.items() for f in fs]
    return names + [charge]


def read_batches(
    info: FileInfo, cfg: StorageConfig, start: int, stop: int, batch_size: int
) -> Iterator[tuple[int, dict[str, ak.Array]]]:
    """Yield ``(first entry, arrays)`` for entries ``[start, stop)`` of the file, ``batch_size`` at a
    time, under canonical names (``Muon.*``, ``EFlowTrack.Charge``)."""
    branches = _branch_names(info.muon, info.track_charge)
    rename = {f"{info.muon}.{f}": f"Muon.{f}" for f in FIELDS["Muon"]}
    try:
        with open_tree(info.url, cfg) as tree, storage_errors(info.url):
            for arrays, report in tree.iterate(
                branches, step_size=batch_size, entry_start=start, entry_stop=stop, library="ak",
                how=dict, report=True,
            ):
                arrays = {rename.get(k, k): v for k, v in arrays.items()}
                if info.track_charge == "EFlowTrack.PID":
                    arrays["EFlowTrack.Charge"] = charge_from_pid(arrays.pop("EFlowTrack.PID"))
                yield report.tree_entry_start, arrays
    except (BadInputError, StorageError):
        raise
    except _DECODE_ERRORS as e:
        raise BadInputError(
            info.url,
            f"cannot decode entries {start}-{stop}: {type(e).__name__}: {_first_lines(e)}",
            "the file is corrupt: re-copy it, or use --on-bad-file skip",
        ) from e


def charge_from_pid(pid: ak.Array) -> ak.Array:
    """Electric charge of a charged track from its PDG id (for files without ``EFlowTrack.Charge``)."""
    flat = np.asarray(ak.flatten(pid))
    sign = np.sign(flat)
    sign = np.where(np.isin(np.abs(flat), _NEGATIVE_FOR_POSITIVE_PID), -sign, sign)
    return ak.unflatten(sign.astype(np.int32), ak.num(pid))
