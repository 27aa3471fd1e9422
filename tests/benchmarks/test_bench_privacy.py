# Owner: G2.
"""The privacy benchmark (issue 19).

Fast: the attacker's pieces on synthetic activations whose bag of words is recoverable (a
fixed random map of the words plus noise): the inversion MLP beats the unigram prior there,
the device's Gaussian noise brings it down, re-identification and the metrics behave.

Slow (real MiniLM-L6 int8 bundle, movie-snippets, the attacker's public text): the command
end to end on small sizes; the attack beats the unigram prior on undefended uploads and the
noise at epsilon 1 lowers it; the outputs' schema."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks._privacy_attack import (
    Inverter,
    InverterConfig,
    bow_scores,
    build_vocab,
    nearest_sets,
    prior_set,
    reidentify,
    stop_words,
    words,
)

ROOT = Path(__file__).resolve().parents[2]


def test_words_drop_stop_words_and_punctuation() -> None:
    got = words("The film's ending -- it is NOT good, isn't it? A 10/10 film.", stop_words())
    assert got == {"film's", "ending", "good", "isn't", "10", "film"}


def test_bow_scores_micro_average() -> None:
    pred = [frozenset({"a1", "b1"}), frozenset()]
    true = [frozenset({"a1"}), frozenset({"c1", "d1"})]
    s = bow_scores(pred, true)
    assert s["precision"] == pytest.approx(0.5)
    assert s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(0.4)


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, list[frozenset[str]]]:
    """(n, 3, 16) activations: a fixed map of each sentence's words (Zipf-ish draws from a
    60-word vocabulary) plus small noise."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(60)]
    p = 1.0 / np.arange(1, 61)
    p /= p.sum()
    sets = [frozenset(rng.choice(vocab, size=rng.integers(2, 6), p=p)) for _ in range(n)]
    basis = np.random.default_rng(99).normal(size=(60, 48)).astype(np.float32)
    hot = np.zeros((n, 60), np.float32)
    for r, s in enumerate(sets):
        hot[r, [int(w[1:]) for w in s]] = 1.0
    x = hot @ basis + 0.1 * rng.normal(size=(n, 48)).astype(np.float32)
    return x.reshape(n, 3, 16), sets


def _noise(sigma: float):
    def mech(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return x + sigma * rng.normal(size=x.shape).astype(np.float32)

    return mech


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core box: more threads spin
    yield
    torch.set_num_threads(before)


def test_inverter_beats_prior_and_noise_lowers_it() -> None:
    xp, sp = _synthetic(800, 0)
    xv, sv = _synthetic(300, 1)
    xt, st = _synthetic(300, 2)
    vocab = build_vocab(sp, 60)
    prior = bow_scores([prior_set(sp, sv, vocab)] * len(st), st)["f1"]
    cfg = InverterConfig(hidden=64, vocab=60, epochs=12, batch=64, lr=3e-3)
    f1 = {}
    for sigma in (0.0, 30.0):
        mech = _noise(sigma)
        inv = Inverter(cfg, vocab, 48, seed=0)
        inv.fit(xp, sp, xv, sv, mech)
        f1[sigma] = bow_scores(inv.predict(mech(xt, np.random.default_rng(5))), st)["f1"]
    assert f1[0.0] > 0.6 and f1[0.0] > prior + 0.3
    assert f1[30.0] < f1[0.0] - 0.3
    nn = bow_scores(nearest_sets(xt, xp, sp), st)["f1"]
    assert prior < nn <= 1.0


def test_reidentify_exact_then_lost_in_noise() -> None:
    x, _ = _synthetic(200, 3)
    assert reidentify(x, x) == 1.0
    noisy = x + 100.0 * np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    assert reidentify(noisy, x) < 0.1


def test_command_refuses_a_sweep_without_the_reference(tmp_path: Path) -> None:
    from benchmarks.bench_privacy import main

    assert main(["--quick", "--out", str(tmp_path), "--epsilons", "8,4"]) == 2
    assert not (tmp_path / "privacy.json").exists()


def test_command_refuses_projected_only_without_ranks(tmp_path: Path) -> None:
    from benchmarks.bench_privacy import main

    assert main(["--quick", "--out", str(tmp_path), "--projected-only",
                 "--projection-ranks", "none"]) == 2  # fmt: skip
    assert main(["--quick", "--out", str(tmp_path), "--projection-ranks", "0"]) == 2
    assert not (tmp_path / "privacy.json").exists()


def test_command_refuses_negative_supervised_directions(tmp_path: Path) -> None:
    from benchmarks.bench_privacy import main

    assert main(["--quick", "--out", str(tmp_path), "--projection-supervised", "0,-1"]) == 2
    assert not (tmp_path / "privacy.json").exists()


def test_default_is_chosen_over_both_mechanisms() -> None:
    """choose_default: the smallest epsilon meeting both bounds on validation, projected rows
    included; none meeting them: no noise."""
    from benchmarks.bench_privacy import choose_default

    def row(eps, val, f1, rank=None):
        return {"epsilon": eps, "val_accuracy": val, "inverter_validation": {"f1": f1},
                "clip": 0.1, "side_lr": 2e-3, "projection_rank": rank}  # fmt: skip

    plain = [row(math.inf, 0.80, 0.12), row(8.0, 0.60, 0.01), row(4.0, 0.55, 0.01)]
    assert choose_default(plain)["epsilon"] is None
    projected = [row(8.0, 0.79, 0.02, 16), row(4.0, 0.70, 0.01, 16)]
    got = choose_default(plain, projected)
    assert got["epsilon"] == 8.0 and got["projection_rank"] == 16


@pytest.mark.slow
def test_end_to_end_small(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle("minilm-l6", num_taps=3, quant="int8", formats=("onnx",), max_seq_len=64)
    cmd = [
        sys.executable, "-m", "benchmarks.bench_privacy", "--quick", "--out", str(tmp_path),
        "--bundle", str(bundle), "--epsilons", "inf,1", "--reid-epsilons", "64",
        "--train-limit", "500", "--val-limit", "200", "--test-limit", "200",
        "--public-limit", "2500", "--attack-eval", "500", "--reid-candidates", "500",
        "--clip-rules", "int8", "--side-lrs", "0.002", "--steps", "150",
        "--inverter-epochs", "10", "--projection-ranks", "8", "--projection-whiten", "yes",
        "--projection-supervised", "0,1",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "privacy.json").read_text(), parse_constant=float)
    rows = {("inf" if math.isinf(r["epsilon"]) else r["epsilon"]): r for r in data["rows"]}
    assert set(rows) == {"inf", 1.0}
    prior = data["prior"]["f1"]
    assert rows["inf"]["inverter"]["f1"] > prior  # the attack recovers words
    assert rows["inf"]["reid_top1"] > 0.9  # undefended uploads re-identify
    assert rows[1.0]["inverter"]["f1"] < rows["inf"]["inverter"]["f1"]
    assert rows[1.0]["reid_top1"] < rows["inf"]["reid_top1"]
    assert rows[1.0]["noise_std"] > 0 and rows["inf"]["noise_std"] == 0
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0
    assert "not built" in data["lm"]
    proj = {
        ("inf" if math.isinf(r["epsilon"]) else r["epsilon"]): r for r in data["projected_rows"]
    }
    assert set(proj) == {"inf", 1.0}
    assert data["projection_choice"]["rank"] == 8 and data["projection_choice"]["whiten"]
    tried = data["projection_choice"]["tried"]  # PCA and 1 discriminant + PCA, on validation
    assert sorted(t["supervised"] for t in tried) == [0, 1]
    best = max(tried, key=lambda t: t["val_accuracy"])
    assert data["projection_choice"]["supervised"] == best["supervised"]
    assert all(r["projection_rank"] == 8 for r in proj.values())
    assert proj[1.0]["inverter"]["f1"] < rows["inf"]["inverter"]["f1"]
    assert "Projected before noise (rank 8" in (tmp_path / "privacy.md").read_text()
    assert (tmp_path / "privacy.png").stat().st_size > 1000
    assert "| epsilon |" in (tmp_path / "privacy.md").read_text()
