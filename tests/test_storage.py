"""Ingestion from and to real storage servers on 127.0.0.1: XRootD (as EOS serves files) and S3
(SeaweedFS). The output must be identical to the local read; broken endpoints fail fast and clearly."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest

from conftest import SAMPLES, free_port, ingest_config
from test_ingest import read_dataset
from topoflow import storage
from topoflow.config import StorageConfig
from topoflow.errors import StorageError
from topoflow.ingest import ingest

pytestmark = [pytest.mark.integration, pytest.mark.spark]


@pytest.fixture(scope="module")
def local_rows(spark, delphes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "ingested"
    ingest(ingest_config({c: [str(delphes_dir / f)] for c, f in SAMPLES.items()}, str(out)), spark,
           show_progress=False)
    return _comparable(read_dataset(out))


def _comparable(rows: dict) -> dict:
    return {(name, entry): (r["label"], r["hlf"], r["particles"]) for (name, entry), r in rows.items()}


def _read_s3_dataset(url: str, cfg: StorageConfig) -> dict:
    fs, path = storage.filesystem(url, cfg)
    manifest = json.loads(fs.cat(f"{path}/_manifest.json"))
    rows = {}
    for part in manifest["files"]:
        with fs.open(f"{path}/{part['name']}") as f:
            for r in pq.read_table(f).to_pylist():
                rows[(r["source_file"].rsplit("/", 1)[-1], r["entry"])] = r
    return rows


def test_xrootd_input_gives_identical_output(spark, xrootd_server, local_rows, tmp_path):
    prefix, _ = xrootd_server
    datasets = {c: [f"{prefix}/{c}_*.root"] for c in SAMPLES}  # globs over XRootD
    out = tmp_path / "from-xrootd"
    summary = ingest(ingest_config(datasets, str(out)), spark, show_progress=False)
    rows = read_dataset(out)
    assert _comparable(rows) == local_rows
    assert all(r["source_file"].startswith("root://127.0.0.1:") for r in rows.values())
    assert summary.events_read == {"qcd": 60, "ttbar": 60, "wjets": 60}


def test_xrootd_output_is_published(spark, xrootd_server, delphes_dir, local_rows):
    prefix, data = xrootd_server
    out = f"{prefix}/ingested-ttbar"
    ingest(ingest_config({"ttbar": [str(delphes_dir / SAMPLES["ttbar"])]}, out), spark, show_progress=False)
    rows = read_dataset(data / "ingested-ttbar")
    assert _comparable(rows) == {k: v for k, v in local_rows.items() if k[0] == SAMPLES["ttbar"]}
    assert not list(data.glob("ingested-ttbar.staging-*"))


def test_s3_input_and_output_give_identical_output(spark, s3_server, local_rows):
    cfg = ingest_config({c: [f"s3://delphes/{c}_*.root"] for c in SAMPLES}, "s3://out/ingested")
    cfg.storage = s3_server
    ingest(cfg, spark, show_progress=False)
    rows = _read_s3_dataset("s3://out/ingested", s3_server)
    assert _comparable(rows) == local_rows
    fs, _ = storage.filesystem("s3://out", s3_server)
    assert not fs.glob("out/ingested.staging-*")


def test_s3_credentials_from_aws_environment(spark, s3_server, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.s3_access_key_id.get_secret_value())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.s3_secret_access_key.get_secret_value())
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.s3_endpoint_url)
    urls = storage.expand("s3://delphes/*.root", StorageConfig())
    assert sorted(u.rsplit("/", 1)[-1] for u in urls) == sorted(SAMPLES.values())


def test_wrong_s3_credentials_are_a_clear_error(s3_server):
    bad = s3_server.model_copy()
    bad.s3_secret_access_key = "wrong-secret"
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        storage.expand("s3://delphes/*.root", bad)
    assert "S3 credentials" in str(e.value) and "s3://delphes/*.root" in str(e.value)
    assert "wrong-secret" not in str(e.value)
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("url", ["root://127.0.0.1:{port}//data/x.root", "s3://bucket/x.root"])
def test_unreachable_endpoint_fails_fast(url):
    port = free_port()  # nothing listens there
    cfg = StorageConfig(s3_endpoint_url=f"http://127.0.0.1:{port}", timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach the .* at 127.0.0.1:{port}"):
        storage.expand(url.format(port=port), cfg)
    assert time.monotonic() - t0 < 10


def test_missing_remote_file_names_the_url(s3_server):
    with pytest.raises(StorageError, match="no file matches 's3://delphes/nope-\\*.root'"):
        storage.expand("s3://delphes/nope-*.root", s3_server)


def test_secrets_stay_out_of_spark_options_json(s3_server):
    from topoflow.datasource import storage_options

    opts = storage_options(s3_server)
    assert s3_server.s3_secret_access_key.get_secret_value() not in opts["storage"]
    assert set(opts) == {"storage", "s3.access.key", "s3.secret"}  # keys Spark's redaction masks


def test_prepare_and_stream_on_s3(spark, s3_server, tmp_path):
    """prepare reads and writes s3:// through fsspec, and training streams from there."""
    import synthetic
    from topoflow import dataset
    from topoflow.config import Config
    from topoflow.prepare import prepare

    local = synthetic.write_dataset(synthetic.ingested_table({"qcd": 60, "ttbar": 80, "wjets": 90}), tmp_path / "in")
    fs, _ = storage.filesystem("s3://out", s3_server)
    fs.put(str(local), "out/synthetic-ingested", recursive=True)
    cfg = Config(storage=s3_server)
    cfg.prepare.input, cfg.prepare.output = "s3://out/synthetic-ingested", "s3://out/prepared"
    summary = prepare(cfg, spark, show_progress=False)
    assert fs.exists("out/prepared/preprocessing.json") and fs.exists("out/prepared/train/_manifest.json")
    batches = list(dataset.iter_batches("s3://out/prepared/train", s3_server, 16))
    assert sum(len(y) for _, y in batches) == sum(summary.counts["train"].values()) > 0


def test_s3_endpoint_without_credentials_is_a_clear_error(s3_server, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    with pytest.raises(StorageError, match="no S3 credentials for URL s3://delphes/\\*.root\nset storage.s3_access_key_id"):
        storage.expand("s3://delphes/*.root", StorageConfig(s3_endpoint_url=s3_server.s3_endpoint_url, timeout_s=5))


def test_an_endpoint_that_is_not_s3_is_named_as_such():
    """An HTTP server that is no S3 service lists nothing: without a check this reads "no file matches"."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(StorageError, match=f"the endpoint {endpoint} answers HTTP but is not an S3 service"):
            storage.expand("s3://delphes/*.root", StorageConfig(s3_endpoint_url=endpoint, s3_access_key_id="k",
                                                                  s3_secret_access_key="s", timeout_s=5))
    finally:
        server.shutdown()
        server.server_close()
