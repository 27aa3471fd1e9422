"""User errors of the `fedmobillm` console script: a message with a hint and exit code 1, no
traceback (unless --debug, accepted anywhere on the command line). Run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _a_message(result: subprocess.CompletedProcess, says: str) -> None:
    assert result.returncode == 1, result.stderr
    assert says in result.stderr and "hint:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_serve_with_a_file_as_data_dir(tmp_path):
    """Prepare: a regular file. Execute: `serve --data-dir FILE`. Assert: a message naming
    the file and --data-dir, exit 1, no traceback."""
    file = tmp_path / "store"
    file.write_text("not a folder")

    result = cli("serve", "--data-dir", file, "--dev", "--port", "0", "--no-train")

    _a_message(result, f"server data dir {file} is a file, not a folder")
    assert "--data-dir" in result.stderr


def test_partition_with_a_file_as_output_folder(tmp_path):
    file = tmp_path / "out"
    file.write_text("")

    result = cli("data", "partition", "movie-snippets", "--devices", "2", "--out", file)

    _a_message(result, f"output folder {file} is a file, not a folder")
    assert "--out" in result.stderr


@pytest.mark.parametrize("where", ["first", "last", "middle"])
def test_debug_is_accepted_anywhere(tmp_path, where):
    """--debug before the subcommand, after it, or between two of its options: the same
    error, now with its traceback."""
    file = tmp_path / "out"
    file.write_text("")
    args = ["data", "partition", "movie-snippets", "--devices", "2", "--out", str(file)]
    at = {"first": 0, "last": len(args), "middle": 3}[where]

    result = cli(*args[:at], "--debug", *args[at:])

    assert result.returncode == 1
    assert "Traceback" in result.stderr and "is a file, not a folder" in result.stderr


def test_no_formats_flag_anywhere():
    """The export flag is --format: no doc, hint or help says --formats."""
    folders = ["docs", "src", "export", "device_runtime", "server", "android_bridge"]
    files = [ROOT / "README.md"]
    for folder in folders:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md")]

    wrong = [str(p.relative_to(ROOT)) for p in files if "--formats" in p.read_text()]

    assert wrong == []


def test_inspect_json_prints_only_json(make_bundle):
    """stdout of `inspect --json` parses as one JSON document; the ok line goes to stderr."""
    bundle = make_bundle("minilm-l3", num_taps=3, formats=("onnx",))  # shared with device tests

    result = cli("inspect", bundle, "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["taps"]
    assert "files match their sha256" in result.stderr
