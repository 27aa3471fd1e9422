"""`fedmobillm device ...` against a real server (`fedmobillm serve`, uvicorn + SQLite): a
refused admin token, a token the server no longer knows and a data file of bare 0/1 labels
are each one clear message (or no problem at all), never a silent success."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmobillm.server.local import LocalServer

pytestmark = pytest.mark.integration

ADMIN = "device-errors-admin-token-0123456789abcdef"
LABELS = "negative,positive"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    data_dir = tmp_path_factory.mktemp("server")
    with LocalServer(data_dir, admin_token=ADMIN, args=["--no-train"], startup_timeout=60.0) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def bundle(make_bundle) -> Path:
    return make_bundle("minilm-l3", num_taps=3, formats=("onnx",))  # shared with device tests


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
    )


def register(server: str, bundle: Path, name: str, state: Path, *labels: str):
    labels = labels or ("--labels", LABELS)
    return cli("device", "register", "--server", server, "--admin-token", ADMIN,
               "--name", name, "--bundle", bundle, "--state", state, *labels)  # fmt: skip


def data01(path: Path, n: int = 6) -> Path:
    """Records whose labels are bare indices 0/1 (no labels.json beside them)."""
    rows = [
        {"text": f"review {i}: {('dull', 'great')[i % 2]} film", "label": i % 2} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_wrong_admin_token_is_named_as_such(server, bundle, tmp_path):
    """Execute: register with a wrong admin token. Assert: the admin token was refused
    (401), not a device-token problem; nothing saved."""
    result = cli("device", "register", "--server", server, "--admin-token", "wrong-token",
                 "--name", "bad-admin", "--bundle", bundle, "--state", tmp_path / "s",
                 "--labels", LABELS)  # fmt: skip

    assert result.returncode == 1
    assert "refused the admin token (HTTP 401)" in result.stderr, result.stderr
    assert "device token" not in result.stderr and "--admin-token" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "s" / "device.json").exists()


def test_stale_token_with_a_complete_journal_fails(server, bundle, tmp_path):
    """Prepare: a device uploads everything (complete journal), then its token becomes one
    the server does not know. Execute: run again. Assert: exit 1 with a re-register hint."""
    state, data = tmp_path / "state", data01(tmp_path / "d.jsonl")
    assert register(server, bundle, "stale", state).returncode == 0
    first = cli("device", "run", "--bundle", bundle, "--data", data, "--state", state)
    assert first.returncode == 0, first.stderr
    saved = json.loads((state / "device.json").read_text())
    saved["token"] = "a-token-this-server-never-issued"
    (state / "device.json").write_text(json.dumps(saved))

    again = cli("device", "run", "--bundle", bundle, "--data", data, "--state", state)

    assert again.returncode == 1, again.stdout
    assert "does not accept device 'stale'" in again.stderr and "HTTP 401" in again.stderr
    assert "register the device again" in again.stderr and "Traceback" not in again.stderr
    assert "samples uploaded" not in again.stdout


def test_register_with_a_01_file_takes_the_servers_labels(server, bundle, tmp_path):
    """The labels `android run-device` registers with (shared with `device register
    --data`): a file of 0/1 labels indexes the server's task, as `device run` reads it;
    it used to register labels "0","1" and get 409."""
    first = register(server, bundle, "named", tmp_path / "a")
    assert first.returncode == 0, first.stderr
    data = data01(tmp_path / "d.jsonl")

    result = register(server, bundle, "indexed", tmp_path / "b", "--data", data)
    run = cli("device", "run", "--bundle", bundle, "--data", data, "--state", tmp_path / "b")

    assert result.returncode == 0, result.stderr
    assert "labels: negative, positive" in result.stdout
    assert run.returncode == 0, run.stderr
