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
    BYTES_PER_VALUE,
    ENCODINGS,
    PROTOCOL_VERSION,
    SPLITS,
    T_ACTIVATIONS,
    T_LABELS,
    T_LENGTHS,
    T_LOSS_MASK,
    T_SAMPLE_IDS,
    T_SCALES,
    T_TOKEN_IDS,
)
from fedmobillm.errors import FedMobiLLMError


class PayloadError(FedMobiLLMError):
    """A malformed upload payload (the server answers 4xx with this message)."""


@dataclass
class Batch:
    """One upload: N samples, K taps, width d; a token batch (``lengths`` set) also has T
    positions, T = max(lengths), padding (t >= lengths[i]) exactly zero."""

    device_id: str
    bundle_sha256: str
    idempotency_key: str
    split: str
    encoding: str
    activations: np.ndarray  # (N, K, d) int8 or float16; token batch: (N, K, T, d)
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    sample_ids: np.ndarray  # (N,) int64
    scales: np.ndarray | None = None  # (K,) float32, int8 only
    protocol: int = PROTOCOL_VERSION
    lengths: np.ndarray | None = None  # (N,) int64 real tokens per sample: token batch only
    token_ids: np.ndarray | None = None  # (N, T) int64: lm batch only, 0 at padding
    loss_mask: np.ndarray | None = None  # (N, T) uint8: lm batch only, 1 = target token

    @property
    def num_samples(self) -> int:
        return int(self.activations.shape[0])

    @property
    def tokens(self) -> bool:
        """A token batch: activations (N, K, T, d) with ``lengths``."""
        return self.lengths is not None

    @property
    def lm(self) -> bool:
        """An lm batch: a token batch with ``token_ids`` and ``loss_mask``."""
        return self.token_ids is not None

    def dequantized(self) -> np.ndarray:
        """float32 (N, K, d), or (N, K, T, d) for a token batch."""
        return dequantize(self.activations, self.scales, tokens=self.tokens)

    def bytes_per_sample(self) -> np.ndarray:
        """(N,) int64 activation bytes of each sample as stored: K * d * b, or K *
        lengths[i] * d * b for a token batch (padding not counted; b = 1 int8, 2 fp16)."""
        k, d = self.activations.shape[1], self.activations.shape[-1]
        per = k * d * BYTES_PER_VALUE[self.encoding]
        if self.lengths is None:
            return np.full(self.num_samples, per, dtype=np.int64)
        return np.asarray(self.lengths, dtype=np.int64) * per


def _per_tap(scales: np.ndarray, ndim: int) -> np.ndarray:
    """(K,) scales shaped to broadcast over axis 1 of an (N, K, ...) array of ``ndim``."""
    return np.asarray(scales, dtype=np.float32).reshape((1, -1) + (1,) * (ndim - 2))


def quantize_int8(x: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Symmetric per-tap int8: x (N, K, d) or token taps (N, K, T, d) float, scales (K,) ->
    int8 of the same shape. Zero stays exactly zero (token padding)."""
    if x.ndim not in (3, 4):
        raise FedMobiLLMError(f"quantize_int8 takes (N, K, d) or (N, K, T, d), got {x.shape}")
    return np.clip(np.rint(x / _per_tap(scales, x.ndim)), -127, 127).astype(np.int8)


def dequantize(q: np.ndarray, scales: np.ndarray | None, tokens: bool = False) -> np.ndarray:
    """int8 times per-tap ``scales`` (K,), or float16 as it is -> float32, same shape.

    Pivot (``tokens=False``): ``(..., K, d)``: a batch (N, K, d) or one stored sample (K, d).
    Tokens (``tokens=True``, implied by 4-D): ``(..., K, T, d)``: a batch (N, K, T, d) or one
    stored sample (K, L, d)."""
    if q.dtype == np.int8:
        if scales is None:
            raise PayloadError("int8 activations need scales")
        tail = (1, 1) if tokens or q.ndim == 4 else (1,)
        s = np.asarray(scales, np.float32).reshape((-1,) + tail)  # (K, 1[, 1])
        return q.astype(np.float32) * s
    return q.astype(np.float32)


def check_layout(act: np.ndarray, lengths: np.ndarray | None) -> None:
    """The activations' layout: [N, K, d] without lengths; with lengths (int64 [N]) a token
    batch [N, K, T, d] with 1 <= lengths[i] <= T, T = max(lengths) and zeros at every
    position t >= lengths[i]. Raises PayloadError saying what is wrong."""
    if lengths is None:
        if act.ndim == 4:
            raise PayloadError(
                f"activations {list(act.shape)} are token taps [N, K, T, d] but the payload "
                f"has no '{T_LENGTHS}' tensor (int64 [N], real tokens per sample)"
            )
        if act.ndim != 3 or act.shape[0] == 0:
            raise PayloadError(f"activations must be [N, K, d] with N > 0, got {list(act.shape)}")
        return
    if act.ndim != 4 or act.shape[0] == 0:
        raise PayloadError(
            f"a payload with '{T_LENGTHS}' carries token taps [N, K, T, d] with N > 0, got "
            f"activations {list(act.shape)}"
        )
    n, _, t, _ = act.shape
    if lengths.dtype != np.int64 or lengths.shape != (n,):
        raise PayloadError(
            f"{T_LENGTHS} must be int64 [{n}], got {lengths.dtype} {list(lengths.shape)}"
        )
    if (lengths < 1).any() or (lengths > t).any():
        raise PayloadError(
            f"{T_LENGTHS} must lie in 1..T = 1..{t}, got {lengths.min()}..{lengths.max()}"
        )
    if int(lengths.max()) != t:
        raise PayloadError(
            f"activations are padded to T = {t} but the longest sample has {int(lengths.max())} "
            f"tokens: pad a batch only to its longest sample"
        )
    padding = np.arange(t)[None, :] >= lengths[:, None]  # (N, T) True at padding
    bad = np.flatnonzero(((act != 0).any(axis=(1, 3)) & padding).any(axis=1))  # samples
    if len(bad):
        i = int(bad[0])
        raise PayloadError(
            f"token padding must be zero: sample {i} has non-zero values past its "
            f"{int(lengths[i])} tokens ({len(bad)} such samples)"
        )


def check_lm(
    token_ids: np.ndarray | None,
    loss_mask: np.ndarray | None,
    lengths: np.ndarray | None,
    labels: np.ndarray,
) -> None:
    """An lm batch's ``token_ids`` (int64 [N, T]) and ``loss_mask`` (uint8 [N, T]), given
    the (already checked) ``lengths``: both or neither, only in a token batch, ids >= 0 and
    0 at padding, mask 0/1, 0 at t = 0 and at padding, at least one target per sample,
    labels all -1. Raises PayloadError saying what is wrong."""
    if token_ids is None and loss_mask is None:
        return
    if token_ids is None or loss_mask is None:
        have, lack = (T_TOKEN_IDS, T_LOSS_MASK) if loss_mask is None else (T_LOSS_MASK, T_TOKEN_IDS)
        raise PayloadError(
            f"an lm batch carries both {T_TOKEN_IDS} and {T_LOSS_MASK}: it has "
            f"{have} but not {lack}"
        )
    if lengths is None:
        raise PayloadError(
            f"{T_TOKEN_IDS}/{T_LOSS_MASK} come only with token taps [N, K, T, d] and "
            f"'{T_LENGTHS}' (export the bundle with --pivot none)"
        )
    n, t = len(lengths), int(lengths.max())
    if token_ids.dtype != np.int64 or token_ids.shape != (n, t):
        raise PayloadError(
            f"{T_TOKEN_IDS} must be int64 [{n}, {t}], got {token_ids.dtype} {list(token_ids.shape)}"
        )
    if loss_mask.dtype != np.uint8 or loss_mask.shape != (n, t):
        raise PayloadError(
            f"{T_LOSS_MASK} must be uint8 [{n}, {t}], got {loss_mask.dtype} {list(loss_mask.shape)}"
        )
    if (token_ids < 0).any():
        raise PayloadError(f"{T_TOKEN_IDS} must be >= 0")
    if (loss_mask > 1).any():
        raise PayloadError(f"{T_LOSS_MASK} must be 0 or 1")
    padding = np.arange(t)[None, :] >= lengths[:, None]
    if (token_ids[padding] != 0).any():
        raise PayloadError(f"{T_TOKEN_IDS} must be 0 at padding (t >= lengths[i])")
    if loss_mask[padding].any() or loss_mask[:, 0].any():
        raise PayloadError(
            f"{T_LOSS_MASK} must be 0 at t = 0 (the first token has nothing before it) and "
            f"at padding"
        )
    empty = np.flatnonzero(loss_mask.sum(axis=1) == 0)
    if len(empty):
        raise PayloadError(
            f"every lm sample needs at least one target token: sample {int(empty[0])} has "
            f"none ({len(empty)} such samples; a record of one token cannot train)"
        )
    if (labels != -1).any():
        raise PayloadError("an lm batch's labels must all be -1 (its targets are the tokens)")


def encode_batch(batch: Batch) -> bytes:
    """A Batch -> safetensors bytes; checks the layout first (a token batch: lengths; an
    lm batch: token_ids and loss_mask)."""
    lengths = None if batch.lengths is None else np.asarray(batch.lengths)
    check_layout(np.asarray(batch.activations), lengths)
    check_lm(batch.token_ids, batch.loss_mask, lengths, np.asarray(batch.labels))
    tensors = {
        T_ACTIVATIONS: np.ascontiguousarray(batch.activations),
        T_LABELS: np.ascontiguousarray(batch.labels, dtype=np.int64),
        T_SAMPLE_IDS: np.ascontiguousarray(batch.sample_ids, dtype=np.int64),
    }
    if lengths is not None:
        tensors[T_LENGTHS] = np.ascontiguousarray(lengths)
    if batch.token_ids is not None and batch.loss_mask is not None:
        tensors[T_TOKEN_IDS] = np.ascontiguousarray(batch.token_ids, dtype=np.int64)
        tensors[T_LOSS_MASK] = np.ascontiguousarray(batch.loss_mask, dtype=np.uint8)
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


def _check_header(meta: dict[str, str]) -> None:
    """The JSON header's fields (see ``protocol``)."""
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


def _check_tensors(tensors: dict[str, np.ndarray], encoding: str) -> None:
    """Tensor names, dtypes and shapes (activations [N, K, d] or [N, K, T, d] + lengths)."""
    expected = {T_ACTIVATIONS, T_LABELS, T_SAMPLE_IDS}
    if encoding == "int8":
        expected.add(T_SCALES)
    if T_LENGTHS in tensors:
        expected.add(T_LENGTHS)
    expected |= {T_TOKEN_IDS, T_LOSS_MASK} & set(tensors)
    if set(tensors) != expected:
        raise PayloadError(f"payload tensors are {sorted(tensors)}, expected {sorted(expected)}")
    act = tensors[T_ACTIVATIONS]
    want = np.int8 if encoding == "int8" else np.float16
    if act.dtype != want:
        raise PayloadError(f"activations dtype {act.dtype} does not match encoding {encoding}")
    check_layout(act, tensors.get(T_LENGTHS))
    n, k = act.shape[:2]
    labels, ids = tensors[T_LABELS], tensors[T_SAMPLE_IDS]
    for name, t in ((T_LABELS, labels), (T_SAMPLE_IDS, ids)):
        if t.dtype != np.int64 or t.shape != (n,):
            raise PayloadError(f"{name} must be int64 [{n}], got {t.dtype} {list(t.shape)}")
    if len(np.unique(ids)) != n:
        raise PayloadError("sample_ids repeat within the batch")
    if (ids < 0).any():
        raise PayloadError("sample_ids must be >= 0")
    check_lm(tensors.get(T_TOKEN_IDS), tensors.get(T_LOSS_MASK), tensors.get(T_LENGTHS), labels)
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


def decode_batch(payload: bytes) -> Batch:
    """Parse and validate a payload's structure (both layouts: pivot [N, K, d]; tokens
    [N, K, T, d] + lengths [N], zero padding; an lm batch also token_ids + loss_mask). Raises PayloadError with a clear message."""
    meta = _read_metadata(payload)
    _check_header(meta)
    try:
        tensors = st_load(payload)
    except Exception as exc:  # safetensors raises its own error types
        raise PayloadError(f"payload is not a valid safetensors file: {exc}") from exc
    _check_tensors(tensors, meta["encoding"])
    return Batch(
        device_id=meta["device_id"],
        bundle_sha256=meta["bundle_sha256"],
        idempotency_key=meta["idempotency_key"],
        split=meta["split"],
        encoding=meta["encoding"],
        activations=tensors[T_ACTIVATIONS],
        labels=tensors[T_LABELS],
        sample_ids=tensors[T_SAMPLE_IDS],
        scales=tensors.get(T_SCALES),
        protocol=int(meta["protocol"]),
        lengths=tensors.get(T_LENGTHS),
        token_ids=tensors.get(T_TOKEN_IDS),
        loss_mask=tensors.get(T_LOSS_MASK),
    )
