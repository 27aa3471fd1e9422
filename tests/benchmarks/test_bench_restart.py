"""bench_restart end to end on a tiny store: the store grown in two steps through the service
layer, a real trainer restarted on it in a fresh process each time (sampled read-back, and
the whole store read back for comparison); the report's schema and what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_restart_grows_the_store_and_restarts_on_a_sample(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "benchmarks.bench_restart", "--rows", "1500,4000", "--devices",
        "4", "--memory-mb", "1", "--full-max", "4000", "--data-dir", str(tmp_path / "data"),
        "--out", str(out), "--timeout", "300",
    ]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "bench_restart.json").read_text())
    rows = report["results"]
    assert [(r["rows"], r["mode"]) for r in rows] == [
        (1500, "default"),
        (1500, "read all (before)"),
        (4000, "default"),
        (4000, "read all (before)"),
    ]
    for r in rows:
        assert r["error"] is None and r["first_step"] is not None and r["full"] is not None
        assert 0 < r["start_to_first_step_s"] < r["process_to_first_step_s"]
        assert r["held_mb"] <= 1.0 and r["rss_mb"] > 0
    sampled = rows[2]
    assert sampled["sampled"] and sampled["rows_fetched"] < 4000 / 3
    assert rows[3]["rows_fetched"] == 4000 and not rows[3]["sampled"]
    assert (out / "bench_restart.md").read_text().count("\n| ") == 5
    assert (out / "bench_restart.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_restart_supervised_kills_serves_trainer_child(tmp_path):
    """--supervised: a real `serve --trainer-process` on a filled store, its active trainer
    child killed with -9, cold and then with the warm standby (which takes over)."""
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "benchmarks.bench_restart", "--supervised", "--rows", "1500",
        "--devices", "4", "--memory-mb", "1", "--kills", "1", "--data-dir",
        str(tmp_path / "data"), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "bench_restart_supervised.json").read_text())["results"]
    assert [(r["rows"], r["standby"], r["kill"]) for r in rows] == [
        (1500, False, 1),
        (1500, True, 1),
    ]
    cold, warm = rows
    assert "standby_mb" not in cold and cold["new_pid"] != warm["new_pid"]
    assert warm["new_pid"] == warm["standby_pid"]  # the standby took over
    assert warm["standby_mb"]["rss"] > 50 and warm["standby_mb"]["uss"] > 0
    for r in rows:
        assert r["resumed_ok"] and 0 < r["status_s"] and 0 < r["first_step_s"]
    assert (out / "bench_restart_supervised.md").read_text().count("\n| 1,500 |") == 2
