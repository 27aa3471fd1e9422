"""The main job end to end: real weights, real bundles, a real server and device processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.integration
def test_small_demo_beats_majority_on_every_backbone(tmp_path):
    """Prepare: two real encoders, four device processes, a slice of movie-snippets.
    Execute: `fedmobillm demo`. Assert: every backbone's on-device test accuracy (bundle +
    downloaded personal model) beats the majority-class rate by at least 10 points."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fedmobillm.cli",
        "demo",
        "--backbones",
        "minilm-l3,minilm-l6",
        "--devices",
        "4",
        "--iid",
        "--train-limit",
        "800",
        "--eval-limit",
        "300",
        "--settle-steps",
        "300",
        "--time-limit",
        "420",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    rows = {b["name"]: b for b in summary["backbones"]}
    assert set(rows) == {"minilm-l3", "minilm-l6"}
    for name, row in rows.items():
        assert "error" not in row, row
        assert row["accuracy"] >= summary["majority_rate"] + 0.10, (
            name,
            row,
            summary["majority_rate"],
        )
        assert row["bytes_uploaded"] > 0 and row["forward_ms_per_sample"] > 0 and row["peak_mb"] > 0
    assert (out / "validation.png").stat().st_size > 0
    assert (out / "server.log").is_file()
    assert "backbone" in r.stdout and "accuracy" in r.stdout
