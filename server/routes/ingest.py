"""Ingest: a device uploads one serde batch; the answer is the acknowledgement."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from fedmobillm.device_runtime.messages import ROUTE_BATCHES, Ack
from fedmobillm.server.errors import PayloadTooLarge, UnsupportedMediaType
from fedmobillm.server.routes.deps import ERRORS, DeviceAuth, ServiceDep, SettingsDep

router = APIRouter(tags=["ingest"], responses=ERRORS)

BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(ROUTE_BATCHES, openapi_extra=BATCH_BODY)
async def upload(
    request: Request, device: DeviceAuth, service: ServiceDep, settings: SettingsDep
) -> Ack:
    body = await _read_body(request, settings.max_body_bytes)
    ack = await run_in_threadpool(service.ingest, device, body)
    return Ack.from_dict(ack)


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
