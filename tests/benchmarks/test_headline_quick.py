"""CI check of the headline benchmark's pieces, run for real on a tiny random BERT
(`python -m benchmarks._selftest`): FLOP counting, one FedAvg round, the simulated clock, and
a fresh-process device step on a real ONNX bundle with no torch in it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def selftest(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("headline")
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks._selftest", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_flops_order_of_methods(selftest: dict) -> None:
    f = selftest["flops"]
    assert 0 < f["fedmobillm_forward"] < f["lora_train_step"] < f["full_train_step"]
    # AdamW's ~10 ops per trainable value are added analytically (8 texts in 2 batches of 4)
    counted = {
        m: f[f"{m}_train_step"] - 10 * f[f"{m}_trainable_params"] * 2 / 8 for m in ("lora", "full")
    }
    # LoRA backprop computes input grads but no frozen weight grads: 1.5x-3x a forward
    assert 1.5 < counted["lora"] / f["lora_forward"] < 3.2
    assert 2.5 < counted["full"] / f["full_forward"] < 3.5
    # forward-gradient: 1 + P forwards, no backward
    p = f["fwdgrad_perturbations"]
    assert f["fwdgrad_step"] == pytest.approx((p + 1) * f["lora_forward"], rel=0.3)
    assert f["lora_trainable_params"] < f["full_trainable_params"]
    # the device forwards each upload batch in order of token length (passes of 2 out of 8
    # here), so its passes are padded less than the training batches of 4 in given order
    assert f["device_forward_batch"] == 2
    assert f["mean_tokens"] <= f["device_padded_len"] <= f["padded_len"]


def test_one_fedavg_round(selftest: dict) -> None:
    res = selftest["fedavg"]
    assert [p["round"] for p in res["curve"]] == [0, 1]
    (rnd,) = res["rounds"]
    assert sorted(rnd["devices"]) == [0, 1]  # fraction 1.0
    sims = {c["device"]: c["sim_s"] for c in rnd["clients"]}
    assert sims[1] > sims[0]  # the slow profile is slower
    assert rnd["round_sim_s"] == pytest.approx(max(sims.values()))  # synchronous round
    for c in rnd["clients"]:
        assert c["bytes_up"] == c["bytes_down"] == res["trainable_bytes"]
    assert 0.0 <= res["test"]["accuracy"] <= 1.0


def test_a_round_deadline_cuts_the_straggler(selftest: dict) -> None:
    """fedavg-lora-deadline: the deadline (the median of two devices' expected round times)
    cuts the slow device; what it downloaded, computed and uploaded until the deadline is
    counted (no more than a full round's), its update is not aggregated, and the round lasts the deadline, not the slow device's time."""
    sync, res = selftest["fedavg"], selftest["fedavg_deadline"]
    (rnd,) = res["rounds"]
    assert rnd["dropped"] == [1] and sorted(rnd["devices"]) == [0, 1]
    clients = {c["device"]: c for c in rnd["clients"]}
    full = {c["device"]: c for c in sync["rounds"][0]["clients"]}
    assert full[0]["sim_s"] < res["deadline_s"] < full[1]["sim_s"]
    assert rnd["round_sim_s"] == pytest.approx(res["deadline_s"])
    assert clients[1]["bytes_up"] < res["trainable_bytes"] == clients[1]["bytes_down"]
    assert 0 < clients[1]["flops"] <= full[1]["flops"]
    assert clients[0] == pytest.approx(full[0])  # the fast device's round is unchanged
    assert (res["dropped_updates"], res["selected_updates"]) == (1, 2)
    assert res["method"] == "fedavg-lora-deadline"
    # the second run in the process starts from the initial weights, not from the first
    # run's trained ones (the model is cached per process)
    assert res["curve"][0] == sync["curve"][0]


def test_simulated_clock_arrivals(selftest: dict) -> None:
    fast, slow = selftest["arrivals"]["fast"], selftest["arrivals"]["slow"]
    assert [a[1:] for a in fast] == [[0, 16], [16, 32], [32, 40]]
    times = [a[0] for a in slow]
    assert times == sorted(times)
    assert slow[-1][0] > fast[-1][0]


def test_device_step_is_torch_free(selftest: dict) -> None:
    step = selftest["device_step"]
    assert step["torch_imported"] is False
    assert step["quant"] == "int8"
    assert 0 < step["peak_rss_mb"] < 1000
    assert step["upload_bytes"] > 0
