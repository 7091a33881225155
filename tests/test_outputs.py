"""Nothing of a user's is lost: a stage replaces only an earlier output of its own, never a folder
holding its inputs or the working directory, and checks that need no Spark (inputs exist, output
writable) fail before Spark starts. Ctrl-C stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SAMPLES
from topoflow.cli import main

SPARK_BANNER = "Setting default log level"  # what Spark prints when it starts


def _user_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "thesis.tex").write_text("\\chapter{Results}")
    (path / "sub" / "data.txt").write_text("1 2 3")
    return path


def _untouched(path: Path) -> bool:
    return (path / "thesis.tex").read_text() == "\\chapter{Results}" and (path / "sub" / "data.txt").exists()


def _ingest_args(delphes_dir: Path, output: Path | str) -> list[str]:
    return ["ingest", "--no-progress", "--master", "local[1]", "--output", str(output),
            *[f"--dataset={c}={delphes_dir / f}" for c, f in SAMPLES.items()]]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "topoflow.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.parametrize("stage", ["ingest", "prepare", "train", "evaluate", "generate"])
def test_a_folder_topoflow_did_not_write_is_refused(stage, delphes_dir, tmp_path, capsys):
    out = _user_folder(tmp_path / "thesis")
    args = {
        "ingest": _ingest_args(delphes_dir, out),
        "prepare": ["prepare", "--input", str(tmp_path), "--output", str(out)],
        "train": ["train", "--data", str(tmp_path), "--output", str(out)],
        "evaluate": ["evaluate", "--model", str(tmp_path / "m"), "--data", str(tmp_path), "--output", str(out)],
        "generate": ["generate", "--events", "ttbar=1", "--output", str(out)],
    }[stage]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"refusing to replace {str(out)!r}" in err and "--overwrite" in err and "another output folder" in err
    assert _untouched(out)


def test_overwrite_replaces_a_foreign_folder_but_never_one_holding_inputs_or_cwd(spark, delphes_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    out = _user_folder(tmp_path / "old")
    assert main(_ingest_args(delphes_dir, out) + ["--overwrite"]) == 0
    assert not (out / "thesis.tex").exists() and (out / "_manifest.json").exists()
    assert main(_ingest_args(delphes_dir, out)) == 0, "an earlier output of the same stage is replaced"
    assert main(["prepare", "--input", str(out), "--output", str(out), "--overwrite"]) == 2
    assert f"replacing it would delete the input {str(out)!r}" in capsys.readouterr().err
    work = _user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    assert main(_ingest_args(delphes_dir, ".") + ["--overwrite"]) == 2
    assert "would delete the working directory" in capsys.readouterr().err and _untouched(work)
    assert main(_ingest_args(delphes_dir, delphes_dir.parent) + ["--overwrite"]) == 2
    assert "would delete the input" in capsys.readouterr().err and (delphes_dir / SAMPLES["qcd"]).exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only filesystem (a tmpfs mounted ro, as root) or else a folder without write permission."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)]).returncode != 0:
            pytest.skip("root cannot mount a read-only tmpfs here")
        yield path
        subprocess.run(["umount", str(path)], check=True)
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


def test_unwritable_output_and_missing_inputs_fail_before_spark_starts(delphes_dir, read_only_dir, tmp_path):
    r = _cli(*_ingest_args(delphes_dir, read_only_dir / "ingested"))
    assert r.returncode == 2 and f"cannot write to {str(read_only_dir / 'ingested')!r}" in r.stderr
    assert "writable" in r.stderr and SPARK_BANNER not in r.stderr and "Traceback" not in r.stderr
    r = _cli("ingest", "--output", str(tmp_path / "o"), f"--dataset=qcd={delphes_dir}/qcd_typo_*.root")
    assert r.returncode == 2 and "no file matches" in r.stderr and "qcd_typo_" in r.stderr
    assert SPARK_BANNER not in r.stderr


def _live_processes(pgid: int) -> list[bytes]:
    """Command lines of the processes of group ``pgid`` that still run (zombies left out)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(group) == pgid and state != "Z":
            found.append(cmdline)
    return found


def test_ctrl_c_during_ingest_stops_cleanly_with_spark(delphes_dir, tmp_path):
    """Ctrl-C while Spark works: exit 130, one plain message (no py4j traceback), no output, and
    the JVM goes down with the command."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(40):  # enough files that the jobs outlast the signal
        for c, f in SAMPLES.items():
            (inputs / f"{c}_{i}.root").symlink_to(delphes_dir / f)
    proc = subprocess.Popen(
        [sys.executable, "-m", "topoflow.cli", "ingest", "--no-progress", "--master", "local[1]",
         "--output", str(tmp_path / "out"), *[f"--dataset={c}={inputs}/{c}_*.root" for c in SAMPLES]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    def spark_task_running():
        return any(b"pyspark" in c and b"daemon" in c for c in _live_processes(proc.pid))

    while not spark_task_running() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and "py4j" not in err
    assert not (tmp_path / "out").exists()
    deadline = time.monotonic() + 60
    while _live_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _live_processes(proc.pid), "the Spark JVM outlived the command"
