"""benchmarks._hetlora (issue 22, ``benchmarks.run --methods fedavg-hetlora``): devices of
different classes train different LoRA ranks; the server averages the products B A and sends
each device the best approximation at its rank (FlexLoRA)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest

from benchmarks import _fedavg as FA
from benchmarks import _hetlora as H
from benchmarks._common import BenchConfig, fleet_profiles
from fedmobillm.errors import FedMobiLLMError

if TYPE_CHECKING:  # the fixture tiny_fleet (tests/benchmarks/conftest.py)
    from tests.benchmarks.conftest import TinyFleet


def test_truncation_is_exact_up_to_the_rank_and_best_beyond() -> None:
    rng = np.random.default_rng(0)
    b, a = rng.normal(size=(6, 3)), rng.normal(size=(3, 5))
    dw = 2.0 * b @ a  # rank 3, scale 2
    a3, b3 = H.truncate(dw, 3, 2.0)
    assert a3.shape == (3, 5) and b3.shape == (6, 3)
    np.testing.assert_allclose(2.0 * b3 @ a3, dw, atol=1e-4)
    a1, b1 = H.truncate(dw, 1, 2.0)
    s = np.linalg.svd(dw, compute_uv=False)
    assert np.linalg.norm(dw - 2.0 * b1 @ a1) == pytest.approx(np.hypot(s[1], s[2]), rel=1e-4)


def test_aggregate_averages_products_not_factors() -> None:
    rng = np.random.default_rng(1)
    layouts = {2: ([(0, 1)], [2]), 1: ([(0, 1)], [2])}
    scales = {2: 1.0, 1: 2.0}
    u2 = [rng.normal(size=(2, 4)), rng.normal(size=(3, 2)), rng.normal(size=(2,))]
    u1 = [rng.normal(size=(1, 4)), rng.normal(size=(3, 1)), rng.normal(size=(2,))]
    g = H.aggregate([(u2, 30, 2), (u1, 10, 1)], layouts, scales)
    want = 0.75 * u2[1] @ u2[0] + 0.25 * 2.0 * u1[1] @ u1[0]
    np.testing.assert_allclose(g["dw"][0], want, atol=1e-12)
    np.testing.assert_allclose(g["head"][0], 0.75 * u2[2] + 0.25 * u1[2], atol=1e-6)


def test_ranks_come_from_the_device_class() -> None:
    profiles = fleet_profiles(BenchConfig.for_mode("quick"))
    assert H.ranks_of(profiles) == [8, 8, 4, 4, 4, 2, 2, 2]
    with pytest.raises(FedMobiLLMError, match="no LoRA rank for device class"):
        H.ranks_of(profiles, {"fast": 8})


def test_two_devices_at_two_ranks(tiny_fleet: TinyFleet) -> None:
    """A rank-4 and a rank-2 device: each moves its own rank's arrays both ways (the rank-2
    one half the adapter bytes), the server's model is the products' mean, and each class's
    best-validation truncation is tested."""
    job = FA.FedAvgJob(
        method="lora", model_dir=tiny_fleet.model_dir, num_labels=2,
        data_dir=str(tiny_fleet.data_dir), num_devices=2, profiles=tiny_fleet.profiles,
        train_flops_per_sample=1e6,
        rounds=2, fraction_train=1.0, local_epochs=1, local_batch=4, lr=1e-2, lora_rank=4,
        max_seq_len=32, seed=0,
    )  # fmt: skip
    res = H.run_hetlora(job, [4, 2])
    assert [p["round"] for p in res["curve"]] == [0, 1, 2]
    head = 2 * 32 * 4 + 2 * 4  # classifier weight and bias, fp32
    adapter = {r: 2 * 4 * 2 * (r * 32) * 4 for r in (4, 2)}  # 2 layers x 4 matrices x (A, B)
    for rnd in res["rounds"]:
        c0, c1 = rnd["clients"]
        assert c0["bytes_up"] == c0["bytes_down"] == adapter[4] + head
        assert c1["bytes_up"] == c1["bytes_down"] == adapter[2] + head
    assert res["delivery_bytes_by_rank"] == {"2": adapter[2] + head, "4": adapter[4] + head}
    assert res["trainable_bytes"] == (adapter[2] + adapter[4]) // 2 + head
    assert set(res["test_by_rank"]) == {"2", "4"}
    assert res["method"] == "fedavg-hetlora" and res["best_round"] in (1, 2)


def test_run_refuses_a_class_without_a_rank_before_any_work(tmp_path, capsys) -> None:
    from benchmarks.run import main

    out = tmp_path / "out"
    args = ["--quick", "--no-flower", "--methods", "fedavg-hetlora", "--out", str(out)]
    assert main([*args, "--fleet", "fast=2,tiny=1"]) == 2
    err = capsys.readouterr().err
    assert "no LoRA rank for device class(es) tiny" in err and "Traceback" not in err
    assert not out.exists()


def test_alone_at_a_seed_needs_its_target_and_flops(tmp_path, capsys) -> None:
    assert H.main(["--seed", "1", "--out", str(tmp_path / "h")]) == 2
    assert "--seed needs --target T and --train-flops F" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
