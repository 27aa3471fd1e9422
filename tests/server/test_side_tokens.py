"""The side network in token mode (issue 15): masked attention over every token's taps,
padding and causal invariance, learning a label no single end token carries, save/load,
anchors with a sequence length per architecture, the exported personal graph."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch_helpers import one_thread  # noqa: F401 - autouse: one torch thread per test

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.side import (
    SideConfig,
    SideTrainer,
    drop_tokens,
    last_token,
    masked_mean,
    pad_tokens,
)

# per_arch {}: pool/skip for both architectures (the default reads decoders by their own rule)
CFG = SideConfig(
    width=32, heads=4, blocks=2, inputs="tokens", warmup_steps=5, dropout=0.1, per_arch={}
)
D_A, D_B = 16, 24


def trainer(seed: int = 0, **config) -> SideTrainer:
    t = SideTrainer(dataclasses.replace(CFG, **config), ["neg", "pos"], seed=seed)
    t.add_architecture("A", [2, 4], 4, D_A, kind="encoder")
    t.add_architecture("B", [2, 4, 6], 6, D_B, kind="decoder")
    return t


# per-architecture token rules (A an encoder, B a decoder): "auto" reads each by its kind
PER_ARCH = {"pool": "auto", "skip": "auto"}


def marker_task(n: int, k: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sequences of 4..10 noise tokens; label 1 when a fixed marker vector (per architecture
    width) was added at one position strictly inside the sequence (never the first or last
    token). Returns x (N, K, T, d) zero-padded, mask (N, T), y (N,)."""
    rng = np.random.default_rng(seed)
    marker = np.random.default_rng(99 + d).normal(size=(k, d)) * 2.5
    arrays, y = [], rng.integers(0, 2, size=n)
    for label in y:
        t = int(rng.integers(4, 11))
        a = rng.normal(size=(k, t, d))
        if label:
            a[:, int(rng.integers(1, t - 1))] += marker
        arrays.append(a.astype(np.float32))
    x, mask = pad_tokens(arrays)
    return x, mask, y.astype(np.int64)


def train(t: SideTrainer, steps: int, seed: int = 0, anchors=None) -> list[float]:
    xa, ma, ya = marker_task(400, 2, D_A, 1)
    xb, mb, yb = marker_task(400, 3, D_B, 2)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        i = rng.integers(0, 400, 16)
        groups = [("A", xa[i], ya[i], ma[i]), ("B", xb[i], yb[i], mb[i])]
        losses.append(t.train_step(groups, anchors))
    return losses


def test_config_is_checked():
    assert SideConfig().inputs == "pivot" and not SideConfig().tokens
    for bad, match in (
        ({"inputs": "words"}, "inputs must be"),
        ({"inputs": "tokens", "pool": "max"}, "pool must be"),
        ({"inputs": "tokens", "token_block": "lstm"}, "token_block must be"),
        ({"inputs": "tokens", "width": 30, "heads": 4}, "divisible by heads"),
        ({"inputs": "tokens", "arch_norms": True}, "arch_norms is for pivot"),
        ({"causal": True}, "causal needs inputs 'tokens'"),
        ({"inputs": "tokens", "skip": "mlp"}, "skip must be"),
        ({"pool": "last"}, "token-mode options"),
        ({"skip": "linear"}, "token-mode options"),
        ({"token_dropout": 0.1}, "token-mode options"),
        ({"inputs": "tokens", "token_dropout": 1.0}, "token_dropout must be"),
        ({"inputs": "tokens", "skip": "linear", "skip_weight_decay": -1.0}, "skip_weight_decay"),
        ({"per_arch": {"decoder": {"pool": "last"}}}, "token-mode options"),
        (
            {"inputs": "tokens", "per_arch": {"decoder": {"pool": "max"}}},
            r"per_arch\['decoder'\]\.pool",
        ),
        ({"inputs": "tokens", "per_arch": {"x": {"skip": "mlp"}}}, r"per_arch\['x'\]\.skip must"),
        ({"inputs": "tokens", "per_arch": {"x": {"width": 8}}}, r"unknown options \['width'\]"),
        ({"inputs": "tokens", "per_arch": {"x": {}}}, "non-empty table"),
        ({"inputs": "tokens", "per_arch": {"x": "last"}}, "non-empty table"),
        ({"inputs": "tokens", "per_arch": ["decoder"]}, "per_arch must be a table"),
    ):
        with pytest.raises(FedMobiLLMError, match=match):
            SideConfig(**bad)


def test_token_rule_per_architecture_kind_and_auto():
    """An architecture's own per_arch entry wins over its kind's, which wins over pool/skip;
    "auto" follows the kind (decoders: last + linear skip, encoders: mean, no skip) and
    needs it; pivot configs may leave pool/skip at "auto" (no token rule applies)."""
    c = SideConfig(inputs="tokens", **PER_ARCH)
    assert c.token_rule("A", "encoder") == ("mean", "none")
    assert c.token_rule("B", "decoder") == ("last", "linear")
    with pytest.raises(FedMobiLLMError, match="kind .* not known"):
        c.token_rule("C")
    given = {"decoder": {"skip": "none"}, "B": {"pool": "attention"}, "C": {"pool": "last"}}
    c = SideConfig(inputs="tokens", per_arch=given)
    assert c.token_rule("B", "decoder") == ("attention", "none")
    assert c.token_rule("D", "decoder") == ("mean", "none")
    assert c.token_rule("C") == ("last", "none") and c.token_rule("E") == ("mean", "none")
    assert c.token_pools() == {"mean", "attention", "last"}
    assert SideConfig(inputs="tokens", pool="auto").token_pools() == {"mean", "last"}
    SideConfig(pool="auto", skip="auto")  # pivot: accepted, unused
    default = SideConfig(inputs="tokens")  # decoders by their own rule, the rest by pool/skip
    assert default.token_rule("B", "decoder") == ("last", "linear")
    assert default.token_rule("A", "encoder") == default.token_rule("C") == ("mean", "none")
    assert SideConfig(inputs="tokens", per_arch={}).token_rule("B", "decoder") == ("mean", "none")


def test_each_architecture_reads_its_tokens_by_its_own_rule():
    """One side network, two rules: the decoder B pools its last real token (changing the
    other tokens changes nothing through MLP blocks) and has a linear skip; the encoder A
    pools the mean (they do change it) and has none. The logits start at zero for both."""
    t = trainer(token_block="mlp", **PER_ARCH)
    assert (t.archs["A"].pool, t.archs["A"].skip) == ("mean", "none")
    assert (t.archs["B"].pool, t.archs["B"].skip) == ("last", "linear")
    assert t.aligns["a0"].skip is None and t.aligns["a1"].skip is not None
    xb, mb, _ = marker_task(6, 3, D_B, 4)
    np.testing.assert_array_equal(t.predict("B", xb, mb), np.zeros((6, 2), np.float32))
    train(t, 5)
    for arch, k, d, same in (("B", 3, D_B, True), ("A", 2, D_A, False)):
        x, mask, _ = marker_task(6, k, d, 3)
        x2 = x + np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
        for i, n in enumerate(mask.sum(1)):
            x2[i, :, n - 1] = x[i, :, n - 1]  # keep each last real token
        diff = np.abs(t.predict(arch, x2, mask) - t.predict(arch, x, mask)).max()
        assert (diff < 1e-5) == same, (arch, diff)


def test_checkpoints_without_rules_load_and_a_changed_rule_is_refused(tmp_path):
    """A checkpoint saved before per-architecture rules (no per_arch, no kind/pool/skip per
    architecture) loads with its config's rule; one whose saved rule its config no longer
    gives is refused, saying which."""
    t = trainer(pool="last", skip="linear")
    train(t, 3)
    t.save(tmp_path / "ck")
    state = json.loads((tmp_path / "ck" / "side.json").read_text())
    assert [(a["kind"], a["pool"], a["skip"]) for a in state["archs"]] == [
        ("encoder", "last", "linear"),
        ("decoder", "last", "linear"),
    ]
    old = json.loads(json.dumps(state))
    del old["config"]["per_arch"]
    for a in old["archs"]:
        del a["kind"], a["pool"], a["skip"]
    (tmp_path / "ck" / "side.json").write_text(json.dumps(old))
    x, mask, _ = marker_task(8, 3, D_B, 9)
    np.testing.assert_array_equal(
        SideTrainer.load(tmp_path / "ck").predict("B", x, mask), t.predict("B", x, mask)
    )
    state["archs"][1]["pool"] = "mean"
    (tmp_path / "ck" / "side.json").write_text(json.dumps(state))
    with pytest.raises(FedMobiLLMError, match="trained with pool 'mean'"):
        SideTrainer.load(tmp_path / "ck")


def test_pad_tokens():
    x, mask = pad_tokens([np.ones((2, 3, 4)), 2 * np.ones((2, 1, 4))], dtype=np.float16)
    assert x.shape == (2, 2, 3, 4) and x.dtype == np.float16
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]] and mask.dtype == np.int64
    assert (x[1, :, 0] == 2).all() and (x[1, :, 1:] == 0).all()
    with pytest.raises(FedMobiLLMError, match="one K and d"):
        pad_tokens([np.ones((2, 3, 4)), np.ones((3, 3, 4))])
    with pytest.raises(FedMobiLLMError, match="at least one"):
        pad_tokens([])


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"pool": "attention"},
        {"causal": True},
        {"token_block": "mlp"},
        {"pool": "last"},
        {"skip": "linear"},
        {"pool": "last", "skip": "linear", "causal": True},
    ],
    ids=["mean", "attention-pool", "causal", "mlp-blocks", "last", "skip", "last-skip-causal"],
)
def test_padding_never_changes_the_output(config):
    """Appending padding positions (holding arbitrary values) leaves the logits unchanged,
    through the model itself (no trimming), also after training has moved the weights."""
    t = trainer(**config)
    train(t, 5)
    model = t._model("B", averaged=True).eval()
    x, mask, _ = marker_task(6, 3, D_B, 5)  # (6, 3, T, 24)
    rng = np.random.default_rng(0)
    pad = rng.normal(size=(6, 3, 4, D_B)).astype(np.float32) * 5  # not even zero
    x2 = np.concatenate([x, pad], axis=2)
    mask2 = np.concatenate([mask, np.zeros((6, 4), np.int64)], axis=1)
    x2[:, :, : x.shape[2]][np.broadcast_to(mask[:, None, :, None] == 0, x.shape)] = 7.0
    with torch.no_grad():
        want = model(torch.from_numpy(x), torch.from_numpy(mask))
        got = model(torch.from_numpy(x2), torch.from_numpy(mask2))
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(t.predict("B", x2, mask2), t.predict("B", x, mask), atol=1e-5)


def test_last_token_reads_each_rows_last_real_position():
    h = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3) + 1.0
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])  # right and left padding
    got = last_token(h, mask)
    torch.testing.assert_close(got, torch.stack([h[0, 2], h[1, 4]]))
    none = last_token(h, torch.zeros(2, 5, dtype=torch.int64))
    assert (none == 0).all()
    assert not torch.allclose(masked_mean(h, mask), got)


def test_last_pool_reads_only_the_last_token_without_mixing():
    """With MLP token blocks (no attention) and pool "last", only the last real token's taps
    reach the logits: changing the others changes nothing; with the mean pool it does."""
    x, mask, _ = marker_task(6, 2, D_A, 3)
    lengths = mask.sum(1)
    x2 = x + np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    for i, n in enumerate(lengths):
        x2[i, :, n - 1] = x[i, :, n - 1]  # keep each last real token
    for pool, same in (("last", True), ("mean", False)):
        t = trainer(token_block="mlp", pool=pool)
        train(t, 5)
        diff = np.abs(t.predict("A", x2, mask) - t.predict("A", x, mask)).max()
        assert (diff < 1e-5) == same, (pool, diff)


def test_linear_skip_starts_at_zero_and_adds_the_last_taps_probe():
    """skip "linear": the logits start at exactly zero (skip and side head both zero) and
    are, after training, the side network's plus the alignment's linear map of the pooled
    last tap; the skip's weights have moved and its logits change the prediction."""
    t = trainer(skip="linear", pool="last")
    x, mask, _ = marker_task(12, 3, D_B, 5)
    np.testing.assert_array_equal(t.predict("B", x, mask), np.zeros((12, 2), np.float32))
    train(t, 40)
    model = t._model("B", averaged=True).eval()
    xt, mt = torch.from_numpy(x), torch.from_numpy(mask)
    with torch.no_grad():
        side = model.head(model.align(xt), mt)  # (12, 2), without the skip
        skip = model.align.skip_logits(xt, mt)
        last = model.align.skip(model.align.skip_norm(last_token(xt[:, -1], mt)))
    assert skip is not None and float(skip.abs().max()) > 1e-3
    torch.testing.assert_close(skip, last)
    np.testing.assert_allclose(t.predict("B", x, mask), (side + skip).numpy(), atol=1e-5)
    plain = trainer()
    assert plain._model("B").align.skip_logits(xt, mt) is None


def test_skip_weight_decay_shrinks_only_the_skip():
    """skip_weight_decay puts the skip's weight matrix in an optimiser group of its own with
    that decay: a strong one keeps it far smaller than the default's, and the rest of the
    alignment gets the config's weight decay as before."""
    norms = {}
    for decay in (None, 200.0):
        t = trainer(skip="linear", skip_weight_decay=decay)
        train(t, 30)
        a = t._model("B").align
        norms[decay] = float(a.skip.weight.norm())
        groups = [
            g for g in t.optimizer.param_groups if any(p is a.skip.weight for p in g["params"])
        ]
        assert len(groups) == 1
        assert groups[0]["weight_decay"] == (t.config.weight_decay if decay is None else decay)
        assert (len(groups[0]["params"]) == 1) == (decay is not None)
    assert norms[200.0] < 0.5 * norms[None], norms


def test_token_dropout_drops_real_tokens_in_training_only():
    """drop_tokens never adds a token, never empties a row, drops about p of them; the model
    drops them in training mode only (evaluation is deterministic and reads every token)."""
    torch.manual_seed(0)
    mask = torch.zeros(400, 20, dtype=torch.int64)
    for i in range(400):
        mask[i, : 1 + i % 20] = 1
    got = drop_tokens(mask, 0.3)
    assert got.dtype == mask.dtype and ((got == 1) <= (mask == 1)).all()
    assert (got.sum(1) >= 1).all()
    assert abs(1.0 - float(got.sum()) / float(mask.sum()) - 0.3) < 0.03
    assert torch.equal(drop_tokens(mask, 0.0), mask)
    t = trainer(token_dropout=0.5)
    model = t._model("A")
    x, m, _ = marker_task(16, 2, D_A, 3)
    xt, mt = torch.from_numpy(x), torch.from_numpy(m)
    model.eval()
    with torch.no_grad():
        a, b = model(xt, mt), model(xt, mt)
    assert torch.equal(a, b)
    model.side.train()
    model.side.blocks[0].drop.p = 0.0  # no weight dropout: only the tokens differ
    model.side.input_drop.p = 0.0
    with torch.no_grad():
        c = model(xt, mt)
    assert float((c - a).abs().max()) > 1e-4
    np.testing.assert_array_equal(t.predict("A", x, m), t.predict("A", x, m))


def test_a_row_without_real_tokens_is_finite():
    t = trainer(pool="attention", causal=True)
    x, mask, _ = marker_task(3, 2, D_A, 3)
    mask[1] = 0
    assert np.isfinite(t.predict("A", x, mask)).all()
    model = t._model("A").eval()
    with torch.no_grad():
        h = model.token_states(torch.from_numpy(x), torch.from_numpy(mask))
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("causal", [True, False])
def test_causal_states_never_see_later_tokens(causal):
    """With causal, changing tokens from position 4 on leaves the states at 0..3 unchanged;
    without it they change (the test can tell the two apart)."""
    t = trainer(causal=causal)
    train(t, 3)
    model = t._model("A").eval()
    x, _, _ = marker_task(4, 2, D_A, 4)
    mask = np.ones((4, x.shape[2]), np.int64)
    x2 = x.copy()
    x2[:, :, 4:] = np.random.default_rng(1).normal(size=x2[:, :, 4:].shape)
    with torch.no_grad():
        h1 = model.token_states(torch.from_numpy(x), torch.from_numpy(mask))  # (4, T, 32)
        h2 = model.token_states(torch.from_numpy(x2), torch.from_numpy(mask))
    early = float((h1[:, :4] - h2[:, :4]).abs().max())
    assert float((h1[:, 4:] - h2[:, 4:]).abs().max()) > 1e-3
    if causal:
        assert early < 1e-5
    else:
        assert early > 1e-3


def test_tokens_learn_a_marker_no_end_token_carries():
    """The label is whether a marker sits inside the sequence. The token network learns it
    on both architectures; a pivot network on the first token (what an encoder uploads)
    stays near chance, since that token never holds the marker."""
    t = trainer()
    train(t, 150)
    for arch, k, d in (("A", 2, D_A), ("B", 3, D_B)):
        x, mask, y = marker_task(300, k, d, 11)
        assert t.evaluate(arch, x, y, mask)["accuracy"] > 0.9, arch
    pivot = SideTrainer(SideConfig(width=32, warmup_steps=5), ["neg", "pos"])
    pivot.add_architecture("A", [2, 4], 4, D_A)
    xa, _, ya = marker_task(400, 2, D_A, 1)
    rng = np.random.default_rng(0)
    for _ in range(150):
        i = rng.integers(0, 400, 32)
        pivot.train_step([("A", xa[i, :, 0], ya[i])])
    x, _, y = marker_task(300, 2, D_A, 11)
    assert pivot.evaluate("A", x[:, :, 0], y)["accuracy"] < 0.65


def test_unlabelled_rows_and_boolean_masks():
    """y = -1 rows are skipped in training and evaluation; a bool mask reads like 0/1."""
    t = trainer()
    x, mask, y = marker_task(8, 2, D_A, 1)
    y[:3] = -1
    assert np.isfinite(t.train_step([("A", x, y, mask.astype(bool))]))
    assert t.samples_seen == 5
    ev = t.evaluate("A", x, y, mask.astype(bool))
    assert ev["n"] == 5 and 0.0 <= ev["accuracy"] <= 1.0
    np.testing.assert_array_equal(t.predict("A", x, mask.astype(bool)), t.predict("A", x, mask))


def test_inputs_are_checked():
    t = trainer()
    x, mask, y = marker_task(4, 2, D_A, 1)
    with pytest.raises(FedMobiLLMError, match=r"\(arch, x, y, mask\)"):
        t.train_step([("A", x, y)])
    with pytest.raises(FedMobiLLMError, match="need their mask"):
        t.predict("A", x)
    with pytest.raises(FedMobiLLMError, match=r"mask \(N, T\)"):
        t.evaluate("A", x, y, mask[:, :2])
    with pytest.raises(FedMobiLLMError, match=r"\(N, K, T, d\)"):
        t.predict("A", x[:, :, 0], mask)
    p = SideTrainer(SideConfig(width=32), ["neg", "pos"])
    p.add_architecture("A", [2, 4], 4, D_A)
    with pytest.raises(FedMobiLLMError, match="take no mask"):
        p.predict("A", x[:, :, 0], mask)
    with pytest.raises(FedMobiLLMError, match=r"\(arch, x, y\)"):
        p.train_step([("A", x[:, :, 0], y, mask)])


@pytest.mark.parametrize(
    "config",
    [
        {"pool": "attention"},
        {"pool": "last", "skip": "linear", "skip_weight_decay": 5.0},
        {**PER_ARCH, "per_arch": {"A": {"pool": "attention"}}},
    ],
    ids=["attn", "skip", "per-arch"],
)
def test_save_load_roundtrip_and_resume(tmp_path, config):
    t = trainer(logit_adjust=1.0, **config)
    train(t, 12)
    assert t.is_finite()
    t.save(tmp_path / "ck")
    u = SideTrainer.load(tmp_path / "ck")
    assert u.tokens and u.config == t.config and u.step == 12
    x, mask, _ = marker_task(20, 3, D_B, 9)
    np.testing.assert_array_equal(t.predict("B", x, mask), u.predict("B", x, mask))
    assert [(a.pool, a.skip) for a in u.archs.values()] == [
        (a.pool, a.skip) for a in t.archs.values()
    ]
    rng = torch.get_rng_state()  # load() restored the saved RNG: the same dropout masks
    loss_t = train(t, 1, seed=7)[0]
    torch.set_rng_state(rng)
    assert loss_t == pytest.approx(train(u, 1, seed=7)[0], abs=1e-6)


def test_anchors_with_a_sequence_length_per_architecture():
    """The same anchor texts tokenise to other lengths per architecture: the feature term
    compares per-block masked means, the KL term the heads; both fall with training."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(32, 6, 8))  # 32 anchor "texts" of 6 latent tokens

    def view(k: int, d: int, split: int, seed: int):
        maps = np.random.default_rng(seed).normal(size=(k, 8, d)) / np.sqrt(8)
        arrays = []
        for text in z:  # architecture B splits every latent token into `split` tokens
            tokens = np.repeat(text, split, axis=0)  # (6 * split, 8)
            arrays.append(np.einsum("tz,kzd->ktd", tokens, maps).astype(np.float32))
        return pad_tokens(arrays)

    (xa, ma), (xb, mb) = view(2, D_A, 1, 1), view(3, D_B, 2, 2)
    assert xa.shape[2] != xb.shape[2]
    anchors = [("A", xa, ma), ("B", xb, mb)]
    t = trainer()
    with torch.no_grad():
        before = float(t._anchor_loss(anchors))
    losses = train(t, 40, anchors=anchors)
    with torch.no_grad():
        after = float(t._anchor_loss(anchors))
    assert np.isfinite(losses).all() and after < 0.7 * before, (before, after)
    with pytest.raises(FedMobiLLMError, match=r"\(arch, x, mask\)"):
        t.train_step([("A", xa, np.zeros(32, np.int64), ma)], [("A", xa), ("B", xb)])


@pytest.mark.parametrize(
    "config",
    [{"pool": "attention"}, {"pool": "last", "skip": "linear"}, PER_ARCH],
    ids=["attn", "skip", "per-arch"],
)
def test_exported_personal_onnx_takes_token_taps(tmp_path, config):
    """personal.onnx: activations (B, K, T, d) + attention_mask (B, T) -> logits; dynamic
    B and T; the same logits as the trainer for two batch sizes and lengths."""
    t = trainer(**config)
    train(t, 30)
    if config is PER_ARCH:  # the encoder A's graph pools the mean, without a skip
        assert_device_runs_arch(t, "A", 2, D_A, tmp_path / "a")
    out = t.export_personal("B", tmp_path / "p", ["sha-b"], quant="fp32")
    meta = json.loads((out / "personal.json").read_text())
    assert meta["side_inputs"] == "tokens"
    assert [i["name"] for i in meta["inputs"]] == ["activations", "attention_mask"]
    assert meta["inputs"][0]["shape"] == ["batch", 3, "seq", D_B]
    sess = ort.InferenceSession(str(out / "personal.onnx"), providers=["CPUExecutionProvider"])
    for n, seed in ((3, 1), (17, 2)):
        x, mask, _ = marker_task(n, 3, D_B, seed)
        got = sess.run(["logits"], {"activations": x, "attention_mask": mask})[0]  # (n, 2)
        np.testing.assert_allclose(got, t.predict("B", x, mask), atol=1e-4)
    q = t.export_personal("B", tmp_path / "q", ["sha-b"])
    assert json.loads((q / "personal.json").read_text())["weights"] == "int8"
    sq = ort.InferenceSession(str(q / "personal.onnx"), providers=["CPUExecutionProvider"])
    x, mask, _ = marker_task(200, 3, D_B, 12)
    got_q = sq.run(["logits"], {"activations": x, "attention_mask": mask})[0]
    assert (got_q.argmax(1) == t.predict("B", x, mask).argmax(1)).mean() >= 0.97
    # the device's runtime (no torch on its path) reads the folder and runs the same graph
    from fedmobillm.device_runtime.personal import PersonalModel

    device = PersonalModel(out, activations="fp32")
    assert device.tokens
    x, mask, _ = marker_task(9, 3, D_B, 13)
    np.testing.assert_allclose(device.logits(x, mask), t.predict("B", x, mask), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        {"causal": True},
        {"pool": "last", "skip": "linear"},
        {"per_arch": {"A": {"pool": "last", "skip": "linear"}}},  # B keeps the mean
    ],
    ids=["causal", "last-skip", "per-arch"],
)
def test_token_personal_pte_runs_one_text_at_a_time(tmp_path, config):
    """XNNPACK lowers no reshape with two dynamic dimensions: the token .pte has batch 1 and
    a dynamic length, says so in personal.json, and matches the trainer row by row."""
    from fedmobillm.device_runtime.graph import Graph

    t = trainer(**config)
    train(t, 10)
    out = t.export_personal("A", tmp_path / "p", ["sha-a"], pte=True)
    meta = json.loads((out / "personal.json").read_text())
    assert meta["files"]["personal.pte"]["batch"] == 1
    graph = Graph(out / "personal.pte", ["activations", "attention_mask"], ["logits"], fmt="pte")
    x, mask, _ = marker_task(4, 2, D_A, 3)
    got = [
        graph.run({"activations": x[i : i + 1], "attention_mask": mask[i : i + 1]})[0]
        for i in range(4)
    ]  # each (1, 2)
    np.testing.assert_allclose(np.concatenate(got), t.predict("A", x, mask), atol=1e-4)


def assert_device_runs_arch(t: SideTrainer, arch: str, k: int, d: int, out) -> None:
    """``arch``'s exported personal model on the device runtime gives the trainer's logits,
    and not those of the same weights under another pooling rule."""
    from fedmobillm.device_runtime.personal import PersonalModel

    device = PersonalModel(t.export_personal(arch, out, ["sha"], quant="fp32"), activations="fp32")
    x, mask, _ = marker_task(9, k, d, 13)
    want = t.predict(arch, x, mask)
    np.testing.assert_allclose(device.logits(x, mask), want, atol=1e-4)
    model = t._model(arch, averaged=True).eval()
    own = model.align.pool
    model.align.pool = "last" if own != "last" else "mean"
    try:
        other = model(torch.from_numpy(x), torch.from_numpy(mask)).detach().numpy()
    finally:
        model.align.pool = own
    assert np.abs(other - want).max() > 1e-3
