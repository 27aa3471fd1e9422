"""benchmarks.run's fedmobillm-tokens method (issue 15), its pieces on a real MiniLM-L3
token bundle and a tiny fleet: token taps as a device makes them, the serde-encoded upload
bytes of each batch (padded to the batch's longest sample), and the replay of the server's
token side network on the simulated clock."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import _fedmobillm as F
from benchmarks._common import BenchConfig, FleetData, fleet_profiles


@pytest.fixture(scope="module")
def setup(make_bundle):
    from fedmobillm.data import load_dataset

    bundle = make_bundle(
        "minilm-l3", num_taps=3, quant="int8", formats=("onnx",), pivot="none",
        fallback_quant="fp32",
    )  # fmt: skip
    ds = load_dataset("movie-snippets", seed=0)
    train, val = ds.splits["train"], ds.splits["validation"]
    data = FleetData(
        label_names=list(ds.label_names),
        devices=[train[:24], train[24:48]],
        validation=val[:40],
        test=ds.splits["test"][:40],
        central_train=train[:48],
    )
    cfg = BenchConfig.for_mode("quick", fleet={"fast": 1, "slow": 1}, side_steps=30)
    cfg.eval_every = 10
    return cfg, data, bundle


def test_upload_bytes_are_padded_token_batches(setup) -> None:
    cfg, data, bundle = setup
    acts = F.token_activations(bundle, data.devices[0])
    assert len(acts) == 24 and acts.q.dtype == np.int8
    bodies = F.token_upload_bytes(acts, 16)
    assert len(bodies) == 2
    k, d = acts.q.shape[1], acts.q.shape[2]
    for j, rows in enumerate((np.arange(16), np.arange(16, 24))):
        padded = len(rows) * k * int(acts.lengths[rows].max()) * d
        assert padded <= bodies[j] <= padded + 4096  # header, lengths, labels, ids, scales
    assert sum(bodies) > acts.bytes_per_sample() * len(acts)


@pytest.mark.slow
def test_replay_trains_the_token_side_network(setup) -> None:
    cfg, data, bundle = setup
    profiles = fleet_profiles(cfg)
    rep = F.replay_tokens(
        cfg, data, profiles, {p.quant: bundle for p in profiles}, 1e9, {"width": 32, "blocks": 1}
    )
    assert rep["steps"] >= 30 and rep["curve"]
    assert [p["step"] for p in rep["curve"]] == sorted(p["step"] for p in rep["curve"])
    (test,) = rep["test"].values()
    assert 0.0 <= test["accuracy"] <= 1.0 and test["n"] == 40
    assert rep["samples"] == [24, 24] and len(rep["upload_body_bytes"]) == 2
    # the slow device's batches arrive later than the fast one's
    assert rep["timelines"][1][-1][2] > rep["timelines"][0][-1][2]
