"""Errors of the server's service layer. Each carries the HTTP status the API layer answers
with; only the API layer (``app``) turns them into responses."""

from __future__ import annotations

from fedmobillm.errors import FedMobiLLMError


class ServerError(FedMobiLLMError):
    status = 400


class BadRequest(ServerError):
    status = 400


class Unauthorized(ServerError):
    status = 401


class Forbidden(ServerError):
    status = 403


class NotFound(ServerError):
    status = 404


class Conflict(ServerError):
    status = 409


class PayloadTooLarge(ServerError):
    status = 413


class UnsupportedMediaType(ServerError):
    status = 415
