"""The lm side network (server/lm.py) on a tiny random Llama bundle exported with --generate
and --pivot none: zero init is exactly the frozen model, causality, the loss mask, training
lowers held-out loss, the personal lm graph equals torch, and generation with it runs on
the device path with torch unimportable (and scores what the trainer scores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from gen_helpers import gen_bundle, tiny_llama  # noqa: E402
from torch_blocker import env_without_torch  # noqa: E402

from fedmobillm.errors import FedMobiLLMError  # noqa: E402
from fedmobillm.server.lm import (  # noqa: E402
    FrozenLMHead,
    LMGroup,
    LMSideTrainer,
    lm_config,
    lm_logits,
    lm_loss,
    next_token_targets,
)
from fedmobillm.server.side import pad_tokens  # noqa: E402

SUBJECTS = ["the quick fox", "a lazy dog", "the model", "my phone"]
VERBS = ["jumps over", "writes to", "talks with", "waits for"]
OBJECTS = ["the lazy dog", "a brown fox", "the world", "you today"]


def corpus(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        f"{SUBJECTS[rng.integers(4)]} {VERBS[rng.integers(4)]} {OBJECTS[rng.integers(4)]}"
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def bundle() -> Path:
    return gen_bundle()


@pytest.fixture(scope="module")
def head() -> FrozenLMHead:
    return FrozenLMHead.from_model(tiny_llama())


@pytest.fixture(scope="module")
def backbone(bundle):
    from fedmobillm.device_runtime.backbone import Backbone

    return Backbone(bundle, backend="onnx", threads=1)


def encode(backbone, texts: list[str]) -> LMGroup:
    """Token taps through the bundle, int8 round-tripped as uploaded, with their ids."""
    from fedmobillm.device_runtime import serde

    x, lengths = backbone.forward_tokens(texts)  # (B, K, T, d), (B,)
    scales = np.asarray(backbone.manifest.activation_scales, np.float32)
    xq = serde.dequantize(serde.quantize_int8(x, scales), scales, tokens=True)
    ids_list = [backbone.encode([t])[0][0, : int(n)] for t, n in zip(texts, lengths, strict=True)]
    xs, mask = pad_tokens([xq[i, :, : int(n)] for i, n in enumerate(lengths)])
    ids = np.zeros_like(mask)
    for i, row in enumerate(ids_list):
        ids[i, : len(row)] = row
    m = backbone.manifest
    return LMGroup(m.architecture, xs, ids, mask, extra={"fp32": x})


def new_trainer(backbone, head, **cfg) -> LMSideTrainer:
    m = backbone.manifest
    trainer = LMSideTrainer(lm_config(width=32, heads=4, blocks=2, lr=3e-3, **cfg), seed=0)
    trainer.add_architecture(
        m.architecture, m.taps, m.depth, m.hidden_size, head, str(tiny_llama())
    )
    return trainer


def test_zero_init_is_exactly_the_frozen_model(backbone, head):
    trainer = new_trainer(backbone, head)
    g = encode(backbone, corpus(6, 0))
    x, mask = torch.from_numpy(g.x), torch.from_numpy(g.mask)
    personal = trainer.model(g.arch).eval()
    with torch.no_grad():
        assert torch.equal(personal(x, mask), torch.zeros(*g.ids.shape, x.shape[-1]))
        got = lm_logits(personal, head, x, mask)
        assert torch.equal(got, lm_logits(None, head, x, mask))
    # ... and the frozen model is the Hugging Face model's own logits (full depth, fp32 taps)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(g.ids), attention_mask=mask).logits
        mine = lm_logits(None, head, torch.from_numpy(g.extra["fp32"]), mask)
    real = mask.bool()
    assert torch.allclose(mine[real], want[real], atol=2e-3, rtol=1e-4)


def test_later_tokens_never_change_earlier_predictions(backbone, head):
    trainer = new_trainer(backbone, head)
    g = encode(backbone, corpus(8, 1))
    for _ in range(5):  # delta no longer zero
        trainer.train_step([g])
    personal = trainer.model(g.arch, averaged=True).eval()
    x, mask = torch.from_numpy(g.x), torch.from_numpy(g.mask)
    cut = 3
    x2 = x.clone()
    x2[:, :, cut:] = torch.randn_like(x2[:, :, cut:]) * 5
    with torch.no_grad():
        a, b = personal(x, mask), personal(x2, mask)
    assert a[:, cut:].abs().max() > 0  # the model is not trivially zero
    assert torch.equal(a[:, :cut], b[:, :cut])
    assert not torch.allclose(a[:, cut:], b[:, cut:])


def test_loss_mask_puts_the_loss_on_the_marked_tokens_only(backbone, head):
    ids = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    scored, target = next_token_targets(ids, mask)
    assert scored.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert target[0, :3].tolist() == [6, 7, 8] and target[1, :2].tolist() == [10, 11]
    response = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])  # prompt then response
    scored, _ = next_token_targets(ids, mask, response)
    assert scored.tolist() == [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    # the loss ignores the ids of prompt tokens it does not predict
    g = encode(backbone, corpus(4, 2))
    x, m = torch.from_numpy(g.x), torch.from_numpy(g.mask)
    lm = m.clone()
    lm[:, :3] = 0
    base, n = lm_loss(None, head, x, torch.from_numpy(g.ids), m, lm)
    changed = torch.from_numpy(g.ids).clone()
    changed[:, :3] = 7  # prompt tokens: targets of nothing scored
    again, n2 = lm_loss(None, head, x, changed, m, lm)
    assert n == n2 == int((lm[:, 1:] * m[:, 1:]).sum()) and torch.equal(base, again)
    full, nf = lm_loss(None, head, x, changed, m)
    assert nf > n and not torch.equal(full, base)
    with pytest.raises(FedMobiLLMError, match="loss_mask"):
        new_trainer(backbone, head).evaluate([LMGroup(g.arch, g.x, g.ids, g.mask, g.mask[:, :2])])


def test_training_lowers_held_out_loss_and_survives_save_load(backbone, head, tmp_path):
    trainer = new_trainer(backbone, head, ema=0.9)
    train = encode(backbone, corpus(48, 3))
    held = encode(backbone, corpus(16, 4))
    frozen = trainer.evaluate([held], frozen=True)
    assert trainer.evaluate([held]) == frozen  # zero init
    rng = np.random.default_rng(0)
    for _ in range(60):
        rows = rng.choice(48, 12, replace=False)
        trainer.train_step([LMGroup(train.arch, train.x[rows], train.ids[rows], train.mask[rows])])
    after = trainer.evaluate([held])
    assert after["perplexity"] < 0.5 * frozen["perplexity"], (frozen, after)
    assert after["next_token_top1"] > frozen["next_token_top1"]
    trainer.save(tmp_path / "lm")
    again = LMSideTrainer.load(tmp_path / "lm", head_for=lambda spec: head)
    assert again.step == 60 and again.evaluate([held]) == after
    (tmp_path / "lm" / "lm.safetensors").write_bytes(b"torn")
    with pytest.raises(FedMobiLLMError, match="torn"):
        LMSideTrainer.load(tmp_path / "lm", head_for=lambda spec: head)


def test_ema_is_the_normalised_moving_average_with_the_configured_decay(backbone, head):
    """The averaged model after t steps is sum_i ema^(t-i) w_i / sum_i ema^(t-i) over the
    weights w_i after each step (the initial weights count nothing), so two ema settings
    give two models from the first steps (the old min(ema, (1+t)/(10+t)) warm-up gave the
    same model for every ema above 0.47 for the first 8 steps)."""
    from torch.nn.utils import parameters_to_vector as flat

    g = encode(backbone, corpus(12, 3))
    got = {}
    for ema in (0.9, 0.5):
        trainer = new_trainer(backbone, head, ema=ema, warmup_steps=1)
        live = []
        for _ in range(6):
            trainer.train_step([g])
            live.append(flat(trainer.model(g.arch).parameters()).detach().clone())
        weights = torch.tensor([ema ** (len(live) - 1 - i) for i in range(len(live))])
        want = (torch.stack(live) * weights[:, None]).sum(0) / weights.sum()
        got[ema] = flat(trainer.model(g.arch, averaged=True).parameters())
        assert torch.allclose(got[ema], want, atol=1e-6), (ema, (got[ema] - want).abs().max())
        assert not torch.allclose(got[ema], live[-1], atol=1e-6)  # an average, not the last
    assert not torch.allclose(got[0.9], got[0.5], atol=1e-6)


def two_arch_trainer(backbone, head, **kw) -> tuple[LMSideTrainer, LMGroup, LMGroup]:
    """A trainer with two architectures of one source model (the bundle's taps under two
    names: as a full and a truncated SmolLM2 share one head) and a group of each."""
    m = backbone.manifest
    trainer = LMSideTrainer(lm_config(width=32, heads=4, blocks=2, lr=3e-3), seed=0, **kw)
    for name in ("full", "short"):
        trainer.add_architecture(name, m.taps, m.depth, m.hidden_size, head, str(tiny_llama()))
    g = encode(backbone, corpus(12, 6))
    return (
        trainer,
        LMGroup("full", g.x, g.ids, g.mask),
        LMGroup("short", g.x[:5], g.ids[:5], g.mask[:5]),
    )


@pytest.mark.parametrize("share", [False, True])
def test_share_out_lets_one_architecture_train_the_others_residual(backbone, head, share, tmp_path):
    """share_out: architectures of one source model write their residual with one output
    projection, so training only the "short" architecture moves the "full" one's delta
    (without it, full's own projection stays zero and its delta exactly 0); checkpoints
    keep the sharing."""
    assert LMSideTrainer(lm_config()).share_out  # the default (the server's trainer)
    trainer, full, short = two_arch_trainer(backbone, head, share_out=share)
    assert len(trainer.outs) == (1 if share else 2)
    assert (trainer.model("full").out is trainer.model("short").out) == share
    for _ in range(4):
        trainer.train_step([short])
    x, mask = torch.from_numpy(full.x), torch.from_numpy(full.mask)
    with torch.no_grad():
        delta = trainer.model("full", averaged=True).eval()(x, mask)
    assert (delta.abs().max() > 0) == share
    expect = trainer.num_parameters("full")
    trainer.save(tmp_path / "lm")
    again = LMSideTrainer.load(tmp_path / "lm", head_for=lambda spec: head)
    assert again.share_out == share and len(again.outs) == len(trainer.outs)
    assert again.evaluate([full]) == trainer.evaluate([full])
    assert again.num_parameters("full") == expect


def test_arch_balance_weighs_each_architectures_mean_alike(backbone, head):
    """arch_balance: a step's loss is the mean of each architecture's mean NLL, not the
    mean over every token (which lets the architecture with more tokens dominate)."""
    assert LMSideTrainer(lm_config()).arch_balance  # the default (the server's trainer)
    got = {}
    for balance in (False, True):
        trainer, full, short = two_arch_trainer(backbone, head, arch_balance=balance)
        got[balance] = trainer.train_step([full, short])  # delta 0: the frozen NLL
    sums = [lm_loss(None, head, *(torch.from_numpy(a) for a in (g.x, g.ids, g.mask)))
            for g in (full, short)]  # fmt: skip
    (s1, n1), (s2, n2) = [(float(s), n) for s, n in sums]
    assert n1 > n2  # unequal token counts, so the two losses differ
    assert got[False] == pytest.approx((s1 + s2) / (n1 + n2), rel=1e-5)
    assert got[True] == pytest.approx((s1 / n1 + s2 / n2) / 2, rel=1e-5)
    assert got[True] != pytest.approx(got[False], rel=1e-4)


def test_config_must_be_causal_tokens():
    from fedmobillm.server.side import SideConfig

    with pytest.raises(FedMobiLLMError, match="causal"):
        LMSideTrainer(SideConfig(inputs="tokens"))


@pytest.fixture(scope="module")
def trained(backbone, head, tmp_path_factory):
    """A briefly trained trainer and its exported personal lm model (fp32)."""
    trainer = new_trainer(backbone, head, ema=0.0)
    train = encode(backbone, corpus(48, 5))
    for _ in range(40):
        trainer.train_step([train])
    out = tmp_path_factory.mktemp("personal-lm")
    m = backbone.manifest
    from fedmobillm.device_runtime.protocol import bundle_digest

    trainer.export_personal(m.architecture, out, [bundle_digest(m)])
    return trainer, out


def test_personal_lm_onnx_equals_torch(trained, backbone):
    from fedmobillm.device_runtime.lm_personal import PersonalLM

    trainer, out = trained
    info = json.loads((out / "personal.json").read_text())
    assert info["onnx_max_abs_diff"] <= 1e-4 and info["outputs"][0]["name"] == "delta"
    assert "lm_head" not in " ".join(info["files"])  # the head is never shipped
    g = encode(backbone, corpus(5, 6))
    personal = PersonalLM(out)
    personal.check_compatible(backbone.manifest)
    got = personal.run(g.extra["fp32"], g.mask)  # int8 round trip inside, as trained
    with torch.no_grad():
        want = trainer.model(g.arch).eval()(torch.from_numpy(g.x), torch.from_numpy(g.mask))
    real = g.mask.astype(bool)
    assert np.abs(got[real] - want.numpy()[real]).max() < 1e-4
    assert np.abs(got[real]).max() > 1e-3  # trained: not the zero residual


def test_device_perplexity_with_the_personal_model_matches_the_trainer(trained, bundle, backbone):
    """Generator.perplexity (ONNX step graph + head + personal.onnx through the delta hook)
    scores held-out text as the trainer's torch evaluation does with the phone's hidden."""
    from fedmobillm.device_runtime.generate import Generator
    from fedmobillm.device_runtime.lm_personal import PersonalLM

    trainer, out = trained
    texts = corpus(6, 7)
    gen = Generator(bundle, threads=1)
    personal = PersonalLM(out)
    personal.check_compatible(gen.manifest)
    device = gen.perplexity(texts, delta=personal.delta)
    frozen = gen.perplexity(texts)
    g = encode(backbone, texts)
    fp32 = torch.from_numpy(g.extra["fp32"][:, -1])
    with torch.no_grad():
        g.extra["hidden"] = trainer.heads[g.arch].hidden(fp32).numpy()
    torch_eval = trainer.evaluate([g], averaged=False)
    assert device.tokens == torch_eval["tokens"]
    assert device.perplexity == pytest.approx(torch_eval["perplexity"], rel=1e-3)
    assert device.perplexity < frozen.perplexity


def test_generate_with_the_personal_model_runs_without_torch(trained, bundle, tmp_path):
    _, out = trained
    env = env_without_torch(tmp_path)
    args = ["--bundle", str(bundle), "--prompt", "the quick fox", "--max-new-tokens", "6"]
    runs = {}
    for name, extra in (("frozen", []), ("personal", ["--personal", str(out)])):
        done = subprocess.run(
            [sys.executable, "-m", "fedmobillm.cli", "device", "generate", *args, *extra, "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["personal"]["tokens_per_s"] > 0
    assert runs["personal"]["token_ids"] != runs["frozen"]["token_ids"]
    # a classification personal model is refused with a clear message
    bad = tmp_path / "not-lm"
    bad.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmobillm.cli",
            "device",
            "generate",
            *args,
            "--personal",
            str(bad),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode != 0 and "not a personal model" in done.stderr


def test_perplexity_of_a_huge_mean_nll_is_inf_not_an_error():
    """A mean NLL past ~709 overflows exp: the stats say inf instead of raising."""
    from fedmobillm.server.lm import NextTokenStats

    stats = NextTokenStats(nll=2000.0, tokens=2)
    out = stats.to_dict()
    assert out["perplexity"] == float("inf") and out["nll_per_token"] == 1000.0
    assert NextTokenStats(nll=2.0, tokens=2).to_dict()["perplexity"] == pytest.approx(np.e)


def test_chunked_cross_entropy_matches_the_whole_and_its_gradient(monkeypatch):
    """lm_loss's head runs CE_CHUNK scored tokens at a time: the same sum and gradient."""
    import torch.nn.functional as F
    from torch import nn

    from fedmobillm.server import lm as lm_mod

    torch.manual_seed(0)
    head = lm_mod.FrozenLMHead(nn.LayerNorm(8), torch.randn(50, 8), None)
    h = torch.randn(23, 8, requires_grad=True)
    tgt = torch.randint(0, 50, (23,))
    whole = F.cross_entropy(head(h), tgt, reduction="sum")
    (g_whole,) = torch.autograd.grad(whole, h)
    monkeypatch.setattr(lm_mod, "CE_CHUNK", 5)
    chunked = lm_mod._chunked_ce(head, h, tgt)
    (g_chunked,) = torch.autograd.grad(chunked, h)
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert torch.allclose(g_whole, g_chunked, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(lm_mod._chunked_ce(head, h, tgt), whole, atol=1e-5)
