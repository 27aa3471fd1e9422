"""The token layout of the wire format (issue 15): activations [N, K, T, d] + lengths [N],
zero padding, per-tap int8 scales, bytes per sample; the pivot layout unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from fedmobillm.device_runtime import protocol, serde
from fedmobillm.device_runtime.serde import Batch, PayloadError

K, D = 3, 8


def token_batch(lengths: list[int], encoding: str = "int8", seed: int = 0) -> Batch:
    """A valid token batch: random taps at real positions, zeros at padding."""
    rng = np.random.default_rng(seed)
    lens = np.asarray(lengths, dtype=np.int64)
    n, t = len(lens), int(lens.max())
    x = rng.normal(size=(n, K, t, D)).astype(np.float32)
    x *= (np.arange(t)[None, :] < lens[:, None])[:, None, :, None]  # (N, 1, T, 1) zero padding
    scales = np.array([0.01, 0.02, 0.05], np.float32)
    if encoding == "int8":
        acts, sc = serde.quantize_int8(x, scales), scales
    else:
        acts, sc = x.astype(np.float16), None
    return Batch(
        "dev", "sha", "key-1", "train", encoding, acts,
        np.arange(n, dtype=np.int64) % 2, np.arange(n, dtype=np.int64) + 10, sc,
        lengths=lens,
    )  # fmt: skip


@pytest.mark.parametrize("encoding", ["int8", "fp16"])
def test_token_batch_round_trips(encoding: str) -> None:
    batch = token_batch([5, 2, 7, 1], encoding)
    got = serde.decode_batch(serde.encode_batch(batch))
    assert got.tokens and got.activations.shape == (4, K, 7, D)
    np.testing.assert_array_equal(got.lengths, [5, 2, 7, 1])
    np.testing.assert_array_equal(got.activations, batch.activations)
    np.testing.assert_array_equal(got.sample_ids, batch.sample_ids)
    x = got.dequantized()  # (N, K, T, d) float32, padding zero
    assert x.dtype == np.float32 and x.shape == (4, K, 7, D)
    assert not x[1, :, 2:].any() and x[1, :, :2].any()
    b = 1 if encoding == "int8" else 2
    np.testing.assert_array_equal(got.bytes_per_sample(), np.array([5, 2, 7, 1]) * K * D * b)


def test_int8_scales_are_per_tap_on_tokens() -> None:
    x = np.ones((1, K, 2, D), np.float32)
    scales = np.array([0.5, 0.25, 1.0], np.float32)
    q = serde.quantize_int8(x, scales)
    np.testing.assert_array_equal(q[0, :, 0, 0], [2, 4, 1])
    np.testing.assert_allclose(serde.dequantize(q, scales), x)
    # one stored token sample (K, L, d) needs tokens=True: 3-D is ambiguous
    np.testing.assert_allclose(serde.dequantize(q[0], scales, tokens=True), x[0])


def test_pivot_batch_unchanged() -> None:
    x = np.random.default_rng(1).normal(size=(3, K, D)).astype(np.float32)
    scales = np.full(K, 0.02, np.float32)
    batch = Batch("d", "s", "k", "train", "int8", serde.quantize_int8(x, scales),
                  np.zeros(3, np.int64), np.arange(3, dtype=np.int64), scales)  # fmt: skip
    got = serde.decode_batch(serde.encode_batch(batch))
    assert got.lengths is None and not got.tokens and got.activations.shape == (3, K, D)
    np.testing.assert_array_equal(got.bytes_per_sample(), [K * D] * 3)
    assert serde.dequantize(got.activations, scales).shape == (3, K, D)


def payload(batch: Batch, **tensors: np.ndarray | None) -> bytes:
    """batch's payload with tensors replaced (None removes one), bypassing encode checks."""
    t = {
        protocol.T_ACTIVATIONS: batch.activations,
        protocol.T_LABELS: batch.labels,
        protocol.T_SAMPLE_IDS: batch.sample_ids,
        protocol.T_SCALES: batch.scales,
        protocol.T_LENGTHS: batch.lengths,
    }
    t.update(tensors)
    meta = {"protocol": "1", "device_id": "d", "bundle_sha256": "s", "idempotency_key": "k",
            "split": "train", "encoding": batch.encoding}  # fmt: skip
    return st_save({k: np.ascontiguousarray(v) for k, v in t.items() if v is not None}, meta)


def test_decode_refuses_bad_token_layouts() -> None:
    b = token_batch([3, 2])
    cases = {
        "no 'lengths' tensor": payload(b, lengths=None),
        "lengths must be int64 [2]": payload(b, lengths=np.array([3, 2, 1], np.int64)),
        "must lie in 1..T": payload(b, lengths=np.array([3, 0], np.int64)),
        "padded to T = 3 but the longest sample has 2": payload(
            b, lengths=np.array([2, 2], np.int64)
        ),
        "carries token taps [N, K, T, d]": payload(b, activations=b.activations[:, :, 0]),
    }
    for message, body in cases.items():
        with pytest.raises(PayloadError, match=message.replace("[", r"\[").replace(".", r"\.")):
            serde.decode_batch(body)
    dirty = b.activations.copy()
    dirty[1, 2, 2, 5] = 1
    with pytest.raises(PayloadError, match="padding must be zero: sample 1 .* past its 2 tokens"):
        serde.decode_batch(payload(b, activations=dirty))


def test_encode_refuses_what_decode_would() -> None:
    b = token_batch([4, 1])
    b.activations[1, 0, 3, 0] = 3
    with pytest.raises(PayloadError, match="padding must be zero"):
        serde.encode_batch(b)


def test_bytes_per_sample_helper() -> None:
    assert protocol.bytes_per_sample(3, 384) == 3 * 384
    assert protocol.bytes_per_sample(3, 384, "fp16", tokens=10) == 3 * 384 * 10 * 2
    with pytest.raises(Exception, match="encoding must be one of"):
        protocol.bytes_per_sample(3, 384, "int4")
