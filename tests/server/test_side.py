"""The learning core alone: depth mapping, determinism, a new architecture mid-training,
save/load, exported personal models matching the trainer's predictions."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from server_helpers import synthetic

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.side import SideConfig, SideTrainer, tap_blocks

CFG = SideConfig(width=32, warmup_steps=5)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def batches(steps: int, seed: int = 0):
    xa, ya = synthetic(400, 2, 16, 1)
    xb, yb = synthetic(400, 3, 24, 2)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        i = rng.integers(0, 400, 16)
        yield [("A", xa[i], ya[i]), ("B", xb[i], yb[i])]


def trainer(seed: int = 0) -> SideTrainer:
    t = SideTrainer(CFG, ["neg", "pos"], seed=seed)
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
    out = t.export_personal("B", tmp_path / "p", ["sha-b"])
    meta = json.loads((out / "personal.json").read_text())
    assert meta["bundle_sha256s"] == ["sha-b"] and meta["label_names"] == ["neg", "pos"]
    sess = ort.InferenceSession(str(out / "personal.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"activations": x})[0]  # (300, 2)
    np.testing.assert_allclose(got, t.predict("B", x), atol=1e-4)


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
