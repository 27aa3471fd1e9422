"""Issue 22's accounting: equal model selection, every byte counted, memory apart from the
runtime, seeds summarised (pure functions of benchmarks._fair and the FedAvg round log)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import _fair as F
from benchmarks._fedavg import FedAvgJob, RoundLog


def test_best_snapshot_is_the_first_best_validation_point():
    curve = [{"accuracy": a} for a in (0.5, 0.7, 0.65, 0.7, math.nan)]
    assert F.best_snapshot(curve) == 1
    assert F.best_snapshot([]) is None


def _job() -> FedAvgJob:
    return FedAvgJob("lora", "m", 2, "d", 2, [], 1.0, 3, 0.5, 1, 8, 1e-3, 8, 64, 0)


def test_fedavg_is_tested_at_its_best_validation_round_not_its_last():
    rl = RoundLog(_job(), "test")
    arrays = {r: [np.full(3, float(r), np.float32)] for r in range(4)}
    for r, acc in ((0, 0.9), (1, 0.6), (2, 0.8), (3, 0.7)):  # round 0 never counts
        if r:
            rl.add_round(
                r,
                [
                    {
                        "device": 0,
                        "sim_s": 1.0,
                        "bytes_up": 1,
                        "bytes_down": 1,
                        "flops": 1.0,
                        "loss": 0.1,
                        "host_train_s": 0.0,
                    }
                ],
            )
        rl.add_eval(r, {"accuracy": acc, "loss": 0.0})
        rl.keep_best(r, acc, arrays[r])
    arrays[2][0][:] = -1.0  # the kept snapshot is a copy
    res = rl.result(lambda a, split: {"accuracy": float(a[0][0]) / 10}, arrays[3])
    assert res["best_round"] == 2
    assert res["test"]["accuracy"] == pytest.approx(0.2)
    assert res["test_last"]["accuracy"] == pytest.approx(0.3)
    assert res["trainable_bytes"] == 12


def test_comm_all_in_counts_validator_and_delivery_apart():
    rows = [
        {"split": "validation", "wire_bytes_up": 900, "wire_bytes_down": 100},
        *[
            {
                "split": "train",
                "wire_bytes_up": 50,
                "wire_bytes_down": 10,
                "delivery_bytes_up": 5,
                "delivery_bytes_down": 195,
            }
            for _ in range(2)
        ],
    ]
    c = F.comm_all_in({"bytes_per_device": 60.0}, {"bytes_per_device": 6000.0}, rows, 400)
    assert c["fedmobillm"]["validator_share"] == 500.0  # 1,000 bytes over 2 devices
    assert c["fedmobillm"]["delivery"] == 200.0
    assert c["fedmobillm"]["total"] == 760.0
    assert c["fedavg_lora"]["total"] == 6400.0
    assert c["reduction"]["training_only"] == pytest.approx(0.99)
    assert c["reduction"]["with_validator"] == pytest.approx(1 - 560 / 6000)
    assert c["reduction"]["all_in"] == pytest.approx(1 - 760 / 6400)


def test_memory_share_subtracts_each_methods_own_runtime():
    mem = {
        "fedmobillm-int8": {"peak_rss_mb": 100.0},
        "fedmobillm-fp32": {"peak_rss_mb": 150.0},
        "lora": {"peak_rss_mb": 600.0},
        "imports-onnx": {"peak_rss_mb": 60.0},
        "imports-torch": {"peak_rss_mb": 400.0},
    }
    shares = F.memory_shares(mem)
    assert shares["fedmobillm-int8"]["method_share_mb"] == 40.0
    assert shares["lora"]["method_share_mb"] == 200.0
    r = F.memory_ratios(shares, {"int8"})
    assert r["int8"] == {"in_fleet": True, "whole_process": 6.0, "method_share": 5.0}
    assert r["fp32"]["in_fleet"] is False
    assert r["fp32"]["whole_process"] == 4.0


def test_seeds_summary_mean_and_spread():
    heads = [
        {
            "seed": s,
            "comm_reduction": {"value": v},
            "test_accuracy": {"fedmobillm": t},
            "figures": {"x": x},
        }
        for s, v, t, x in ((0, 0.9, 0.7, 1.0), (1, 0.8, 0.8, math.nan), (2, 0.7, 0.6, 3.0))
    ]
    s = F.seeds_summary(heads)
    assert s["comm_reduction"]["mean"] == pytest.approx(0.8)
    assert s["comm_reduction"]["std"] == pytest.approx(0.1)
    assert s["test_accuracy"]["fedmobillm"]["min"] == 0.6
    assert s["figures"]["x"]["n"] == 2  # a NaN seed is left out and counted out
    assert s["seeds"] == [0, 1, 2]
    lines = F.summary_markdown(s, "cmd", "1.0, 1.0, 1.0")
    assert any(line.startswith("| comm_reduction | 0.8 |") for line in lines)


def _probe_data(rng: np.random.Generator, n_dev: int = 4, n: int = 30, d: int = 8):
    from benchmarks._probe import ProbeData

    w = rng.normal(size=d)

    def draw(k: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(k, d)).astype(np.float32) * 3.0 + 5.0  # unstandardised
        return x, ((x - 5.0) @ w > 0).astype(np.int64)

    devs = [draw(n) for _ in range(n_dev)]
    vx, vy = draw(200)
    return ProbeData([x for x, _ in devs], [y for _, y in devs], vx, vy, {"int8": draw(200)})


def test_federated_probe_learns_and_pays_the_forward_once_per_device():
    from benchmarks._common import DeviceProfile
    from benchmarks._probe import LR_SWEEP, ProbeJob, federated_probe

    prof = DeviceProfile("t", 1.0, 1.0, 8.0, 8.0)  # 1 GFLOP/s
    job = ProbeJob(
        2, [prof] * 4, 1e9, rounds=6, fraction_train=0.5, local_epochs=2, local_batch=8, seed=0
    )
    res = federated_probe(job, _probe_data(np.random.default_rng(0)), ["int8"] * 4)
    assert res["test"]["accuracy"] > 0.85  # a separable problem: the probe learns it
    assert set(res["lr_sweep"]) == {str(x) for x in LR_SWEEP}
    assert res["lr_sweep"][str(res["lr"])] == max(res["lr_sweep"].values())
    head = (8 + 1) * 2 * 4
    assert res["trainable_bytes"] == head
    seen: set[int] = set()
    for rnd in res["rounds"]:
        for c in rnd["clients"]:
            first = c["device"] not in seen
            seen.add(c["device"])
            fwd = 30 * 1e9 if first else 0.0
            assert c["flops"] == pytest.approx(fwd + 6.0 * 9 * 2 * 30 * 2)
            assert c["bytes_up"] == head
            assert c["bytes_down"] == head + (2 * 8 * 4 if first else 0)  # + mean/std once
    # the round lasts as long as the slowest selected device (synchronous)
    r1 = res["rounds"][0]
    assert r1["clock_s"] == pytest.approx(max(c["sim_s"] for c in r1["clients"]))
