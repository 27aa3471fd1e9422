"""Operations: liveness, fleet and trainer status (admin), Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from fedmobillm.device_runtime.messages import (
    ROUTE_HEALTHZ,
    ROUTE_METRICS,
    ROUTE_QUARANTINE,
    ROUTE_QUARANTINE_DEVICE,
    ROUTE_STATUS,
    DeviceFlag,
)
from fedmobillm.server.metrics import CONTENT_TYPE_LATEST, render
from fedmobillm.server.routes.deps import ERRORS, AdminAuth, ServiceDep

router = APIRouter(tags=["ops"])


@router.get(ROUTE_HEALTHZ)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(ROUTE_STATUS, responses=ERRORS)
def status(request: Request, _: AdminAuth, service: ServiceDep) -> dict[str, Any]:
    out = service.fleet()
    out["requests"] = service.counters.requests()
    trainer = request.app.state.trainer
    out["trainer"] = trainer.status() if trainer is not None else {"running": False}
    return out


@router.get(ROUTE_QUARANTINE, responses=ERRORS)
def quarantine(_: AdminAuth, service: ServiceDep) -> list[DeviceFlag]:
    """Devices with offences: refused uploads of values their bundle cannot produce, or
    non-finite training steps traced to them; ``quarantined`` ones are out of training."""
    return [DeviceFlag(**f) for f in service.store.flags()]


@router.delete(ROUTE_QUARANTINE_DEVICE, status_code=204, responses=ERRORS)
def release(device_id: str, _: AdminAuth, service: ServiceDep) -> Response:
    """Lift a device's quarantine and forget its offences: its samples rejoin training."""
    service.release(device_id)
    return Response(status_code=204)


@router.get(ROUTE_METRICS, response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format (``fedmobillm.server.metrics``): counters, gauges, process."""
    return Response(render(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
