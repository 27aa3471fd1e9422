"""bench_accuracy's fedmobillm-tokens rows end to end on tiny data (issue 15): a real
MiniLM-L3 pivot bundle and its pivot-none (token) bundle, 2 devices, 160 labelled records,
through the command line. Checks the row schema (the token rows beside fedmobillm, upload
bytes per sample in the rows and the table) and that the token personal model, run as a
device runs it (personal.onnx on onnxruntime with the attention mask), agrees with the
trainer and beats the majority class."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
B = "minilm-l3"


@pytest.fixture(scope="module")
def result(make_bundle, tmp_path_factory) -> tuple[dict, Path]:
    pivot = make_bundle(B, num_taps=3, quant="int8", formats=("onnx",))
    tokens = make_bundle(
        B, num_taps=3, quant="int8", formats=("onnx",), pivot="none", fallback_quant="fp32"
    )
    out = tmp_path_factory.mktemp("accuracy-tokens")
    cmd = [
        sys.executable, "-m", "benchmarks.bench_accuracy", "--quick", "--out", str(out),
        "--backbones", B, "--devices-per-backbone", "2", "--partitions", "iid",
        "--methods", "fedmobillm,fedmobillm-tokens", "--train-limit", "160", "--anchors", "0",
        "--val-limit", "60", "--test-limit", "120", "--steps", "60", "--batch-per-arch", "16",
        "--repeats", "1", "--token-side", "width=64", "--token-side", "blocks=1",
        f"--bundle={B}={pivot}", f"--token-bundle={B}={tokens}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "accuracy.json").read_text()), out


def test_token_rows_beside_the_pivot_rows_with_bytes(result) -> None:
    data, out = result
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"fedmobillm", "fedmobillm-tokens"}
    tok, piv = rows["fedmobillm-tokens"], rows["fedmobillm"]
    assert tok["partition"] == "iid" and tok["backbone"] == B
    k, d = 3, 384
    assert piv["bytes_per_sample"] == k * d  # one int8 vector per tap
    # every real token's taps: K * mean(L) * d, mean(L) between 2 and the 64-token limit
    assert tok["bytes_per_sample"] == pytest.approx(k * tok["mean_tokens"] * d)
    assert 2 < tok["mean_tokens"] < 64
    assert tok["train_samples"] == piv["train_samples"] == 160
    assert data["config"]["token_side_config"]["inputs"] == "tokens"
    assert data["config"]["token_side_config"]["width"] == 64
    table = (out / "accuracy.md").read_text()
    assert "fedmobillm-tokens iid" in table and "bytes/sample tokens" in table
    assert f"{int(tok['bytes_per_sample']):,}"[:3] in table


def test_token_personal_model_learns_on_the_device_path(result) -> None:
    data, _ = result
    (run,) = [r for r in data["runs"] if r["method"] == "fedmobillm-tokens"]
    assert run["accuracy"] > run["majority_class_rate"] + 0.05, run
    # personal.onnx (int8 weights) on onnxruntime agrees with the trainer's torch model
    assert abs(run["accuracy"] - run["accuracy_torch"]) <= 0.03, run
    assert run["personal_onnx_bytes"] > 0 and run["selected_step"] <= 60


def test_validation_only_sweeps_never_read_test(make_bundle, tmp_path) -> None:
    """--validation-only refuses pivot methods (they read test) before any work."""
    cmd = [
        sys.executable, "-m", "benchmarks.bench_accuracy", "--quick", "--out", str(tmp_path),
        "--validation-only", "--methods", "fedmobillm,fedmobillm-tokens",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--methods fedmobillm-tokens" in proc.stderr


def test_per_backbone_token_settings_in_a_mixed_fleet() -> None:
    """Backbones with different TOKEN_SIDE_BACKBONE entries keep them per architecture
    (SideConfig.per_arch, keyed by architecture name once the bundles name them); a key
    --token-side sets wins for every backbone; a lone backbone's entry is fleet-wide."""
    from benchmarks._tokens import side_config
    from benchmarks.bench_accuracy import (
        TOKEN_SIDE,
        TOKEN_SIDE_BACKBONE,
        AccuracyConfig,
        token_side_for,
    )

    smol = TOKEN_SIDE_BACKBONE["smollm2-135m"]
    assert smol == {"pool": "last", "skip": "linear"} and "minilm-l6" not in TOKEN_SIDE_BACKBONE
    assert token_side_for(("smollm2-135m",), {}) == {**TOKEN_SIDE, **smol}
    mixed = token_side_for(("minilm-l6", "smollm2-135m"), {})
    assert mixed == {**TOKEN_SIDE, "per_arch": {"smollm2-135m": smol}}
    assert token_side_for(("minilm-l6", "smollm2-135m"), {"pool": "mean"}) == {
        **TOKEN_SIDE,
        "per_arch": {"smollm2-135m": {"skip": "linear"}},
        "pool": "mean",
    }
    shared = {"pool": "mean", "skip": "none"}
    assert token_side_for(("minilm-l6", "smollm2-135m"), shared) == {**TOKEN_SIDE, **shared}
    archs = {"minilm-l6": "bert/l6", "smollm2-135m": "llama/smol"}
    c = side_config(AccuracyConfig(token_side=mixed), archs)
    assert c.per_arch == {"llama/smol": smol}
    assert c.token_rule("llama/smol") == ("last", "linear")
    assert c.token_rule("bert/l6") == ("mean", "none")


def test_run_token_side_follows_the_backbone(make_bundle) -> None:
    """benchmarks.run's fedmobillm-tokens: the backbone's TOKEN_SIDE_BACKBONE entry under
    --token-side, and the rule spelled out for the bundle's architecture and kind."""
    from benchmarks._common import BenchConfig
    from benchmarks.run import _token_rule, _token_side

    smol = _token_side(["width=32"], "smollm2-135m")
    assert (smol["pool"], smol["skip"], smol["width"]) == ("last", "linear", 32)
    assert _token_side(["pool=mean"], "smollm2-135m")["pool"] == "mean"
    assert "pool" not in _token_side([], "minilm-l3")
    bundle = make_bundle(
        B, num_taps=3, quant="int8", formats=("onnx",), pivot="none", fallback_quant="fp32"
    )  # an encoder
    cfg = BenchConfig()
    assert _token_rule(cfg, {"pool": "auto", "skip": "auto"}, bundle) == {
        "pool": "mean",
        "skip": "none",
    }
    own = {"per_arch": {"encoder": {"pool": "last"}}, "skip": "linear", "width": 32}
    assert _token_rule(cfg, own, bundle) == {"pool": "last", "skip": "linear", "width": 32}
