"""What every router shares: authentication (admin token or device token), the service and
settings of the app, and the error responses every route documents.

Dependencies that do not block are ``async def``: FastAPI runs a plain ``def`` dependency on
a worker thread, a hop (and, with the trainer thread in the same process, a wait for the
GIL) per dependency per request. Only ``_authenticate`` reads the store and stays on a
thread."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fedmobillm.device_runtime.messages import ErrorBody
from fedmobillm.server.errors import Forbidden, Unauthorized
from fedmobillm.server.service import Service
from fedmobillm.server.settings import ServerSettings
from fedmobillm.server.store import Device

ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409, 413, 415, 429)
}


@dataclass
class Principal:
    admin: bool
    device: Device | None = None


_bearer = HTTPBearer(auto_error=False, description="admin token or device token")


async def _service(request: Request) -> Service:
    return request.app.state.service


async def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def _authenticate(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if creds is None or not creds.credentials:
        raise Unauthorized("missing credentials: send `Authorization: Bearer <token>`")
    token = creds.credentials
    client = request.client.host if request.client else "unknown"
    throttle = request.app.state.throttle
    throttle.check(client)  # 429 while this client is over its budget of wrong tokens
    admin_token = request.app.state.settings.admin_token.get_secret_value()
    if hmac.compare_digest(token.encode(), admin_token.encode()):
        return Principal(admin=True)
    device = request.app.state.service.store.device_by_token(token)
    if device is None:
        throttle.failed(client)
        raise Unauthorized("unknown token", hint="register the device to get a token")
    return Principal(admin=False, device=device)


async def _admin(principal: Annotated[Principal, Depends(_authenticate)]) -> Principal:
    if not principal.admin:
        raise Forbidden("this endpoint needs the admin token")
    return principal


async def _device(principal: Annotated[Principal, Depends(_authenticate)]) -> Device:
    if principal.device is None:
        raise Forbidden("this endpoint needs a device token")
    return principal.device


AnyAuth = Annotated[Principal, Depends(_authenticate)]
AdminAuth = Annotated[Principal, Depends(_admin)]
DeviceAuth = Annotated[Device, Depends(_device)]
ServiceDep = Annotated[Service, Depends(_service)]
SettingsDep = Annotated[ServerSettings, Depends(_settings)]
