"""Device work to target: fedmobillm is cut at the simulated moment the target is reached,
as FedAvg is cut at its target round (pure accounting, no model)."""

from __future__ import annotations

from types import SimpleNamespace

from benchmarks._common import DeviceProfile
from benchmarks._fedmobillm import device_timeline
from benchmarks._report import fedmobillm_to_target, not_learning_warning, work_by

# 1 GFLOP/s and 8 Mbit/s: a sample's forward takes 1 s, 1,000 bytes take 1 ms
SLOW = DeviceProfile("t", 1.0, 1.0, 8.0, 8.0)


def test_timeline_overlaps_upload_with_the_next_forward():
    tl = device_timeline(10, SLOW, 1e9, 4, 4000.0)  # batches of 4, 4, 2 samples
    assert [(s, e) for *_, s, e in tl] == [(0, 4), (4, 8), (8, 10)]
    assert [round(done, 6) for _, done, _, _, _ in tl] == [4.0, 8.0, 10.0]
    assert [round(arrive, 6) for _, _, arrive, _, _ in tl] == [4.004, 8.004, 10.002]
    assert work_by(tl, 5.0, 10) == (5.0, 4)  # a quarter of the second batch's forward done
    assert work_by(tl, 100.0, 10) == (10, 10)


def test_to_target_counts_only_the_work_before_the_target():
    timelines = [device_timeline(10, SLOW, 1e9, 4, 4000.0) for _ in range(2)]
    replay = {
        "curve": [
            {"step": s, "time_s": t, "accuracy": a, "samples_arrived": n}
            for s, t, a, n in (
                (10, 2.0, 0.5, 0),
                (20, 4.5, 0.9, 8),
                (30, 5.0, 0.9, 8),
                (40, 6.0, 0.9, 8),
            )
        ],
        "timelines": timelines,
    }
    rows = [
        {
            "split": "train",
            "profile": "t",
            "samples": 10,
            "wire_bytes_up": 10_000,
            "wire_bytes_down": 1_000,
            "http_body_bytes_up": 9_000,
            "delivery_bytes_up": 0,
            "delivery_bytes_down": 0,
        }
        for _ in timelines
    ]
    got = fedmobillm_to_target(replay, SimpleNamespace(per_device=rows), 1e9, 0.75)
    hit_time = 5.0  # the mean of the last 3 evaluations first reaches 0.75 at t = 5.0 s
    fwd, sent = work_by(timelines[0], hit_time, 10)
    assert got["reached"] and got["time_s"] == hit_time
    assert got["flops_per_device"] == fwd * 1e9 == 5e9
    assert got["bytes_per_device"] == (10_000 + 1_000) * sent / 10
    assert got["whole_run"]["flops_per_device"] == 10e9
    assert got["flops_per_device"] < got["whole_run"]["flops_per_device"]


def test_a_method_stuck_at_the_majority_rate_is_flagged():
    """A baseline that only ever guessed one class gives a target that compares nothing:
    the headline carries a warning naming it (seen once: FedAvg-LoRA at 0.500)."""
    assert not_learning_warning({"fedmobillm": 0.73, "fedavg-lora": 0.72}, 0.5, 0.02) is None
    warning = not_learning_warning({"fedmobillm": 0.73, "fedavg-lora": 0.50}, 0.5, 0.02)
    assert warning is not None and "fedavg-lora (best 0.500)" in warning
    assert "fedmobillm" not in warning and "degenerate" in warning


def test_per_class_breakdown_groups_devices_by_profile():
    """Each class's row is the mean over its own devices, for both methods, with the
    fedmobillm peak at the class's bundle quant."""
    from benchmarks.run import class_breakdown

    profiles = [DeviceProfile("fast", 1, 40, 50, 50), DeviceProfile("slow", 10, 4, 2, 2)] * 2
    fm = {
        "classes": ["fast", "slow", "fast", "slow"],
        "per_device": {
            "flops": [4.0, 1.0, 6.0, 3.0],
            "bytes": [40.0, 10.0, 60.0, 30.0],
            "records_forwarded": [4, 1, 6, 3],
        },
    }
    lora = {"per_device": {"flops": [100.0, 0.0, 300.0, 40.0], "bytes": [1, 0, 3, 4]}}
    mem = {"fedmobillm-int8": {"peak_rss_mb": 110.0}, "lora": {"peak_rss_mb": 560.0}}
    got = class_breakdown(fm, lora, mem, profiles)
    assert got["fast"]["fedmobillm_flops"] == 5.0 and got["slow"]["fedmobillm_flops"] == 2.0
    assert got["fast"]["lora_flops"] == 200.0 and got["slow"]["lora_flops"] == 20.0
    assert got["fast"]["devices"] == 2 and got["slow"]["fedmobillm_bytes"] == 20.0
    assert got["slow"]["fedmobillm_peak_rss_mb"] == 110.0 and got["slow"]["lora_peak_rss_mb"] == 560
