"""HTTP to the server, with explicit timeouts and retries: exponential backoff with full
jitter on connection errors, 5xx and 429 (honouring Retry-After); any other 4xx is final
and ends with the server's own message. Optional bandwidth throttling simulates a phone
link. Torch-free."""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from fedmobillm.device_runtime.messages import ROUTE_BATCHES, ErrorBody, MessageError
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)


class ServerUnavailable(FedMobiLLMError):
    """The server could not be reached (or kept failing) after every retry."""


class ServerRejected(FedMobiLLMError):
    """The server answered with a final 4xx."""

    def __init__(self, message: str, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.status = status


@dataclass
class RetryPolicy:
    """attempts = tries in all; delay before retry n (0-based) is uniform in
    [0, min(cap_s, base_s * 2**n)] ("full jitter"), at least Retry-After when given."""

    attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 30.0
    max_retry_after_s: float = 120.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    write_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s < 0 or self.cap_s < 0:
            raise FedMobiLLMError("retry attempts must be >= 1 and delays >= 0")

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        jitter = rng.uniform(0.0, min(self.cap_s, self.base_s * (2**attempt)))
        if retry_after is None:
            return jitter
        return max(jitter, min(retry_after, self.max_retry_after_s))

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.connect_timeout_s,
            read=self.read_timeout_s,
            write=self.write_timeout_s,
            pool=self.connect_timeout_s,
        )


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def server_message(resp: httpx.Response) -> str:
    """The server's error text: an ErrorBody, FastAPI's own {"detail": [...]} (422) or the
    raw body."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or resp.reason_phrase
    try:
        err = ErrorBody.from_dict(data)
    except MessageError:
        if isinstance(data, dict) and "detail" in data:
            return str(data["detail"])
        return str(data)[:500]
    return f"{err.detail} (server hint: {err.hint})" if err.hint else err.detail


@dataclass
class UploadStats:
    requests: int = 0
    retries: int = 0
    bytes_sent: int = 0  # request bodies of acknowledged uploads
    seconds: float = 0.0  # wall time of those uploads, throttling included
    measured_seconds: float = 0.0  # the same without the simulated link's extra wait


@dataclass
class Uploader:
    """One HTTP client to one server, authenticated with a bearer token."""

    server: str
    token: str
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    bandwidth_mbps: float | None = None
    sleep: Callable[[float], None] = time.sleep
    seed: int | None = None
    stats: UploadStats = field(default_factory=UploadStats)

    def __post_init__(self) -> None:
        if self.bandwidth_mbps is not None and self.bandwidth_mbps <= 0:
            raise FedMobiLLMError("--bandwidth-mbps must be positive")
        self._rng = random.Random(self.seed)
        self._http = httpx.Client(
            base_url=self.server.rstrip("/"),
            timeout=self.retry.timeout(),
            headers={"Authorization": f"Bearer {self.token}"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Uploader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send with retries; returns the first response that is neither 5xx nor 429.

        Raises ServerUnavailable when every attempt failed."""
        last = ""
        for attempt in range(self.retry.attempts):
            retry_after = None
            try:
                self.stats.requests += 1
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # connect/read/write errors and timeouts
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if resp.status_code != 429 and resp.status_code < 500:
                    return resp
                last = f"HTTP {resp.status_code}: {server_message(resp)}"
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            if attempt + 1 == self.retry.attempts:
                break
            delay = self.retry.delay(attempt, retry_after, self._rng)
            self.stats.retries += 1
            log.warning(
                "%s %s%s failed (%s); retry %d/%d in %.2f s",
                method,
                self.server,
                path,
                last,
                attempt + 1,
                self.retry.attempts - 1,
                delay,
            )
            self.sleep(delay)
        raise ServerUnavailable(
            f"server {self.server} did not answer {method} {path} after "
            f"{self.retry.attempts} attempts (last: {last})",
            hint="check --server and that `fedmobillm serve` is running",
        )

    def post_batch(self, body: bytes) -> dict[str, Any]:
        """POST one encoded batch; returns the server's acknowledgement."""
        start = time.perf_counter()
        resp = self.request(
            "POST",
            ROUTE_BATCHES,
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        if resp.status_code != 200:
            raise rejected(resp, "upload")
        measured = time.perf_counter() - start
        simulated = self._throttle(len(body), measured)
        self.stats.bytes_sent += len(body)
        self.stats.measured_seconds += measured
        self.stats.seconds += max(measured, simulated)
        return resp.json()

    def _throttle(self, nbytes: int, elapsed: float) -> float:
        """Sleep so that nbytes took as long as they would at bandwidth_mbps."""
        if not self.bandwidth_mbps:
            return elapsed
        target = nbytes * 8 / (self.bandwidth_mbps * 1e6)
        if target > elapsed:
            self.sleep(target - elapsed)
        return target


def rejected(resp: httpx.Response, what: str) -> ServerRejected:
    msg = server_message(resp)
    hint = None
    if resp.status_code in (401, 403):
        hint = "the device token is not valid on this server: register the device again"
    elif resp.status_code == 409:
        hint = "the server keeps a conflicting record; see its message"
    return ServerRejected(
        f"server rejected the {what} (HTTP {resp.status_code}): {msg}", resp.status_code, hint
    )
