"""On-device generation (`device_runtime.generate`, `fedmobillm device generate`) on a tiny
random Llama bundle exported with --generate: cache and no cache agree, sampling is
seeded, the personal-model hook changes the output, the CLI prints text and tokens/s, and
the whole path runs with torch unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from gen_helpers import PROMPTS, gen_bundle  # noqa: E402
from torch_blocker import env_without_torch  # noqa: E402

from fedmobillm.errors import FedMobiLLMError  # noqa: E402


@pytest.fixture(scope="module")
def bundle() -> Path:
    return gen_bundle()


@pytest.fixture(scope="module")
def gen(bundle):
    from fedmobillm.device_runtime.generate import Generator

    return Generator(bundle, threads=1)


def test_cache_and_no_cache_give_the_same_greedy_tokens(gen):
    for prompt in PROMPTS:
        cached = gen.generate(prompt, 10)
        fresh = gen.generate(prompt, 10, use_cache=False)
        assert cached.token_ids == fresh.token_ids and cached.text == fresh.text
        assert cached.use_cache and not fresh.use_cache
        assert cached.stopped in ("eos", "max_new_tokens")
        assert cached.tokens_per_s > 0 and cached.peak_rss_mib > 0


def test_stops_at_eos_and_at_max_new_tokens(gen):
    ids = gen.encode(PROMPTS[0])
    new, stopped, _ = gen.generate_ids(ids, 3)
    assert len(new) <= 3 and (stopped == "max_new_tokens") == (len(new) == 3 and 2 not in new)
    gen_eos = set(gen.eos)
    gen.eos = {new[0]}  # pretend the first greedy token ends the text
    try:
        again, why, _ = gen.generate_ids(ids, 3)
    finally:
        gen.eos = gen_eos
    assert again == new[:1] and why == "eos"


def test_sampling_is_seeded_and_top1_is_greedy(gen):
    from fedmobillm.device_runtime.generate import Sampling

    greedy = gen.generate(PROMPTS[1], 8).token_ids
    assert gen.generate(PROMPTS[1], 8, sampling=Sampling(1.0, 1, 5)).token_ids == greedy
    a = gen.generate(PROMPTS[1], 8, sampling=Sampling(1.5, 50, 7)).token_ids
    b = gen.generate(PROMPTS[1], 8, sampling=Sampling(1.5, 50, 7)).token_ids
    c = [gen.generate(PROMPTS[1], 8, sampling=Sampling(1.5, 50, s)).token_ids for s in range(4)]
    assert a == b
    assert any(x != greedy for x in c)  # sampling at temperature 1.5 over 50 tokens varies
    with pytest.raises(FedMobiLLMError, match="temperature"):
        Sampling(-1.0)


@pytest.mark.parametrize("context", ["new", "all"])
def test_delta_is_added_before_the_head(gen, context):
    """A residual of -hidden zeroes the head's input: every logit is 0, token 0 wins."""
    seen = []

    def cancel(taps: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        seen.append((taps.shape, hidden.shape))
        return -hidden

    out = gen.generate(PROMPTS[0], 4, delta=cancel, delta_context=context)
    assert out.token_ids == [0, 0, 0, 0]
    prompt_len = len(gen.encode(PROMPTS[0]))
    assert seen[0] == ((1, 3, prompt_len, 32), (1, prompt_len, 32))
    last_len = prompt_len + 3 if context == "all" else 1
    assert seen[-1] == ((1, 3, last_len, 32), (1, last_len, 32))
    zero = gen.generate(PROMPTS[0], 4, delta=lambda t, h: np.zeros_like(h))
    assert zero.token_ids == gen.generate(PROMPTS[0], 4).token_ids


def test_delta_of_the_wrong_shape_is_refused(gen):
    with pytest.raises(FedMobiLLMError, match="residual of shape"):
        gen.generate(PROMPTS[0], 2, delta=lambda t, h: h[:, :, :4])


def test_perplexity_response_only_and_with_delta(gen):
    text = "hello world, how are you today?"
    full = gen.perplexity([text])
    assert full.tokens == len(gen.encode(text)) - 1 and full.perplexity > 1
    pair = gen.perplexity([("hello world,", " how are you today?")])
    assert 0 < pair.tokens < full.tokens
    same = gen.perplexity([text], delta=lambda t, h: np.zeros_like(h))
    assert same.perplexity == pytest.approx(full.perplexity, rel=1e-6)
    flat = gen.perplexity([text], delta=lambda t, h: -h)  # uniform prediction
    assert flat.perplexity == pytest.approx(gen.vocab, rel=1e-3)
    d = full.to_dict()
    assert 0 <= d["next_token_top1"] <= d["next_token_top3"] <= 1


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", "device", "generate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_cli_prints_the_completion_and_tokens_per_second(bundle, gen):
    done = _cli("--bundle", str(bundle), "--prompt", PROMPTS[0], "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    want = gen.generate(PROMPTS[0], 6)
    assert done.stdout.splitlines()[0] == PROMPTS[0] + want.text
    assert "tokens/s" in done.stdout and "peak RSS" in done.stdout and "KV cache on" in done.stdout
    done = _cli(
        "--bundle",
        str(bundle),
        "--prompt",
        PROMPTS[0],
        "--max-new-tokens",
        "6",
        "--no-cache",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["token_ids"] == want.token_ids and result["use_cache"] is False
    assert result["tokens_per_s"] > 0


def test_cli_refuses_a_folder_that_is_not_a_personal_model(bundle, tmp_path):
    # --personal runs the lm personal model (tests/server/test_lm.py); a folder without
    # personal.json / personal.onnx is refused, never ignored
    done = _cli("--bundle", str(bundle), "--prompt", "hi", "--personal", str(tmp_path))
    assert done.returncode != 0
    assert "is not a personal model" in done.stderr


def test_generation_runs_with_torch_unimportable(bundle, tmp_path):
    env = env_without_torch(tmp_path)
    done = _cli("--bundle", str(bundle), "--prompt", PROMPTS[2], "--max-new-tokens", "4", env=env)
    assert done.returncode == 0, done.stderr
    assert "tokens/s" in done.stdout
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import fedmobillm.device_runtime.generate, sys; print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "False", probe.stderr
