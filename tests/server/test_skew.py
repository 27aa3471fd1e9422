"""Label skew and negative transfer (issue 23): the sampler's label balance, the anchor terms
that never pull the best architecture, quality-weighted anchor targets, and the label
distribution per architecture in the server's status (a real server)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from server_helpers import (
    FAST,
    admin_headers,
    make_manifest,
    make_payload,
    register,
    synthetic,
    upload,
)
from torch_helpers import one_thread  # noqa: F401 - autouse: one torch thread per test

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.policies import balanced_sample, label_distribution
from fedmobillm.server.side import SideConfig, SideTrainer

CFG = SideConfig(width=32, warmup_steps=5)


def trainer(**config) -> SideTrainer:
    t = SideTrainer(dataclasses.replace(CFG, **config), ["neg", "pos"], seed=0)
    t.add_architecture("A", [2, 4], 4, 16)
    t.add_architecture("B", [2, 4, 6], 6, 24)
    return t


def anchors(m: int = 16) -> list[tuple]:
    xa, _ = synthetic(m, 2, 16, 5)
    xb, _ = synthetic(m, 3, 24, 5)
    return [("A", xa), ("B", xb)]


def grads(t: SideTrainer, arch: str | None) -> float:
    """Largest |gradient| on ``arch``'s alignment (None: the shared side network)."""
    mod = t.side if arch is None else t.aligns[t.archs[arch].key]
    return max((float(p.grad.abs().max()) for p in mod.parameters() if p.grad is not None),
               default=0.0)  # fmt: skip


@pytest.mark.parametrize("shared", [True, False])
def test_protect_best_never_pulls_the_best_architecture(shared):
    """Prepare two architectures, A with the better validation accuracy; the anchor loss's
    gradient reaches B's alignment and never A's (and, with anchor_shared off, never the
    shared side network either)."""
    t = trainer(anchor_protect_best=True, anchor_shared=shared)
    t.arch_quality = {"A": 0.9, "B": 0.6}
    t._anchor_loss(anchors()).backward()
    assert grads(t, "A") == 0.0
    assert grads(t, "B") > 0.0
    assert (grads(t, None) > 0.0) == shared

    t.optimizer.zero_grad(set_to_none=True)
    t.arch_quality = {"A": 0.6, "B": 0.9}  # now B is the teacher
    t._anchor_loss(anchors()).backward()
    assert grads(t, "B") == 0.0 and grads(t, "A") > 0.0


def test_without_protection_both_architectures_are_pulled():
    t = trainer()
    t.arch_quality = {"A": 0.9, "B": 0.6}
    t._anchor_loss(anchors()).backward()
    assert grads(t, "A") > 0.0 and grads(t, "B") > 0.0


def test_protect_best_before_any_evaluation_pulls_every_architecture(caplog):
    t = trainer(anchor_protect_best=True)
    with caplog.at_level("INFO", logger="fedmobillm.server.side"):
        t._anchor_loss(anchors()).backward()
    assert grads(t, "A") > 0.0 and grads(t, "B") > 0.0
    assert "no validation accuracy yet" in caplog.text


def test_quality_target_ignores_an_architecture_at_chance():
    t = trainer(anchor_target="quality")
    t.arch_quality = {"A": 0.85, "B": 0.5}  # B: no better than chance (2 labels)
    assert np.allclose(t.anchor_weights(["A", "B"]), [1.0, 0.0])
    t.arch_quality = {"A": 0.8, "B": 0.6}
    assert np.allclose(t.anchor_weights(["A", "B"]), [0.75, 0.25])
    assert np.allclose(trainer().anchor_weights(["A", "B"]), [0.5, 0.5])  # "mean"
    with pytest.raises(FedMobiLLMError, match="anchor_target"):
        SideConfig(anchor_target="best-guess")


def fleet_arrays(rng: np.random.Generator) -> tuple[dict, dict]:
    """One architecture, two devices: 'big' holds 95 of label 0 and 5 of label 1, 'small'
    holds 3 of label 1."""
    y_big = np.array([0] * 95 + [1] * 5)
    y_small = np.array([1, 1, 1])
    data = {
        "big": (rng.normal(size=(100, 2, 4)).astype(np.float32), y_big),
        "small": (rng.normal(size=(3, 2, 4)).astype(np.float32), y_small),
    }
    return {"A": ["big", "small"]}, data


def test_sampler_label_balance_draws_each_label_equally():
    """Prepare an architecture whose samples are 92% one label; "label" draws both labels
    about equally, "sample" in proportion to the samples, "device" (the default) half from
    each device; an unknown balance is refused."""
    rng = np.random.default_rng(0)
    devices, data = fleet_arrays(rng)
    draw = {}
    for balance in ("device", "sample", "label"):
        groups = balanced_sample(
            np.random.default_rng(1), 4000, devices, lambda a, d: data[d], balance
        )
        assert [g[0] for g in groups] == ["A"] and groups[0][1].shape == (4000, 2, 4)
        draw[balance] = float(groups[0][2].mean())  # share of label 1
    assert 0.45 < draw["label"] < 0.55
    assert 0.04 < draw["sample"] < 0.12  # 8 of 103
    assert 0.48 < draw["device"] < 0.56  # half from 'small' (all 1) + 5% of 'big'
    with pytest.raises(FedMobiLLMError, match="balance"):
        balanced_sample(rng, 8, devices, lambda a, d: data[d], "labels")


def test_sampler_default_draw_is_unchanged():
    """The default ("device") consumes the generator as before: the same batch for a seed."""
    rng = np.random.default_rng(3)
    devices, data = fleet_arrays(rng)
    got = balanced_sample(np.random.default_rng(7), 64, devices, lambda a, d: data[d])
    ref_rng = np.random.default_rng(7)
    picks = ref_rng.integers(2, size=64)
    ys = []
    for di in np.unique(picks):
        y = data[devices["A"][di]][1]
        ys.append(y[ref_rng.integers(len(y), size=int((picks == di).sum()))])
    assert np.array_equal(got[0][2], np.concatenate(ys))


def test_label_distribution_counts_per_name():
    got = label_distribution({"d1": [0, 0, 1], "d2": [1, 1]}, ["neg", "pos"])
    assert got == {"neg": 2, "pos": 3}
    assert label_distribution({"d1": [2]}, None) == {"2": 1}
    assert label_distribution({}, ["neg", "pos"]) == {"neg": 0, "pos": 0}


@pytest.mark.integration
def test_status_reports_each_architectures_label_distribution(server_factory):
    """Prepare a real server with two architectures, one whose device holds a single
    label; /v1/status gives each architecture's training samples per label name."""
    import httpx

    from fedmobillm.device_runtime.messages import ROUTE_STATUS

    srv = server_factory(FAST)
    ma, mb = make_manifest("tiny-a"), make_manifest("tiny-b", depth=6, hidden=24, taps=[3, 6])
    ra, rb = register(srv.url, "phone-a", ma), register(srv.url, "phone-b", mb)
    assert upload(srv.url, ra, make_payload(ra, ma, range(64), seed=1)).status_code == 200
    pay_b = make_payload(rb, mb, range(40), seed=2, labels=np.ones(40, np.int64))
    assert upload(srv.url, rb, pay_b).status_code == 200
    deadline = time.monotonic() + 60
    while True:
        st = httpx.get(f"{srv.url}{ROUTE_STATUS}", headers=admin_headers()).json()["trainer"]
        archs = st["architectures"]
        done = len(archs) == 2 and sum(sum(a["labels"].values()) for a in archs.values()) == 104
        if done and st["step"] > 0:  # the trainer knows the label names
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.3)
    a, b = archs[ra["architecture"]]["labels"], archs[rb["architecture"]]["labels"]
    assert set(a) == {"negative", "positive"} and min(a.values()) > 10
    assert b == {"negative": 0, "positive": 40}


def skewed_fleet_train(steps: int, **config) -> SideTrainer:
    """A holds both labels, B only label 1 (a single-label architecture); no anchors."""
    t = trainer(**config)
    xa, ya = synthetic(400, 2, 16, 1)
    xb, yb = synthetic(400, 3, 24, 2)
    ones = np.flatnonzero(yb == 1)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        i, j = rng.integers(0, 400, 16), rng.choice(ones, 16)
        t.train_step([("A", xa[i], ya[i]), ("B", xb[j], yb[j])])
    return t


def share_of_label_1(t: SideTrainer, arch: str, x: np.ndarray) -> float:
    return float(torch.softmax(torch.from_numpy(t.predict(arch, x)), -1)[:, 1].mean())


def test_logit_adjustment_against_a_uniform_prior_keeps_other_architectures_balanced():
    """Prepare a fleet where B's devices hold label 1 only: plain training makes B call
    everything 1. With the logit adjustment against the fleet's drawn labels (75% label 1),
    A's predictions on balanced data lean to label 1 too; against a uniform prior
    (balanced softmax per architecture) A's stay closer to its data's real mix."""
    xa, ya = synthetic(400, 2, 16, 9)  # held-out data of A, about balanced
    xb, _ = synthetic(400, 3, 24, 9)
    plain = skewed_fleet_train(60)
    fleet = skewed_fleet_train(60, logit_adjust=1.0)
    uniform = skewed_fleet_train(60, logit_adjust=1.0, logit_adjust_prior="uniform")
    assert share_of_label_1(plain, "B", xb) > 0.9
    real = float(ya.mean())
    a_fleet, a_uniform = share_of_label_1(fleet, "A", xa), share_of_label_1(uniform, "A", xa)
    assert abs(a_uniform - real) < abs(a_fleet - real), (a_uniform, a_fleet, real)
    with pytest.raises(FedMobiLLMError, match="logit_adjust_prior"):
        SideConfig(logit_adjust_prior="population")
