"""Bounds on what one request can cost the server, enforced before authentication.

- ``RequestLimits`` (ASGI middleware): request headers larger than ``max_header_bytes`` are
  answered 431; a body on any route but the batch upload is read only up to
  ``max_request_bytes`` (a declared Content-Length above it is refused before reading a
  byte, an undeclared one when the running count passes it) and answered 413. Batch uploads
  authenticate first and are then read in chunks up to ``max_body_bytes``
  (``routes.ingest``), so an unauthenticated body is never read at all.
- ``AuthThrottle``: a client (by address) that presents ``auth_failures_per_minute`` wrong
  tokens within a moving minute gets 429 with ``Retry-After`` on every authenticated route
  until the window has room again. Requests without a token are not counted: they guess
  nothing.
- ``IngestGate``: back-pressure on batch uploads. An authenticated upload is answered 429
  with ``Retry-After`` (seconds, with jitter) when ``max_inflight_uploads`` uploads are
  already in flight, when the trainer's unread backlog is past ``max_backlog_samples``, or
  when it waited ``max_write_wait_s`` for the store's write slot (SQLite with group commit:
  for a place in the next group); always before anything of it is stored, so a 429 never
  loses an acknowledged sample and a retry is safe. Uploads run on their own thread
  limiter, so ``/v1/status`` and the other routes keep their threads.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from fedmobillm.device_runtime.messages import ROUTE_BATCHES, ErrorBody
from fedmobillm.server.errors import ServerError
from fedmobillm.server.store_sql import WriteWaitExpired

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TooManyRequests(ServerError):
    status = 429

    def __init__(self, message: str, retry_after: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.retry_after = retry_after


class AuthThrottle:
    """Counts wrong tokens per client in a moving one-minute window (``limits``)."""

    def __init__(self, per_minute: int) -> None:
        self.item = RateLimitItemPerMinute(per_minute)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def check(self, client: str) -> None:
        """Raise ``TooManyRequests`` while ``client`` is over its budget of failures."""
        if self.limiter.test(self.item, "auth-failures", client):
            return
        reset = self.limiter.get_window_stats(self.item, "auth-failures", client).reset_time
        wait = max(1, int(reset - time.time()) + 1)
        raise TooManyRequests(
            f"too many failed authentications from {client}: retry in {wait} s",
            retry_after=wait,
            hint="check the token: devices use the token `device register` printed, operators "
            "the server's admin token",
        )

    def failed(self, client: str) -> None:
        self.limiter.hit(self.item, "auth-failures", client)


class IngestGate:
    """Back-pressure on batch uploads (see the module docstring). ``admit()`` runs on the
    event loop around the whole upload; ``write_slot()`` on the upload's worker thread
    around the store commit (``write_slots`` commits at once: 1 for SQLite's one writer
    without group commit; with it the store's group queue is the wait, bounded by the rest
    of ``max_write_wait_s`` that the slot yields). ``backlog()``: stored samples the trainer
    has not read (0 without a trainer)."""

    def __init__(
        self,
        max_inflight: int,
        max_write_wait_s: float,
        max_backlog: int,
        retry_after_s: int,
        backlog: Callable[[], int] = lambda: 0,
        write_slots: int = 1,
        seed: int | None = None,
    ) -> None:
        self.max_inflight = max_inflight
        self.max_write_wait_s = max_write_wait_s
        self.max_backlog = max_backlog
        self.retry_after_s = retry_after_s
        self.backlog = backlog
        self.inflight = 0
        self.limiter = anyio.CapacityLimiter(max_inflight)  # the uploads' own threads
        self.refused = {"inflight": 0, "backlog": 0, "write_wait": 0}
        self._slots = threading.BoundedSemaphore(write_slots)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def retry_after(self) -> int:
        """Seconds a refused device waits: the base plus uniform jitter of up to as much
        again, so that refused devices do not come back all at once."""
        with self._lock:
            return self.retry_after_s + self._rng.randint(0, self.retry_after_s)

    def _refuse(self, why: str, message: str) -> TooManyRequests:
        with self._lock:
            self.refused[why] += 1
        wait = self.retry_after()
        return TooManyRequests(
            f"{message}: retry in {wait} s (nothing of this upload was stored)",
            retry_after=wait,
            hint="the device client retries on its own after Retry-After; an operator can "
            "raise max_inflight_uploads / max_backlog_samples or add ingest workers",
        )

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count one upload in flight, or raise TooManyRequests (on the event loop)."""
        if self.inflight >= self.max_inflight:
            raise self._refuse(
                "inflight", f"the server is busy ({self.inflight} uploads in flight)"
            )
        backlog = self.backlog()
        if self.max_backlog and backlog > self.max_backlog:
            raise self._refuse(
                "backlog", f"the trainer is {backlog} samples behind (bound {self.max_backlog})"
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    @contextmanager
    def write_slot(self) -> Iterator[float]:
        """Hold one of the store's write slots, or raise TooManyRequests after waiting
        ``max_write_wait_s`` (on a worker thread). Yields what is left of that wait: the
        bound of the store's own wait for a place in a group commit, whose expiry
        (``WriteWaitExpired``, nothing stored) is answered the same 429."""
        start = time.monotonic()
        if not self._slots.acquire(timeout=self.max_write_wait_s):
            raise self._refuse(
                "write_wait",
                f"the store's writer is busy (waited {self.max_write_wait_s:g} s)",
            )
        try:
            yield max(0.0, self.max_write_wait_s - (time.monotonic() - start))
        except WriteWaitExpired:
            raise self._refuse(
                "write_wait",
                f"the store's writer is busy (waited {self.max_write_wait_s:g} s for a place "
                "in a group commit)",
            ) from None
        finally:
            self._slots.release()

    def stats(self) -> dict[str, Any]:
        """In flight now and refusals since start, by reason."""
        with self._lock:
            return {"inflight": self.inflight, "refused": dict(self.refused)}


class RequestLimits:
    """Header and body bounds for every route (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        max_request_bytes: int,
        max_header_bytes: int,
        on_refuse: Callable[[int], None] = lambda status: None,
    ) -> None:
        self.app = app
        self.max_request = max_request_bytes
        self.max_header = max_header_bytes
        self.on_refuse = on_refuse  # counts refusals for /metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        size = sum(len(k) + len(v) + 4 for k, v in headers)
        if size > self.max_header:
            self.on_refuse(431)
            await _refuse(
                send,
                431,
                f"request headers of {size} bytes exceed the limit of {self.max_header}",
                "send fewer or shorter headers",
            )
            return
        if scope.get("path") == ROUTE_BATCHES and scope.get("method") == "POST":
            await self.app(scope, receive, send)  # authenticated, then read in bounded chunks
            return
        declared = dict(headers).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_request:
            self.on_refuse(413)
            await _too_large(send, int(declared), self.max_request)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_request:
                self.on_refuse(413)
                await _too_large(send, None, self.max_request)
                return
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the disconnect, when it comes

    return replay


async def _too_large(send: Send, declared: int | None, limit: int) -> None:
    what = f"body of {declared} bytes" if declared is not None else "body"
    await _refuse(
        send,
        413,
        f"{what} exceeds the limit of {limit} bytes for this route",
        "JSON requests are small; batches go to POST " + ROUTE_BATCHES,
    )


async def _refuse(send: Send, status: int, detail: str, hint: str) -> None:
    payload = json.dumps(ErrorBody(detail, hint).to_dict()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
