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
  composition can move a value by one step). Anything else is a conflict (409), never a
  silent drop of the new data.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fedmobillm.device_runtime.serde import Batch, dequantize
from fedmobillm.server.errors import BadRequest, Conflict
from fedmobillm.server.store import Device

FP16_RANGE = 256.0
RESEND_TOLERANCE = 2.0  # int8 steps (x the tap's pre-scale)


class ValueRejected(BadRequest):
    """Values a registered bundle cannot produce: counted as an offence of the device."""


def manifest_scales(device: Device) -> np.ndarray:
    return np.asarray(device.manifest["activation_scales"], np.float32)  # (K,)


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
    x = batch.activations.astype(np.float32)  # (N, K, d)
    if not np.isfinite(x).all():
        raise ValueRejected("activations contain NaN or infinity")
    bound = FP16_RANGE * 127.0 * scales  # (K,)
    peak = np.abs(x).max(axis=(0, 2))  # (K,)
    over = np.flatnonzero(peak > bound)
    if over.size:
        k = int(over[0])
        raise ValueRejected(
            f"fp16 activations of tap {k} reach {peak[k]:.4g}; the registered bundle's range "
            f"for that tap is +-{bound[k]:.4g} ({FP16_RANGE:g} x its int8 clip)",
            hint="upload what the registered bundle computes; int8 uploads are bounded by design",
        )


def batch_content(batch: Batch) -> str:
    """Digest of what a batch claims: split, sample ids and labels (activations are compared
    sample by sample, within a tolerance)."""
    h = hashlib.sha256(batch.split.encode())
    h.update(np.ascontiguousarray(batch.sample_ids, np.int64).tobytes())
    h.update(np.ascontiguousarray(batch.labels, np.int64).tobytes())
    return h.hexdigest()


def check_resent(device: Device, batch: Batch, stored: dict[int, tuple[int, np.ndarray]]) -> None:
    """Raise ``Conflict`` if a sample the device already uploaded comes back different."""
    if not stored:
        return
    tol = RESEND_TOLERANCE * manifest_scales(device).reshape(-1, 1) * 1.001  # (K, 1)
    new = dequantize(batch.activations, batch.scales)  # (N, K, d)
    bad = []
    for i, sid in enumerate(batch.sample_ids.tolist()):
        if sid not in stored:
            continue
        label, x = stored[sid]  # int, (K, d)
        if label != int(batch.labels[i]) or (np.abs(new[i] - x) > tol).any():
            bad.append(sid)
    if bad:
        raise Conflict(
            f"{len(bad)} sample id(s) of split {batch.split!r} were uploaded before with other "
            f"content (label or activations), e.g. {bad[:5]}; the stored samples are kept",
            hint="sample ids name one record for good: give new records new ids, or register "
            "a new device for a new data set",
        )


def _short(a: np.ndarray) -> str:
    vals = ", ".join(f"{v:.4g}" for v in a[:4].tolist())
    return f"[{vals}{', ...' if a.size > 4 else ''}]"
