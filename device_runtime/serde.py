"""All byte conversion of the wire protocol, in one place (see ``protocol`` for the format).

Device side: ``quantize_int8`` + ``encode_batch``. Server side: ``decode_batch`` (which
validates everything it can without knowing the device) + ``dequantize``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedmobillm.device_runtime.protocol import (
    ENCODINGS,
    PROTOCOL_VERSION,
    SPLITS,
    T_ACTIVATIONS,
    T_LABELS,
    T_SAMPLE_IDS,
    T_SCALES,
)
from fedmobillm.errors import FedMobiLLMError


class PayloadError(FedMobiLLMError):
    """A malformed upload payload (the server answers 4xx with this message)."""


@dataclass
class Batch:
    """One upload: N samples, K taps, width d."""

    device_id: str
    bundle_sha256: str
    idempotency_key: str
    split: str
    encoding: str
    activations: np.ndarray  # (N, K, d) int8 or float16
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    sample_ids: np.ndarray  # (N,) int64
    scales: np.ndarray | None = None  # (K,) float32, int8 only
    protocol: int = PROTOCOL_VERSION

    @property
    def num_samples(self) -> int:
        return int(self.activations.shape[0])

    def dequantized(self) -> np.ndarray:
        """float32 (N, K, d)."""
        return dequantize(self.activations, self.scales)


def quantize_int8(x: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Symmetric per-tap int8: x (N, K, d) float, scales (K,) -> int8 (N, K, d)."""
    s = np.asarray(scales, dtype=np.float32).reshape(1, -1, 1)  # (1, K, 1)
    return np.clip(np.rint(x / s), -127, 127).astype(np.int8)


def dequantize(q: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """int8 ``(..., K, d)`` times per-tap ``scales`` (K,), or float16 as it is -> float32
    ``(..., K, d)``: a batch (N, K, d) or one stored sample (K, d)."""
    if q.dtype == np.int8:
        if scales is None:
            raise PayloadError("int8 activations need scales")
        return q.astype(np.float32) * np.asarray(scales, np.float32).reshape(-1, 1)  # (K, 1)
    return q.astype(np.float32)


def encode_batch(batch: Batch) -> bytes:
    tensors = {
        T_ACTIVATIONS: np.ascontiguousarray(batch.activations),
        T_LABELS: np.ascontiguousarray(batch.labels, dtype=np.int64),
        T_SAMPLE_IDS: np.ascontiguousarray(batch.sample_ids, dtype=np.int64),
    }
    if batch.encoding == "int8":
        if batch.scales is None:
            raise PayloadError("int8 encoding needs per-tap scales")
        tensors[T_SCALES] = np.ascontiguousarray(batch.scales, dtype=np.float32)
    metadata = {
        "protocol": str(batch.protocol),
        "device_id": batch.device_id,
        "bundle_sha256": batch.bundle_sha256,
        "idempotency_key": batch.idempotency_key,
        "split": batch.split,
        "encoding": batch.encoding,
    }
    return st_save(tensors, metadata=metadata)


def _read_metadata(payload: bytes) -> dict[str, str]:
    if len(payload) < 8:
        raise PayloadError("payload is too short to be a safetensors file")
    n = int.from_bytes(payload[:8], "little")
    if n <= 0 or 8 + n > len(payload):
        raise PayloadError("payload header length is out of range: not a safetensors file")
    try:
        header = json.loads(payload[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"payload header is not JSON: {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise PayloadError("payload has no __metadata__ header (device, bundle, protocol)")
    return meta


def decode_batch(payload: bytes) -> Batch:
    """Parse and validate a payload's structure. Raises PayloadError with a clear message."""
    meta = _read_metadata(payload)
    missing = [
        k
        for k in ("protocol", "device_id", "bundle_sha256", "idempotency_key", "split", "encoding")
        if not isinstance(meta.get(k), str) or not meta.get(k)
    ]
    if missing:
        raise PayloadError(f"payload header lacks: {', '.join(missing)}")
    if meta["protocol"] != str(PROTOCOL_VERSION):
        raise PayloadError(
            f"protocol version {meta['protocol']} is not supported; this server speaks "
            f"{PROTOCOL_VERSION}"
        )
    if meta["split"] not in SPLITS:
        raise PayloadError(f"split must be one of {SPLITS}, not {meta['split']!r}")
    if meta["encoding"] not in ENCODINGS:
        raise PayloadError(f"encoding must be one of {ENCODINGS}, not {meta['encoding']!r}")
    if len(meta["idempotency_key"]) > 200:
        raise PayloadError("idempotency_key is longer than 200 characters")
    try:
        tensors = st_load(payload)
    except Exception as exc:  # safetensors raises its own error types
        raise PayloadError(f"payload is not a valid safetensors file: {exc}") from exc
    expected = {T_ACTIVATIONS, T_LABELS, T_SAMPLE_IDS}
    if meta["encoding"] == "int8":
        expected.add(T_SCALES)
    if set(tensors) != expected:
        raise PayloadError(f"payload tensors are {sorted(tensors)}, expected {sorted(expected)}")
    act = tensors[T_ACTIVATIONS]
    want = np.int8 if meta["encoding"] == "int8" else np.float16
    if act.dtype != want:
        raise PayloadError(
            f"activations dtype {act.dtype} does not match encoding {meta['encoding']}"
        )
    if act.ndim != 3 or act.shape[0] == 0:
        raise PayloadError(f"activations must be [N, K, d] with N > 0, got {list(act.shape)}")
    n, k, _ = act.shape
    labels, ids = tensors[T_LABELS], tensors[T_SAMPLE_IDS]
    for name, t in ((T_LABELS, labels), (T_SAMPLE_IDS, ids)):
        if t.dtype != np.int64 or t.shape != (n,):
            raise PayloadError(f"{name} must be int64 [{n}], got {t.dtype} {list(t.shape)}")
    if len(np.unique(ids)) != n:
        raise PayloadError("sample_ids repeat within the batch")
    if (ids < 0).any():
        raise PayloadError("sample_ids must be >= 0")
    scales = tensors.get(T_SCALES)
    if scales is not None:
        if scales.dtype != np.float32 or scales.shape != (k,):
            raise PayloadError(
                f"scales must be float32 [{k}], got {scales.dtype} {list(scales.shape)}"
            )
        if not np.isfinite(scales).all() or (scales <= 0).any():
            raise PayloadError("scales must be finite and positive")
    elif not np.isfinite(act).all():
        raise PayloadError("activations contain NaN or infinity")
    return Batch(
        device_id=meta["device_id"],
        bundle_sha256=meta["bundle_sha256"],
        idempotency_key=meta["idempotency_key"],
        split=meta["split"],
        encoding=meta["encoding"],
        activations=act,
        labels=labels,
        sample_ids=ids,
        scales=scales,
        protocol=int(meta["protocol"]),
    )
