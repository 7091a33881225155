"""topoflow serve: the real server (the CLI, in a subprocess) on 127.0.0.1, called with real clients,
httpx for KServe V1 and V2 REST and grpcio with KServe's V2 stubs, on the real Delphes samples.

Its answers are evaluate's (Keras on the features ingestion computes) for raw events and feature
tensors alike, and the saved_model backend's too; every kind of bad request is a 4xx naming what is
wrong and leaves the server ready; 32 concurrent clients for 10 s get no error and their requests
are batched together; the server is not ready until its model has loaded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from topoflow.serve import inputs  # first: importing topoflow.serve keeps KServe off pytest's arguments
from conftest import REPO, SAMPLES, free_port
from kserve import InferInput, InferRequest
from kserve.errors import InvalidInput
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as rpc
from topoflow import CLASSES, delphes, events, export, features
from topoflow.config import Config, ServeConfig
from topoflow.preprocessing import MAX_PARTICLES, Preprocessing, pad
from topoflow.serve.batcher import Batcher

pytestmark = pytest.mark.integration

MAX_EVENTS, MAX_BYTES = 200, 4 * 2**20  # the test servers' limits (the samples: 180 events, ≈ 2.5 MB as JSON)
LOAD_SECONDS, CLIENTS = 10, 32

# The CLI; with TEST_LOAD_GATE set, the model's loading waits until that file exists; the modules
# in TEST_UNINSTALLED cannot be imported.
LAUNCH = """
import os, pathlib, sys, time
sys.modules.update(dict.fromkeys(os.environ.get("TEST_UNINSTALLED", "").split()))
gate = os.environ.get("TEST_LOAD_GATE")
if gate:
    import topoflow.export as export
    load = export.load
    def gated(*args, **kwargs):
        while not pathlib.Path(gate).exists():
            time.sleep(0.05)
        return load(*args, **kwargs)
    export.load = gated
from topoflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Reference:
    """The samples' events as a client sends them, and what evaluate computes for them."""

    json: list[dict]  # every event (the three samples back to back)
    selected: np.ndarray  # indices of the events ingestion selects
    hlf: np.ndarray  # their features
    particles: np.ndarray
    counts: np.ndarray
    probs: np.ndarray  # Keras on those features, as topoflow evaluate runs it

    def rows(self, i: int) -> np.ndarray:
        start = self.counts[:i].sum()
        return self.particles[start:start + self.counts[i]]


@pytest.fixture(scope="module")
def samples(delphes_dir) -> tuple[list[dict], features.Features]:
    """Every event of the real samples as a client sends it (JSON), and the features ingestion computes."""
    cfg = Config()
    jsons, computed = [], []
    for file in SAMPLES.values():
        info = delphes.probe(str(delphes_dir / file), cfg.storage)
        ((_, arrays),) = delphes.read_batches(info, cfg.storage, 0, info.entries, info.entries)
        computed.append(features.compute(arrays))
        computed[-1].events += len(jsons)
        jsons += events.from_arrays(arrays)
    return jsons, features.Features(*(np.concatenate([getattr(f, k) for f in computed])
                                      for k in ("events", "hlf", "particles", "counts")))


@pytest.fixture(scope="module")
def model_dir(samples, tmp_path_factory):
    """An untrained inclusive model whose preprocessing is fitted on the samples, so that its
    probabilities are far from 0 and 1 and equal numbers mean something."""
    from topoflow.export import export as write
    from topoflow.models import build

    f = samples[1]
    cfg = Config()
    cfg.train.model = "inclusive"
    folder = tmp_path_factory.mktemp("serve") / "model"
    pre = Preprocessing(f.hlf.min(axis=0), f.hlf.max(axis=0), f.particles.mean(axis=0), f.particles.std(axis=0),
                        {"events": len(f.hlf)})
    write(build(cfg.train), str(folder), cfg.storage, pre, cfg, {"loss": [1.0]})
    return folder


@pytest.fixture(scope="module")
def ref(samples, model_dir) -> Reference:
    jsons, f = samples
    probs = export.load(str(model_dir), Config().storage).predict(f.hlf, f.particles, f.counts)  # Keras, as evaluate
    assert 0.05 < probs.min() and probs.max() < 0.95, "saturated probabilities would hide differences"
    return Reference(jsons, f.events, f.hlf, f.particles, f.counts, probs)


def ports() -> tuple[int, int]:
    """Two free ports (two calls of free_port can give the same one)."""
    http = free_port()
    while (grpc_port := free_port()) == http:
        pass
    return http, grpc_port


class Server:
    """``topoflow serve`` in a subprocess on free ports of 127.0.0.1, with clients for it."""

    def __init__(self, model: Path, log: Path, *args: str, gate: Path | None = None):
        (self.http_port, self.grpc_port), self.log, self.gate = ports(), log, gate
        env = os.environ | ({"TEST_LOAD_GATE": str(gate)} if gate else {})
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCH, "serve", "--model", str(model), "--http-port", str(self.http_port),
                 "--grpc-port", str(self.grpc_port), "--set", f"serve.max_events_per_request={MAX_EVENTS}",
                 "--set", f"serve.max_request_bytes={MAX_BYTES}", *args],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=60)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.grpc = rpc.GRPCInferenceServiceStub(self.channel)

    def get(self, path: str) -> httpx.Response | None:
        """``None`` while nothing listens."""
        try:
            return self.http.get(path)
        except httpx.TransportError:
            return None

    def wait(self, path: str = "/v2/health/ready", seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while (r := self.get(path)) is None or r.status_code != 200:
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.output()}"
            assert time.monotonic() < deadline, f"{path} not 200 after {seconds} s:\n{self.output()}"
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text()[-5000:]

    def stop(self) -> int | None:
        self.http.close()
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "serve.log")
    try:
        s.wait()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def gated(model_dir, tmp_path_factory):
    """A saved_model server whose model loads only once the test creates ``gate``."""
    base = tmp_path_factory.mktemp("gated")
    s = Server(model_dir, base / "serve.log", "--backend", "saved_model", gate=base / "gate")
    yield s
    s.stop()


# Requests, as clients build them.

def v1(ref: Reference, idx) -> dict:
    return {"instances": [ref.json[i] for i in idx]}


def v2_events(ref: Reference, idx, per_element: bool = True) -> dict:
    data = [json.dumps(ref.json[i]) for i in idx] if per_element else [json.dumps([ref.json[i] for i in idx])]
    return {"inputs": [{"name": "events", "datatype": "BYTES", "shape": [len(data)], "data": data}]}


def tensors(ref: Reference, sel, lengths: bool = True, extra_rows: int = 0):
    """hlf, particles padded at the end, and lengths of the selected events ``sel`` (indices into ref.selected)."""
    rows = [ref.rows(i) for i in sel]
    counts = np.array([len(r) for r in rows])
    padded = pad(np.concatenate(rows), counts)
    padded = np.concatenate([padded, np.zeros((len(sel), extra_rows, padded.shape[2]), np.float32)], axis=1)
    out = {"hlf": ref.hlf[sel].astype(np.float32), "particles": padded}
    return out | ({"lengths": counts.astype(np.int64)} if lengths else {})


DATATYPES = {"float32": "FP32", "float64": "FP64", "int32": "INT32", "int64": "INT64"}


def v2_tensors(arrays: dict[str, np.ndarray]) -> dict:
    return {"inputs": [{"name": k, "datatype": DATATYPES[str(a.dtype)], "shape": list(a.shape),
                        "data": a.ravel().tolist()} for k, a in arrays.items()]}


def grpc_request(arrays: dict[str, np.ndarray] | None = None, texts: list[str] | None = None) -> pb.ModelInferRequest:
    if texts is not None:
        return pb.ModelInferRequest(model_name="topoflow", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="events", datatype="BYTES", shape=[len(texts)],
            contents=pb.InferTensorContents(bytes_contents=[t.encode() for t in texts]))])
    return pb.ModelInferRequest(
        model_name="topoflow",
        inputs=[pb.ModelInferRequest.InferInputTensor(name=k, datatype=DATATYPES[str(a.dtype)], shape=list(a.shape))
                for k, a in arrays.items()],
        raw_input_contents=[np.ascontiguousarray(a).tobytes() for a in arrays.values()])


def v2_outputs(body: dict) -> dict[str, np.ndarray]:
    out = {}
    for o in body["outputs"]:
        data = [np.nan if v is None else v for v in o["data"]]
        out[o["name"]] = np.array(data, dtype=object if o["datatype"] == "BYTES" else None).reshape(o["shape"])
        if o["name"] == "probabilities":
            assert o["parameters"]["classes"] == ",".join(CLASSES)
    return out


def grpc_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    out = {}
    for o, raw in zip(response.outputs, response.raw_output_contents):
        if o.datatype == "BYTES":  # each element: 4-byte little-endian length, then the bytes
            items, at = [], 0
            while at < len(raw):
                size = int.from_bytes(raw[at:at + 4], "little")
                items.append(raw[at + 4:at + 4 + size].decode())
                at += 4 + size
            out[o.name] = np.array(items, dtype=object)
        else:
            out[o.name] = np.frombuffer(raw, {"FP32": np.float32, "BOOL": bool}[o.datatype]).reshape(o.shape)
    return out


def v1_outputs(body: dict) -> dict[str, np.ndarray]:
    preds = body["predictions"]
    return {"selected": np.array([p["selected"] for p in preds]),
            "probabilities": np.array([[p["probabilities"][c] for c in CLASSES] if p["selected"] else [np.nan] * 3
                                       for p in preds], dtype=float),
            "predicted": np.array([p["predicted"] or "" for p in preds], dtype=object)}


def check_raw(out: dict[str, np.ndarray], ref: Reference, idx) -> None:
    """The answer for raw events ``idx``: selected as ingestion selects, evaluate's probabilities, NaN and
    no class for the others."""
    idx = np.asarray(idx)
    chosen = np.isin(idx, ref.selected)
    np.testing.assert_array_equal(out["selected"], chosen)
    expected = np.full((len(idx), 3), np.nan)
    expected[chosen] = ref.probs[np.searchsorted(ref.selected, idx[chosen])]
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
    np.testing.assert_array_equal(out["predicted"],
                                  [CLASSES[p.argmax()] if c else "" for p, c in zip(expected, chosen)])


def check_tensors(out: dict[str, np.ndarray], ref: Reference, sel) -> None:
    np.testing.assert_allclose(out["probabilities"], ref.probs[sel], atol=1e-5)
    np.testing.assert_array_equal(out["predicted"], [CLASSES[i] for i in ref.probs[sel].argmax(axis=1)])
    assert "selected" not in out


def test_raw_events_get_evaluates_answers_over_v1_v2_and_grpc(server, ref):
    """All 180 events of the real samples, sent as JSON: every protocol selects the events ingestion
    selects and gives them evaluate's probabilities."""
    every = np.arange(len(ref.json))
    r = server.http.post("/v1/models/topoflow:predict", json=v1(ref, every))
    assert r.status_code == 200, r.text
    check_raw(v1_outputs(r.json()), ref, every)
    for per_element in (True, False):
        r = server.http.post("/v2/models/topoflow/infer", json=v2_events(ref, every, per_element))
        assert r.status_code == 200, r.text
        check_raw(v2_outputs(r.json()), ref, every)
    texts = [json.dumps(e) for e in ref.json]
    check_raw(grpc_outputs(server.grpc.ModelInfer(grpc_request(texts=texts))), ref, every)
    assert server.http.post("/v1/models/topoflow:predict", json={"instances": []}).json() == {"predictions": []}


def test_feature_tensors_get_evaluates_answers_over_v2_rest_and_grpc(server, ref):
    """The selected events' features, padded at the end: with lengths, without (the padding found),
    with more padding than needed, as JSON and as gRPC raw bytes."""
    sel = np.arange(len(ref.selected))
    for arrays in (tensors(ref, sel), tensors(ref, sel, lengths=False), tensors(ref, sel, extra_rows=7)):
        r = server.http.post("/v2/models/topoflow/infer", json=v2_tensors(arrays))
        assert r.status_code == 200, r.text
        check_tensors(v2_outputs(r.json()), ref, sel)
    arrays = tensors(ref, sel)
    arrays["lengths"] = arrays["lengths"].astype(np.int32)
    check_tensors(grpc_outputs(server.grpc.ModelInfer(grpc_request(arrays))), ref, sel)
    metadata = server.http.get("/v2/models/topoflow").json()
    assert [i["name"] for i in metadata["inputs"]] == ["events", "hlf", "particles", "lengths"]


def _without(event: dict, collection: str, field: str | None = None) -> dict:
    event = json.loads(json.dumps(event))
    if field:
        del event[collection][field]
    else:
        del event[collection]
    return event


def _bad(ref: Reference, case: str):
    """(path, request keyword arguments, status, what the message must say) for one kind of bad request."""
    good = tensors(ref, [0, 1])
    infer, predict = "/v2/models/topoflow/infer", "/v1/models/topoflow:predict"
    json_body = {"headers": {"content-type": "application/json"}}
    return {
        "v1-not-json": (predict, {"content": b'{"instances": [', **json_body}, 400, r"Unrecognized request format"),
        "v1-not-an-object": (predict, {"content": b"plain text", "headers": {"content-type": "text/plain"}}, 400,
                             r"expected a JSON object \{\"instances\""),
        "v1-tensors": (predict, {"json": {"inputs": []}}, 400, r'missing "instances"'),
        "v2-not-json": (infer, {"content": b'{"inputs": [', **json_body}, 422, r"JSON decode error"),
        "missing-collection": (predict, {"json": {"instances": [ref.json[0], _without(ref.json[1], "Jet")]}}, 400,
                               r"instances\[1\]: missing collection 'Jet'"),
        "missing-field": (predict, {"json": {"instances": [_without(ref.json[0], "Jet", "PT")]}}, 400,
                          r"instances\[0\]\.Jet\.PT: missing field"),
        "wrong-type": (predict, {"json": {"instances": [ref.json[0] | {"MissingET": {"MET": ["a"], "Phi": [0.0]}}]}},
                       400, r"instances\[0\]\.MissingET\.MET\[0\]: expected a number, got a string"),
        "v2-event-wrong-type": (infer, {"json": {"inputs": [{
            "name": "events", "datatype": "BYTES", "shape": [2],
            "data": [json.dumps(ref.json[0]), json.dumps(ref.json[1] | {"Electron": 3})]}]}}, 400,
            r"events\[1\]\.Electron: expected a list of objects or an object of lists, got int"),
        "events-not-json": (infer, {"json": {"inputs": [{"name": "events", "datatype": "BYTES", "shape": [1],
                                                         "data": ["{not json"]}]}}, 400,
                            r"input 'events', element 0: not JSON"),
        "wrong-shape": (infer, {"json": v2_tensors(good | {"hlf": good["hlf"][:, :13]})}, 400,
                        r"input 'hlf': shape \[2, 13\], expected \[n, 14\]"),
        "wrong-dtype": (infer, {"json": v2_tensors(good | {"hlf": good["hlf"].astype(np.float64)})}, 400,
                        r"input 'hlf': datatype FP64, expected FP32"),
        "data-not-shape": (infer, {"json": v2_tensors(good) | {"inputs": [
            {"name": "hlf", "datatype": "FP32", "shape": [2, 14], "data": [1.0] * 27},
            v2_tensors(good)["inputs"][1]]}}, 400,
            r"input 'hlf': the data do not make a FP32 tensor of shape \[2, 14\]"),
        "nan": (infer, {"content": json.dumps(v2_tensors(good | {"hlf": np.where(  # NaN is no JSON: refused unread
            np.eye(2, 14, 3) > 0, np.nan, good["hlf"]).astype(np.float32)})).encode(), **json_body}, 422,
                r"JSON decode error"),
        "too-many-rows": (infer, {"json": v2_tensors(tensors(ref, [0], extra_rows=MAX_PARTICLES))}, 400,
                          r"input 'particles': \d+ rows per event, at most 801"),
        "lengths-out-of-range": (infer, {"json": v2_tensors(good | {"lengths": good["lengths"] + 1000})}, 400,
                                 r"input 'lengths': \d+ at \[0\], expected 0 to \d+"),
        "n-disagrees": (infer, {"json": v2_tensors(good | {"hlf": good["hlf"][:1]})}, 400,
                        r"the inputs disagree on the number of events n: \{'hlf': 1, 'particles': 2"),
        "unknown-input": (infer, {"json": v2_tensors(good | {"jets": good["hlf"]})}, 400,
                          r"unknown input 'jets': this model takes 'events'"),
        "missing-input": (infer, {"json": v2_tensors({"hlf": good["hlf"]})}, 400, r"missing input 'particles'"),
        "too-many-events": (infer, {"json": v2_tensors({"hlf": np.zeros((MAX_EVENTS + 1, 14), np.float32),
                                                        "particles": np.zeros((MAX_EVENTS + 1, 1, 19), np.float32)})},
                            400, rf"input 'hlf': {MAX_EVENTS + 1} events, more than serve.max_events_per_request"),
        "too-large": (predict, {"content": b" " * (MAX_BYTES + 1), **json_body}, 413,
                      rf"over serve.max_request_bytes={MAX_BYTES}"),
        "too-large-chunked": (predict, {"content": iter([b" " * 2**20] * 5), **json_body}, 413,
                              rf"over serve.max_request_bytes={MAX_BYTES}"),
    }[case]


@pytest.mark.parametrize("case", [
    "v1-not-json", "v1-not-an-object", "v1-tensors", "v2-not-json", "missing-collection", "missing-field", "wrong-type",
    "v2-event-wrong-type", "events-not-json", "wrong-shape", "wrong-dtype", "data-not-shape", "nan", "too-many-rows",
    "lengths-out-of-range", "n-disagrees", "unknown-input", "missing-input", "too-many-events", "too-large",
    "too-large-chunked"])
def test_a_bad_request_is_a_4xx_naming_the_problem_and_the_server_stays_ready(server, ref, case):
    path, request, status, message = _bad(ref, case)
    r = server.http.post(path, **request)
    assert r.status_code == status and re.search(message, str(r.json())), (r.status_code, r.text)
    assert server.get("/v2/health/ready").status_code == 200
    r = server.http.post("/v1/models/topoflow:predict", json=v1(ref, [2]))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("case, code, message", [
    ("wrong-dtype", grpc.StatusCode.INVALID_ARGUMENT, r"input 'hlf': datatype FP64, expected FP32"),
    ("missing-field", grpc.StatusCode.INVALID_ARGUMENT, r"events\[0\]\.Jet\.PT: missing field"),
    ("too-large", grpc.StatusCode.RESOURCE_EXHAUSTED, r"larger than max"),
    ("nan", grpc.StatusCode.INVALID_ARGUMENT, r"input 'hlf': not a finite number at \[0, 3\]"),
])
def test_a_bad_grpc_request_gets_its_status_and_the_server_stays_ready(server, ref, case, code, message):
    good = tensors(ref, [0, 1])
    request = {"wrong-dtype": lambda: grpc_request(good | {"hlf": good["hlf"].astype(np.float64)}),
               "missing-field": lambda: grpc_request(texts=[json.dumps(_without(ref.json[0], "Jet", "PT"))]),
               "too-large": lambda: grpc_request({"hlf": np.zeros((MAX_BYTES // 56 + 1, 14), np.float32)}),
               "nan": lambda: grpc_request(good | {"hlf": np.where(np.eye(2, 14, 3) > 0, np.nan, good["hlf"])
                                                   .astype(np.float32)})}[case]()
    with pytest.raises(grpc.RpcError) as e:
        server.grpc.ModelInfer(request)
    assert e.value.code() == code and re.search(message, e.value.details()), (e.value.code(), e.value.details())
    assert server.grpc.ServerReady(pb.ServerReadyRequest()).ready
    check_tensors(grpc_outputs(server.grpc.ModelInfer(grpc_request(good))), ref, [0, 1])


def test_it_listens_on_loopback_only_by_default(server):
    """KServe alone binds 0.0.0.0 and [::]; topoflow serve binds serve.host, 127.0.0.1 by default."""
    assert ServeConfig().host == "127.0.0.1"
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) in (server.http_port, server.grpc_port):  # 0A: LISTEN
                listening.append((address, int(port, 16)))
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, as IPv4 and as IPv4-mapped IPv6
    assert {a for a, _ in listening} <= loopback, listening
    assert {p for _, p in listening} == {server.http_port, server.grpc_port}, listening


def test_it_is_not_ready_until_its_model_has_loaded(gated, ref):
    """Listening, live, but not ready while the model loads: REST 503, gRPC not ready and UNAVAILABLE;
    then ready once it has loaded and warmed up."""
    gated.wait("/v2/health/live")
    assert gated.get("/v2/health/ready").status_code == 503
    assert gated.get("/v2/models/topoflow/ready").status_code == 503
    assert gated.http.post("/v1/models/topoflow:predict", json=v1(ref, [0])).status_code == 503
    assert not gated.grpc.ServerReady(pb.ServerReadyRequest()).ready
    with pytest.raises(grpc.RpcError) as e:
        gated.grpc.ModelInfer(grpc_request(tensors(ref, [0])))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    gated.gate.touch()
    gated.wait()
    assert gated.grpc.ServerReady(pb.ServerReadyRequest()).ready


def test_the_saved_model_backend_gives_the_same_answers(gated, ref):
    gated.gate.touch()
    gated.wait()
    every = np.arange(len(ref.json))
    r = gated.http.post("/v1/models/topoflow:predict", json=v1(ref, every))
    assert r.status_code == 200, r.text
    check_raw(v1_outputs(r.json()), ref, every)
    sel = np.arange(len(ref.selected))
    check_tensors(grpc_outputs(gated.grpc.ModelInfer(grpc_request(tensors(ref, sel)))), ref, sel)
    assert gated.stop() == 0, f"SIGTERM did not stop the server cleanly:\n{gated.output()}"


def _batching(server: Server) -> tuple[float, float]:
    """(batches, requests batched) so far, from the server's Prometheus metrics."""
    text = server.get("/metrics").text
    return tuple(float(re.search(rf"^topoflow_batch_requests_{k} (\S+)$", text, re.M).group(1))
                 for k in ("count", "sum"))


def test_32_clients_for_10_s_get_no_error_and_are_batched_together(server, ref):
    """Each client thread sends its own mix (raw events over V1, tensors over V2 REST or gRPC, 1-4
    events) and checks every answer: batching must give each request its own events' answers."""
    errors, latencies, stop = [], [], time.monotonic() + LOAD_SECONDS
    before = _batching(server)

    def client(k: int) -> None:
        rng = np.random.default_rng(k)
        http = httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30)
        try:
            while time.monotonic() < stop:
                size = int(rng.integers(1, 5))
                start = time.perf_counter()
                if k % 3 == 0:
                    idx = rng.choice(len(ref.json), size, replace=False)
                    r = http.post("/v1/models/topoflow:predict", json=v1(ref, idx))
                    r.raise_for_status()
                    check_raw(v1_outputs(r.json()), ref, idx)
                else:
                    sel = rng.choice(len(ref.selected), size, replace=False)
                    if k % 3 == 1:
                        r = http.post("/v2/models/topoflow/infer", json=v2_tensors(tensors(ref, sel)))
                        r.raise_for_status()
                        out = v2_outputs(r.json())
                    else:
                        out = grpc_outputs(server.grpc.ModelInfer(grpc_request(tensors(ref, sel))))
                    check_tensors(out, ref, sel)
                latencies.append(time.perf_counter() - start)
        except Exception as e:  # any failure counts; the first ones are shown
            errors.append(f"client {k}: {type(e).__name__}: {e}")
        finally:
            http.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batches, requests = (after - b for after, b in zip(_batching(server), before))
    print(f"\n{len(latencies)} requests in {LOAD_SECONDS} s by {CLIENTS} clients "
          f"({len(latencies) / LOAD_SECONDS:.0f}/s), "
          f"latency p50 {1e3 * np.median(latencies):.1f} ms, p99 {1e3 * np.quantile(latencies, 0.99):.1f} ms; "
          f"{requests:.0f} requests in {batches:.0f} batches")
    assert not errors, errors[:5]
    assert requests == len(latencies) and batches < requests / 2, (batches, requests)


@pytest.mark.parametrize("case", ["no-model", "no-tensorflow"])
def test_a_model_that_cannot_load_stops_the_server_with_one_error(model_dir, tmp_path, case):
    """The servers listen while the model loads; when it cannot, they stop and the error is the
    CLI's one line (exit 2), naming the folder, or the extra that brings the saved_model backend."""
    model, uninstalled, error = {
        "no-model": (tmp_path / "nothing", "", rf"^error: no model.keras: .*\nin file {tmp_path / 'nothing'}\n"),
        "no-tensorflow": (model_dir, "tensorflow",
                          r"^error: tensorflow is not installed.*pip install 'topoflow\[train\]'"),
    }[case]
    http, grpc_port = ports()
    done = subprocess.run([sys.executable, "-c", LAUNCH, "serve", "--model", str(model), "--backend", "saved_model",
                           "--http-port", str(http), "--grpc-port", str(grpc_port)],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=os.environ | {"TEST_UNINSTALLED": uninstalled})
    assert done.returncode == 2 and re.search(error, done.stderr) and "Traceback" not in done.stderr, done.stderr


def test_the_batcher_waits_for_requests_on_their_way_and_isolates_a_failure():
    """Requests still being checked (``coming``) join the batch; a lone client's request does not wait;
    a batch that raises runs again one request at a time, so that only the request that raises gets
    the error."""
    calls = []

    def run(items: list[int]) -> list[int]:
        calls.append(list(items))
        if 13 in items:
            raise ValueError("thirteen")
        return [i * i for i in items]

    async def main():
        batcher = Batcher(run, max_events=64, max_wait_s=0.5)

        async def request(i: int) -> int:
            with batcher.coming():
                await asyncio.sleep(0.01 * (i % 3))  # checking takes a while
            return await batcher(i, 1)

        together = await asyncio.gather(*(request(i) for i in range(20)), return_exceptions=True)
        await request(2)  # after a crowd, a batch waits for more
        start = time.monotonic()
        alone = await request(3)
        return together, alone, time.monotonic() - start

    together, alone, waited = asyncio.run(main())
    assert [r for i, r in enumerate(together) if i != 13] == [i * i for i in range(20) if i != 13]
    assert isinstance(together[13], ValueError) and sorted(calls[0]) == list(range(20)) and len(calls) == 23
    assert alone == 9 and waited < 0.25


def test_a_model_takes_the_tensors_its_card_names():
    """The hlf model takes only hlf, the gru model only particles (an event may have none)."""
    sc = ServeConfig()
    hlf = InferInput("hlf", [2, 14], "FP32", np.ones(28).tolist())
    particles = InferInput("particles", [2, 3, 19], "FP32", np.ones(2 * 3 * 19).tolist())
    (f,) = inputs.features([inputs.parse(InferRequest("m", [hlf]), ("hlf",), sc)])
    assert f.hlf.shape == (2, 14) and f.particles.shape == (0, 19) and f.counts.tolist() == [0, 0]
    (f,) = inputs.features([inputs.parse(InferRequest("m", [particles]), ("particles",), sc)])
    assert not f.hlf.any() and f.particles.shape == (6, 19) and f.counts.tolist() == [3, 3]
    empty = InferInput("particles", [2, 0, 19], "FP32", [])
    (f,) = inputs.features([inputs.parse(InferRequest("m", [empty]), ("particles",), sc)])
    assert f.counts.tolist() == [0, 0]
    with pytest.raises(InvalidInput, match=r"unknown input 'particles': this model takes 'events' .*\['hlf'\]"):
        inputs.parse(InferRequest("m", [hlf, particles]), ("hlf",), sc)
    with pytest.raises(InvalidInput, match=r"missing input 'particles': this model takes \['particles'\]"):
        inputs.parse(InferRequest("m", [InferInput("lengths", [2], "INT64", [1, 1])]), ("particles",), sc)
