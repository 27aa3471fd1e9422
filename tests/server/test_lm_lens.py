"""The tuned-lens start of truncated decoders (server/lm_lens.py): the ridge fit recovers a
known affine map, a truncated architecture's personal model starts exactly at the lens's
predictions (a full-depth one at the frozen model's), the lens survives save/load, and the
exported personal.onnx (lens inside) equals torch on the torch-free device path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from gen_helpers import tiny_llama  # noqa: E402

from fedmobillm.server import lm_lens  # noqa: E402
from fedmobillm.server.lm import FrozenLMHead, LMSideTrainer, lm_config, lm_logits  # noqa: E402

TEXTS = [f"the {a} fox {b} over the {c} dog" for a in ("quick", "lazy", "brown", "red")
         for b in ("jumps", "runs", "talks", "waits") for c in ("lazy", "big", "small")]  # fmt: skip


def test_fit_affine_recovers_a_known_affine_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 12)) * rng.uniform(0.1, 30, size=12)  # outlier-scaled channels
    a, c = rng.normal(size=(9, 12)), rng.normal(size=9) * 5
    exact = lm_lens.fit_affine(x, x @ a.T + c, ridges=(1e-10,))
    assert np.allclose(exact.weight, a, atol=1e-4) and np.allclose(exact.bias, c, atol=1e-3)
    fit = lm_lens.fit_affine(x, x @ a.T + c)  # the ridge chosen on held-out rows: the least
    assert fit.meta["ridge"] == min(lm_lens.RIDGES) and fit.meta["heldout_r2"] > 0.999999
    assert np.allclose(fit.weight, a, atol=1e-2) and np.allclose(fit.bias, c, atol=0.1)
    noisy = lm_lens.fit_affine(x, x @ a.T + c + rng.normal(size=(3000, 9)))
    assert np.allclose(noisy.weight, a, atol=0.05) and 0.5 < noisy.meta["heldout_r2"] < 1


@pytest.fixture(scope="module")
def model_folder() -> Path:
    return tiny_llama()


@pytest.fixture(scope="module")
def head(model_folder) -> FrozenLMHead:
    return FrozenLMHead.from_model(model_folder)


def taps_of(folder: Path, texts: list[str], layers: list[int]):
    """Token taps (B, K, T, d) of the tiny model's blocks ``layers`` (pre-norm), mask, ids."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token or tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    enc = tok(texts, return_tensors="pt", padding=True)
    got = {}
    hooks = [model.model.layers[t - 1].register_forward_hook(
        lambda _m, _i, o, t=t: got.__setitem__(t, o[0] if isinstance(o, tuple) else o))
        for t in layers]  # fmt: skip
    with torch.no_grad():
        model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    for h in hooks:
        h.remove()
    mask = enc["attention_mask"]
    x = torch.stack([got[t] for t in layers], 1) * mask[:, None, :, None]
    return x.float(), mask.long(), enc["input_ids"].long()


@pytest.fixture
def lens(model_folder, head, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOBILLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lm_lens, "calibration_texts", lambda: TEXTS)
    monkeypatch.delenv(lm_lens.LENS_ENV, raising=False)
    got = lm_lens.lens_for(model_folder, 2, head.norm, digest="tiny")
    assert got is not None and got.meta["cached"] is False
    assert got.meta["heldout_r2"] > got.meta["identity_r2"]
    again = lm_lens.lens_for(model_folder, 2, head.norm, digest="tiny")  # from the disk cache
    assert torch.equal(again.proj.weight, got.proj.weight)
    assert len(list((tmp_path / "cache" / "lm-lens").glob("*.safetensors"))) == 1
    assert lm_lens.lens_for(model_folder, 3, head.norm, digest="tiny") is None  # full depth
    monkeypatch.setenv(lm_lens.LENS_ENV, "off")
    assert lm_lens.lens_for(model_folder, 2, head.norm, digest="tiny") is None
    return got


def trainer_with(head, lens, folder) -> LMSideTrainer:
    trainer = LMSideTrainer(lm_config(width=32, heads=4, blocks=2, lr=3e-3, ema=0.9), seed=0)
    trainer.add_architecture("tiny:1-2", [1, 2], 2, head.hidden_size, head, str(folder), lens)
    return trainer


def test_truncated_personal_model_starts_at_the_lens(model_folder, head, lens, tmp_path):
    x, mask, ids = taps_of(model_folder, TEXTS[:6], [1, 2])
    trainer = trainer_with(head, lens, model_folder)
    personal = trainer.model("tiny:1-2").eval()
    real = mask.bool()
    with torch.no_grad():
        got = lm_logits(personal, head, x, mask)
        want = head(lens.translated(x[:, -1]))  # the tuned lens's own logits
        frozen = lm_logits(None, head, x, mask)  # the logit lens
    assert torch.allclose(got[real], want[real], atol=1e-4)
    assert not torch.allclose(got[real], frozen[real], atol=1e-2)
    # a checkpoint keeps the lens (and a trained step moves off it only through the side)
    from fedmobillm.server.lm import LMGroup

    g = LMGroup("tiny:1-2", x.numpy(), ids.numpy(), mask.numpy())
    trainer.train_step([g])
    trainer.save(tmp_path / "ckpt")
    loaded = LMSideTrainer.load(tmp_path / "ckpt", head_for=lambda spec: head)
    assert loaded.archs["tiny:1-2"].lens["ridge"] == lens.meta["ridge"]
    with torch.no_grad():
        a = trainer.model("tiny:1-2", averaged=True).eval()(x, mask)
        b = loaded.model("tiny:1-2", averaged=True).eval()(x, mask)
    assert torch.equal(a[real], b[real])


def test_personal_onnx_with_lens_equals_torch_on_the_device_path(
    model_folder, head, lens, tmp_path
):
    from fedmobillm.device_runtime.lm_personal import PersonalLM

    trainer = trainer_with(head, lens, model_folder)
    with torch.no_grad():  # a trained-looking side: non-zero output projection
        trainer.outs["a0"].proj.weight.normal_(0, 0.05)
    out = trainer.export_personal("tiny:1-2", tmp_path / "personal", ["digest"], quant="fp32")
    assert (out / "lens.json").is_file()
    device = PersonalLM(out, activations="fp32")
    assert device.lens is not None and device.lens["tuned_lens"]["ridge"] == lens.meta["ridge"]
    x, mask, _ = taps_of(model_folder, TEXTS[6:11], [1, 2])
    got = device.run(x.numpy(), mask.numpy())
    with torch.no_grad():
        want = trainer.model("tiny:1-2", averaged=True).eval()(x, mask).numpy()
    real = mask.numpy().astype(bool)
    assert np.abs(got[real] - want[real]).max() <= 1e-4
    assert np.abs(want[real]).max() > 1e-2  # the lens part is there, not zeros
