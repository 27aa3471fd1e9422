"""Generation graphs (`export --generate`) on tiny random Llamas: the ONNX decoder step with
its KV cache reproduces Hugging Face's logits and greedy `generate`, the LM head graph is the
model's head, truncated bundles generate through their own depth, files are verified."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gen_helpers import PROMPTS, calibration_file, gen_bundle, tiny_llama

from fedmobillm.errors import FedMobiLLMError


@pytest.fixture(scope="module")
def bundle():
    return gen_bundle()


def _hf(tied: bool = True):
    from fedmobillm.export.generate import load_causal_lm

    return load_causal_lm(tiny_llama(tied))


def test_manifest_lists_and_hashes_the_generation_files(bundle):
    from fedmobillm.device_runtime.files import sha256_file

    manifest = json.loads((bundle / "manifest.json").read_text())
    gen = manifest["generation"]
    assert gen["step"] == "decoder_step.onnx" and gen["head"] == "lm_head.onnx"
    assert gen["depth"] == 3 and gen["num_kv_heads"] == 2 and gen["head_dim"] == 8
    for name in (
        "decoder_step.onnx",
        "decoder_step.onnx.data",
        "lm_head.onnx",
        "lm_head.onnx.data",
    ):
        assert manifest["files"][name]["sha256"] == sha256_file(bundle / name)
    check = gen["verification"]
    assert check["logits_min_cosine"] > 0.9999 and check["hf_greedy_agreement"] == 1.0
    assert check["cache_matches_no_cache"] is True


@pytest.mark.parametrize("tied", [True, False])
def test_greedy_matches_hf_generate_with_and_without_cache(tied):
    from fedmobillm.device_runtime.generate import Generator
    from fedmobillm.export.generate import hf_greedy

    gen, model = Generator(gen_bundle(tied=tied)), _hf(tied)
    for prompt in PROMPTS:
        ids = gen.encode(prompt)
        want = hf_greedy(model, ids, 12, [2])
        cached, _, _ = gen.generate_ids(ids, 12, use_cache=True)
        fresh, _, _ = gen.generate_ids(ids, 12, use_cache=False)
        assert cached == want
        assert fresh == want


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_graph_is_the_hf_head(tied):
    import torch

    from fedmobillm.device_runtime.generate import Generator

    gen, model = Generator(gen_bundle(tied=tied)), _hf(tied)
    hidden = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32)
    with torch.no_grad():
        want = model.lm_head(torch.from_numpy(hidden)).numpy()
    np.testing.assert_allclose(gen.logits(hidden), want, rtol=1e-5, atol=1e-5)
    assert (
        json.loads((gen.bundle_dir / "manifest.json").read_text())["generation"]["tied_head"]
        is tied
    )


def test_step_hidden_and_taps_match_hf_hidden_states(bundle):
    import torch

    from fedmobillm.device_runtime.generate import Generator

    gen, model = Generator(bundle), _hf()
    ids = np.asarray([gen.encode(PROMPTS[0] + " jumps over")], dtype=np.int64)  # (1, T)
    hidden, taps, present = gen.step(ids, np.ones_like(ids), gen.empty_past(1))
    with torch.no_grad():
        out = model.model(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), atol=1e-4)
    for k in range(3):  # taps: block outputs 1..3 (pre-norm; HF's last entry is normed)
        want = out.hidden_states[k + 1] if k < 2 else None
        if want is not None:
            np.testing.assert_allclose(taps[:, k], want.numpy(), atol=1e-4)
    assert taps.shape == (1, 3, ids.shape[1], 32)
    assert len(present) == 6 and present[0].shape == (1, 2, ids.shape[1], 8)


def test_perplexity_equals_hf_cross_entropy(bundle):
    import torch

    from fedmobillm.device_runtime.generate import Generator

    gen, model = Generator(bundle), _hf()
    texts = ["hello world, how are you today?", "a model writes text one token at a time"]
    got = gen.perplexity(texts, batch=2)  # right-padded batch of two
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([gen.encode(text)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    assert got.tokens == count
    assert got.perplexity == pytest.approx(np.exp(nll / count), rel=1e-4)


def test_truncated_bundle_generates_through_its_own_depth():
    from fedmobillm.device_runtime.generate import Generator

    gen = Generator(gen_bundle(layers=[1, 2]))
    assert gen.info["depth"] == 2 and gen.info["full_depth"] == 3
    assert gen.info["verification"]["logits_min_cosine"] > 0.9999
    assert "hf_greedy_agreement" not in gen.info["verification"]  # no HF reference at depth 2
    ids = gen.encode(PROMPTS[1])
    assert gen.generate_ids(ids, 8)[0] == gen.generate_ids(ids, 8, use_cache=False)[0]


def test_int8_generation_graphs_are_checked_against_fp32():
    from fedmobillm.device_runtime.generate import Generator

    gen = Generator(gen_bundle(quant="int8"))
    check = gen.info["verification"]
    assert gen.info["quant"] == "int8"
    assert check["logits_min_cosine"] >= 0.98
    assert 0.0 <= check["argmax_agreement"] <= 1.0
    fp32 = (gen_bundle() / "decoder_step.onnx.data").stat().st_size
    assert (gen.bundle_dir / "decoder_step.onnx.data").stat().st_size < fp32


def test_changed_generation_file_fails_verification(bundle, tmp_path):
    import shutil

    from fedmobillm.device_runtime.generate import Generator

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    data = copy / "lm_head.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(FedMobiLLMError, match="lm_head.onnx.data: sha256 mismatch"):
        Generator(copy)


def test_generate_needs_onnx(tmp_path):
    from fedmobillm.export.pipeline import export_bundle

    with pytest.raises(FedMobiLLMError, match="--generate writes ONNX"):
        export_bundle(str(tiny_llama()), tmp_path / "b", formats=("pte",), generate=True)


def test_bundle_without_generation_graphs_is_refused(tmp_path):
    from fedmobillm.device_runtime.generate import Generator
    from fedmobillm.export.pipeline import export_bundle

    out = tmp_path / "plain"
    export_bundle(
        str(tiny_llama()),
        out,
        formats=("onnx",),
        max_seq_len=32,
        calibration=str(calibration_file()),
    )
    with pytest.raises(FedMobiLLMError, match="no generation graphs") as err:
        Generator(out)
    assert "--generate" in str(err.value.hint)


@pytest.mark.slow
def test_smollm2_generates_the_tokens_hf_generates(make_bundle):
    """Real SmolLM2-135M (fp32): the ONNX step with its cache, and without it, give Hugging
    Face's own greedy tokens; its perplexity on plain English is that of a language model."""
    from fedmobillm.device_runtime.generate import Generator
    from fedmobillm.export.generate import hf_greedy, load_causal_lm
    from fedmobillm.export.models import fetch_model

    bundle = make_bundle("smollm2-135m", num_taps=3, generate=True)
    gen, model = Generator(bundle), load_causal_lm(fetch_model("smollm2-135m"))
    prompts = ["The capital of France is", "Once upon a time, a small robot", "def fibonacci(n):"]
    for prompt in prompts:
        ids = gen.encode(prompt)
        want = hf_greedy(model, ids, 16, sorted(gen.eos))
        assert gen.generate_ids(ids, 16)[0] == want
        assert gen.generate_ids(ids, 16, use_cache=False)[0] == want
    ppl = gen.perplexity(["The cat sat on the mat and looked out of the window at the rain."])
    assert 2 < ppl.perplexity < 200


@pytest.mark.parametrize("quant", ["int8", "8da4w"])
def test_smollm2_quantized_generation_graphs_pass_their_check(
    make_bundle, smollm2_lm_bundle, quant
):
    """Real SmolLM2-135M blocks 1-2: the int8 (8-bit weights) and 8da4w (4-bit HQQ weights,
    fp32 activations) generation graphs pass the export's logits check against eager fp32,
    are MatMulNBits graphs a fraction of the fp32 ones' size, and generate."""
    import onnx

    from fedmobillm.device_runtime.generate import Generator

    opts = {"layers": [1, 2], "pivot": "none", "formats": ("onnx",), "max_seq_len": 64}
    gen = Generator(make_bundle("smollm2-135m", quant=quant, generate=True, **opts))
    assert gen.info["quant"] == quant and gen.info["weights"].startswith(
        "MatMul weights 8-bit" if quant == "int8" else "step MatMul weights 4-bit"
    )
    assert gen.info["verification"]["logits_min_cosine"] >= 0.98
    step = onnx.load(str(gen.bundle_dir / "decoder_step.onnx"), load_external_data=False)
    bits = {
        a.i for n in step.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
        if a.name == "bits"
    }  # fmt: skip
    assert bits == ({8} if quant == "int8" else {4})
    size = (gen.bundle_dir / "decoder_step.onnx.data").stat().st_size
    assert size < 0.35 * (smollm2_lm_bundle / "decoder_step.onnx.data").stat().st_size
    new, why, _ = gen.generate_ids(gen.encode("The capital of France is"), 8)
    assert len(new) >= 1 and why in ("max_new_tokens", "eos")
