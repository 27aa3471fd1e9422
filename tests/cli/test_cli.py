"""The `fedmobillm` console script, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from fedmobillm import __version__


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_help_lists_the_workflows():
    result = cli("--help")
    assert result.returncode == 0
    for name in ("models", "data"):
        assert f"    {name}" in result.stdout


def test_server_is_listed_once_and_serve_is_its_alias():
    """Execute the top-level help and both spellings of starting the server; Assert the
    help lists `server` and not `serve`, and `serve` takes exactly `server start`'s options."""
    top = cli("--help").stdout
    start = cli("server", "start", "--help")
    alias = cli("serve", "--help")
    assert "    server " in top and "    serve " not in top and "fedmobillm serve" in top
    assert start.returncode == alias.returncode == 0
    assert start.stdout.split("options:")[1] == alias.stdout.split("options:")[1]


def test_version():
    result = cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_user_error_is_a_message_not_a_traceback():
    result = cli("models", "fetch", "minilm-l99")
    assert result.returncode != 0
    assert "unknown model 'minilm-l99'" in result.stderr and "minilm-l6" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_local_data_file_is_a_message(tmp_path):
    result = cli(
        "data", "partition", str(tmp_path / "nope.jsonl"), "--devices", "2", "--out", str(tmp_path)
    )
    assert result.returncode != 0 and "nope.jsonl does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_models_list_and_path():
    listed = cli("models", "list")
    assert listed.returncode == 0
    assert all(n in listed.stdout for n in ("minilm-l6", "minilm-l3", "smollm2-135m"))
    path = cli("models", "path", "minilm-l6")
    assert path.returncode == 0 and path.stdout.strip().endswith("minilm-l6")


def test_data_fetch_reports_counts_per_split_and_label():
    result = cli("data", "fetch", "movie-snippets")
    assert result.returncode == 0, result.stderr
    assert "10568 labelled records" in result.stdout
    assert "negative" in result.stdout and "validation" in result.stdout


def test_data_partition_writes_devices_and_is_reproducible(tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        args = ("data", "partition", "movie-snippets", "--devices", "10", "--alpha", "0.5")
        result = cli(*args, "--seed", "7", "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert "device_09" in result.stdout
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == [f"device_{i:02d}.jsonl" for i in range(10)] + ["labels.json", "summary.json"]
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    summary = json.loads((outs[0] / "summary.json").read_text())["devices"]
    assert sum(d["records"] for d in summary) == 8454 and all(d["records"] > 0 for d in summary)
    first = json.loads((outs[0] / "device_00.jsonl").read_text().splitlines()[0])
    assert set(first) == {"text", "label"} and isinstance(first["label"], int)
