"""The JSON half of the wire protocol, defined once for device and server: every message
both ends exchange, the personal model's manifest (``personal.json``) and the route paths.
The binary half (the batch upload) is ``protocol`` + ``serde``.

Messages are stdlib dataclasses (the device has no pydantic): ``to_dict()`` gives the JSON
object, ``from_dict()`` checks every field's type and raises ``MessageError`` naming the
message and the field. Unknown keys are ignored, so a newer peer may add fields. The server
uses these same classes as FastAPI request bodies and response models.

Routes (all JSON unless noted; auth: ``Authorization: Bearer <token>``)::

    POST ROUTE_DEVICES          admin   RegisterRequest -> 201 RegisterResponse
    GET  ROUTE_DEVICES          admin   -> list[DeviceInfo] (revoked ones too)
    POST ROUTE_DEVICE_REVOKE    admin   RevokeRequest -> Revoked (the token stops working)
    GET  ROUTE_DEVICE           device  -> DeviceState (a device reads only its own)
    POST ROUTE_BATCHES          device  serde payload (application/octet-stream) -> Ack
    GET  ROUTE_ANCHORS          device  -> AnchorShare
    GET  ROUTE_PERSONAL_MODEL   device  -> zip (personal graph(s) + PersonalManifest)
    GET  ROUTE_STATUS           admin   -> fleet and trainer status (free-form object)
    GET  ROUTE_HEALTHZ, ROUTE_METRICS   no auth (Prometheus text)
    GET  ROUTE_DASHBOARD        no auth (HTML page; it asks for the admin token and reads
                                ROUTE_STATUS and ROUTE_QUARANTINE with it)

Any error: ErrorBody, with the HTTP status saying which.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from fedmobillm.errors import FedMobiLLMError

ROUTE_DEVICES = "/v1/devices"
ROUTE_DEVICE = "/v1/devices/{device_id}"
ROUTE_DEVICE_REVOKE = "/v1/devices/{device_id}/revoke"
ROUTE_BATCHES = "/v1/batches"
ROUTE_ANCHORS = "/v1/anchors"
ROUTE_PERSONAL_MODEL = "/v1/personal-model"
ROUTE_STATUS = "/v1/status"
ROUTE_HEALTHZ = "/healthz"
ROUTE_METRICS = "/metrics"
ROUTE_QUARANTINE = "/v1/quarantine"
ROUTE_QUARANTINE_DEVICE = "/v1/quarantine/{device_id}"
ROUTE_DASHBOARD = "/dashboard"
ROUTES = (
    ROUTE_DEVICES,
    ROUTE_DEVICE,
    ROUTE_DEVICE_REVOKE,
    ROUTE_BATCHES,
    ROUTE_ANCHORS,
    ROUTE_PERSONAL_MODEL,
    ROUTE_STATUS,
    ROUTE_HEALTHZ,
    ROUTE_METRICS,
    ROUTE_QUARANTINE,
    ROUTE_QUARANTINE_DEVICE,
    ROUTE_DASHBOARD,
)

PERSONAL_FORMAT_VERSION = 1


def device_route(device_id: str) -> str:
    """ROUTE_DEVICE for one device."""
    return ROUTE_DEVICE.format(device_id=device_id)


class MessageError(FedMobiLLMError):
    """A JSON message that does not have its message's shape."""


M = TypeVar("M", bound="Message")


class Message:
    """Base of the wire messages (each a dataclass)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[M], data: Any) -> M:
        """Validate ``data`` (a decoded JSON object) and build the message."""
        return _build(cls, data, cls.__name__)


# -- registration -------------------------------------------------------------------------


@dataclass
class PrivacyDeclaration(Message):
    """The local differential privacy a device applies before uploading (privacy.py):
    every tap vector clipped to L2 norm ``clip``, Gaussian noise of ``noise_multiplier`` x
    the per-sample sensitivity, (epsilon, delta) per sample; labels by randomised response
    at ``label_epsilon`` (None: labels as they are)."""

    mechanism: str  # "gaussian-rdp"
    epsilon: float
    delta: float
    clip: float
    noise_multiplier: float = 0.0
    label_epsilon: float | None = None


@dataclass
class RegisterRequest(Message):
    name: str  # 1..100 characters
    manifest: dict[str, Any]  # the bundle's manifest.json (protocol.Manifest.to_dict())
    label_names: list[str]  # 2..1000: the task's labels, fixed by the first registration
    # ([] for task "lm": its targets are the device's tokens)
    privacy: PrivacyDeclaration | None = None  # None: uploads without a privacy mechanism
    task: str = "classify"  # protocol.TASKS: must be the federation's (server setting task)


@dataclass
class RegisterResponse(Message):
    device_id: str
    token: str  # the device's bearer token: a secret
    architecture: str
    bundle_sha256: str
    task: str = "classify"  # the federation's task (protocol.TASKS)


# -- ingest and device state -------------------------------------------------------------


@dataclass
class SampleCounts(Message):
    train: int
    validation: int
    anchor: int = 0


@dataclass
class Ack(Message):
    """The answer to an upload: the batch is durably stored."""

    batch_id: str
    samples: int
    split: str
    duplicate: bool  # the idempotency key was acknowledged before: nothing new stored
    device_samples: SampleCounts  # what the server now holds of this device
    skipped: int = 0  # samples whose ids the server already held


@dataclass
class DeviceState(Message):
    """The server's view of one device."""

    device_id: str
    name: str
    architecture: str
    bundle_sha256: str
    samples: SampleCounts
    batches: int
    acked_keys: list[str]


@dataclass
class AnchorShare(Message):
    anchor_set: str  # sha256 of the server's anchor texts
    total: int  # texts in the set
    ids: list[int]  # this device's share: upload text i with sample id ids[i]
    texts: list[str]


@dataclass
class DeviceFlag(Message):
    """A device with offences (refused impossible uploads, non-finite steps traced to it);
    ``quarantined`` is the time it was quarantined (uploads refused, samples out of
    training), or None while it is only counted."""

    device_id: str
    name: str
    architecture: str
    offences: int
    last_reason: str
    quarantined: float | None = None


@dataclass
class DeviceInfo(Message):
    """One registered device as an admin lists it (GET ROUTE_DEVICES)."""

    device_id: str
    name: str
    architecture: str
    samples: SampleCounts  # what the store holds of it (0 once its data is deleted)
    registered: float  # unix time
    last_upload: float | None = None  # its latest acknowledged batch; None before any
    quarantined: bool = False
    revoked: float | None = None  # when its token was revoked; None while it works
    data_deleted: bool = False  # its samples were removed from the store
    privacy: PrivacyDeclaration | None = None  # what it declared at registration


@dataclass
class RevokeRequest(Message):
    delete_data: bool = False  # also remove its samples from the store (and from training)


@dataclass
class Revoked(Message):
    """The answer to a revocation: the device's token is refused (401) from now on."""

    device_id: str
    revoked: float  # when it was first revoked
    deleted_samples: int = 0  # samples removed from the store by this request


@dataclass
class ErrorBody(Message):
    detail: str
    hint: str | None = None


# -- personal model ----------------------------------------------------------------------


@dataclass
class PersonalManifest(Message):
    """``personal.json`` in a personal model: the graph takes ``taps`` activations of
    width ``hidden_size`` and returns ``num_labels`` logits."""

    format_version: int
    architecture: str
    taps: list[int]
    hidden_size: int
    label_names: list[str]
    num_labels: int = 0
    bundle_sha256s: list[str] = field(default_factory=list)  # bundles it was trained on
    trainer_step: int = 0
    encoding: str = "int8"  # what the side network saw: "int8" or "fp16" uploads
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    # "pivot": activations (B, K, d); "tokens": activations (B, K, T, d) + attention_mask (B, T)
    side_inputs: str = "pivot"
    onnx_max_abs_diff: float | None = None  # fp32 graph against torch
    weights: str = "fp32"  # personal.onnx weights: "int8" or "fp32"
    int8_max_abs_logit_diff: float | None = None  # int8 graph against torch
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> sha256, bytes
    task: str = "classify"  # "lm": the graph returns ``delta`` (B, T, d) for the frozen head


# -- validation --------------------------------------------------------------------------


@functools.cache
def _fields(cls: type) -> tuple[dict[str, Any], tuple[dataclasses.Field, ...]]:
    """A message class's resolved type hints and fields, worked out once per class
    (``get_type_hints`` evaluates every annotation string anew: most of an upload's
    acknowledgement time on the server's event loop before it was cached)."""
    return get_type_hints(cls), dataclasses.fields(cls)


def _build(cls: type[M], data: Any, where: str) -> M:
    if not isinstance(data, dict):
        raise _error(where, "a JSON object", data)
    hints, fields = _fields(cls)
    missing = [
        f.name
        for f in fields
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise MessageError(
            f"malformed {where}: missing {', '.join(missing)}",
            hint="the other side may speak another protocol version: update fedmobillm",
        )
    kwargs = {
        f.name: _check(data[f.name], hints[f.name], f"{where}.{f.name}")
        for f in fields
        if f.name in data
    }
    return cls(**kwargs)


def _check(value: Any, tp: Any, where: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:
            try:
                return _check(value, option, where)
            except MessageError:
                pass
        return _check(value, options[-1], where)
    if origin is list:
        if not isinstance(value, list):
            raise _error(where, "a list", value)
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _error(where, "an object", value)
        return {k: _check(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Message):
        return _build(tp, value, where)
    return _scalar(value, tp, where)


def _scalar(value: Any, tp: type, where: str) -> Any:
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise _error(where, _NAMES.get(tp, tp.__name__), value)
    return value


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _error(where: str, expected: str, value: Any) -> MessageError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return MessageError(
        f"malformed {where}: expected {expected}, got {type(value).__name__} {shown}",
        hint="the other side may speak another protocol version: update fedmobillm",
    )
