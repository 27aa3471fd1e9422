"""bench_privacy_lm's parts (issue 19): the device mechanism as the bench applies it to a
line's token taps, the attacker (inverter, nearest public position, prior) and the scores.
The end-to-end run forwards SmolLM2 and is measured in docs/privacy.md, not here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import bench_privacy_lm as bp
from fedmobillm.device_runtime.privacy import noise_multiplier, sample_sigma
from fedmobillm.errors import FedMobiLLMError


def test_the_mechanism_is_the_devices_clip_and_per_line_noise():
    k, t, d = 3, 10, 64
    scales = np.full(k, 0.05, np.float32)
    assert bp.mechanism(math.inf, 1e-5, scales, k, 64) is None  # no noise: uploaded as is
    mech = bp.mechanism(8.0, 1e-5, scales, k, 64)
    z = noise_multiplier(8.0, 1e-5)
    assert mech.z == pytest.approx(z)
    x = np.random.default_rng(0).normal(size=(k, t, d)).astype(np.float32) * 10
    out = mech(x, np.random.default_rng(1))
    assert out.shape == x.shape
    # every tap vector clipped to mech.clip (far below its norm), then noise of std
    # sigma * clip with sigma = 2 z sqrt(K T): the residual has that std
    clipped = x * (mech.clip / np.linalg.norm(x, axis=-1, keepdims=True))
    std = float(sample_sigma(z, k, np.asarray([t]))[0]) * mech.clip
    assert np.std(out - clipped) == pytest.approx(std, rel=0.05)


def _synthetic(n: int, rng: np.random.Generator, protos: np.ndarray, noise: float):
    tokens = rng.integers(0, len(protos), n)
    feats = protos[tokens] + noise * rng.normal(size=(n, protos.shape[1]))
    return feats.astype(np.float32), tokens.astype(np.int64)


def test_the_attacker_recovers_separable_tokens_and_not_drowned_ones():
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(20, 48))
    cfg = bp.PrivacyLmConfig(vocab=20, dims=16, epochs=6)
    pub_x, pub_y = _synthetic(3000, rng, protos, 0.3)
    att = bp.Attacker(cfg, pub_x, pub_y)
    vic_x, vic_y = _synthetic(400, rng, protos, 0.3)
    assert (att.invert(vic_x) == vic_y).mean() > 0.9
    assert (att.nearest(vic_x) == vic_y).mean() > 0.9
    drowned = vic_x + 30.0 * rng.normal(size=vic_x.shape).astype(np.float32)
    assert (att.invert(drowned) == vic_y).mean() < 0.25  # near chance (1 in 20)
    assert att.prior in set(pub_y.tolist())


def test_scores_count_tokens_exact_lines_and_words():
    true = np.asarray([1, 2, 3, 4, 5])
    pred = np.asarray([1, 2, 3, 4, 9])  # line 1 (3 tokens) exact, line 2 one token wrong
    words = {1: "movie", 2: "great", 3: "fun", 4: "cinema", 5: "acting", 9: "actor"}
    got = bp.scores(pred, true, np.asarray([3, 2]), lambda ids: " ".join(words[i] for i in ids))
    assert got["token_recovery"] == pytest.approx(0.8)
    assert got["exact_lines"] == pytest.approx(0.5)
    assert got["precision"] == pytest.approx(0.8) and got["recall"] == pytest.approx(0.8)


def test_epsilons_are_parsed_or_refused_with_the_fix():
    assert bp.parse_epsilons("inf,8, 1") == [math.inf, 8.0, 1.0]
    with pytest.raises(FedMobiLLMError, match="not a number"):
        bp.parse_epsilons("8,x")
    with pytest.raises(FedMobiLLMError, match="above 0"):
        bp.parse_epsilons("0")
