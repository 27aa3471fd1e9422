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
    return argparse.Namespace(**{**base, "side": [], "adapt": [], "onnx": False, **given})


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


def test_adapt_variants_are_parsed_and_bad_ones_refused():
    sc = B.config_from(args(adapt=["a100:steps=100,every=25,lr_scale=0.5,shared_lr_scale=0.1"]))
    assert sc.adapt == {
        "a100": {
            "adapt_steps": 100,
            "adapt_every": 25,
            "adapt_lr_scale": 0.5,
            "adapt_shared_lr_scale": 0.1,
        }
    }
    for bad in ("a:stepz=3", "a:steps=0", ":steps=10", "a:steps=10,every=0", "a:steps=-5"):
        with pytest.raises(FedMobiLLMError):
            B.config_from(args(adapt=[bad]))


def test_adapt_row_draws_only_the_backbones_own_devices():
    """The adaptation's batches come from the given devices' rows only (here rows of label
    1, the activations pure noise): adapting a trainer that says label 0 everywhere on them
    makes it predict label 1 on held-out rows of label 1 (drawing the whole split, half of
    each label, could not)."""
    from benchmarks._activations import Activations
    from benchmarks.bench_accuracy import AccuracyConfig, Split
    from fedmobillm.server.side import SideConfig, SideTrainer

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    x = rng.normal(size=(200, 2, 8)).astype(np.float32)

    def acts(rows: np.ndarray) -> Activations:
        return Activations(x[rows], y[rows], rows, np.ones(2, np.float32), "arch", [1, 2], 2,
                           8, "0" * 64)  # fmt: skip

    ones = np.flatnonzero(y == 1)
    split = Split(acts(np.arange(200)), acts(ones[-30:]), acts(np.arange(10)))
    t = SideTrainer(SideConfig(width=16, warmup_steps=1), ["a", "b"], seed=0)
    t.add_architecture("arch", [1, 2], 2, 8)
    for _ in range(30):  # the shared model says label 0 everywhere
        t.train_step([("arch", x[:64], np.zeros(64, np.int64))])
    devices = {"d0": ones[:30], "d1": ones[30:-30]}
    cfg = AccuracyConfig.for_mode(True, seed=0)
    got = B.adapt_row(
        cfg,
        "label",
        t,
        split,
        devices,
        {"adapt_steps": 60, "adapt_every": 20, "adapt_lr_scale": 5.0},
    )
    assert got.shared_accuracy < 0.2 and got.steps > 0 and got.accuracy == 1.0, got.summary()
    assert got.cv_gain > 0.5  # chosen on one half, measured on the other
