"""Helpers of the end-to-end federation tests (test_tokens_federation.py, test_lm_federation.py):
the `fedmobillm` CLI in a subprocess, one device's `device run` command line, and the wait
for the real server's trainer to settle."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

PIPES = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}


def cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m fedmobillm.cli ARGS`; fails the test (with its output) unless it exits 0."""
    r = subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    return r


def register_devices(url: str, admin: str, bundle: Path, root: Path, *extra: str) -> list[Path]:
    """`fedmobillm device register` of two devices (phone-0, phone-1) with ``bundle`` and
    ``extra`` options (``--task lm`` or ``--labels ...``); their state folders under ``root``."""
    states = [root / f"device-{d}" for d in range(2)]
    for d, state in enumerate(states):
        cli("device", "register", "--server", url, "--admin-token", admin, "--name", f"phone-{d}",
            "--bundle", bundle, "--state", state, *extra)  # fmt: skip
    return states


def run_cmd(
    bundle: Path, data: Path, state: Path, split: str, batch_size: int, task: str | None = None
) -> list[str]:
    """`fedmobillm device run [--task TASK]` of one device on one split, one forward thread."""
    return [sys.executable, "-m", "fedmobillm.cli", "device", "run",
            *(["--task", task] if task else []), "--bundle", str(bundle), "--data", str(data),
            "--state", str(state), "--split", split, "--threads", "1",
            "--batch-size", str(batch_size)]  # fmt: skip


def run_devices(commands: list[list[str]], split: str, timeout: float = 300) -> None:
    """Run the devices' commands at once; each must exit 0 (its output in the failure)."""
    procs = [subprocess.Popen(cmd, **PIPES) for cmd in commands]  # type: ignore[call-overload]
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, (split, out[-2000:], err[-3000:])


def wait_trained(url: str, admin: str, timeout: float) -> dict:
    """The whole status (GET /v1/status) once the trainer idles with a personal model
    exported after at least 100 steps; a trainer error fails at once."""
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {admin}"})
        body = r.json()
        st = body["trainer"]
        assert st.get("error") is None, st["error"]
        if st["idle"] and st["personal_models"] and st["step"] >= 100:
            return body
        time.sleep(1.0)
    raise AssertionError(f"trainer did not settle in {timeout} s: {json.dumps(st)[:2000]}")
