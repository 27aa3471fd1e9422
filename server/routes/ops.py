"""Operations: liveness, fleet and trainer status (admin), Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from fedmobillm.device_runtime.messages import (
    ROUTE_HEALTHZ,
    ROUTE_METRICS,
    ROUTE_QUARANTINE,
    ROUTE_QUARANTINE_DEVICE,
    ROUTE_STATUS,
    DeviceFlag,
)
from fedmobillm.server.routes.deps import ERRORS, AdminAuth, ServiceDep
from fedmobillm.server.service import Service

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


@router.get(ROUTE_METRICS, response_class=PlainTextResponse)
def metrics(request: Request, service: ServiceDep) -> str:
    return _metrics_text(service, request.app.state.trainer)


def _metrics_text(service: Service, trainer: Any) -> str:
    c = service.counters
    totals = service.store.totals()
    writes = service.store.write_stats.snapshot()
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
        "# TYPE fedmobillm_conflict_requests_total counter",
        f"fedmobillm_conflict_requests_total {c.conflicts}",
        "# TYPE fedmobillm_refused_values_total counter",
        f"fedmobillm_refused_values_total {c.offences}",
        # store commits holding uploads, and the uploads they held (SQLite group commit:
        # several a commit; the largest group since start)
        "# TYPE fedmobillm_ingest_commits_total counter",
        f"fedmobillm_ingest_commits_total {writes['commits']}",
        "# TYPE fedmobillm_ingest_committed_uploads_total counter",
        f"fedmobillm_ingest_committed_uploads_total {writes['writes']}",
        "# TYPE fedmobillm_ingest_largest_group gauge",
        f"fedmobillm_ingest_largest_group {writes['largest']}",
        "# TYPE fedmobillm_quarantined_devices gauge",
        f"fedmobillm_quarantined_devices {len(service.store.quarantined())}",
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
            "# TYPE fedmobillm_trainer_skipped_steps_total counter",
            f"fedmobillm_trainer_skipped_steps_total {st.get('skipped_steps', 0)}",
            "# TYPE fedmobillm_trainer_weights_finite gauge",
            f"fedmobillm_trainer_weights_finite {int(bool(st.get('weights_finite', True)))}",
            "# TYPE fedmobillm_trainer_dropped_samples_total counter",
            f"fedmobillm_trainer_dropped_samples_total {sum(st.get('dropped_samples', {}).values())}",
        ]
        if st.get("loss") is not None:
            lines += [
                "# TYPE fedmobillm_trainer_loss gauge",
                f"fedmobillm_trainer_loss {st['loss']}",
            ]
    return "\n".join(lines) + "\n"
