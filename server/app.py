"""The HTTP API: ``create_app(settings)`` builds the FastAPI app (store, service, trainer).

This is the only module that speaks HTTP: the service layer raises ``server.errors``
exceptions, turned into JSON error responses here.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from fedmobillm import __version__
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.errors import (
    Forbidden,
    PayloadTooLarge,
    ServerError,
    Unauthorized,
    UnsupportedMediaType,
)
from fedmobillm.server.personal import read_personal_zip
from fedmobillm.server.service import Service
from fedmobillm.server.settings import ServerSettings
from fedmobillm.server.store import Device, Store

log = logging.getLogger(__name__)

# -- wire schemas (separate from storage) ------------------------------------------------


class RegisterRequest(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    manifest: dict[str, Any]
    label_names: list[str] = Field(min_length=2, max_length=1000)


class RegisterResponse(BaseModel):
    device_id: str
    token: str
    architecture: str
    bundle_sha256: str


class SampleCounts(BaseModel):
    train: int
    validation: int
    anchor: int = 0


class AnchorShare(BaseModel):
    anchor_set: str  # sha256 of the server's anchor texts
    total: int  # texts in the set
    ids: list[int]  # this device's share: upload text i with sample id ids[i]
    texts: list[str]


class Ack(BaseModel):
    batch_id: str
    samples: int
    skipped: int = 0
    split: str
    duplicate: bool
    device_samples: SampleCounts


class DeviceState(BaseModel):
    device_id: str
    name: str
    architecture: str
    bundle_sha256: str
    samples: SampleCounts
    batches: int
    acked_keys: list[str]


class ErrorBody(BaseModel):
    detail: str
    hint: str | None = None


# -- auth --------------------------------------------------------------------------------


@dataclass
class Principal:
    admin: bool
    device: Device | None = None


_bearer = HTTPBearer(auto_error=False, description="admin token or device token")


def _authenticate(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if creds is None or not creds.credentials:
        raise Unauthorized("missing credentials: send `Authorization: Bearer <token>`")
    token = creds.credentials
    admin_token = request.app.state.settings.admin_token.get_secret_value()
    if hmac.compare_digest(token.encode(), admin_token.encode()):
        return Principal(admin=True)
    device = request.app.state.service.store.device_by_token(token)
    if device is None:
        raise Unauthorized("unknown token", hint="register the device to get a token")
    return Principal(admin=False, device=device)


def _admin(principal: Annotated[Principal, Depends(_authenticate)]) -> Principal:
    if not principal.admin:
        raise Forbidden("this endpoint needs the admin token")
    return principal


def _device(principal: Annotated[Principal, Depends(_authenticate)]) -> Device:
    if principal.device is None:
        raise Forbidden("this endpoint needs a device token")
    return principal.device


AnyAuth = Annotated[Principal, Depends(_authenticate)]
AdminAuth = Annotated[Principal, Depends(_admin)]
DeviceAuth = Annotated[Device, Depends(_device)]

# -- app ---------------------------------------------------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409, 413, 415)
}


def create_app(settings: ServerSettings) -> FastAPI:
    """Build the app. The store opens now; the trainer thread starts with the app's lifespan."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    anchors = None
    if settings.anchors is not None:
        from fedmobillm.server.anchors import load_anchor_set

        anchors = load_anchor_set(settings.anchors, settings.anchors_per_device)
    store = Store(settings.db_path)
    service = Service(store, settings.max_samples_per_batch, anchors)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        trainer = None
        if settings.train:
            from fedmobillm.server.trainer import Trainer  # torch: only when training

            trainer = Trainer(settings)
            trainer.start()
        app.state.trainer = trainer
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
    _add_error_handlers(app)
    _add_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FedMobiLLMError)
    async def _server_error(request: Request, exc: FedMobiLLMError) -> JSONResponse:
        status = exc.status if isinstance(exc, ServerError) else 400
        app.state.service.counters.reject(status)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(
            {"detail": exc.message, "hint": exc.hint}, status_code=status, headers=headers
        )


async def _read_body(request: Request, limit: int) -> bytes:
    ctype = request.headers.get("content-type", "application/octet-stream")
    if ctype.split(";")[0].strip().lower() != "application/octet-stream":
        raise UnsupportedMediaType(
            f"Content-Type {ctype!r}: send the serde payload as application/octet-stream"
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"body of {declared} bytes exceeds the limit of {limit} bytes",
            hint="upload fewer samples per batch",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"body exceeds the limit of {limit} bytes", hint="upload fewer samples per batch"
            )
        chunks.append(chunk)
    return b"".join(chunks)


BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _add_routes(app: FastAPI) -> None:
    service: Service = app.state.service
    settings: ServerSettings = app.state.settings

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/devices", status_code=201, responses=ERRORS, tags=["devices"])
    def register(body: RegisterRequest, _: AdminAuth) -> RegisterResponse:
        out = service.register(body.name, body.manifest, body.label_names)
        log.info("registered %s (%s) as %s", body.name, out["architecture"], out["device_id"])
        return RegisterResponse(**out)

    @app.get("/v1/devices/{device_id}", responses=ERRORS, tags=["devices"])
    def device_state(device_id: str, principal: AnyAuth) -> DeviceState:
        if not principal.admin and (
            principal.device is None or principal.device.device_id != device_id
        ):
            raise Forbidden("a device may read only its own state")
        return DeviceState(**service.device_state(device_id))

    @app.post("/v1/batches", responses=ERRORS, tags=["ingest"], openapi_extra=BATCH_BODY)
    async def upload(request: Request, device: DeviceAuth) -> Ack:
        body = await _read_body(request, settings.max_body_bytes)
        ack = await run_in_threadpool(service.ingest, device, body)
        return Ack(**ack)

    @app.get("/v1/anchors", responses=ERRORS, tags=["devices"])
    def anchors(device: DeviceAuth) -> AnchorShare:
        """The public anchor texts this device should forward and upload as split
        ``anchor`` (sample id = anchor id), so architectures can be aligned on them."""
        return AnchorShare(**service.anchor_share(device))

    @app.get(
        "/v1/personal-model",
        responses={**ERRORS, 200: {"content": {"application/zip": {}}}},
        response_class=Response,
        tags=["devices"],
    )
    def personal_model(
        request: Request,
        device: DeviceAuth,
        weights: bool = False,
        graph: Literal["all", "onnx", "pte"] = "all",
    ) -> Response:
        """The personal model for the device's architecture as a zip: personal.onnx
        (+ .pte) and personal.json; ``graph=onnx`` or ``graph=pte`` keeps only the graph the
        device runs; ``weights=true`` adds personal.safetensors."""
        trainer = request.app.state.trainer
        if trainer is not None:
            trainer.export_fresh(device.architecture)
        data = read_personal_zip(settings.personal_dir, device.architecture, weights, graph)
        if data is None:
            raise NotReady()
        name = f"personal-{device.architecture.replace('/', '_')}.zip"
        return Response(
            data,
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @app.get("/v1/status", responses=ERRORS, tags=["ops"])
    def status(request: Request, _: AdminAuth) -> dict[str, Any]:
        out = service.fleet()
        trainer = request.app.state.trainer
        out["trainer"] = trainer.status() if trainer is not None else {"running": False}
        return out

    @app.get("/metrics", response_class=PlainTextResponse, tags=["ops"])
    def metrics(request: Request) -> str:
        return _metrics_text(service, request.app.state.trainer)


class NotReady(ServerError):
    status = 409

    def __init__(self) -> None:
        super().__init__(
            "the personal model for this device's architecture is not trained yet",
            hint="upload labelled training batches and retry after the trainer exports",
        )


def _metrics_text(service: Service, trainer: Any) -> str:
    c = service.counters
    totals = service.store.totals()
    lines = [
        "# TYPE fedmobillm_acked_batches_total counter",
        f"fedmobillm_acked_batches_total {c.acked_batches}",
        "# TYPE fedmobillm_acked_samples_total counter",
        f"fedmobillm_acked_samples_total {c.acked_samples}",
        "# TYPE fedmobillm_duplicate_batches_total counter",
        f"fedmobillm_duplicate_batches_total {c.duplicate_batches}",
        "# TYPE fedmobillm_skipped_samples_total counter",
        f"fedmobillm_skipped_samples_total {c.skipped_samples}",
        "# TYPE fedmobillm_ingest_bytes_total counter",
        f"fedmobillm_ingest_bytes_total {c.ingest_bytes}",
        "# TYPE fedmobillm_rejected_requests_total counter",
    ]
    lines += [
        f'fedmobillm_rejected_requests_total{{status="{s}"}} {n}'
        for s, n in sorted(c.rejected.items())
    ]
    lines += [
        "# TYPE fedmobillm_devices gauge",
        f"fedmobillm_devices {totals['devices']}",
        "# TYPE fedmobillm_stored_samples gauge",
        f"fedmobillm_stored_samples {totals['samples']}",
    ]
    if trainer is not None:
        st = trainer.status()
        lines += [
            "# TYPE fedmobillm_trainer_step gauge",
            f"fedmobillm_trainer_step {st.get('step', 0)}",
            "# TYPE fedmobillm_trainer_samples_total counter",
            f"fedmobillm_trainer_samples_total {st.get('samples_seen', 0)}",
        ]
        if st.get("loss") is not None:
            lines += [
                "# TYPE fedmobillm_trainer_loss gauge",
                f"fedmobillm_trainer_loss {st['loss']}",
            ]
    return "\n".join(lines) + "\n"
