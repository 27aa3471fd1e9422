"""A thin client over the real ``adb`` executable (subprocess).

Why subprocess and not adbutils: the bridge then drives phones exactly as a user's own
``adb`` does -- the same server, ``ADB_SERVER_SOCKET``/``-P``, keys and push/pull code, and
adb's own error messages ("unauthorized", "offline") -- and a test against the emulated
device exercises the real adb client, not a Python re-implementation of its sync protocol.
It also adds no dependency. The price is one process per call (~10 ms), negligible next to
a benchmark.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

RC_MARKER = "__fedmobillm_rc:"


class AdbError(FedMobiLLMError):
    """adb failed, or the device is not usable."""


@dataclass
class DeviceEntry:
    serial: str
    state: str
    info: dict[str, str] = field(default_factory=dict)


@dataclass
class ShellResult:
    rc: int
    output: str


def find_adb() -> str:
    """``$FEDMOBILLM_ADB`` or ``adb`` on PATH."""
    exe = os.environ.get("FEDMOBILLM_ADB") or shutil.which("adb")
    if not exe or not (Path(exe).is_file() and os.access(exe, os.X_OK)):
        raise AdbError(
            "adb is not installed (no `adb` on PATH)",
            hint="install it (Debian/Ubuntu: `apt-get install adb`; or Android platform-tools) "
            "or point FEDMOBILLM_ADB at it",
        )
    return exe


@dataclass
class Adb:
    """The adb client. ``server_port`` = adb's ``-P`` (default: adb's own choice)."""

    executable: str = field(default_factory=find_adb)
    server_port: int | None = None

    def _cmd(self, *args: str) -> list[str]:
        base = [self.executable]
        if self.server_port:
            base += ["-P", str(self.server_port)]
        return base + list(args)

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = self._cmd(*args)
        log.debug("$ %s", shlex.join(cmd))
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, errors="replace", timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise AdbError(
                f"`adb {' '.join(args)[:80]}` did not finish within {timeout:.0f} s",
                hint="check the device connection (`adb devices`) and try again",
            ) from exc

    def devices(self) -> list[DeviceEntry]:
        res = self.run("devices", "-l", timeout=30)
        if res.returncode != 0:
            raise AdbError(f"`adb devices` failed: {res.stderr.strip() or res.stdout.strip()}")
        return parse_devices(res.stdout)

    def connect(self, address: str) -> None:
        res = self.run("connect", address, timeout=30)
        text = (res.stdout + res.stderr).strip()
        if res.returncode != 0 or "connected to" not in text:
            raise AdbError(
                f"`adb connect {address}` failed: {text}",
                hint="is `fedmobillm android emulate` (or the phone) listening there?",
            )

    def device(self, serial: str) -> Device:
        """The device ``serial``, checked to be online and authorised."""
        entries = self.devices()
        match = [e for e in entries if e.serial == serial]
        if not match:
            known = ", ".join(f"{e.serial} ({e.state})" for e in entries) or "none"
            raise AdbError(
                f"no device {serial!r} (adb devices lists: {known})",
                hint="plug the phone in with USB debugging on, or `adb connect HOST:PORT`; "
                "`fedmobillm android devices` lists what adb sees",
            )
        check_state(match[0])
        return Device(self, serial)


def check_state(entry: DeviceEntry) -> None:
    if entry.state == "device":
        return
    if entry.state == "unauthorized":
        raise AdbError(
            f"device {entry.serial} is unauthorised: it has not accepted this computer's adb key",
            hint="unlock the phone and accept the 'Allow USB debugging?' prompt (tick 'Always "
            "allow'), then retry; if no prompt shows, revoke USB debugging authorisations in "
            "Developer options and reconnect",
        )
    if entry.state == "offline":
        raise AdbError(
            f"device {entry.serial} is offline",
            hint="reconnect it (`adb disconnect SERIAL` then `adb connect SERIAL`, or replug USB)",
        )
    raise AdbError(
        f"device {entry.serial} is in state {entry.state!r}, not 'device'",
        hint="wait until `adb devices` shows it as 'device'",
    )


def parse_devices(text: str) -> list[DeviceEntry]:
    """Parse ``adb devices -l``."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*", "adb server")):
            continue
        parts = line.split()
        if len(parts) < 2:
            continue
        info = dict(p.split(":", 1) for p in parts[2:] if ":" in p)
        out.append(DeviceEntry(parts[0], parts[1], info))
    return out


@dataclass
class Device:
    adb: Adb
    serial: str

    def shell(self, command: str, *, timeout: float = 120, check: bool = True) -> ShellResult:
        """Run ``command`` with the device's /bin/sh; returns its exit status and output.

        Legacy ``shell:`` loses the exit status, so a marker carries it back (the command
        runs in a subshell so that ``exit`` in it cannot skip the marker)."""
        res = self.adb.run(
            "-s", self.serial, "shell", f"({command}\n); echo {RC_MARKER}$?", timeout=timeout
        )
        text = res.stdout.replace("\r\n", "\n")
        match = re.search(rf"{RC_MARKER}(\d+)\s*$", text)
        if res.returncode != 0 and not match:
            raise _adb_failure(self.serial, res)
        if not match:
            raise AdbError(
                f"adb shell on {self.serial} ended without an exit status: "
                f"{(res.stderr or text).strip()[-300:]}"
            )
        out = ShellResult(int(match.group(1)), text[: match.start()])
        if check and out.rc != 0:
            raise AdbError(
                f"`{command[:120]}` failed on {self.serial} (exit {out.rc}): "
                f"{out.output.strip()[-500:]}"
            )
        return out

    def getprop(self, name: str) -> str:
        return self.shell(f"getprop {shlex.quote(name)}").output.strip()

    def push(self, local: Path, remote: str, timeout: float = 600) -> None:
        res = self.adb.run("-s", self.serial, "push", str(local), remote, timeout=timeout)
        if res.returncode != 0:
            raise _adb_failure(self.serial, res, f"pushing {local} to {remote}")

    def pull(self, remote: str, local: Path, timeout: float = 600) -> None:
        res = self.adb.run("-s", self.serial, "pull", remote, str(local), timeout=timeout)
        if res.returncode != 0:
            raise _adb_failure(self.serial, res, f"pulling {remote}")


def _adb_failure(serial: str, res: subprocess.CompletedProcess[str], what: str = "") -> AdbError:
    text = (res.stderr.strip() or res.stdout.strip())[-500:]
    low = text.lower()
    prefix = f"{what} on {serial} failed" if what else f"adb failed on {serial}"
    if "unauthorized" in low:
        return AdbError(
            f"device {serial} is unauthorised: {text}",
            hint="accept the 'Allow USB debugging?' prompt on the phone and retry",
        )
    if "no space left" in low:
        return AdbError(
            f"{prefix}: the device is full ({text})",
            hint="free space in /data/local/tmp on the phone (`adb shell df`)",
        )
    if "not found" in low or "offline" in low:
        return AdbError(f"{prefix}: {text}", hint="check `adb devices`; reconnect the device")
    return AdbError(f"{prefix}: {text}")
