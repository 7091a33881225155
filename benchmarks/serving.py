"""Serving throughput and latency of the inclusive model, side by side in one run on this machine:

- the limit: in-process ONNX Runtime (one thread) on typical events, batched (events/s per core);
- ``topoflow serve`` (ONNX Runtime, micro-batching): single-event requests at concurrency 1, 8 and 32
  over V2 REST (``wrk``) and V2 gRPC (a closed-loop client in processes), and batched requests;
- the naive baseline: a KServe model calling Keras ``model.predict`` per request, no batching.

Typical events are the first ``--events`` of an ingested dataset of generated events (``make run``
writes out/ingested and out/models/inclusive); requests cycle through them. Server and load
generator share this machine's cores, so the numbers are a floor for a dedicated server.

    python benchmarks/serving.py [--model out/models/inclusive] [--data out/ingested] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from topoflow import export
from topoflow.config import Config
from topoflow.evaluate import raw_batches
from topoflow.preprocessing import pad

NAME = "topoflow"
CONCURRENCY = (1, 8, 32)
BATCH = 256  # events per batched request


def load_events(data: str, n: int):
    """HLF (n, 14), particle rows and counts of the first ``n`` events of an ingested dataset."""
    parts = []
    for _, hlf, rows, counts in raw_batches(data, Config().storage, n):
        parts.append((hlf, rows, counts))
        if sum(len(p[0]) for p in parts) >= n:
            break
    hlf, rows, counts = (np.concatenate(x) for x in zip(*parts))
    keep = int(counts[:n].sum())
    return hlf[:n], rows[:keep], counts[:n]


def in_process_limit(model: str, hlf, rows, counts) -> float:
    """Events/s of Exported.predict on ONNX Runtime with one thread, all events in one call (batched
    by length, as the server batches them; best of 5 after a warm-up)."""
    m = export.load(model, Config().storage, "onnx", threads=1)
    m.predict(hlf, rows, counts)  # warm-up: ONNX Runtime allocates for each new length once
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        m.predict(hlf, rows, counts)
        best = max(best, len(counts) / (time.perf_counter() - t0))
    return best


def v2_body(hlf, rows, counts) -> dict:
    """A V2 inference request of raw feature tensors (particles padded to the longest event)."""
    particles = pad(rows, counts)
    return {"inputs": [
        {"name": "hlf", "shape": list(hlf.shape), "datatype": "FP32", "data": hlf.astype("float32").ravel().tolist()},
        {"name": "particles", "shape": list(particles.shape), "datatype": "FP32", "data": particles.ravel().tolist()},
        {"name": "lengths", "shape": [len(counts)], "datatype": "INT64", "data": counts.tolist()}]}


def requests_of(hlf, rows, counts, size: int, most: int = 200) -> list[dict]:
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = []
    for i in range(0, min(len(counts), most * size) - size + 1, size):
        out.append(v2_body(hlf[i:i + size], rows[starts[i]:starts[i + size]], counts[i:i + size]))
    return out


# ---- load generators


WRK_SCRIPT = """
local bodies = {}
for line in io.lines(os.getenv("BODIES")) do bodies[#bodies + 1] = line end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
"""


def wrk(url: str, bodies: list[dict], concurrency: int, seconds: float, tmp: Path) -> dict:
    """Requests/s, p50 and p99 (ms) and errors of ``wrk`` posting ``bodies`` in turn."""
    (tmp / "bodies.jsonl").write_text("\n".join(json.dumps(b, separators=(",", ":")) for b in bodies))
    (tmp / "post.lua").write_text(WRK_SCRIPT)
    done = subprocess.run(["wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d", f"{round(seconds)}s",
                           "--latency", "--timeout", "30s", "-s", str(tmp / "post.lua"), url], capture_output=True, text=True,
                          env=os.environ | {"BODIES": str(tmp / "bodies.jsonl")}, timeout=seconds + 60)
    out = done.stdout
    if "Requests/sec" not in out:
        raise SystemExit(f"wrk failed:\n{out}{done.stderr}")

    def ms(label):
        value, unit = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(x) for x in re.findall(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                                             out)[0]) if "Socket errors" in out else 0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    return {"rps": rps, "p50": ms("50"), "p99": ms("99"), "errors": errors}


def _grpc_worker(port: int, raw: list[bytes], threads: int, seconds: float, queue) -> None:
    """One load process: ``threads`` closed-loop clients sending the serialized requests in turn."""
    import threading

    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    requests = [pb.ModelInferRequest.FromString(r) for r in raw]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    latencies, errors, stop = [], [0], time.perf_counter() + seconds

    def client(k):
        i = k
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                stub.ModelInfer(requests[i % len(requests)], timeout=10)
                latencies.append(time.perf_counter() - t0)
            except grpc.RpcError:
                errors[0] += 1
            i += threads

    pool = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    queue.put((latencies, errors[0]))


def grpc_load(port: int, bodies: list[dict], concurrency: int, seconds: float) -> dict:
    """Requests/s, p50 and p99 (ms) and errors of V2 gRPC clients (2 processes when concurrency > 1)."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    raw = []
    for b in bodies:
        req = pb.ModelInferRequest(model_name=NAME)
        for t in b["inputs"]:
            req.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            dtype = "<f4" if t["datatype"] == "FP32" else "<i8"
            req.raw_input_contents.append(np.asarray(t["data"], dtype).tobytes())
        raw.append(req.SerializeToString())
    procs = min(concurrency, 2)
    queue = multiprocessing.get_context("spawn").Queue()
    workers = [multiprocessing.get_context("spawn").Process(
        target=_grpc_worker, args=(port, raw, concurrency // procs, seconds, queue)) for _ in range(procs)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join()
    lat = np.concatenate([r[0] for r in results]) * 1e3
    return {"rps": len(lat) / seconds, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "errors": sum(r[1] for r in results)}


# ---- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], http: int, log: Path) -> subprocess.Popen:
    import urllib.request

    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not ready in 300 s:\n{log.read_text()[-3000:]}")


def naive_server(model: str, http: int, grpc: int) -> None:
    """The baseline: Keras ``model.predict`` on each request as it comes (same preprocessing)."""
    import kserve
    from kserve import InferOutput, InferResponse

    from topoflow.tf import import_tensorflow

    import_tensorflow()
    import keras

    class Naive(kserve.Model):
        def load(self):
            self.exported = export.load(model, Config().storage, "keras")
            self.keras = keras.saving.load_model(Path(model) / "model.keras", compile=False)
            self.ready = True
            return True

        def predict(self, request, headers=None):
            x = {i.name: i.as_numpy() for i in request.inputs}
            rows, counts = export.unpad(x["particles"], x["lengths"])
            probs = self.keras.predict(self.exported.model_inputs(x["hlf"], rows, counts), verbose=0)
            return InferResponse(request.id or "0", self.name,
                                 [InferOutput("probabilities", list(probs.shape), "FP32", probs)])

    m = Naive(NAME)
    m.load()
    kserve.ModelServer(http_port=http, grpc_port=grpc, enable_latency_logging=False).start([m])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="out/models/inclusive")
    parser.add_argument("--data", default="out/ingested", help="an ingested dataset (typical events)")
    parser.add_argument("--events", type=int, default=4096)
    parser.add_argument("--seconds", type=float, default=10, help="duration of each load measurement")
    parser.add_argument("--naive-server", nargs=2, type=int, metavar=("HTTP", "GRPC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_server:
        return naive_server(args.model, *args.naive_server)
    if not Path(args.model, "model.onnx").exists() or not Path(args.data).exists():
        raise SystemExit(f"no {args.model} or {args.data}: run `make run` first (it writes both)")
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")
    hlf, rows, counts = load_events(args.data, args.events)
    print(f"{len(counts)} events of {args.data}: median {np.median(counts):.0f} particles, "
          f"longest {counts.max()}; {os.cpu_count()} cores shared by server and load generator\n")
    limit = in_process_limit(args.model, hlf, rows, counts)
    print(f"in-process ONNX Runtime, 1 thread, batched by length: {limit:,.0f} events/s per core\n")
    single, batched = requests_of(hlf, rows, counts, 1), requests_of(hlf, rows, counts, BATCH, most=8)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        servers = {
            "topoflow serve": [str(Path(sys.executable).parent / "topoflow"), "serve", "--model", args.model],
            "naive Keras": [sys.executable, __file__, "--model", args.model, "--naive-server"],
        }
        for name, cmd in servers.items():
            http, grpc = free_port(), free_port()
            cmd = cmd + ([str(http), str(grpc)] if name.startswith("naive") else
                         ["--http-port", str(http), "--grpc-port", str(grpc)])
            proc = start(cmd, http, tmp / "server.log")
            try:
                url = f"http://127.0.0.1:{http}/v2/models/{NAME}/infer"
                for c in CONCURRENCY:
                    r = wrk(url, single, c, args.seconds, tmp)
                    rows_out.append((name, "V2 REST", f"1 event, c={c}", r["rps"], r["p50"], r["p99"], r["errors"]))
                    print(rows_out[-1], flush=True)
                if name.startswith("naive"):
                    continue
                for c in CONCURRENCY:
                    r = grpc_load(grpc, single, c, args.seconds)
                    rows_out.append((name, "V2 gRPC", f"1 event, c={c}", r["rps"], r["p50"], r["p99"], r["errors"]))
                    print(rows_out[-1], flush=True)
                r = wrk(url, batched, 2, args.seconds, tmp)
                rows_out.append((name, "V2 REST", f"{BATCH} events, c=2", r["rps"] * BATCH, r["p50"], r["p99"],
                                 r["errors"]))
                r = grpc_load(grpc, batched, 2, args.seconds)
                rows_out.append((name, "V2 gRPC", f"{BATCH} events, c=2", r["rps"] * BATCH, r["p50"], r["p99"],
                                 r["errors"]))
            finally:
                proc.terminate()
                proc.wait(30)
    print("\n| server | protocol | requests | events/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, proto, what, eps, p50, p99, errors in rows_out:
        print(f"| {name} | {proto} | {what} | {eps:,.0f} | {p50:.1f} | {p99:.1f} | {errors} |")
    ours = {(p, w): e for n, p, w, e, *_ in rows_out if n == "topoflow serve"}
    naive = {(p, w): e for n, p, w, e, *_ in rows_out if n != "topoflow serve"}
    key = ("V2 REST", "1 event, c=32")
    p99_8 = {p: r[5] for r in rows_out for p in ("V2 REST", "V2 gRPC") if r[:3] == ("topoflow serve", p, "1 event, c=8")}
    best_batched = max(e for (p, w), e in ours.items() if w.startswith(str(BATCH)))
    print(f"\nsingle-event throughput at c=32 vs naive: {ours[key] / naive[key]:.1f}x (target >= 5x)")
    print(f"p99 at c=8: V2 REST {p99_8['V2 REST']:.1f} ms, V2 gRPC {p99_8['V2 gRPC']:.1f} ms (target < 20 ms)")
    print(f"batched requests vs in-process limit: {best_batched / limit:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
