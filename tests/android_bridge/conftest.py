"""Fixtures: a private adb server (own port and HOME, killed at the end) and emulated
devices started as `fedmobillm android emulate` processes, attached with `adb connect`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedmobillm.server.local import free_port


@dataclass
class AdbServer:
    port: int
    env: dict[str, str]

    def adb(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["adb", "-P", str(self.port), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`fedmobillm ARGS --adb-port P` in a fresh process."""
        cmd = [sys.executable, "-m", "fedmobillm.cli", *args, "--adb-port", str(self.port)]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)


@dataclass
class Emulated:
    serial: str
    root: Path
    proc: subprocess.Popen

    def pushed_leftovers(self) -> list[str]:
        """What is left of the bridge's folder /data/local/tmp/fedmobillm (programs run on
        the device may keep their own temp files next to it, as on a phone)."""
        base = self.root / "data" / "local" / "tmp"
        return sorted(str(p.relative_to(base)) for p in (base / "fedmobillm").glob("**/*")) + (
            ["fedmobillm/"] if (base / "fedmobillm").exists() else []
        )


@pytest.fixture(scope="session")
def adb_server(tmp_path_factory) -> AdbServer:
    if not shutil.which("adb"):
        pytest.fail("adb is not installed: `apt-get install adb` (.ci/run installs it)")
    home = tmp_path_factory.mktemp("adb-home")
    port = free_port()
    env = {**os.environ, "HOME": str(home), "ANDROID_ADB_SERVER_PORT": str(port)}
    env.pop("ADB_SERVER_SOCKET", None)
    server = AdbServer(port, env)
    server.adb("start-server")
    yield server
    server.adb("kill-server")


@pytest.fixture(scope="session")
def emulate(adb_server, tmp_path_factory):
    """`emulate(*extra_args)` -> an attached Emulated device; all stopped at the end."""
    started: list[Emulated] = []

    def start(*extra: str, connect: bool = True) -> Emulated:
        root = tmp_path_factory.mktemp("phone")
        cmd = [
            sys.executable,
            "-m",
            "fedmobillm.cli",
            "android",
            "emulate",
            "--port",
            "0",
            "--root",
            str(root),
            *extra,
        ]
        proc = subprocess.Popen(
            cmd, env=adb_server.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        line = proc.stdout.readline() if proc.stdout else ""
        if "listening on" not in line:
            proc.kill()
            pytest.fail(f"emulator did not start: {line!r}")
        address = line.split("listening on ")[1].split()[0]
        dev = Emulated(address, root, proc)
        started.append(dev)
        if connect:
            res = adb_server.adb("connect", address)
            assert "connected to" in res.stdout, res.stdout + res.stderr
            _wait_state(adb_server, address)
        return dev

    yield start
    for dev in started:
        adb_server.adb("disconnect", dev.serial)
        dev.proc.terminate()
        try:
            dev.proc.wait(10)
        except subprocess.TimeoutExpired:
            dev.proc.kill()


def _wait_state(server: AdbServer, serial: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = server.adb("-s", serial, "get-state").stdout.strip()
        if state == "device":
            return state
        time.sleep(0.1)
    return state


@pytest.fixture(scope="session")
def phone(emulate) -> Emulated:
    """The default emulated phone (64 GB of fake storage, this machine's ABI)."""
    return emulate()


@pytest.fixture(scope="session")
def pte_bundle(make_bundle) -> Path:
    """A real MiniLM-L6 bundle with backbone.pte and backbone.onnx (the same option set as
    tests/export, so CI exports it once)."""
    return make_bundle("minilm-l6", num_taps=3, formats=("onnx", "pte"))


@pytest.fixture(scope="session")
def host_runner() -> Path:
    from fedmobillm.android_bridge.runners import host_pte_runner

    return host_pte_runner()
