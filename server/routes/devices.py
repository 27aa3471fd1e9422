"""Devices: registration, the list and revocation (admin), a device's state, its share of
the anchor set."""

from __future__ import annotations

import dataclasses
import logging
from typing import Annotated

from fastapi import APIRouter
from pydantic import Field
from pydantic.dataclasses import dataclass

from fedmobillm.device_runtime import messages
from fedmobillm.device_runtime.messages import (
    AnchorShare,
    DeviceInfo,
    DeviceState,
    RegisterResponse,
    Revoked,
    RevokeRequest,
)
from fedmobillm.server.errors import Forbidden
from fedmobillm.server.privacy import check_declaration
from fedmobillm.server.routes.deps import (
    ERRORS,
    AdminAuth,
    AnyAuth,
    DeviceAuth,
    ServiceDep,
    SettingsDep,
)

log = logging.getLogger(__name__)

router = APIRouter(tags=["devices"], responses=ERRORS)


@dataclass
class RegisterRequest(messages.RegisterRequest):
    """The shared message with its bounds checked before the service sees it (422)."""

    name: Annotated[str, Field(min_length=1, max_length=100)]
    # 2..1000 for classify, [] for lm (the service checks which)
    label_names: Annotated[list[str], Field(max_length=1000)]


@router.post(messages.ROUTE_DEVICES, status_code=201)
def register(
    body: RegisterRequest, _: AdminAuth, service: ServiceDep, settings: SettingsDep
) -> RegisterResponse:
    """403 when the server requires ``max_epsilon`` and the device declares more or none."""
    privacy = None if body.privacy is None else dataclasses.asdict(body.privacy)
    check_declaration(privacy, settings.max_epsilon)
    out = RegisterResponse.from_dict(
        service.register(body.name, body.manifest, body.label_names, privacy, body.task)
    )
    log.info("registered %s (%s) as %s", body.name, out.architecture, out.device_id)
    return out


@router.get(messages.ROUTE_DEVICES)
def list_devices(_: AdminAuth, service: ServiceDep) -> list[DeviceInfo]:
    """Every registered device, revoked ones too: samples held, last upload, quarantine."""
    return [DeviceInfo.from_dict(d) for d in service.devices()]


@router.post(messages.ROUTE_DEVICE_REVOKE)
def revoke(device_id: str, body: RevokeRequest, _: AdminAuth, service: ServiceDep) -> Revoked:
    """Refuse the device's token from now on (401); ``delete_data`` also removes its
    samples from the store and from training."""
    return Revoked.from_dict(service.revoke(device_id, body.delete_data))


@router.get(messages.ROUTE_DEVICE)
def device_state(device_id: str, principal: AnyAuth, service: ServiceDep) -> DeviceState:
    if not principal.admin and (
        principal.device is None or principal.device.device_id != device_id
    ):
        raise Forbidden("a device may read only its own state")
    return DeviceState.from_dict(service.device_state(device_id))


@router.get(messages.ROUTE_ANCHORS)
def anchors(device: DeviceAuth, service: ServiceDep) -> AnchorShare:
    """The public anchor texts this device should forward and upload as split
    ``anchor`` (sample id = anchor id), so architectures can be aligned on them."""
    return AnchorShare.from_dict(service.anchor_share(device))
