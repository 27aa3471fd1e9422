"""Phone-in-the-loop: `android run-device` through the emulated phone leaves the real server
(`fedmobillm serve`, uvicorn + SQLite) with the same samples and activations as
`device run --backend pte` on the same data and bundle."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmobillm.server.local import LocalServer

pytestmark = pytest.mark.integration

ADMIN = "android-e2e-admin-token-0123456789abcdef"
WORDS = ["great", "dull", "moving", "tedious", "sharp", "clumsy"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("server")
    with LocalServer(
        data_dir,
        admin_token=ADMIN,
        args=["--no-train"],
        log_path=data_dir / "server.log",
        startup_timeout=60.0,
    ) as srv:
        yield srv.url, data_dir


def _data(path: Path, n: int = 21) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            w = WORDS[(i * 5) % len(WORDS)]
            label = "positive" if WORDS.index(w) % 2 == 0 else "negative"
            f.write(
                json.dumps({"text": f"review {i}: the film was {w} and long", "label": label})
                + "\n"
            )
    return path


def _cli(*args, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _stored(data_dir: Path, device_id: str) -> list[tuple]:
    with sqlite3.connect(data_dir / "store.sqlite3", timeout=10) as db:
        return db.execute(
            "SELECT sample_id, label, split, encoding, act, scales FROM samples "
            "WHERE device_id = ? ORDER BY split, sample_id",
            (device_id,),
        ).fetchall()


def test_run_device_uploads_what_device_run_uploads(
    adb_server, phone, pte_bundle, host_runner, server, tmp_path
):
    """Prepare: one data file, one pte bundle, two devices (host and emulated phone).
    Execute: `device run --backend pte` on the host; `android run-device` via adb.
    Assert: same sample ids, labels and int8 activations on the server; a rerun adds nothing."""
    url, data_dir = server
    data = _data(tmp_path / "local.jsonl")
    host_state, phone_state = tmp_path / "host", tmp_path / "phone"
    reg = _cli(
        "device",
        "register",
        "--server",
        url,
        "--admin-token",
        ADMIN,
        "--name",
        "host-pte",
        "--bundle",
        pte_bundle,
        "--state",
        host_state,
        "--data",
        data,
    )
    assert reg.returncode == 0, reg.stderr

    host = _cli(
        "device",
        "run",
        "--bundle",
        pte_bundle,
        "--data",
        data,
        "--state",
        host_state,
        "--backend",
        "pte",
        "--batch-size",
        "8",
    )

    def run_device(*extra: str) -> subprocess.CompletedProcess[str]:
        return adb_server.cli(
            "android", "run-device", phone.serial, str(pte_bundle), "--data", str(data),
            "--server", url, "--state", str(phone_state), "--runner", str(host_runner),
            "--batch-size", "8", *extra,
        )  # fmt: skip

    ph = run_device("--admin-token", ADMIN, "--name", "phone-1")
    again = run_device()  # registered by the first run: its state is enough

    assert host.returncode == 0, host.stderr[-3000:]
    assert ph.returncode == 0, ph.stderr[-3000:]
    assert "3 batches run there" in ph.stdout
    ids = {
        s: json.loads((s / "device.json").read_text())["device_id"]
        for s in (host_state, phone_state)
    }
    a, b = _stored(data_dir, ids[host_state]), _stored(data_dir, ids[phone_state])
    assert len(a) == len(b) == 21
    assert [r[:4] for r in a] == [r[:4] for r in b]  # sample ids, labels, split, encoding
    qa = np.stack([np.frombuffer(r[4], np.int8) for r in a]).astype(np.int16)  # (N, K*d)
    qb = np.stack([np.frombuffer(r[4], np.int8) for r in b]).astype(np.int16)  # (N, K*d)
    same = float((qa == qb).mean())
    print(f"int8 activations identical: {same:.5f}, max |diff| {int(np.abs(qa - qb).max())}")
    assert same > 0.995 and np.abs(qa - qb).max() <= 1  # float rounding at a quantum edge
    assert all(ra[5] == rb[5] for ra, rb in zip(a, b, strict=True))  # same scales
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 batches run there" in again.stdout
    assert len(_stored(data_dir, ids[phone_state])) == 21
    assert phone.pushed_leftovers() == []


def test_run_device_needs_a_registration_or_a_token(
    adb_server, phone, pte_bundle, server, tmp_path
):
    url, _ = server
    res = adb_server.cli(
        "android",
        "run-device",
        phone.serial,
        str(pte_bundle),
        "--data",
        str(_data(tmp_path / "d.jsonl", 3)),
        "--server",
        url,
        "--state",
        str(tmp_path / "nostate"),
    )
    assert res.returncode == 1 and "not registered" in res.stderr and "--admin-token" in res.stderr


def test_run_device_takes_a_01_file_as_device_run_does(
    adb_server, phone, pte_bundle, host_runner, server, tmp_path
):
    """Prepare: the server's task has named labels; a data file labels its records 0/1.
    Execute: `android run-device --admin-token` registers the phone and uploads. Assert: it
    is accepted (the indices index the server's labels), as `device run` accepts the file."""
    url, data_dir = server
    named = _cli("device", "register", "--server", url, "--admin-token", ADMIN, "--name",
                 "named-labels", "--bundle", pte_bundle, "--state", tmp_path / "named",
                 "--labels", "negative,positive")  # fmt: skip
    assert named.returncode == 0, named.stderr
    data = tmp_path / "d01.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"film {i}", "label": i % 2}) + "\n" for i in range(3))
    )

    res = adb_server.cli(
        "android", "run-device", phone.serial, str(pte_bundle), "--data", str(data),
        "--server", url, "--admin-token", ADMIN, "--state", str(tmp_path / "phone"),
        "--name", "phone-01", "--runner", str(host_runner),
    )  # fmt: skip

    assert res.returncode == 0, res.stderr[-3000:]
    device_id = json.loads((tmp_path / "phone" / "device.json").read_text())["device_id"]
    assert [r[1] for r in _stored(data_dir, device_id)] == [0, 1, 0]
