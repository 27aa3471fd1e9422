"""The learning core alone: depth mapping, determinism, a new architecture mid-training,
save/load, exported personal models matching the trainer's predictions."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from server_helpers import synthetic
from torch_helpers import one_thread  # noqa: F401 - autouse: one torch thread per test

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.side import SideConfig, SideTrainer, tap_blocks

CFG = SideConfig(width=32, warmup_steps=5)


def batches(steps: int, seed: int = 0):
    xa, ya = synthetic(400, 2, 16, 1)
    xb, yb = synthetic(400, 3, 24, 2)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        i = rng.integers(0, 400, 16)
        yield [("A", xa[i], ya[i]), ("B", xb[i], yb[i])]


def trainer(seed: int = 0, **config) -> SideTrainer:
    cfg = dataclasses.replace(CFG, **config) if config else CFG
    t = SideTrainer(cfg, ["neg", "pos"], seed=seed)
    t.add_architecture("A", [2, 4], 4, 16)
    t.add_architecture("B", [2, 4, 6], 6, 24)
    return t


def test_tap_blocks_by_relative_depth():
    assert tap_blocks([10, 20, 30], 30, 3) == [0, 1, 2]
    assert tap_blocks([1, 2, 3], 3, 3) == [0, 1, 2]
    assert tap_blocks([2, 4, 6], 6, 3) == [0, 1, 2]
    assert tap_blocks([3, 6], 6, 3) == [1, 2]
    assert tap_blocks([1, 2, 3, 4, 5, 6], 6, 3) == [0, 0, 1, 1, 2, 2]


def test_deterministic_for_a_seed():
    losses = []
    for _ in range(2):
        t = trainer(seed=3)
        losses.append([t.train_step(g) for g in batches(20)])
    assert losses[0] == losses[1]


def test_new_architecture_mid_training_keeps_the_side_network():
    t = trainer()
    for g in batches(10):
        t.train_step(g)
    before = {k: v.clone() for k, v in t.side.state_dict().items()}
    t.add_architecture("C", [5, 10], 10, 8)
    t.add_architecture("C", [5, 10], 10, 8)  # idempotent
    after = t.side.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    x, y = synthetic(64, 2, 8, 5)
    assert np.isfinite(t.train_step([("C", x, y)]))
    with pytest.raises(FedMobiLLMError):
        t.add_architecture("C", [5], 10, 8)


def test_save_load_roundtrip_and_resume(tmp_path):
    t = trainer()
    for g in batches(15):
        t.train_step(g)
    t.save(tmp_path / "ck")
    u = SideTrainer.load(tmp_path / "ck")
    x, _ = synthetic(32, 3, 24, 9)
    assert u.step == 15
    np.testing.assert_array_equal(t.predict("B", x), u.predict("B", x))
    g = next(batches(1, seed=7))
    rng = torch.get_rng_state()  # load() restored the saved RNG; both draw the same masks
    loss_t = t.train_step(g)
    torch.set_rng_state(rng)
    assert loss_t == pytest.approx(u.train_step(g), abs=1e-6)


def test_torn_checkpoint_is_detected(tmp_path):
    t = trainer()
    t.save(tmp_path / "ck")
    (tmp_path / "ck" / "side.safetensors").write_bytes(b"garbage")
    with pytest.raises(FedMobiLLMError, match="torn|weights"):
        SideTrainer.load(tmp_path / "ck")


def test_learns_and_exported_onnx_matches(tmp_path):
    t = trainer()
    for g in batches(80):
        t.train_step(g)
    x, y = synthetic(300, 3, 24, 11)
    assert t.evaluate("B", x, y)["accuracy"] > 0.9
    out = t.export_personal("B", tmp_path / "p", ["sha-b"], quant="fp32")
    meta = json.loads((out / "personal.json").read_text())
    assert meta["bundle_sha256s"] == ["sha-b"] and meta["label_names"] == ["neg", "pos"]
    sess = ort.InferenceSession(str(out / "personal.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"activations": x})[0]  # (300, 2)
    np.testing.assert_allclose(got, t.predict("B", x), atol=1e-4)
    # the default download: int8 weights, a fraction of the bytes, the same predictions
    q = t.export_personal("B", tmp_path / "q", ["sha-b"])
    assert json.loads((q / "personal.json").read_text())["weights"] == "int8"
    assert (q / "personal.onnx").stat().st_size < 0.8 * (out / "personal.onnx").stat().st_size
    sq = ort.InferenceSession(str(q / "personal.onnx"), providers=["CPUExecutionProvider"])
    got_q = sq.run(["logits"], {"activations": x})[0]  # (300, 2)
    assert (got_q.argmax(1) == got.argmax(1)).mean() >= 0.98
    with pytest.raises(FedMobiLLMError, match="int8 or fp32"):
        t.export_personal("B", tmp_path / "r", ["sha-b"], quant="fp16")


def test_arch_norms_are_alignment_parameters(tmp_path):
    """With arch_norms, each architecture gets its own affine after the shared LayerNorms:
    they live in its alignment (grow with architectures), survive save/load and export."""
    t = trainer(arch_norms=True)
    shared = t.num_parameters()
    for g in batches(40):
        t.train_step(g)
    a = t.aligns[t.archs["A"].key]
    assert a.norm_scale is not None and tuple(a.norm_scale.shape) == (4, 32)
    assert t.num_parameters("A") - shared == sum(p.numel() for p in a.parameters())
    assert not torch.allclose(a.norm_scale, torch.ones_like(a.norm_scale))  # trained
    t.save(tmp_path / "ck")
    back = SideTrainer.load(tmp_path / "ck")
    x, _ = synthetic(50, 2, 16, 5)
    np.testing.assert_allclose(back.predict("A", x), t.predict("A", x), atol=1e-6)
    out = t.export_personal("A", tmp_path / "p", ["sha-a"], quant="fp32")
    sess = ort.InferenceSession(str(out / "personal.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        sess.run(["logits"], {"activations": x})[0], t.predict("A", x), atol=1e-4
    )
    with pytest.raises(FedMobiLLMError, match="arch_norms needs MLP"):
        SideConfig(arch_norms=True, block="transformer")


@pytest.mark.slow
def test_personal_pte_runs_in_executorch(tmp_path):
    from executorch.runtime import Runtime

    t = trainer()
    for g in batches(20):
        t.train_step(g)
    out = t.export_personal("A", tmp_path / "p", ["sha-a"], pte=True)
    x, _ = synthetic(4, 2, 16, 3)
    program = Runtime.get().load_program(str(out / "personal.pte"))
    got = program.load_method("forward").execute([torch.from_numpy(x)])[0].numpy()
    np.testing.assert_allclose(got, t.predict("A", x), atol=1e-4)


def _views(z: np.ndarray, taps: int, width: int, seed: int) -> np.ndarray:
    """One architecture's taps of latent texts z (N, 8): fixed random linear maps + noise."""
    rng = np.random.default_rng(seed)
    maps = rng.normal(size=(taps, z.shape[1], width)) / np.sqrt(z.shape[1])
    x = np.einsum("nz,kzd->nkd", z, maps) + 0.1 * rng.normal(size=(len(z), taps, width))
    return x.astype(np.float32)  # (N, K, d)


def test_anchor_alignment_carries_labels_to_a_data_poor_architecture():
    """Architecture A has 400 labelled samples, B only 12. With both architectures'
    activations of the same unlabelled anchor texts, B's personal model learns what A's
    labels teach: its test accuracy rises well above B trained on its 12 alone, and the
    anchor loss falls as the alignments come to agree."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=8)

    def texts(n):
        z = rng.normal(size=(n, 8))
        return z, (z @ w > 0).astype(np.int64)

    (za, ya), (zb, yb), (zanc, _), (zt, yt) = texts(400), texts(12), texts(300), texts(500)
    xa, xb, xt = _views(za, 2, 16, 1), _views(zb, 3, 24, 2), _views(zt, 3, 24, 2)
    anchors = [("A", _views(zanc, 2, 16, 1)), ("B", _views(zanc, 3, 24, 2))]

    def fit(use_anchors: bool) -> tuple[float, list[float]]:
        t = trainer(seed=0)
        anchor_losses = []
        for step in range(300):
            r = np.random.default_rng(step)
            ia, ib, ic = r.integers(0, 400, 32), r.integers(0, 12, 32), r.choice(300, 64, False)
            batch = [(a, x[ic]) for a, x in anchors] if use_anchors else None
            t.train_step([("A", xa[ia], ya[ia]), ("B", xb[ib], yb[ib])], batch)
            if use_anchors and step % 50 == 0:
                with torch.no_grad():
                    anchor_losses.append(float(t._anchor_loss(anchors)))
        return t.evaluate("B", xt, yt)["accuracy"], anchor_losses

    alone, _ = fit(False)
    aligned, losses = fit(True)
    assert aligned >= alone + 0.08, (alone, aligned)
    assert losses[-1] < 0.5 * losses[0], losses


def test_anchor_batches_need_one_row_count_and_sampling_pairs_ids():
    from fedmobillm.server.trainer import ArchData, TrainingCache

    t = trainer()
    xa, _ = synthetic(5, 2, 16, 1)
    xb, _ = synthetic(6, 3, 24, 2)
    with pytest.raises(FedMobiLLMError, match="one row count"):
        t.train_step(next(batches(1)), [("A", xa), ("B", xb)])

    cache = TrainingCache()
    for name, (k, d), ids in (("A", (2, 16), [0, 1, 2, 3]), ("B", (3, 24), [2, 3, 4])):
        a = ArchData(list(range(1, k + 1)), k, d)
        a.train_x["dev"], a.train_y["dev"] = [np.zeros((k, d), np.float32)], [0]
        a.anchor_x = {i: np.full((k, d), i, np.float32) for i in ids}
        cache.archs[name] = a
    assert cache.shared_anchors() == 2
    picked = cache.sample_anchors(np.random.default_rng(0), 64)
    assert [name for name, _ in picked] == ["A", "B"]
    (_, pa), (_, pb) = picked
    assert pa.shape == (2, 2, 16) and pb.shape == (2, 3, 24)
    assert sorted(pa[:, 0, 0]) == [2.0, 3.0] and (pa[:, 0, 0] == pb[:, 0, 0]).all()
    cache.archs["B"].anchor_x = {9: np.zeros((3, 24), np.float32)}
    assert cache.sample_anchors(np.random.default_rng(0), 64) is None


def test_logit_adjustment_absorbs_one_architectures_label_skew(tmp_path):
    """Architecture A draws only label 0, B both: A's training logits get +log(p_A / p)
    (favouring label 0), B's about the opposite; the counts survive save/load, and with
    logit_adjust 0 nothing is shifted."""
    xa, _ = synthetic(64, 2, 16, 1)
    xb, yb = synthetic(64, 3, 24, 2)
    t = trainer(logit_adjust=1.0)
    for _ in range(3):
        t.train_step([("A", xa[:16], np.zeros(16, np.int64)), ("B", xb[:16], yb[:16])])
    assert t.label_counts["A"].tolist() == [48.0, 0.0]
    assert t.label_counts["B"].sum() == 48
    shift = t._label_shift()
    assert shift["A"][0] > 0.2 and shift["A"][1] < -2.0
    assert shift["B"][1] > 0 > shift["B"][0]
    t.save(tmp_path / "ck")
    again = SideTrainer.load(tmp_path / "ck")
    assert {a: c.tolist() for a, c in again.label_counts.items()} == {
        a: c.tolist() for a, c in t.label_counts.items()
    }
    off = trainer(logit_adjust=0.0)
    off.train_step([("A", xa[:16], np.zeros(16, np.int64)), ("B", xb[:16], yb[:16])])
    on = trainer(logit_adjust=1.0)
    on.train_step([("A", xa[:16], np.zeros(16, np.int64)), ("B", xb[:16], yb[:16])])
    assert not np.allclose(off.predict("A", xa), on.predict("A", xa))
