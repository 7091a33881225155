"""Packaging by tier: each pip extra (spark, generate, train, serve, pipeline) brings what its stages import,
`all` is every tier, a missing tier is one error naming the install command, and the CLI starts
without importing any tier's heavy packages."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO
from topoflow.config import SparkConfig
from topoflow.errors import TopoflowError
from topoflow.generate import pythia
from topoflow.spark import session
from topoflow.tf import import_tensorflow

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
TIERS = set(EXTRAS) - {"all", "test"}
STORAGE = ["s3fs", "fsspec_xrootd", "XRootD.client"]  # fsspec loads its s3:// and root:// backends lazily
STAGE_IMPORTS = {  # what each tier must make importable: its stages' modules and what they import lazily
    "spark": ["topoflow.ingest", "topoflow.prepare", "topoflow.predict", "pyspark.sql", "onnxruntime", *STORAGE],
    "generate": ["topoflow.generate.detector", "topoflow.generate.pythia", "topoflow.generate.writer",
                 "topoflow.generate.validate", "pythia8mc", "fastjet", "matplotlib.pyplot", "mplhep", *STORAGE],
    "train": ["topoflow.train", "topoflow.evaluate", "topoflow.plots", "tf2onnx", "onnxruntime", "matplotlib.pyplot",
              *STORAGE],
    "serve": ["topoflow.serve", "topoflow.export", "topoflow.events", "onnxruntime", "kserve", *STORAGE],
    "pipeline": ["kfp", "kfp.kubernetes", "kubernetes"],
}


def test_all_is_every_tier():
    (everything,) = (Requirement(r) for r in EXTRAS["all"])
    assert everything.name == PROJECT["name"] and everything.extras == TIERS == set(STAGE_IMPORTS)


def _installs(requirements: list[str]) -> set[str]:
    """The distributions that ``requirements`` bring, their dependencies included (installed metadata)."""
    dists, seen, todo = set(), {}, [Requirement(r) for r in requirements]  # seen: name -> extras expanded
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        dists.add(name)
        for extra in {"", *req.extras} - seen.get(name, set()):
            seen.setdefault(name, set()).add(extra)
            deps = (Requirement(r) for r in importlib.metadata.requires(name) or [])
            todo += [d for d in deps if d.marker is None or d.marker.evaluate({"extra": extra})]
    return dists


@pytest.mark.parametrize("tier", sorted(STAGE_IMPORTS))
def test_each_tier_installs_what_its_stages_import(tier):
    """In a process where only the tier's distributions (and the base ones) can be imported."""
    allowed = _installs(PROJECT["dependencies"] + EXTRAS[tier]) | {PROJECT["name"]}
    blocked = [top for top, dists in importlib.metadata.packages_distributions().items()
               if not {canonicalize_name(d) for d in dists} & allowed]
    code = ("import importlib, sys\n"
            f"sys.modules.update(dict.fromkeys({blocked!r}))\n"
            f"for m in {STAGE_IMPORTS[tier]!r}: importlib.import_module(m)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the {tier!r} extra lacks a package:\n{done.stderr[-3000:]}"


def _uninstall(monkeypatch, name: str) -> None:
    """Make ``name`` unimportable, as if not installed, for this test only."""
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")] + [name]:
        monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize("module, extra, stage", [
    ("pyspark", "spark", lambda: session(SparkConfig())),
    ("tensorflow", "train", import_tensorflow),
    ("pythia8mc", "generate", lambda: next(pythia.events("ttbar", 1, 1, {}))),
])
def test_a_missing_tier_names_its_install_command(monkeypatch, module, extra, stage):
    _uninstall(monkeypatch, module)
    with pytest.raises(TopoflowError, match=rf"^{module}\b.* not installed.*: pip install 'topoflow\[{extra}\]'$"):
        stage()


def test_cli_reports_a_missing_tier_as_an_error(tmp_path):
    code = "import sys; sys.modules['tensorflow'] = None; from topoflow.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "train", "--data", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error: tensorflow is not installed"), done.stderr
    assert "pip install 'topoflow[train]'" in done.stderr and "Traceback" not in done.stderr


def test_cli_imports_no_heavy_package():
    code = "import json, sys, topoflow.cli; print(json.dumps([m.partition('.')[0] for m in sys.modules]))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout))
    assert not loaded & {"pyspark", "tensorflow", "keras", "kfp", "kubernetes", "numpy", "pyarrow", "uproot",
                         "matplotlib", "pythia8mc"}
