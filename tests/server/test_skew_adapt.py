"""Local adaptation with validation selection (issue 23, server/adapt.py): an architecture's
personal model is the shared one fine-tuned on its own samples, the steps (0 included)
chosen on its validation samples; the setting reaches the server's trainer and its export."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from server_helpers import synthetic
from torch_helpers import one_thread  # noqa: F401 - autouse: one torch thread per test

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.adapt import adapt
from fedmobillm.server.side import SideConfig, SideTrainer

CFG = SideConfig(width=32, warmup_steps=5, adapt_steps=60, adapt_every=20, adapt_lr_scale=2.0)


def federation(flip_b: bool, steps: int = 80, **config) -> SideTrainer:
    """A and B trained together; with ``flip_b`` B's labels are flipped in the shared
    training (what B's own data says is the opposite: the federation misled B)."""
    t = SideTrainer(dataclasses.replace(CFG, **config), ["neg", "pos"], seed=0)
    t.add_architecture("A", [2, 4], 4, 16)
    t.add_architecture("B", [2, 4, 6], 6, 24)
    xa, ya = synthetic(400, 2, 16, 1)
    xb, yb = synthetic(400, 3, 24, 2)
    yb_seen = 1 - yb if flip_b else yb
    rng = np.random.default_rng(0)
    for _ in range(steps):
        i, j = rng.integers(0, 400, 16), rng.integers(0, 400, 16)
        t.train_step([("A", xa[i], ya[i]), ("B", xb[j], yb_seen[j])])
    return t


def own_data(seed: int = 3, noise: bool = False):
    """B's own labelled samples as a draw, and its validation chunks (true labels; with
    ``noise`` the training labels are random)."""
    x, y = synthetic(400, 3, 24, seed)
    xv, yv = synthetic(300, 3, 24, seed + 100)
    if noise:
        y = np.random.default_rng(7).integers(0, 2, len(y))

    def draw(rng: np.random.Generator) -> tuple:
        i = rng.integers(0, len(y), 32)
        return x[i], y[i]

    return draw, (lambda: [(xv[:150], yv[:150]), (xv[150:], yv[150:])]), (xv, yv)


def weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_adaptation_recovers_what_the_federation_cost_and_leaves_the_shared_model():
    """The shared model was taught B's labels flipped: on B's validation it is far below
    chance. Adapting on B's own samples picks steps > 0 whose validation accuracy is higher
    by a wide margin; the returned trainer's evaluate (what export reads) gives that
    accuracy; the shared trainer's weights and the global torch RNG are untouched."""
    t = federation(flip_b=True)
    draw, val, (xv, yv) = own_data()
    before, rng_before = weights(t.ema_side) + weights(t.ema_aligns), torch.get_rng_state()
    shared = t.evaluate("B", xv, yv)["accuracy"]
    got = adapt(t, "B", draw, val, seed=0)
    assert shared < 0.4 and got.shared_accuracy == pytest.approx(shared)
    assert got.steps > 0 and got.accuracy > shared + 0.3, got.summary()
    assert got.trainer.evaluate("B", xv, yv)["accuracy"] == pytest.approx(got.accuracy)
    after = weights(t.ema_side) + weights(t.ema_aligns)
    assert all(torch.equal(u, v) for u, v in zip(before, after, strict=True))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert [s for s, _ in got.curve] == [0, 20, 40, 60]


def test_adaptation_is_never_below_the_shared_model_on_validation():
    """Adapting on random labels cannot help: whatever it does, the chosen model's validation
    accuracy is the shared model's or higher, and with no strictly better count it is the
    shared model itself (0 steps, identical predictions)."""
    t = federation(flip_b=False)
    draw, val, (xv, yv) = own_data(noise=True)
    got = adapt(t, "B", draw, val, seed=0)
    assert got.accuracy >= got.shared_accuracy > 0.8
    assert got.accuracy == max(a for _, a in got.curve)
    if got.steps == 0:
        assert np.array_equal(got.trainer.predict("B", xv), t.predict("B", xv))
    off = adapt(t, "B", draw, val, config=dataclasses.replace(t.config, adapt_steps=0))
    assert off.steps == 0 and off.curve == [(0, off.shared_accuracy)]
    assert np.array_equal(off.trainer.predict("B", xv), t.predict("B", xv))


@pytest.mark.parametrize("shared_scale", [0.0, 0.1])
def test_shared_blocks_move_only_with_a_shared_lr(shared_scale):
    """adapt_shared_lr_scale 0: the adapted copy's shared blocks and gates equal the shared
    model's and only B's alignment and the head moved; > 0: the blocks move too."""
    t = federation(flip_b=True)
    draw, val, _ = own_data()
    got = adapt(
        t, "B", draw, val, config=dataclasses.replace(t.config, adapt_shared_lr_scale=shared_scale)
    )
    assert got.steps > 0
    src, dst = t.ema_side, got.trainer.ema_side
    blocks_same = all(
        torch.equal(p, q)
        for (n, p), (_, q) in zip(src.named_parameters(), dst.named_parameters(), strict=True)
        if not n.startswith("head.")
    )
    head_same = all(
        torch.equal(p, q) for p, q in zip(src.head.parameters(), dst.head.parameters(), strict=True)
    )
    key = t.archs["B"].key
    align_same = all(
        torch.equal(p, q)
        for p, q in zip(
            t.ema_aligns[key].parameters(), got.trainer.ema_aligns[key].parameters(), strict=True
        )
    )
    assert not head_same and not align_same
    assert blocks_same == (shared_scale == 0.0)


def test_bad_adaptation_settings_are_refused():
    with pytest.raises(FedMobiLLMError, match="adapt_steps"):
        SideConfig(adapt_steps=-1)
    with pytest.raises(FedMobiLLMError, match="adapt_every"):
        SideConfig(adapt_every=0)
    with pytest.raises(FedMobiLLMError, match="adapt_lr_scale"):
        SideConfig(adapt_lr_scale=-0.5)
    with pytest.raises(FedMobiLLMError, match="classification"):
        SideConfig(inputs="tokens", causal=True, adapt_steps=10)
    t = federation(flip_b=False, steps=1)
    draw, val, _ = own_data()
    with pytest.raises(FedMobiLLMError, match="unknown architecture"):
        adapt(t, "C", draw, val)
    with pytest.raises(FedMobiLLMError, match="labelled validation"):
        adapt(t, "B", draw, lambda: [(np.zeros((3, 3, 24), np.float32), -np.ones(3, np.int64))])


def test_the_setting_reaches_the_server_trainer_and_its_export(tmp_path):
    """[server.side] adapt_steps in a config file reaches the server's trainer: the personal
    model it exports for B (personal.onnx, run on onnxruntime as a device does) predicts what
    the adapted model predicts, not what the shared one does, and the trainer's best record
    for B says which steps validation chose; with adapt_steps 0 it exports the shared model."""
    from fedmobillm.device_runtime.personal import PersonalModel
    from fedmobillm.server.settings import load_settings
    from fedmobillm.server.trainer import ArchData, Trainer

    cfg = tmp_path / "server.toml"
    cfg.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n[server.side]\nwidth = 32\n'
        "warmup_steps = 5\nadapt_steps = 60\nadapt_every = 20\nadapt_lr_scale = 2.0\n"
    )
    settings = load_settings(cfg, dev=True)[0]
    assert settings.side.adapt_steps == 60
    x, y = synthetic(400, 3, 24, 3)
    xv, yv = synthetic(300, 3, 24, 103)
    for steps in (60, 0):
        side = dataclasses.replace(settings.side, adapt_steps=steps)
        trainer = Trainer(settings.model_copy(update={"side": side}))
        trainer.side = federation(flip_b=True, **{"adapt_steps": steps})
        a = ArchData([2, 4, 6], 6, 24, bundle_sha256s={"0" * 64})
        a.train_x["phone-b"], a.train_y["phone-b"] = list(x), y.tolist()
        a.val_x, a.val_y = list(xv), yv.tolist()
        trainer.cache.archs["B"] = a
        trainer.best["B"] = {"accuracy": 0.0, "step": 80, "n": len(yv), "train": len(y)}
        trainer._export({"B"}, force=True)
        model = PersonalModel(settings.personal_dir / "B")
        pred = model.logits(xv).argmax(1)
        shared = trainer.side.predict("B", xv).argmax(1)
        if steps:
            chosen = trainer.best["B"]["adapt"]
            assert chosen["steps"] > 0 and chosen["accuracy"] > chosen["shared_accuracy"] + 0.3
            assert float((pred == yv).mean()) > float((shared == yv).mean()) + 0.3
        else:
            assert "adapt" not in trainer.best["B"]
            assert float((pred == shared).mean()) > 0.98
