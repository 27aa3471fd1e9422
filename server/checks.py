"""What an upload must satisfy beyond its structure (``serde.decode_batch``): the values a
device's registered bundle can produce, and agreement with what the device sent before.

A device is authenticated, not trusted. Its registration pins the bundle manifest, so:

- int8 uploads carry the bundle's own activation pre-scales (``manifest.activation_scales``,
  compared at float32 precision): a device cannot widen its range with its own scales, and
  every dequantised value lies within +-127 x scale of its tap;
- fp16 uploads (no pre-scales on the wire) must stay within ``FP16_RANGE`` times that
  int8 clip range of each tap; the clip is the 99.9th percentile of |activation| on the
  export's calibration text, so this admits the outliers a real backbone emits and refuses
  values that only a forged upload has;
- a re-sent sample (same split and sample id) must agree with the stored one: the same label,
  activations within ``RESEND_TOLERANCE`` int8 steps (a re-run forward with another batch
  composition can move a value by one step), and for a token sample the same number of
  tokens. Anything else is a conflict (409), never a silent drop of the new data.

Layout (``check_layout``): a token bundle (manifest pivot ``"none"``) uploads [N, K, T, d] with
``lengths`` (1 <= lengths <= min(T, the manifest's max_seq_len), every position past a
sample's length exactly zero); a pivot bundle uploads [N, K, d] without. K and d are the
registered bundle's.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fedmobillm.device_runtime.protocol import TOKEN_PIVOT
from fedmobillm.device_runtime.serde import Batch
from fedmobillm.server.errors import BadRequest, Conflict
from fedmobillm.server.store import Device, dequantize_sample

FP16_RANGE = 256.0
RESEND_TOLERANCE = 2.0  # int8 steps (x the tap's pre-scale)


class ValueRejected(BadRequest):
    """Values a registered bundle cannot produce: counted as an offence of the device."""


def manifest_scales(device: Device) -> np.ndarray:
    return np.asarray(device.manifest["activation_scales"], np.float32)  # (K,)


def is_token_device(device: Device) -> bool:
    """Whether the device registered a token bundle (taps at every token)."""
    return device.manifest.get("pivot") == TOKEN_PIVOT


def check_layout(device: Device, batch: Batch) -> None:
    """Raise ``BadRequest`` unless the batch has the registered bundle's layout: [N, K, d]
    for a pivot bundle; [N, K, T, d] + lengths, zero padding, for a token bundle."""
    k, d = device.num_taps, device.hidden_size
    lengths = batch.lengths
    if is_token_device(device):
        if lengths is None:
            raise BadRequest(
                "the registered bundle is a token bundle (pivot 'none'): upload every token's "
                f"taps, [N, {k}, T, {d}] with lengths; got [{_dims(batch)}] without lengths",
                hint="fedmobillm device run uploads token batches for a token bundle",
            )
    elif lengths is not None:
        raise BadRequest(
            f"the registered bundle is a pivot bundle (pivot {device.manifest.get('pivot')!r}): "
            f"upload [N, {k}, {d}] without lengths; got a token batch [{_dims(batch)}]",
            hint="upload with the registered bundle, or register a bundle exported with "
            "--pivot none on a token federation",
        )
    shape = batch.activations.shape
    if (shape[1], shape[-1]) != (k, d):
        want = f"N, {k}, T, {d}" if lengths is not None else f"N, {k}, {d}"
        raise BadRequest(f"activations are [{_dims(batch)}], the registered bundle emits [{want}]")
    if lengths is not None:
        _check_tokens(device, batch.activations, lengths)


def _check_tokens(device: Device, act: np.ndarray, lengths: np.ndarray) -> None:
    """lengths (N,) within the bundle's max_seq_len; act (N, K, T, d) zero past them."""
    limit = int(device.manifest["max_seq_len"])
    if int(lengths.max()) > limit:
        raise BadRequest(
            f"a sample has {int(lengths.max())} tokens; the registered bundle's max_seq_len is "
            f"{limit}",
            hint="truncate to the bundle's max_seq_len (its tokenizer does)",
        )
    t = act.shape[2]
    pad = np.arange(t)[None, :] >= lengths[:, None]  # (N, T) True past a sample's length
    if pad.any():
        peak = np.abs(act).max(axis=(1, 3))  # (N, T)
        bad = np.flatnonzero((peak * pad).any(axis=1))
        if bad.size:
            raise BadRequest(
                f"{bad.size} sample(s) carry non-zero values past their length (padding must "
                f"be exactly zero), e.g. row {int(bad[0])} of length {int(lengths[bad[0]])}",
                hint="zero every position t >= lengths[i] (fedmobillm device run does)",
            )


def _dims(batch: Batch) -> str:
    return ", ".join(str(n) for n in batch.activations.shape)


def check_values(device: Device, batch: Batch) -> None:
    """Raise ``ValueRejected`` unless ``batch``'s values are ones the bundle can produce."""
    scales = manifest_scales(device)  # (K,)
    if batch.encoding == "int8":
        sent = np.asarray(batch.scales, np.float32)  # (K,)
        if sent.shape != scales.shape or not np.array_equal(sent, scales):
            raise ValueRejected(
                f"int8 scales {_short(sent)} are not the registered bundle's activation "
                f"pre-scales {_short(scales)}",
                hint="quantize with the bundle's manifest activation_scales "
                "(fedmobillm device run does), or register the bundle you export with",
            )
        return
    x = batch.activations.astype(np.float32)  # (N, K, d) or (N, K, T, d)
    if not np.isfinite(x).all():
        raise ValueRejected("activations contain NaN or infinity")
    bound = FP16_RANGE * 127.0 * scales  # (K,)
    peak = np.abs(x).max(axis=tuple(i for i in range(x.ndim) if i != 1))  # (K,)
    over = np.flatnonzero(peak > bound)
    if over.size:
        k = int(over[0])
        raise ValueRejected(
            f"fp16 activations of tap {k} reach {peak[k]:.4g}; the registered bundle's range "
            f"for that tap is +-{bound[k]:.4g} ({FP16_RANGE:g} x its int8 clip)",
            hint="upload what the registered bundle computes; int8 uploads are bounded by design",
        )


def batch_content(batch: Batch) -> str:
    """Digest of what a batch claims: split, sample ids and labels, and an lm batch's token
    ids and loss mask (activations are compared sample by sample, within a tolerance)."""
    h = hashlib.sha256(batch.split.encode())
    h.update(np.ascontiguousarray(batch.sample_ids, np.int64).tobytes())
    h.update(np.ascontiguousarray(batch.labels, np.int64).tobytes())
    if batch.token_ids is not None:  # an lm batch: its targets are its token ids
        h.update(np.ascontiguousarray(batch.token_ids, np.int64).tobytes())
    if batch.loss_mask is not None:  # which of those targets are scored
        h.update(b"loss_mask")
        h.update((np.asarray(batch.loss_mask) != 0).astype(np.uint8).tobytes())
    return h.hexdigest()


def _same_mask(sent: np.ndarray, stored: np.ndarray | None) -> bool:
    """Whether a re-sent loss mask (T,) scores the stored one's (L,) positions alike."""
    if stored is None:
        return False
    return np.array_equal(np.asarray(sent)[: len(stored)] != 0, np.asarray(stored) != 0)


def check_resent(
    device: Device,
    batch: Batch,
    stored: dict[int, tuple[int, np.ndarray, np.ndarray | None, np.ndarray | None]],
) -> None:
    """Raise ``Conflict`` if a sample the device already uploaded comes back different."""
    if not stored:
        return
    scales = manifest_scales(device)
    bad = []
    for i, sid in enumerate(batch.sample_ids.tolist()):
        if sid not in stored:
            continue
        label, x, ids, mask = stored[sid]  # int, (K, d) or (K, L, d), lm (L,) ids, mask
        q = batch.activations[i]  # (K, d) or (K, T, d)
        if batch.lengths is not None:
            q = q[:, : int(batch.lengths[i])]  # (K, L_i, d)
        new = dequantize_sample(q, batch.scales)
        tol = RESEND_TOLERANCE * scales.reshape((-1,) + (1,) * (x.ndim - 1)) * 1.001
        if label != int(batch.labels[i]) or new.shape != x.shape or (np.abs(new - x) > tol).any():
            bad.append(sid)
        elif batch.token_ids is not None and (
            ids is None or not np.array_equal(batch.token_ids[i, : len(ids)], ids)
        ):
            bad.append(sid)  # an lm sample re-sent with other token ids
        elif batch.loss_mask is not None and not _same_mask(batch.loss_mask[i], mask):
            bad.append(sid)  # an lm sample re-sent with another loss mask
    if bad:
        raise Conflict(
            f"{len(bad)} sample id(s) of split {batch.split!r} were uploaded before with other "
            f"content (label, activations, length, token ids or loss mask), e.g. {bad[:5]}; "
            "the stored samples are kept",
            hint="sample ids name one record for good: give new records new ids, or register "
            "a new device for a new data set",
        )


def _short(a: np.ndarray) -> str:
    vals = ", ".join(f"{v:.4g}" for v in a[:4].tolist())
    return f"[{vals}{', ...' if a.size > 4 else ''}]"
