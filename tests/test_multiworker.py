"""The multiworker engine: two local workers compute what one process computes, a killed worker is restarted
from the checkpoint, Ctrl-C leaves no worker behind and --resume continues, a permanent failure is one clear
error. Small sizes: each group of workers starts TensorFlow anew (seconds)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import synthetic
from conftest import free_port, train_config
from topoflow.config import METRICS, StorageConfig
from topoflow.errors import TopoflowError

STATE = "state.json"  # topoflow.train.STATE (importing it here would load TensorFlow at collection)
pytestmark = [pytest.mark.spark, pytest.mark.slow]
SETTINGS = dict(epochs=3, batch_size=32, dropout=0.0)  # no dropout: replicas draw masks of their slices only


@pytest.fixture(scope="module")
def prepared(spark, tmp_path_factory):
    return synthetic.prepared(spark, tmp_path_factory.mktemp("multiworker"), 150)


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """One process, the keras engine: what any number of workers must compute."""
    from topoflow.train import train

    return train(train_config(prepared, tmp_path_factory.mktemp("keras"), "inclusive", **SETTINGS),
                 show_progress=False)


def test_replicas_slice_the_global_batches(prepared):
    from topoflow.dataset import iter_batches

    url, sc = str(prepared / "train"), StorageConfig()
    whole = [y for _, y in iter_batches(url, sc, 64, shuffle=True, seed=3)]
    parts = list(iter_batches(url, sc, 64, shuffle=True, seed=3, parts=3, keep=(0, 2)))
    middle = [y for _, y in iter_batches(url, sc, 64, shuffle=True, seed=3, parts=3, keep=(1,))]
    assert len(parts) == 2 * len(whole)
    for i, y in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([parts[2 * i][1], middle[i], parts[2 * i + 1][1]]), y)


def test_two_workers_compute_what_one_process_computes(prepared, reference, tmp_path, capsys):
    from topoflow.train import train

    cfg = train_config(prepared, tmp_path, "inclusive", engine="multiworker", workers=2, **SETTINGS)
    result = train(cfg, show_progress=False)
    assert result.epochs == 3 and result.samples_per_s > 0
    for name in METRICS:  # also says the optimizer sums the replicas' gradients, and metrics count every worker
        np.testing.assert_allclose(result.history[name], reference.history[name], rtol=1e-4, atol=1e-5, err_msg=name)
    lines = re.findall(r"^\S+Z epoch=(\d) .*val_auc=", capsys.readouterr().out, re.M)
    assert lines == ["1", "2", "3"], "the chief's metric lines, once each"
    card = json.loads((tmp_path / "models" / "inclusive" / "model_card.json").read_text())
    assert card["history"] == result.history

    with pytest.raises(TopoflowError, match=r"(?s)a checkpoint of 3 epochs exists.*--resume.*\(worker \d"):
        train(cfg, show_progress=False)  # permanent: no restart
    assert "restarting" not in capsys.readouterr().out


def test_a_killed_worker_restarts_from_the_checkpoint(prepared, reference, tmp_path, capsys):
    from topoflow.train import train

    cfg = train_config(prepared, tmp_path, "inclusive", engine="multiworker", workers=2, **SETTINGS)
    cfg.pipeline.train_restarts = 1
    killed = []
    state = tmp_path / "ckpt" / "inclusive" / STATE
    killer = threading.Thread(target=lambda: killed.append(_kill_after_first_epoch(state, os.getpid(), index=1)))
    killer.start()
    result = train(cfg, show_progress=False)
    killer.join()
    assert killed == [True]
    assert "worker 1 was killed by SIGKILL; restarting the 2 workers from the checkpoint" in capsys.readouterr().out
    assert result.epochs == 3 and (tmp_path / "models" / "inclusive" / "model_card.json").exists()
    for name in METRICS:  # a resumed run computes what an uninterrupted one does
        np.testing.assert_allclose(result.history[name], reference.history[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_ctrl_c_stops_every_worker_and_resume_continues(prepared, tmp_path, capsys):
    from topoflow.config import load_config
    from topoflow.train import train

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": {
        "data": str(prepared), "model": "hlf", "output": str(tmp_path / "model"), "epochs": 6, "batch_size": 16,
        "checkpoint_dir": str(tmp_path / "ckpt" / "{model}"), "engine": "multiworker", "workers": 2}}))
    command = [sys.executable, "-m", "topoflow.cli", "train", "--config", str(config), "--no-progress"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_epoch(tmp_path / "ckpt" / "hlf" / STATE, 1, launcher)
        workers = _children(launcher.pid)
        assert len(workers) == 2
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert launcher.returncode == 2 and re.search(r"training interrupted; \d epochs? checkpointed", err), err
    assert not [pid for pid in workers if _alive(pid)], "no worker outlives its launcher"

    resumed = train(load_config(config), resume=True, show_progress=False)
    assert resumed.epochs == 6 and json.loads((tmp_path / "model" / "model_card.json").read_text())["history"]
    out = capsys.readouterr().out
    assert "epoch=6 " in out and "epoch=1 " not in out, "continues after the checkpointed epochs"


def test_a_worker_whose_peer_died_exits_to_be_restarted(prepared, tmp_path):
    """In a TFJob only the dead pod goes: the other workers must end by themselves, with the code its ExitCode
    policy retries. Two workers as a TFJob runs them (``topoflow train`` with ``TF_CONFIG``); one is SIGKILLed."""
    from topoflow.engines.multiworker import PEER_LOST

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": {
        "data": str(prepared), "model": "hlf", "output": str(tmp_path / "model"), "epochs": 1000, "batch_size": 16,
        "checkpoint_dir": str(tmp_path / "ckpt" / "{model}"), "engine": "multiworker", "workers": 2, "threads": 1}}))
    hosts = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    command = [sys.executable, "-m", "topoflow.cli", "train", "--config", str(config), "--no-progress"]
    workers = []
    for i in range(2):
        with open(tmp_path / f"worker-{i}.log", "wb") as log:
            workers.append(subprocess.Popen(command, stdout=log, stderr=log, env=dict(os.environ, TF_CONFIG=json.dumps(
                {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}))))
    try:
        _wait_for_epoch(tmp_path / "ckpt" / "hlf" / STATE, 1, workers[0])
        workers[1].kill()
        workers[0].wait(timeout=120)
    finally:
        for w in workers:
            w.kill()
            w.wait()
    assert workers[0].returncode == PEER_LOST, (tmp_path / "worker-0.log").read_text(errors="replace")[-3000:]


def _wait_for_epoch(state: Path, epoch: int, launcher: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (state.exists() and json.loads(state.read_text())["epoch"] >= epoch):
        assert time.monotonic() < deadline and (launcher is None or launcher.poll() is None), "no checkpoint came"
        time.sleep(0.05)


def _kill_after_first_epoch(state: Path, launcher: int, index: int) -> bool:
    _wait_for_epoch(state, 1)
    for pid in _children(launcher):
        if f'"index": {index}' in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace"):
            os.kill(pid, signal.SIGKILL)
            return True
    return False


def _children(parent: int) -> list[int]:
    """The worker processes ``parent`` started."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"topoflow.engines.multiworker" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("ignores_term", [False, True])
def test_a_worker_group_is_ended_whole(ignores_term):
    """``end_group``, which both launchers use: the worker and what it started end, with a grace period for
    SIGTERM and SIGKILL after it (a worker that ignores SIGTERM, as a busy JVM may, is killed)."""
    from topoflow.engines import end_group

    trap = "trap '' TERM; " if ignores_term else ""
    proc = subprocess.Popen(["sh", "-c", f"{trap}sleep 60 & {trap}sleep 60 & wait"], start_new_session=True)
    time.sleep(0.3)
    start = time.monotonic()
    assert end_group(proc, grace=1.0)
    took = time.monotonic() - start
    assert proc.returncode is not None
    assert (took >= 1.0) if ignores_term else (took < 1.0)
    deadline = time.monotonic() + 5
    while _living(proc.pid) and time.monotonic() < deadline:  # signals reach the children asynchronously
        time.sleep(0.05)
    assert not _living(proc.pid), "nothing of the group is left running"


def _living(group: int) -> list[int]:
    """Processes of a process group that are not zombies (an orphan's zombie waits for init to reap it)."""
    living = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[2]) == group and fields[0] not in "ZX":
            living.append(int(stat.parent.name))
    return living
