"""The main job end to end: real weights, real bundles, a real server and device processes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

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


def _demo_cmd(out, *extra):
    """The smallest demo: one encoder, two devices, a few records, no anchors."""
    return [
        sys.executable, "-m", "fedmobillm.cli", "demo", "--backbones", "minilm-l3",
        "--devices", "2", "--iid", "--train-limit", "120", "--eval-limit", "60",
        "--anchors", "0", "--settle-steps", "20", "--time-limit", "120", "--out", str(out),
        *extra,
    ]  # fmt: skip


def _interrupt_once_devices_run(cmd, timeout=300.0):
    """Start the demo, Ctrl-C it (SIGINT) once its device processes are launched; its stderr."""
    # SIGINT back to its default in the child: a test run started in the background of a
    # non-interactive shell inherits SIGINT ignored, and Python then keeps ignoring Ctrl-C.
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    deadline = time.monotonic() + timeout
    try:
        for line in p.stderr:
            lines.append(line)
            if "launched" in line and "device processes" in line:
                p.send_signal(signal.SIGINT)
                break
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
        lines += p.stderr.readlines()
        p.wait(120)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, "".join(lines)


@pytest.mark.integration
def test_demo_runs_again_in_the_same_folder_after_ctrl_c_and_after_a_full_run(tmp_path):
    """Prepare: a demo interrupted with Ctrl-C once its devices were registered and running.
    Execute: the demo twice more in the same folder. Assert: each run starts afresh (says so,
    removes the previous run's state), registers its devices and finishes with a summary; no
    library warnings reach the output without --debug."""
    out = tmp_path / "run"
    rc, err = _interrupt_once_devices_run(_demo_cmd(out))
    assert rc == 130, err[-3000:]
    assert (out / "devices").is_dir() and (out / "server").is_dir()

    runs = [subprocess.run(_demo_cmd(out), capture_output=True, text=True, timeout=600)]
    first_summary = json.loads((out / "summary.json").read_text())
    runs.append(subprocess.run(_demo_cmd(out), capture_output=True, text=True, timeout=600))

    for r in runs:
        assert r.returncode == 0, r.stderr[-4000:]
        assert "new run in" in r.stderr and "removed the previous run's" in r.stderr
        assert "registered 3 devices" in r.stderr
        for noise in (r"Warning:", r"(?m)^[WI]\d{4} ", r"LOAD REPORT", r"Loading weights"):
            assert not re.search(noise, r.stderr), (noise, r.stderr[-3000:])
        assert "backbone" in r.stdout and "quant" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_s"] != first_summary["wall_s"]  # written anew
    (row,) = summary["backbones"]
    assert "error" not in row and row["quant"] == "int8" and row["quant_fallback"] is None
    assert (out / "validation.png").stat().st_size > 0
    assert json.loads((out / "demo-run.json").read_text())["pid"] is None
