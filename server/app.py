"""The HTTP API: ``create_app(settings)`` builds the FastAPI app (store, service, trainer).

Only this module and ``server.routes`` (one router per resource) speak HTTP: the service
layer raises ``server.errors`` exceptions, turned into JSON error responses here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fedmobillm import __version__
from fedmobillm.device_runtime.messages import ErrorBody
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.paths import ensure_dir
from fedmobillm.server.errors import ServerError
from fedmobillm.server.limits import AuthThrottle, RequestLimits, TooManyRequests
from fedmobillm.server.metrics import metrics_registry
from fedmobillm.server.routes import dashboard, devices, ingest, ops, personal
from fedmobillm.server.service import Service
from fedmobillm.server.settings import ServerSettings
from fedmobillm.server.store import open_store

log = logging.getLogger(__name__)


# `serve --workers N`: the settings every worker process builds its app from (JSON, secrets
# included; only in the environment of the server's own processes)
WORKER_SETTINGS_ENV = "_FEDMOBILLM_WORKER_SETTINGS"


def open_service(settings: ServerSettings) -> Service:
    """The data dir, the anchor set and the store, checked: the Service the app serves."""
    ensure_dir(
        settings.data_dir,
        "server data dir",
        hint="pass --data-dir (or data_dir in the config file) a folder, or a path to create",
    )
    anchors = None
    if settings.anchors is not None:
        from fedmobillm.server.anchors import load_anchor_set

        anchors = load_anchor_set(settings.anchors, settings.anchors_per_device)
    store = open_store(settings)  # SQLite in data_dir, or PostgreSQL at settings.database
    try:
        return Service(
            store,
            settings.max_samples_per_batch,
            anchors,
            settings.side.inputs,
            settings.task,
            lm_max_seq_len=settings.lm_max_seq_len,
        )
    except BaseException:
        store.close()
        raise


def worker_app() -> FastAPI:
    """The app of one `serve --workers N` worker process (uvicorn's factory): the settings
    the parent put in WORKER_SETTINGS_ENV; no trainer (the parent process runs the one)."""
    import json
    import os

    from fedmobillm.server.trainer_view import TrainerView

    settings = ServerSettings(**json.loads(os.environ[WORKER_SETTINGS_ENV]))
    return create_app(settings, trainer_view=TrainerView)


def create_app(settings: ServerSettings, trainer_view: Any = None) -> FastAPI:
    """Build the app. The store opens now; the trainer thread starts with the app's lifespan.
    ``trainer_view``: without a trainer here, a class built on the store that stands for it
    (``status()``, ``export_fresh()``; `serve --workers N`: trainer_view.TrainerView)."""
    service = open_service(settings)
    store = service.store

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        trainer = None
        if settings.train:
            from fedmobillm.server.trainer import create_trainer  # torch: only when training

            trainer = create_trainer(settings)
            _warm_imports()
            trainer.start()
        app.state.trainer = trainer
        if trainer is None and trainer_view is not None:
            app.state.trainer = trainer_view(store)
        try:
            yield
        finally:
            if trainer is not None:
                trainer.stop()
            store.close()

    app = FastAPI(
        title="fedmobillm server",
        version=__version__,
        description="Ingest of tapped activations from devices; side-network training; "
        "personal models out.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.trainer = None
    app.state.throttle = AuthThrottle(settings.auth_failures_per_minute)
    app.state.metrics = metrics_registry(service, lambda: app.state.trainer)
    app.add_middleware(
        RequestLimits,
        max_request_bytes=settings.max_request_bytes,
        max_header_bytes=settings.max_header_bytes,
        on_refuse=service.counters.reject,
    )
    _add_error_handlers(app)
    for router in (ops.router, devices.router, ingest.router, personal.router, dashboard.router):
        app.include_router(router)
    return app


def _warm_imports() -> None:
    """Import now, before the app serves, what the trainer thread imports lazily at its
    first step (``torch._dynamo``, through the optimizer) and its first personal-model export
    (``onnx``, ``onnxruntime.quantization``): an import holds the GIL throughout (py-spy
    under bench_fleet at load 7: 4.1 s and 1.5 s), during which the event loop answered no
    upload of the fleet. A module missing here is left to fail where it is used, as before."""
    import importlib

    for name in ("torch._dynamo", "onnx", "onnxruntime.quantization"):
        try:
            importlib.import_module(name)
        except ImportError:
            log.debug("%s not importable; the trainer reports it where it needs it", name)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FedMobiLLMError)
    async def _server_error(request: Request, exc: FedMobiLLMError) -> JSONResponse:
        status = exc.status if isinstance(exc, ServerError) else 400
        app.state.service.counters.reject(status)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if isinstance(exc, TooManyRequests):
            headers = {"Retry-After": str(exc.retry_after)}
        body = ErrorBody(exc.message, exc.hint).to_dict()
        return JSONResponse(body, status_code=status, headers=headers)
