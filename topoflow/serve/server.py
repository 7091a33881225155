"""KServe's ModelServer (V1 and V2 REST, V2 gRPC) made safe by default for ``topoflow serve``.

What KServe 0.21 does on its own, and what this changes:

- it binds REST to 0.0.0.0 and gRPC to [::], with no setting: both listen on ``serve.host`` here
  (127.0.0.1 by default; 0.0.0.0 in a container);
- it accepts request bodies of any size: REST bodies over ``serve.max_request_bytes`` get 413
  (before they are read when Content-Length says so), gRPC messages over it RESOURCE_EXHAUSTED;
- it loads the model before it listens, and then reports the server ready at once: here the
  servers listen first (liveness answers while a large model downloads), the model loads in the
  background, and the server and the model report ready only once it has loaded and warmed up;
  requests meanwhile get 503 (gRPC UNAVAILABLE), where KServe's data plane would load the model
  again inside the request;
- it lets any client unload or reload a model (the V2 repository extension): refused here (501);
- it logs every request (an access line, timing lines and a gRPC line; ≈ 30 % of throughput):
  only warnings and errors here, and the REST timing middleware, which reads the process's CPU time
  twice per request, is left out;
- Starlette decodes JSON bodies with the standard library: orjson here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import warnings
from concurrent import futures

import orjson
from fastapi.exceptions import FastAPIDeprecationWarning
from grpc import aio
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.server import RESTServer
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from topoflow.config import Config, ServeConfig
from topoflow.errors import TopoflowError
from topoflow.serve.model import Loading, TopoflowModel

_REFUSALS = (InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady, NotImplementedError)


def serve(cfg: Config) -> None:
    """Serve the exported model ``cfg.serve.model`` until SIGINT or SIGTERM."""
    warnings.filterwarnings("ignore", "ORJSONResponse is deprecated", FastAPIDeprecationWarning)  # KServe's use
    logging.getLogger("kserve").addFilter(_quiet_refusals)
    Request.json = _orjson_body  # this process serves only KServe's app
    _Server(cfg.serve).start([TopoflowModel(cfg)])


async def _orjson_body(self: Request):
    """Starlette's ``Request.json`` with orjson (a KServe dependency) instead of the standard library's
    json, which took a quarter of a single-event V2 REST request's time (≈ 5x slower on float lists)."""
    if not hasattr(self, "_json"):
        self._json = orjson.loads(await self.body())
    return self._json


def _quiet_refusals(record: logging.LogRecord) -> bool:
    """KServe logs every refused request at ERROR with a traceback; a client's mistake (400, 404, 501) or
    a request before the model is ready (503) is not the server's error, and a stream of them would bury those."""
    return not (record.exc_info and isinstance(record.exc_info[1], _REFUSALS))


class _Server(ModelServer):
    def __init__(self, sc: ServeConfig):
        super().__init__(http_port=sc.http_port, grpc_port=sc.grpc_port, enable_latency_logging=False)
        self.sc = sc
        self.dataplane = _DataPlane(self.registered_models)
        self.model_repository_extension = _FixedModels(self.registered_models)
        for name in ("uvicorn.access", "kserve.trace"):  # one line per request each
            logging.getLogger(name).setLevel(logging.WARNING)

    def start(self, models: list[TopoflowModel]) -> None:
        """KServe's start for one model, bound to ``serve.host``, loading it after the servers listen."""
        (model,) = models
        sc = self.sc
        for port, setting in ((sc.http_port, "serve.http_port"), (sc.grpc_port, "serve.grpc_port")):
            _check_free(sc.host, port, setting)
        self.register_model(model)
        self._rest_server = _RESTServer(sc.host, sc.max_request_bytes, FASTAPI_APP_IMPORT_STRING, self.dataplane,
                                        self.model_repository_extension, self.http_port, grace_period=self.grace_period,
                                        event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive)
        self._grpc_server = _GRPCServer(sc.host, self.grpc_port, sc.max_request_bytes, self.dataplane,
                                        self.model_repository_extension, self.grace_period)
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve_loading(model))

    async def _serve_loading(self, model: TopoflowModel) -> None:
        servers = asyncio.gather(self._rest_server.start(), self._grpc_server.start(self.max_threads))
        loading = asyncio.ensure_future(asyncio.to_thread(model.load))
        await asyncio.wait([servers, loading], return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            if loading.exception() is not None:  # a server whose model cannot load must not look alive
                await asyncio.gather(self._rest_server.stop(), self._grpc_server.stop())
                await servers
                raise loading.exception()
            sc = self.sc
            print(f"ready: {sc.model} ({model.exported.card['model']} model, {sc.backend}) as {sc.name!r}: "
                  f"REST http://{sc.host}:{sc.http_port}/v1/models/{sc.name}:predict and /v2/models/{sc.name}/infer, "
                  f"gRPC {_address(sc.host, sc.grpc_port)}", flush=True)
        await servers


class _DataPlane(DataPlane):
    async def ready(self) -> bool:
        """Ready once the models are (KServe's server is ready as soon as it listens)."""
        return all([await self.model_registry.is_model_ready(name) for name in self.model_registry.get_models()])

    async def get_model(self, name: str):
        """The model, if ready (KServe's would load a model that is not, inside the request)."""
        model = self.get_model_from_registry(name)
        if not await model.healthy():
            raise Loading(name)
        return model


class _FixedModels(ModelRepositoryExtension):
    """The one model is loaded at start; no client unloads it (or loads another)."""

    async def load(self, model_name: str) -> None:
        raise NotImplementedError("topoflow serve loads its one model at start (serve.model)")

    async def unload(self, model_name: str) -> None:
        raise NotImplementedError("topoflow serve keeps its model loaded until it stops")


class _RESTServer(RESTServer):
    """KServe's REST server on ``host``, refusing bodies over ``max_bytes``, and stoppable."""

    def __init__(self, host: str, max_bytes: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config.host, self._max_bytes = host, max_bytes

    def _add_middlewares(self, app) -> None:
        """The body limit only. KServe's own middleware times every request for its trace log (silenced
        here), reading the process's CPU time twice per request: a quarter of the server's time."""
        app.add_middleware(_BodyLimit, limit=self._max_bytes)

    def _add_exception_handlers(self, app) -> None:
        super()._add_exception_handlers(app)
        app.add_exception_handler(_TooLarge, _too_large)

    async def stop(self) -> None:
        """Stop serving (KServe leaves that to uvicorn's signal handler)."""
        while not self._server.started:  # stopped midway through its start-up, uvicorn logs a traceback
            await asyncio.sleep(0.01)
        self._server.should_exit = True


class _GRPCServer(GRPCServer):
    """KServe's gRPC server on ``host``, with a message size limit and without a log line per call."""

    def __init__(self, host: str, port: int, max_bytes: int, data_plane: DataPlane,
                 extension: ModelRepositoryExtension, grace_period: int):
        super().__init__(port, data_plane, extension, kwargs={}, grace_period=grace_period)
        self._host, self._max_bytes, self._started = host, max_bytes, asyncio.Event()

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                  interceptors=(ExceptionToStatusInterceptor(),),
                                  options=[("grpc.max_receive_message_length", self._max_bytes)])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self._data_plane, self._model_repository_extension), self._server)
        self._server.add_insecure_port(_address(self._host, self._port))
        await self._server.start()
        self._started.set()
        await self._server.wait_for_termination()

    async def stop(self, sig: int | None = None) -> None:
        await self._started.wait()  # else a stop during start-up would leave it serving
        await super().stop(sig)


class _TooLarge(HTTPException):  # an HTTPException, so that FastAPI's body parsing lets it through
    pass


async def _too_large(request, e: _TooLarge) -> JSONResponse:
    return JSONResponse({"error": e.detail}, e.status_code)


class _BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes (uvicorn has no limit of its own)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _refusal(self, size: int) -> _TooLarge:
        return _TooLarge(413, f"request body of {size} bytes or more, over serve.max_request_bytes={self.limit}: "
                         "send fewer events per request")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.limit:  # refused unread
            response = await _too_large(None, self._refusal(int(declared)))
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self._refusal(seen)
            return message

        await self.app(scope, counted, send)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_free(host: str, port: int, setting: str) -> None:
    """One clear error before anything starts, for a port in use or an address not on this machine."""
    try:
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as e:
        raise TopoflowError(f"cannot listen on {_address(host, port)}: {e.strerror or e}; choose another "
                            f"port ({setting}) or address (serve.host), or stop what listens there") from e
