"""benchmarks/_lm_compress.py: the lm upload compression options on synthetic taps (fast):
parsing (segment pooling refused for lm), bytes per token against the K x d int8 limit,
and the server's d-wide reconstruction of pca-R uploads."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks._activations import TokenActivations
from benchmarks._lm_compress import SPLITS, compressed, parse, plot
from benchmarks.bench_lm import Texts
from fedmobillm.errors import FedMobiLLMError

K, D = 3, 16


def texts(seed: int, n: int = 40) -> Texts:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 9, n)
    basis = np.random.default_rng(99).normal(size=(K, 4, D))  # every split: rank 4 taps
    z = rng.normal(size=(int(lengths.sum()), K, 4))
    q = np.einsum("nkr,krd->nkd", z, basis).astype(np.float16)
    acts = TokenActivations(q=q, lengths=lengths, y=np.zeros(n, np.int64), index=np.arange(n),
                            scales=np.ones(K, np.float32), architecture="m:1-2-3",
                            taps=[1, 2, 3], depth=3, hidden=D, bundle_sha256="x", bits=16)  # fmt: skip
    off = np.concatenate([[0], np.cumsum(lengths)])
    deepest = [q[off[i] : off[i + 1], -1].astype(np.float32) for i in range(n)]
    ids = [np.arange(n_) for n_ in lengths]
    return Texts(acts, ids, deepest, np.arange(n) % 2)


def test_parse_names_and_refusals():
    assert parse("none").base == "fp16" and parse("none").steps == []
    assert parse("int8+taps-2").base == "int8" and parse("int8+taps-2").steps == ["taps-2"]
    assert parse("proj-64+int4").steps == ["pca-64", "int4"]  # the name for pca
    with pytest.raises(FedMobiLLMError, match="segment pooling"):
        parse("seg-4")
    with pytest.raises(FedMobiLLMError, match="before pca"):
        parse("pca-64+taps-2")
    with pytest.raises(FedMobiLLMError, match="first"):
        parse("taps-2+int8")
    with pytest.raises(FedMobiLLMError, match="unknown"):
        parse("zip-3")
    with pytest.raises(FedMobiLLMError, match="bad compression"):
        parse("taps-x")


def test_bytes_per_token_against_the_int8_limit(tmp_path):
    base = {s: texts(i) for i, s in enumerate(SPLITS)}
    got = {}
    for name in ("none", "taps-2", "int4", "pca-4", "taps-1+pca-2+int4"):
        out, info = compressed(parse(name), base)
        got[name] = info
        assert info["limit_bytes_per_token"] == K * D
        for s in SPLITS:  # what the server trains on: d wide, the same lines and ids
            assert out[s].acts.q.shape[2] == D and len(out[s].acts) == len(base[s].acts)
            assert out[s].ids is base[s].ids and out[s].deepest is base[s].deepest
    assert got["none"]["bytes_per_token"] == K * D * 2 and got["none"]["ratio_to_limit"] == 2.0
    assert got["taps-2"]["bytes_per_token"] == 2 * D * 2
    assert got["int4"]["bytes_per_token"] == K * D / 2
    assert got["pca-4"]["bytes_per_token"] == K * 4
    assert got["taps-1+pca-2+int4"]["bytes_per_token"] == 1 * 2 / 2
    # rank-4 taps: the reconstruction from 4 int8 dims per tap is close to the taps
    out, _ = compressed(parse("pca-4"), base)
    x = base["test"].acts.q.astype(np.float32)
    err = np.sqrt(np.mean((out["test"].acts.q.astype(np.float32) - x) ** 2) / np.mean(x**2))
    assert err < 0.05, err  # relative RMS: int8 rounding and clips at the train split's scale
    rows = [{"compression": n, "val_perplexity": 10.0 + i, "perplexity": 12.0 + i, **info}
            for i, (n, info) in enumerate(got.items())]  # fmt: skip
    plot(rows, {"perplexity": 20.0, "val_perplexity": 18.0}, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
