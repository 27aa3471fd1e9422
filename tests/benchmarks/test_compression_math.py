"""The compression options of the per-token upload (benchmarks._compress), on synthetic
token taps: int4 round trip, segment pooling under masks, PCA shapes, and the compact token
store (benchmarks._activations.TokenActivations) they operate on."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks._activations import TokenActivations
from benchmarks._compress import (
    INT4_MAX,
    Option,
    compress,
    fit_pca,
    percentile_scales,
    project,
    quantize_int4,
    segment_pool,
)
from fedmobillm.errors import FedMobiLLMError

K, D = 3, 16


def tokens(lengths: list[int], seed: int = 0) -> TokenActivations:
    """A compact split: int8 taps of samples with these lengths, scales 0.05 per tap."""
    rng = np.random.default_rng(seed)
    n_tok = int(sum(lengths))
    q = rng.integers(-127, 128, size=(n_tok, K, D)).astype(np.int8)
    return TokenActivations(
        q=q,
        lengths=np.asarray(lengths, np.int64),
        y=np.arange(len(lengths)) % 2,
        index=np.arange(len(lengths)),
        scales=np.full(K, 0.05, np.float32),
        architecture="toy",
        taps=[1, 2, 3],
        depth=3,
        hidden=D,
        bundle_sha256="0" * 64,
    )


def test_int4_round_trip_error_is_half_a_step_and_zero_stays_zero() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, K, 7, D)).astype(np.float32)
    x[:, :, 5:] = 0.0  # padding
    scales = np.asarray([0.1, 0.2, 0.4], np.float32)
    q = quantize_int4(x, scales)
    assert q.dtype == np.int8 and q.min() >= -INT4_MAX and q.max() <= INT4_MAX
    assert (q[:, :, 5:] == 0).all()
    back = q.astype(np.float32) * scales.reshape(1, K, 1, 1)
    inside = np.abs(x) <= INT4_MAX * scales.reshape(1, K, 1, 1)
    err = np.abs(back - x)[inside]
    assert err.max() <= 0.5 * scales.max() + 1e-6
    # per tap: tap 0's error is bounded by its own (smallest) step
    assert np.abs(back - x)[:, 0][inside[:, 0]].max() <= 0.05 + 1e-6
    # beyond the clip, values saturate at +-7 steps
    assert (np.abs(q[~inside]) == INT4_MAX).all()


def test_percentile_scales_follow_the_export_rule() -> None:
    x = np.zeros((1000, K, D), np.float32)
    x[:, 1] = 3.0
    s = percentile_scales(x, 7)
    assert s.shape == (K,)
    assert s[1] == pytest.approx(3.0 / 7)
    assert s[0] > 0  # never zero (a dead tap still quantizes)


def test_segment_pool_means_real_tokens_only() -> None:
    x = np.zeros((2, 1, 6, 2), np.float32)
    x[0, 0, :5, 0] = [1, 2, 3, 4, 5]  # L = 5
    x[1, 0, :2, 0] = [10, 20]  # L = 2 (fewer tokens than segments)
    x[1, 0, 2:, :] = 99.0  # garbage in padding must not leak into the means
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    px, pm = segment_pool(x, mask, 3)
    assert px.shape == (2, 1, 3, 2) and pm.shape == (2, 3)
    # sample 0: token t goes to segment t * 3 // 5 = 0, 0, 1, 1, 2
    assert px[0, 0, :, 0].tolist() == pytest.approx([1.5, 3.5, 5.0])
    assert pm[0].tolist() == [1, 1, 1]
    # sample 1: two segments (one token each), the third masked and zero
    assert px[1, 0, :, 0].tolist() == pytest.approx([10.0, 20.0, 0.0])
    assert pm[1].tolist() == [1, 1, 0]


def test_segment_pool_one_segment_is_the_masked_mean() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, K, 9, D)).astype(np.float32)
    lengths = np.array([9, 1, 4, 7])
    mask = (np.arange(9)[None] < lengths[:, None]).astype(np.int64)
    x *= mask[:, None, :, None]
    px, pm = segment_pool(x, mask, 1)
    want = x.sum(2) / lengths[:, None, None]
    np.testing.assert_allclose(px[:, :, 0], want, rtol=1e-5, atol=1e-6)
    assert pm.tolist() == [[1]] * 4
    with pytest.raises(FedMobiLLMError):
        segment_pool(x, mask, 0)


def test_pca_shapes_and_reconstruction_of_low_rank_data() -> None:
    rng = np.random.default_rng(3)
    basis = rng.normal(size=(K, 4, D))
    coef = rng.normal(size=(500, K, 4))
    x = np.einsum("nkr,krd->nkd", coef, basis).astype(np.float32) + 2.0
    means, proj = fit_pca(x, 4)
    assert means.shape == (K, D) and proj.shape == (K, D, 4)
    z = project(x, means, proj)
    assert z.shape == (500, K, 4)
    back = np.einsum("nkr,kdr->nkd", z, proj) + means[None]
    np.testing.assert_allclose(back, x, atol=1e-3)
    with pytest.raises(FedMobiLLMError):
        fit_pca(x, D + 1)


def test_token_store_batches_and_subsets() -> None:
    acts = tokens([3, 1, 5])
    assert acts.bytes_per_sample() == pytest.approx(K * D * 3.0)
    x, mask = acts.batch(np.array([2, 1]))
    assert x.shape == (2, K, 5, D) and mask.tolist() == [[1] * 5, [1, 0, 0, 0, 0]]
    np.testing.assert_allclose(x[0, :, :5], acts.q[4:9].transpose(1, 0, 2) * 0.05)
    assert (x[1, :, 1:] == 0).all()
    sub = acts.subset(np.array([2, 0]))
    assert sub.lengths.tolist() == [5, 3] and len(sub.q) == 8
    np.testing.assert_array_equal(sub.q[:5], acts.q[4:9])


def test_options_change_bytes_as_a_device_upload_would() -> None:
    train, val = tokens([8, 6, 12, 3] * 10), tokens([5, 9, 2], seed=4)
    base = K * D
    tr, (va,) = compress("taps-1", train, [val])[0], compress("taps-1", train, [val])[1:]
    assert tr.q.shape[1] == 1 and tr.taps == [3] and va.scales.shape == (1,)
    tr, va = compress("int4", train, [val])
    assert tr.bits == 4 and np.abs(va.q).max() <= INT4_MAX
    assert tr.bytes_per_sample() == pytest.approx(train.bytes_per_sample() / 2)
    tr, va = compress("pca-4", train, [val])
    assert tr.q.shape[2] == 4 and tr.hidden == 4 and va.q.dtype == np.int8
    tr, va = compress("seg-4", train, [val])
    assert va.lengths.tolist() == [4, 4, 2]
    assert va.bytes_per_sample() == pytest.approx(base * 10 / 3)
    tr, va = compress("pca-4+seg-2+int4", train, [val])
    assert va.lengths.tolist() == [2, 2, 2] and tr.bits == 4 and tr.q.shape[2] == 4
    with pytest.raises(FedMobiLLMError):
        Option("zip-3").apply(val)
