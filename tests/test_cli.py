"""The command line and the config model: help that teaches, YAML then --set then flags, clear
errors with exit code 2 and no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import SAMPLES
from topoflow.cli import main


def test_help_lists_stages_and_teaches_ingest(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "ingest" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["ingest", "--help"])
    text = capsys.readouterr().out
    for needle in ("--dataset", "--on-bad-file", "root://", "s3://", "examples:", "_manifest.json"):
        assert needle in text


def test_config_precedence_file_then_set_then_flags(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"spark": {"master": "local[1]"}, "ingest": {"output": "from-file", "batch_size": 5}}))
    assert main(["config", "--config", str(path), "--set", "ingest.batch_size=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["spark"]["master"] == "local[1]" and shown["ingest"]["batch_size"] == 7
    assert shown["ingest"]["output"] == "from-file"


def test_missing_config_file_and_bad_dataset_flag_exit_2(tmp_path, capsys):
    assert main(["config", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["ingest", "--dataset", "higgs=x.root"]) == 2
    assert "CLASS=URL" in capsys.readouterr().err


def test_ingest_without_datasets_says_how_to_give_them(capsys):
    assert main(["ingest"]) == 2
    err = capsys.readouterr().err
    assert "no input datasets" in err and "--dataset ttbar=" in err


@pytest.mark.spark
def test_cli_ingest_end_to_end(delphes_dir, tmp_path):
    """The installed console script, in a fresh process, as a user runs it."""
    out = tmp_path / "ingested"
    cmd = [sys.executable, "-m", "topoflow.cli", "ingest", "--no-progress", "--output", str(out),
           "--set", "spark.master=local[2]", *[f"--dataset={c}={delphes_dir / f}" for c, f in SAMPLES.items()]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wjets" in done.stdout and "46" in done.stdout and (out / "_manifest.json").exists()
    bad = subprocess.run(cmd[:-3] + [f"--dataset=ttbar={tmp_path / 'missing.root'}"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no file matches" in bad.stderr


def test_prepare_help_and_flags(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = capsys.readouterr().out
    assert "--from-original" in text and "preprocessing.json" in text and "examples:" in text
    assert main(["config", "--set", "prepare.seed=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["prepare"]["seed"] == 3


def test_prepare_on_missing_input_is_a_clear_error(tmp_path, capsys):
    assert main(["prepare", "--no-progress", "--input", str(tmp_path / "none"), "--output", str(tmp_path / "o"),
                 "--master", "local[1]"]) == 2
    err = capsys.readouterr().err
    assert "the input dataset does not exist" in err and str(tmp_path / "none") in err and "topoflow ingest" in err
    assert "SQLSTATE" not in err and "Traceback" not in err
