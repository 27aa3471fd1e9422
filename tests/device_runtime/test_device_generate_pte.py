"""ExecuTorch generation (`export --format onnx,pte --generate`, `device generate --backend
pte`) on a tiny random Llama bundle: the .pte step keeps its KV cache in the program, and its
tokens, logits and perplexity are the ONNX graphs' (which are checked against Hugging Face)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from gen_helpers import CORPUS, PROMPTS, PTE_CONTEXT, gen_bundle  # noqa: E402

from fedmobillm.errors import FedMobiLLMError  # noqa: E402

pytest.importorskip("executorch")


@pytest.fixture(scope="module")
def bundle() -> Path:
    return gen_bundle(formats=("onnx", "pte"))


@pytest.fixture(scope="module")
def pair(bundle):
    """The same bundle's generation through ONNX and through ExecuTorch."""
    from fedmobillm.device_runtime.generate import Generator

    return Generator(bundle, threads=1), Generator(bundle, threads=1, backend="pte")


def test_manifest_lists_verified_pte_graphs(bundle):
    """Assert: the entry names both .pte files (hashed in `files`), the cache length asked
    for, and a verification against eager Hugging Face that passed (greedy tokens equal)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    pte = manifest["generation"]["pte"]
    assert pte["max_context"] == PTE_CONTEXT and pte["quant"] == "fp32"
    assert {pte["step"], pte["head"]} <= set(manifest["files"])
    check = pte["verification"]
    assert check["logits_min_cosine"] > 0.9999 and check["argmax_agreement"] == 1.0
    assert check["cache_matches_no_cache"] and check["hf_greedy_agreement"] == 1.0


def test_pte_greedy_tokens_are_the_onnx_ones_with_and_without_cache(pair):
    """Execute: greedy completions of every prompt, longest first, so later prompts start
    over a cache that holds an earlier, longer context. Assert: the same tokens as ONNX."""
    onnx, pte = pair
    for prompt in sorted(PROMPTS, key=len, reverse=True):
        want = onnx.generate(prompt, 8).token_ids
        cached = pte.generate(prompt, 8)
        assert cached.token_ids == want and cached.use_cache
        assert pte.generate(prompt, 8, use_cache=False).token_ids == want
        assert cached.tokens_per_s > 0


def test_pte_perplexity_and_delta_match_onnx(pair):
    """Assert: the next-token loss of whole texts (right-padded batches, fed row by row to
    the program) and a personal model's residual give what ONNX gives."""
    onnx, pte = pair

    def delta(taps: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        return 0.5 * taps[:, -1] - 0.25 * hidden  # (B, S, d)

    for d in (None, delta):
        a = onnx.perplexity(CORPUS, d, max_len=PTE_CONTEXT, batch=3)
        b = pte.perplexity(CORPUS, d, max_len=PTE_CONTEXT, batch=3)
        assert a.tokens == b.tokens > 0 and a.top1 == b.top1
        assert b.perplexity == pytest.approx(a.perplexity, rel=1e-4)
    assert pte.generate(PROMPTS[0], 6, delta=delta).token_ids == (
        onnx.generate(PROMPTS[0], 6, delta=delta).token_ids
    )


def test_pte_stops_at_its_cache_length(pair):
    _, pte = pair
    assert pte.max_context == PTE_CONTEXT
    ids = pte.encode(PROMPTS[0])
    new, stopped, _ = pte.generate_ids(ids, 100)
    if stopped == "context":
        assert len(ids) + len(new) == PTE_CONTEXT
    else:  # the tiny model said EOS before the cache was full
        assert stopped == "eos" and len(ids) + len(new) < PTE_CONTEXT
    with pytest.raises(FedMobiLLMError, match="do not fit the .pte step's KV cache"):
        pte.perplexity([" ".join(CORPUS * 3)], max_len=PTE_CONTEXT + 8)


def test_onnx_only_bundle_refuses_the_pte_backend():
    from fedmobillm.device_runtime.generate import Generator

    with pytest.raises(FedMobiLLMError, match="no ExecuTorch") as err:
        Generator(gen_bundle(), backend="pte")
    assert "--format onnx,pte" in (err.value.hint or "")


def test_cli_generates_with_the_pte_backend(bundle, pair):
    onnx, _ = pair
    args = ["--bundle", str(bundle), "--prompt", PROMPTS[1], "--max-new-tokens", "5"]
    done = subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", "device", "generate", *args, "--backend", "pte"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == PROMPTS[1] + onnx.generate(PROMPTS[1], 5).text
    assert "tokens/s" in done.stdout and ", pte," in done.stdout
