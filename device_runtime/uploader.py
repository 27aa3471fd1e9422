"""HTTP to the server, with explicit timeouts and retries: exponential backoff with full
jitter on connection errors, 5xx and 429 (honouring Retry-After); any other 4xx is final
and ends with the server's own message. Optional bandwidth throttling simulates a phone
link. Torch-free.

TLS (``TlsConfig``): an ``https://`` server is verified against the system's CAs, a CA
bundle (``--ca-bundle FILE``) or a pinned certificate (``--pin-sha256 HEX``: the SHA-256 of
the server certificate's DER bytes, checked during the handshake, before a byte of the
request, the bearer token included, is sent). A certificate that fails is an error at
once, never retried. A device configured for TLS refuses an ``http://`` URL; plaintext to
a host other than loopback is allowed but warned about loudly (activations, labels and the
token would cross the network readable)."""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import logging
import os
import random
import ssl
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


class TlsRefused(ServerUnavailable):
    """The server's certificate failed verification (unknown CA, wrong host, wrong pin), or
    TLS was required and the URL is plaintext."""


class PinMismatch(ssl.SSLCertVerificationError):
    """The server's certificate is not the pinned one."""


class _PinnedContext(ssl.SSLContext):
    """An SSL context that accepts exactly one certificate: the one whose DER bytes hash to
    ``pin`` (sha256 hex), checked when the handshake completes (inside wrap_socket, which
    httpx calls before it sends anything)."""

    pin: str = ""

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        sock = super().wrap_socket(*args, **kwargs)
        der = sock.getpeercert(binary_form=True) or b""
        got = hashlib.sha256(der).hexdigest()
        if got != self.pin:
            sock.close()
            raise PinMismatch(
                f"the server's certificate has sha256 {got}, not the pinned {self.pin}"
            )
        return sock


def normalise_pin(pin: str) -> str:
    """A certificate's SHA-256 fingerprint as 64 lower-case hex digits (colons and spaces, as
    `openssl x509 -fingerprint -sha256` prints them, are dropped)."""
    hexpin = pin.replace(":", "").replace(" ", "").strip().lower()
    if len(hexpin) != 64 or any(c not in "0123456789abcdef" for c in hexpin):
        raise FedMobiLLMError(
            f"--pin-sha256 {pin!r} is not a SHA-256 fingerprint (64 hex digits)",
            hint="print it with `openssl x509 -in server.crt -noout -fingerprint -sha256`",
        )
    return hexpin


@dataclass(frozen=True)
class TlsConfig:
    """How a device verifies an https server: ``ca_bundle`` (a PEM file of trusted CAs),
    ``pin_sha256`` (the server certificate's sha256: exactly that certificate is accepted,
    whoever signed it), or neither (the system's CAs)."""

    ca_bundle: str | None = None
    pin_sha256: str | None = None

    @property
    def required(self) -> bool:
        return bool(self.ca_bundle or self.pin_sha256)

    def verify(self) -> ssl.SSLContext | bool:
        """httpx's ``verify=``: an SSL context for a CA bundle or a pin, else True."""
        if self.pin_sha256:
            ctx = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False  # the pin names the certificate itself
            ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.pin = normalise_pin(self.pin_sha256)
            return ctx
        if self.ca_bundle:
            try:
                return ssl.create_default_context(cafile=self.ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise FedMobiLLMError(
                    f"--ca-bundle {self.ca_bundle} cannot be read as PEM certificates: {exc}",
                    hint="pass the PEM file of the CA that signed the server's certificate",
                ) from exc
        return True

    def to_dict(self) -> dict[str, str | None]:
        return {"ca_bundle": self.ca_bundle, "pin_sha256": self.pin_sha256}


def check_transport(server: str, tls: TlsConfig) -> None:
    """Refuse plaintext when TLS is configured; warn loudly about plaintext to a host that
    is not loopback."""
    url = httpx.URL(server)
    if url.scheme == "https":
        return
    if tls.required:
        raise TlsRefused(
            f"server {server} is plaintext http, but this device verifies the server "
            "(--ca-bundle / --pin-sha256): refusing to send activations and the token "
            "unencrypted",
            hint="use the https:// URL of the server (`fedmobillm serve --ssl-certfile ... "
            "--ssl-keyfile ...`)",
        )
    if not _loopback(url.host):
        log.warning(
            "PLAINTEXT: %s is not loopback and not https: activations, labels and the device "
            "token cross the network readable by anyone on the path. Serve with "
            "--ssl-certfile/--ssl-keyfile and use https:// (docs/privacy.md)",
            server,
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind an httpx transport error, if any."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


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
    tls: TlsConfig = field(default_factory=TlsConfig)

    def __post_init__(self) -> None:
        if self.bandwidth_mbps is not None and self.bandwidth_mbps <= 0:
            raise FedMobiLLMError("--bandwidth-mbps must be positive")
        self._rng = random.Random(self.seed)
        check_transport(self.server, self.tls)
        self._http = httpx.Client(
            base_url=self.server.rstrip("/"),
            timeout=self.retry.timeout(),
            headers={"Authorization": f"Bearer {self.token}"},
            verify=self.tls.verify(),
            # A pinned certificate is checked in wrap_socket; through an HTTPS proxy from
            # the environment httpcore would wrap with wrap_bio instead and skip the pin:
            # a pinned device ignores proxy variables (HTTPS_PROXY, ...).
            trust_env=not self.tls.pin_sha256,
        )
        if self.tls.pin_sha256 and any(
            os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
        ):
            log.warning("a pinned server certificate: the proxy set in the environment is not used")

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
                bad_cert = tls_failure(exc)
                if bad_cert is not None:  # never retried: it will not get better
                    raise TlsRefused(
                        f"server {self.server} failed TLS verification: {bad_cert}; nothing "
                        "was sent",
                        hint="pass --ca-bundle with the CA that signed the server's "
                        "certificate, or --pin-sha256 with its fingerprint (docs/privacy.md)",
                    ) from exc
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
