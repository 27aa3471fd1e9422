# Owner: H7.
"""The accuracy benchmark end to end on tiny data: two real backbones (MiniLM-L3, MiniLM-L6,
int8 ONNX bundles), 4 devices (IID), 240 labelled train records and 120 anchor texts, every
method, through the command line.
Checks the output schema and that the shared side network learns (beats the majority
class on held-out test records through the exported personal model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKBONES = ("minilm-l3", "minilm-l6")
METHODS = {
    "fedmobillm",
    "fedmobillm-no-anchors",
    "centralised",
    "single",
    "linear-probe",
    "full-ft",
}


@pytest.fixture(scope="module")
def result(make_bundle, tmp_path_factory) -> tuple[dict, Path]:
    bundles = {b: make_bundle(b, num_taps=3, quant="int8", formats=("onnx",)) for b in BACKBONES}
    out = tmp_path_factory.mktemp("accuracy")
    cmd = [
        sys.executable, "-m", "benchmarks.bench_accuracy", "--quick", "--out", str(out),
        "--backbones", ",".join(BACKBONES), "--devices-per-backbone", "2",
        "--partitions", "iid", "--train-limit", "240", "--anchors", "120", "--val-limit", "100",
        "--test-limit", "200", "--steps", "150", "--batch-per-arch", "16", "--repeats", "2",
        "--full-ft-model", "minilm-l3", "--full-ft-train", "16",
        "--methods", ",".join(sorted(METHODS)),
        *[f"--bundle={b}={d}" for b, d in bundles.items()],
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "accuracy.json").read_text()), out


def test_schema_and_outputs(result) -> None:
    data, out = result
    assert {"rows", "config", "versions", "targets"} <= set(data)
    for row in data["rows"]:
        assert {"method", "backbone", "partition", "dataset", "accuracy"} <= set(row)
        assert 0.0 <= row["accuracy"] <= 1.0
    got = {(r["method"], r["backbone"], r["partition"]) for r in data["rows"]}
    for b in BACKBONES:
        assert ("fedmobillm", b, "iid") in got and ("single", b, "iid") in got
        assert ("centralised", b, "central") in got and ("linear-probe", b, "central") in got
    assert {r["method"] for r in data["rows"]} == METHODS
    assert (out / "accuracy.png").stat().st_size > 1000
    table = (out / "accuracy.md").read_text()
    assert "| minilm-l3 |" in table and "fedmobillm iid" in table


def test_fedmobillm_learns_through_the_personal_model(result) -> None:
    data, _ = result
    fed = [r for r in data["rows"] if r["method"] == "fedmobillm" and r["partition"] == "iid"]
    assert len(fed) == len(BACKBONES)
    for r in fed:
        chance = r["majority_class_rate"]
        assert r["accuracy"] > chance + 0.05, r
        # the device path (personal.onnx on onnxruntime) agrees with the trainer's torch model
        assert abs(r["accuracy"] - r["accuracy_torch"]) <= 0.01, r


def test_single_uses_a_third_of_what_centralised_uses(result) -> None:
    data, _ = result
    rows = data["rows"]
    for b in BACKBONES:
        single = next(r for r in rows if (r["method"], r["backbone"], r["partition"]) ==
                      ("single", b, "iid"))  # fmt: skip
        central = next(r for r in rows if (r["method"], r["backbone"]) == ("centralised", b))
        assert central["train_samples"] == 240
        assert single["train_samples"] == 240 // len(BACKBONES)
        # the anchor texts are held out of the labelled records and reach fedmobillm only
        fed = {r["method"]: r for r in rows if r["backbone"] == b and r["partition"] == "iid"}
        assert fed["fedmobillm"]["anchor_samples"] == 120
        assert fed["fedmobillm-no-anchors"]["anchor_samples"] == 0
        assert fed["fedmobillm"]["train_samples"] == single["train_samples"]


def test_side_methods_average_over_seeds(result) -> None:
    """Each side-network row is the mean of --repeats runs (seeds 0 and 1), kept in runs."""
    data, _ = result
    side = [r for r in data["rows"] if r["method"] in ("fedmobillm", "single", "centralised")]
    assert side
    for row in side:
        assert row["seeds"] == [0, 1], row
        per_seed = [
            r["accuracy"]
            for r in data["runs"]
            if (r["method"], r["backbone"], r["partition"])
            == (row["method"], row["backbone"], row["partition"])
        ]
        assert sorted(per_seed) == sorted(row["accuracy_per_seed"])
        assert abs(row["accuracy"] - sum(per_seed) / 2) < 1e-9
