"""Ingest: a device uploads one serde batch; the answer is the acknowledgement.

Back-pressure (``limits.IngestGate``): the gate comes first, so an upload past a bound is
answered 429 + Retry-After before its token is even looked up, and
the commit waits a bounded time for the store's write slot (SQLite: for a place in a group
commit); uploads run on the gate's own thread limiter, so the other routes keep the default
thread pool."""

from __future__ import annotations

import functools
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from fedmobillm.device_runtime.messages import ROUTE_BATCHES, Ack
from fedmobillm.server.errors import PayloadTooLarge, UnsupportedMediaType
from fedmobillm.server.limits import IngestGate
from fedmobillm.server.routes.deps import ERRORS, upload_device

router = APIRouter(tags=["ingest"], responses=ERRORS)

BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def gate_of(state: Any) -> IngestGate:
    """The IngestGate of an app's ``state``, made by the first upload (the trainer, whose
    backlog it reads, is started by the app's lifespan)."""
    gate = getattr(state, "ingest_gate", None)
    if gate is None:
        s = state.settings
        trainer = getattr(state, "trainer", None)
        sqlite = getattr(state.service.store, "backend", "sqlite") == "sqlite"
        gate = IngestGate(
            s.max_inflight_uploads,
            s.max_write_wait_s,
            s.max_backlog_samples,
            s.retry_after_s,
            backlog=(lambda: trainer.backlog) if trainer is not None else (lambda: 0),
            # SQLite: one writer; with group commit (ingest_group_max > 1) the uploads wait in
            # the store's group queue instead, for what is left of max_write_wait_s
            write_slots=1 if sqlite and s.ingest_group_max == 1 else s.max_inflight_uploads,
        )
        state.ingest_gate = gate
    return gate


@router.post(
    ROUTE_BATCHES,
    response_model=Ack,
    openapi_extra={**BATCH_BODY, "security": [{"HTTPBearer": []}]},
)
async def upload(request: Request) -> JSONResponse:
    """One function, no FastAPI dependencies (solving them was a quarter of the event loop's
    time per upload under bench_fleet): the gate, then the device's token (``upload_device``),
    then the body, then decode, checks and commit on one of the gate's threads."""
    state = request.app.state
    gate = gate_of(state)
    with gate.admit():  # first: 429 before auth when busy
        device = await upload_device(request)
        body = await _read_body(request, state.settings.max_body_bytes)
        ingest = functools.partial(state.service.ingest, device, body, write_slot=gate.write_slot)
        ack = await anyio.to_thread.run_sync(ingest, limiter=gate.limiter)
    # checked against the Ack message here; returned as a response, so that FastAPI does not
    # validate and serialise it a second time through the response model (documented above)
    return JSONResponse(Ack.from_dict(ack).to_dict())


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
