"""bench_skew's configuration and fleet (issue 23): pure functions, no data loaded."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from benchmarks import bench_skew as B
from fedmobillm.errors import FedMobiLLMError


def args(**given) -> argparse.Namespace:
    base = {
        k: None
        for k in (
            "fleets partitions methods backbones repeats first_repeat seed steps anchors "
            "train_limit test_limit balance"
        ).split()
    }
    return argparse.Namespace(**{**base, "side": [], "onnx": False, **given})


def test_first_repeat_and_the_projection_option_are_taken():
    sc = B.config_from(
        args(first_repeat=3, repeats=1, side=["conflict_projection=anchors"], balance="label")
    )
    assert (sc.first_repeat, sc.repeats, sc.seed) == (3, 1, 0)
    assert sc.accuracy_config(3).side_config().conflict_projection == "anchors"
    assert B.config_from(args()).first_repeat == 0


def test_bad_options_are_refused():
    with pytest.raises(FedMobiLLMError):
        B.config_from(args(side=["conflict_projection=sideways"]))
    with pytest.raises(FedMobiLLMError, match="balance"):
        B.config_from(args(balance="labels"))


def test_skew_fleet_splits_devices_over_backbones_and_keeps_every_record():
    y = np.random.default_rng(0).integers(0, 2, 600)
    fleet = B.skew_fleet(y, ["a", "b", "c"], 100, "dirichlet-0.1", seed=1)
    assert [len(fleet[b]) for b in "abc"] == [34, 33, 33]
    rows = np.concatenate([r for devs in fleet.values() for r in devs.values()])
    assert sorted(rows.tolist()) == list(range(600))
