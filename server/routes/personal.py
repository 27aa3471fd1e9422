"""The personal model: the zip a device downloads for its architecture."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response

from fedmobillm.device_runtime.messages import ROUTE_PERSONAL_MODEL
from fedmobillm.server.errors import ServerError
from fedmobillm.server.personal import read_personal_zip
from fedmobillm.server.routes.deps import ERRORS, DeviceAuth, SettingsDep

router = APIRouter(tags=["devices"])


class NotReady(ServerError):
    status = 409

    def __init__(self) -> None:
        super().__init__(
            "the personal model for this device's architecture is not trained yet",
            hint="upload labelled training batches and retry after the trainer exports",
        )


@router.get(
    ROUTE_PERSONAL_MODEL,
    responses={**ERRORS, 200: {"content": {"application/zip": {}}}},
    response_class=Response,
)
def personal_model(
    request: Request,
    device: DeviceAuth,
    settings: SettingsDep,
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
