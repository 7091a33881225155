"""The kserve.Model of ``topoflow serve``: one exported model folder, loaded and warmed up before it
reports ready, answering V1 and V2 requests through the micro-batcher.

Answers (``n`` events in the request, classes in softmax order, :data:`topoflow.CLASSES`):

- V2: ``probabilities`` FP32 ``[n, 3]`` (its parameter ``classes`` names the columns), ``predicted``
  BYTES ``[n]`` (a class name) and, for raw events, ``selected`` BOOL ``[n]``;
- V1: ``{"predictions": [{"selected": true, "probabilities": {"qcd": …, "ttbar": …, "wjets": …},
  "predicted": "ttbar"}, …]}``.

An event the selection rejects (no isolated lepton) has no answer, and it looks like none: its
probabilities are NaN (``null`` in JSON) and ``predicted`` is empty (V1: ``null``), never numbers a
client could take for a classification.
"""

from __future__ import annotations

import asyncio
import gc

import numpy as np
from kserve import InferOutput, InferResponse, Model
from kserve.errors import ModelNotReady
from kserve.utils.utils import generate_uuid

from topoflow import export
from topoflow.config import Config
from topoflow.features import HLF_NAMES, PARTICLE_NAMES
from topoflow.preprocessing import MAX_PARTICLES
from topoflow.serve.batcher import Batcher
from topoflow.serve.inputs import EVENTS, TENSORS, Parsed, features, parse, tensors_taken

WARM_UP_LENGTHS = (1, 40, MAX_PARTICLES)  # particle rows per event: ONNX Runtime sizes its buffers on first use


class Loading(ModelNotReady):
    """The model is loading (HTTP 503, gRPC UNAVAILABLE). KServe 0.21's gRPC interceptor reads a
    ``reason`` that its own ModelNotReady lacks: the client would get UNKNOWN and an AttributeError."""

    def __init__(self, name: str):
        super().__init__(name, "It is loading.")

    @property
    def reason(self) -> str:
        return self.error_msg


class TopoflowModel(Model):
    def __init__(self, cfg: Config):
        super().__init__(cfg.serve.name)
        self.cfg = cfg
        self.exported: export.Exported | None = None
        self.batcher: Batcher | None = None

    def load(self) -> bool:
        """Read the model folder, run it on events of a few lengths, then report ready: the first
        client never pays for the backend's start-up."""
        sc = self.cfg.serve
        exported = export.load(sc.model, self.cfg.storage, sc.backend, sc.threads)
        width = len(PARTICLE_NAMES)
        for length in WARM_UP_LENGTHS:
            for n in (1, min(8, sc.max_batch_events)):
                exported.predict(np.zeros((n, len(HLF_NAMES))), np.zeros((n * length, width)), np.full(n, length))
        self.exported = exported
        self.batcher = Batcher(self._score, sc.max_batch_events, sc.max_wait_ms / 1000)
        gc.collect()
        gc.freeze()  # what loading left is permanent: the collector stops walking it (shorter pauses)
        self.ready = True
        return self.ready

    def _score(self, requests: list[Parsed]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per request, its scored events and their probabilities: one model call for all (batcher thread)."""
        given = features(requests)
        probs = self.exported.predict(*(np.concatenate([getattr(f, k) for f in given])
                                        for k in ("hlf", "particles", "counts")))
        return list(zip((f.events for f in given), np.split(probs, np.cumsum([len(f.events) for f in given])[:-1])))

    async def preprocess(self, payload, headers=None) -> Parsed:
        """Check the request, in a thread: the event loop keeps serving."""
        with self.batcher.coming():
            return await asyncio.to_thread(parse, payload, self.exported.inputs, self.cfg.serve)

    async def predict(self, request: Parsed, headers=None) -> dict | InferResponse:
        classes = self.exported.card["classes"]
        scored, scores = ((await self.batcher(request, request.n)) if request.n else
                          (np.zeros(0, int), np.zeros((0, len(classes)))))
        probs = np.full((request.n, len(classes)), np.nan, np.float32)
        probs[scored] = scores
        selected = np.zeros(request.n, bool)
        selected[scored] = True
        predicted = np.full(request.n, "", dtype=object)
        predicted[scored] = np.asarray(classes, dtype=object)[probs[scored].argmax(axis=1)]
        if request.v2 is None:
            return {"predictions": [
                {"selected": bool(s), "probabilities": dict(zip(classes, p.tolist())) if s else None,
                 "predicted": c or None} for s, p, c in zip(selected, probs, predicted)]}
        outputs = [InferOutput("probabilities", list(probs.shape), "FP32", probs,
                               parameters={"classes": ",".join(classes)}),
                   InferOutput("predicted", [request.n], "BYTES", predicted)]
        if request.events is not None:
            outputs.append(InferOutput("selected", [request.n], "BOOL", selected))
        v2 = request.v2
        if v2.from_grpc:  # KServe 0.21's to_grpc fails on numpy data when the request came as raw bytes
            for output in outputs:
                output.set_data_from_numpy(output.data, binary_data=True)
        return InferResponse(v2.id or generate_uuid(), self.name, outputs, use_binary_outputs=v2.use_binary_outputs,
                             requested_outputs=v2.request_outputs)

    def get_input_types(self) -> list[dict]:
        """For the V2 model metadata (GET /v2/models/NAME): raw events, or the tensors this model takes."""
        return [{"name": EVENTS, "datatype": "BYTES", "shape": [-1]}] + [
            {"name": name, "datatype": TENSORS[name][0][-1], "shape": [-1 if d is None else d for d in TENSORS[name][1]]}
            for name in tensors_taken(self._loaded().inputs)]

    def get_output_types(self) -> list[dict]:
        return [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self._loaded().card["classes"])]},
                {"name": "predicted", "datatype": "BYTES", "shape": [-1]},
                {"name": "selected", "datatype": "BOOL", "shape": [-1]}]

    def _loaded(self) -> export.Exported:
        if self.exported is None:
            raise Loading(self.name)
        return self.exported
