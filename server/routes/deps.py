"""What every router shares: authentication (admin token or device token), the service and
settings of the app, and the error responses every route documents.

Dependencies that do not block are ``async def``: FastAPI runs a plain ``def`` dependency on
a worker thread, a hop (and, with the trainer thread in the same process, a wait for the
GIL) per dependency per request. Only ``_authenticate`` reads the store and stays on a
thread. Batch uploads authenticate with ``upload_device`` (no dependency: ``routes.ingest``).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

import anyio.to_thread
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
    token, client = _checked_token(request, creds)
    if _is_admin(request, token):
        return Principal(admin=True)
    device = request.app.state.service.store.device_by_token(token)
    if device is None:
        _unknown(request, client)
    return Principal(admin=False, device=device)


def _checked_token(request: Request, creds: HTTPAuthorizationCredentials | None) -> tuple[str, str]:
    """(token, client address), or Unauthorized without one, TooManyRequests while the
    client is over its budget of wrong tokens."""
    if creds is None or not creds.credentials:
        raise Unauthorized("missing credentials: send `Authorization: Bearer <token>`")
    client = request.client.host if request.client else "unknown"
    request.app.state.throttle.check(client)
    return creds.credentials, client


def _is_admin(request: Request, token: str) -> bool:
    admin_token = request.app.state.settings.admin_token.get_secret_value()
    return hmac.compare_digest(token.encode(), admin_token.encode())


def _unknown(request: Request, client: str) -> NoReturn:
    request.app.state.throttle.failed(client)
    raise Unauthorized("unknown token", hint="register the device to get a token")


async def upload_device(request: Request) -> Device:
    """The device of a batch upload's token (``routes.ingest``; the checks of ``_device``):
    from the service's cache of authenticated devices, else from the store on a worker
    thread. A cached device revoked since (by another process) is refused inside the write
    transaction that would store its batch (``Service._store_batch``: 401, nothing stored)."""
    token, client = _checked_token(request, await _bearer(request))
    if _is_admin(request, token):
        raise Forbidden("this endpoint needs a device token")
    service: Service = request.app.state.service
    device = service.cached_device(token)
    if device is None:
        device = await anyio.to_thread.run_sync(service.device_by_token, token)
    if device is None:
        _unknown(request, client)
    return device


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
