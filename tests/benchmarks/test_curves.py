"""Cost-to-target curves (issue 22): several targets up to the best any method reached,
each method's cost at each, and 'never reached' said, not hidden."""

from __future__ import annotations

import math

import pytest

from benchmarks import _curves as C
from benchmarks._common import DeviceProfile
from benchmarks._fedmobillm import device_timeline

SLOW = DeviceProfile("t", 1.0, 1.0, 8.0, 8.0)


def _fedavg(accs: list[float]) -> dict:
    return {
        "curve": [{"round": r, "time_s": 10.0 * r, "accuracy": a} for r, a in enumerate(accs)],
        "rounds": [
            {
                "round": r,
                "clients": [{"device": 0, "bytes_up": 100, "bytes_down": 100, "flops": 1e9}],
            }
            for r in range(1, len(accs))
        ],
        "trainable_bytes": 50,
    }


def _results() -> dict:
    tl = [device_timeline(10, SLOW, 1e9, 4, 4000.0)]
    row = {
        "split": "train",
        "profile": "t",
        "samples": 10,
        "wire_bytes_up": 1000,
        "wire_bytes_down": 0,
        "http_body_bytes_up": 900,
        "delivery_bytes_up": 0,
        "delivery_bytes_down": 0,
    }
    curve = [
        {"step": s, "time_s": t, "accuracy": a, "samples_arrived": 4}
        for s, t, a in ((1, 1.0, 0.6), (2, 2.0, 0.6), (3, 3.0, 0.6))
    ]
    return {
        "validation_majority_rate": 0.5,
        "data": {"devices": 1},
        "flops_per_sample": {"fedmobillm_forward": 1e9},
        "fedmobillm": {"replay": {"curve": curve, "timelines": tl}, "real": {"per_device": [row]}},
        "fedavg": {"lora": _fedavg([0.5, 0.55, 0.7]), "full": _fedavg([0.5, 0.5])},
        "fair": {"comm": {"fedmobillm": {"validator_share": 7.0, "delivery": 3.0}}},
    }


def test_targets_run_from_the_floor_to_the_best_any_method_reached():
    ts = C.targets(_results(), steps=4)
    assert ts[0] == pytest.approx(0.52) and ts[-1] == pytest.approx(0.7)


def test_targets_start_above_an_untrained_model_that_beats_the_majority_rate():
    """An untrained head scoring 0.56 at round 0 (above the 0.5 majority rate by chance):
    the lowest target is 0.58, so a method that learns nothing reaches none."""
    res = _results()
    res["fedavg"]["full"] = _fedavg([0.56, 0.56, 0.56])
    ts = C.targets(res, steps=4)
    assert ts[0] == pytest.approx(0.58) and ts[-1] == pytest.approx(0.7)
    full = C.cost_curves(res)["methods"]["fedavg_full"]
    assert not any(p["reached"] for p in full)


def test_each_method_costed_at_each_target_or_marked_never_reached():
    c = C.cost_curves(_results())
    lora, full, fm = (c["methods"][k] for k in ("fedavg_lora", "fedavg_full", "fedmobillm"))
    assert [p["reached"] for p in lora] == [True] * len(c["targets"])
    assert lora[0]["flops_per_device"] == 1e9 and lora[-1]["flops_per_device"] == 2e9
    assert lora[-1]["bytes_per_device"] == 400 + 50  # rounds + the final model's delivery
    assert not any(p["reached"] for p in full) and math.isnan(full[0]["flops_per_device"])
    assert fm[0]["reached"] and not fm[-1]["reached"]  # fedmobillm's best is 0.6
    # reached at t = 1 s, before any upload: only the validator share + delivery (7 + 3)
    assert fm[0]["bytes_per_device"] == pytest.approx(10.0)
    md = "\n".join(C.markdown(c))
    assert "—" in md and "fedavg_lora" in md
