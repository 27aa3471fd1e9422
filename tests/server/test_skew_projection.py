"""Issue 23, negative transfer without a ranking: the anchor terms' gradient projected off
each architecture's own labelled-loss gradient where they conflict
(``SideConfig.conflict_projection``), and the sampler's balance as a server setting
(``ServerSettings.sampler_balance``) that the trainer uses (a real server)."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from server_helpers import FAST, make_manifest, make_payload, register, synthetic, upload
from torch_helpers import one_thread  # noqa: F401 - autouse: one torch thread per test

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server import side as side_mod
from fedmobillm.server.settings import load_settings
from fedmobillm.server.side import SideConfig, SideTrainer, project_gradients, remove_conflicts

STRONG = "kV3q9Zr7yP2wLx8tNf4hJc6B"


def test_remove_conflicts_leaves_no_conflict_with_any_gradient():
    """Prepare h that conflicts with two of three gradients: after the projection it
    conflicts with none, and an h that conflicts with nothing is returned unchanged."""
    g = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.6, 0.8, 0.0]), torch.tensor([0, 0, 1.0])]
    h = torch.tensor([-1.0, -0.5, 2.0])
    out, made, resolved = remove_conflicts(h, g)
    assert resolved and made >= 2
    assert all(float(out @ gi) >= -1e-6 for gi in g)
    same, made, resolved = remove_conflicts(torch.tensor([1.0, 1.0, 1.0]), g)
    assert made == 0 and resolved and torch.equal(same, torch.tensor([1.0, 1.0, 1.0]))


def test_projection_never_raises_an_architectures_own_loss_to_first_order():
    """Construct a conflict: the anchor gradient points against A's own gradient on A's
    alignment and on the shared network. Unprojected, a step along the summed gradient
    raises A's loss to first order (<g_A, update> < 0); projected, every architecture's
    <g_a, update> >= <g_a, own part> (the anchors never cost it), and B's part, which did
    not conflict, is kept as it was."""
    ga_s, gb_s = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    ga_a, gb_a = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])
    h_s = torch.tensor([-3.0, 0.5, 1.0, 0.0])  # against A's shared gradient
    h_a = {"A": torch.tensor([-2.0, -2.0]), "B": torch.tensor([1.0, 0.0])}
    own = {"A": (ga_s, ga_a), "B": (gb_s, gb_a)}
    full_a = torch.cat([ga_s, ga_a])
    plain = torch.cat([ga_s + gb_s + h_s, ga_a + h_a["A"]])
    assert float(full_a @ plain) < 0  # the plain step raises A's own loss
    shared, aligns, counts = project_gradients(own, (h_s, h_a), "anchors")
    assert counts["shared"] >= 1 and counts["align:A"] == 1 and counts["align:B"] == 0
    for a, (gs, ga) in own.items():
        own_part = float(torch.cat([gs, ga]) @ torch.cat([ga_s + gb_s, ga]))
        got = float(torch.cat([gs, ga]) @ torch.cat([shared, aligns[a]]))
        assert got >= own_part - 1e-6, (a, got, own_part)
    assert torch.allclose(aligns["B"], gb_a + h_a["B"])
    assert torch.allclose(aligns["A"], ga_a)  # the anchor part was all conflict
    with pytest.raises(FedMobiLLMError, match="conflict_projection"):
        SideConfig(conflict_projection="pcgrad")


def test_pcgrad_mode_projects_the_architectures_shared_gradients_apart():
    """ "all": two architectures whose labelled gradients on the shared network conflict
    have them projected apart; "anchors" leaves them as they are."""
    own = {
        "A": (torch.tensor([1.0, 0.2]), torch.tensor([1.0])),
        "B": (torch.tensor([-1.0, 0.5]), torch.tensor([1.0])),
    }
    plain, _, _ = project_gradients(own, None, "anchors")
    assert torch.allclose(plain, torch.tensor([0.0, 0.7]))
    pc, _, counts = project_gradients(own, None, "all")
    assert counts["shared"] == 2 and not torch.allclose(pc, plain)


def two_arch_trainer(**config) -> SideTrainer:
    cfg = SideConfig(width=32, warmup_steps=1, dropout=0.0, ema=0.0, **config)
    t = SideTrainer(cfg, ["neg", "pos"], seed=0)
    t.add_architecture("A", [2, 4], 4, 16)
    t.add_architecture("B", [2, 4, 6], 6, 24)
    return t


def batch(seed: int) -> tuple[list[tuple], list[tuple]]:
    xa, ya = synthetic(32, 2, 16, seed)
    xb, yb = synthetic(32, 3, 24, seed + 100)
    anc_a, _ = synthetic(16, 2, 16, seed + 200)
    anc_b, _ = synthetic(16, 3, 24, seed + 300)
    return [("A", xa, ya), ("B", xb, 1 - yb)], [("A", anc_a), ("B", anc_b)]


def test_trainer_steps_on_the_projected_gradient(monkeypatch):
    """A real SideTrainer with conflict_projection "anchors": every step goes through
    project_gradients, the gradients it applies are the projected ones (no architecture's
    own gradient is opposed by the anchor part), and the loss is the plain step's."""
    seen: list[tuple] = []
    real = side_mod.project_gradients

    def spy(own, transfer, mode, protected=None):
        assert protected == {"A", "B"}  # both batches hold both labels
        out = real(own, transfer, mode, protected)
        seen.append((own, transfer, out))
        return out

    monkeypatch.setattr(side_mod, "project_gradients", spy)
    t = two_arch_trainer(conflict_projection="anchors", anchor_kl=30.0)
    plain = two_arch_trainer(anchor_kl=30.0)
    for step in range(6):
        groups, anc = batch(step)
        loss = t.train_step(groups, anc)
        if step == 0:  # same weights: the same loss
            assert loss == pytest.approx(plain.train_step(groups, anc), rel=1e-5)
    assert len(seen) == 6 and t.conflicts["steps"] == 6
    conflicts = 0
    for own, transfer, (shared, aligns, counts) in seen:
        conflicts += sum(v for k, v in counts.items() if k != "shared_dropped")
        assert transfer is not None
        total_own = sum(g for g, _ in own.values())
        for a, (gs, ga) in own.items():
            h_s, h_a = shared - total_own, aligns[a] - ga
            assert float(ga @ h_a) >= -1e-5 * float(ga.norm() * h_a.norm() + 1e-12)
            if not counts["shared_dropped"]:
                assert float(gs @ h_s) >= -1e-5 * float(gs.norm() * h_s.norm() + 1e-12)
    assert conflicts > 0  # the construction does conflict: the projection was exercised
    # the applied gradient is the projected one (scaled alike by the norm clipping)
    for a in ("A", "B"):
        got = torch.cat([p.grad.reshape(-1) for p in t.aligns[t.archs[a].key].parameters()])
        want = seen[-1][2][1][a]
        c = float(got @ want) / float(want @ want)
        assert 0 < c <= 1 + 1e-6 and torch.allclose(got, c * want, atol=1e-6)


def test_sampler_balance_setting_from_config_env_and_override(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOBILLM_ADMIN_TOKEN", STRONG)
    from typing import get_args

    from fedmobillm.server.policies import BALANCES
    from fedmobillm.server.settings import ServerSettings

    assert get_args(ServerSettings.model_fields["sampler_balance"].annotation) == BALANCES
    assert load_settings(None)[0].sampler_balance == "device"
    monkeypatch.setenv("FEDMOBILLM_SAMPLER_BALANCE", "sample")
    assert load_settings(None)[0].sampler_balance == "sample"
    cfg = tmp_path / "server.toml"
    cfg.write_text('[server]\nsampler_balance = "label"\n')
    assert load_settings(cfg)[0].sampler_balance == "label"
    assert load_settings(cfg, sampler_balance="device")[0].sampler_balance == "device"
    cfg.write_text('[server]\nsampler_balance = "labels"\n')
    with pytest.raises(FedMobiLLMError, match="sampler_balance"):
        load_settings(cfg)
    with pytest.raises(FedMobiLLMError, match="task lm has no labels"):
        load_settings(None, task="lm", sampler_balance="label")


@pytest.mark.integration
def test_the_server_trainer_draws_by_label_when_set(server_factory, tmp_path):
    """Prepare a real server with sampler_balance "label" and one device holding 60 samples
    of one label and 4 of the other: the labels the trainer drew (its checkpoint's
    label_counts) are near half and half; the default draw would give about 6%."""
    data = tmp_path / "srv"
    srv = server_factory({**FAST, "sampler_balance": "label"}, data_dir=data)
    m = make_manifest("tiny-a")
    reg = register(srv.url, "phone-a", m)
    labels = np.asarray([0] * 60 + [1] * 4, np.int64)
    assert upload(srv.url, reg, make_payload(reg, m, range(64), labels=labels)).status_code == 200
    ckpt = data / "checkpoints"
    deadline = time.monotonic() + 90
    while True:
        latest = ckpt / "LATEST"
        if latest.is_file():
            step_dir = ckpt / json.loads(latest.read_text())["dir"]
            state = json.loads((step_dir / "side.json").read_text())
            counts = next(iter(state["label_counts"].values()), None)
            if counts is not None and sum(counts) >= 400:
                break
        assert time.monotonic() < deadline, "no checkpoint with 400 drawn samples"
        time.sleep(0.5)
    share = counts[1] / sum(counts)
    assert 0.35 < share < 0.65, counts


def test_an_architecture_whose_batch_lacks_a_label_is_not_guarded(monkeypatch):
    """B's batch holds one label: its own loss says only "predict that label", so the anchor
    gradient on B's alignment is kept whole (the anchors are its one teacher); A's, whose
    batch holds both labels, is still projected."""
    seen: list[tuple] = []
    real = side_mod.project_gradients

    def spy(own, transfer, mode, protected=None):
        seen.append((own, transfer, protected))
        return real(own, transfer, mode, protected)

    monkeypatch.setattr(side_mod, "project_gradients", spy)
    t = two_arch_trainer(conflict_projection="anchors", anchor_kl=30.0)
    groups, anc = batch(0)
    xb = groups[1][1]
    t.train_step([groups[0], ("B", xb, np.ones(len(xb), np.int64))], anc)
    ((own, transfer, protected),) = seen
    assert protected == {"A"} and t.conflicts["unprotected"] == 1
    _, aligns, _ = real(own, transfer, "anchors", protected)
    assert torch.allclose(aligns["B"], own["B"][1] + transfer[1]["B"])
    # the same anchor gradient on A's side of a constructed conflict is projected
    own2 = {"A": (torch.ones(2), torch.tensor([1.0])), "B": (torch.ones(2), torch.tensor([1.0]))}
    tr2 = (torch.zeros(2), {"A": torch.tensor([-1.0]), "B": torch.tensor([-1.0])})
    _, al2, _ = real(own2, tr2, "anchors", {"A"})
    assert torch.allclose(al2["A"], torch.tensor([1.0])) and torch.allclose(
        al2["B"], torch.tensor([0.0])
    )


def test_protect_margin_keeps_every_close_architecture_a_teacher():
    """anchor_protect_margin 0.02: A (0.80) and B (0.79) are both teachers, C (0.70) is
    pulled; the anchor gradient reaches C's alignment only. Margin 0 keeps the best alone."""
    t = SideTrainer(
        SideConfig(width=32, anchor_protect_best=True, anchor_protect_margin=0.02, dropout=0.0),
        ["neg", "pos"],
    )
    for name in ("A", "B", "C"):
        t.add_architecture(name, [2, 4], 4, 16)
    t.arch_quality = {"A": 0.80, "B": 0.79, "C": 0.70}
    assert t.anchor_teachers(["A", "B", "C"]) == {"A", "B"}
    xs = [synthetic(16, 2, 16, s)[0] for s in (1, 2, 3)]
    t._anchor_loss([(n, x) for n, x in zip("ABC", xs, strict=True)]).backward()
    grad = {
        n: sum(float(p.grad.abs().sum()) for p in t.aligns[t.archs[n].key].parameters()
               if p.grad is not None)
        for n in "ABC"
    }  # fmt: skip
    assert grad["A"] == 0.0 and grad["B"] == 0.0 and grad["C"] > 0.0
    t.config = dataclasses.replace(t.config, anchor_protect_margin=0.0)
    assert t.anchor_teachers(["A", "B", "C"]) == {"A"}
    with pytest.raises(FedMobiLLMError, match="anchor_protect_margin"):
        SideConfig(anchor_protect_margin=2.0)
