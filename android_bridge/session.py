"""What bench and run-device share: ABI checks of a runner before anything is pushed, a free
space check, a work folder under /data/local/tmp/fedmobillm/ that is always removed, and
running the runner with a clear error when it crashes."""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import signal
from dataclasses import dataclass, field
from pathlib import Path

from fedmobillm.android_bridge.adb import AdbError, Device
from fedmobillm.android_bridge.profile import parse_df_free_kb
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

DEVICE_BASE = "/data/local/tmp/fedmobillm"
ELF_MACHINES = {3: "x86", 40: "armeabi-v7a", 62: "x86_64", 183: "arm64-v8a"}
SPACE_MARGIN = 1.1  # push needs the bytes plus 10 %
SPACE_EXTRA_MB = 4  # and room for outputs and logs


def runner_abi(path: Path) -> str | None:
    """The Android ABI of an ELF executable; None for a script (``#!``).

    Raises FedMobiLLMError for anything that is neither."""
    path = Path(path)
    if not path.is_file():
        raise FedMobiLLMError(
            f"runner {path} does not exist",
            hint="build it (docs/android.md) or omit --runner",
        )
    head = path.read_bytes()[:20]
    if head[:2] == b"#!":
        return None
    if head[:4] != b"\x7fELF" or len(head) < 20:
        raise FedMobiLLMError(
            f"runner {path} is not an executable (no ELF header, no #!)",
            hint="pass the executor_runner / onnxruntime_perf_test binary",
        )
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return ELF_MACHINES.get(machine, f"elf-machine-{machine}")


def check_runner_abi(path: Path, abilist: list[str]) -> None:
    abi = runner_abi(path)
    if abi is None:
        log.warning(
            "runner %s is a script: it runs only where its interpreter exists "
            "(the emulated device; not a phone)",
            path,
        )
        return
    if abi not in abilist:
        raise FedMobiLLMError(
            f"runner {path} is built for {abi}, the device runs {', '.join(abilist)}",
            hint=f"build the runner for {abilist[0]} with the Android NDK "
            "(docs/android.md) and pass it with --runner",
        )


def device_abis(device: Device) -> list[str]:
    abilist = device.getprop("ro.product.cpu.abilist") or device.getprop("ro.product.cpu.abi")
    return [a for a in abilist.split(",") if a]


def check_free_space(device: Device, need_bytes: int) -> int:
    """Refuse (before pushing anything) when /data/local/tmp cannot hold ``need_bytes``."""
    res = device.shell("df -k /data/local/tmp", check=False)
    free_kb = parse_df_free_kb(res.output)
    if free_kb is None:
        log.warning(
            "could not read free space on %s (df said: %s)",
            device.serial,
            res.output.strip()[-200:],
        )
        return -1
    need_kb = int(need_bytes * SPACE_MARGIN / 1024) + SPACE_EXTRA_MB * 1024
    if free_kb < need_kb:
        raise FedMobiLLMError(
            f"/data/local/tmp on {device.serial} has {free_kb / 1024:.0f} MB free, this run "
            f"needs {need_kb / 1024:.0f} MB: nothing was pushed",
            hint="free space on the phone (e.g. `adb shell rm -rf /data/local/tmp/...`), or "
            "export a smaller bundle (--quant int8)",
        )
    return free_kb


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


@dataclass
class WorkDir:
    """A fresh folder on the device; ``with`` removes it whatever happens."""

    device: Device
    path: str = field(
        default_factory=lambda: f"{DEVICE_BASE}/run-{os.getpid()}-{secrets.token_hex(3)}"
    )
    pushed_bytes: int = 0

    def __enter__(self) -> WorkDir:
        self.device.shell(f"mkdir -p {shlex.quote(self.path)}")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.device.shell(
                f"rm -rf {shlex.quote(self.path)}; rmdir {DEVICE_BASE} 2>/dev/null; true",
                check=False,
                timeout=60,
            )
        except FedMobiLLMError as err:
            log.warning("could not clean %s on %s: %s", self.path, self.device.serial, err)

    def push(self, local: Path, name: str | None = None) -> str:
        remote = f"{self.path}/{name or Path(local).name}"
        size = Path(local).stat().st_size
        level = logging.INFO if size > 1 << 20 else logging.DEBUG
        log.log(level, "pushing %s (%.1f MB) to %s", Path(local).name, size / 1e6, remote)
        self.device.push(Path(local), remote)
        self.pushed_bytes += size
        return remote

    def run(self, argv: list[str], timeout: float) -> str:
        """Run a command in the work folder; a crash or failure is a FedMobiLLMError."""
        cmd = f"cd {shlex.quote(self.path)} && {shlex.join(argv)} 2>&1"
        try:
            res = self.device.shell(cmd, timeout=timeout, check=False)
        except AdbError as exc:
            raise FedMobiLLMError(
                f"the runner did not finish on {self.device.serial}: {exc.message}", hint=exc.hint
            ) from exc
        tail = "\n".join(res.output.strip().splitlines()[-15:])
        if res.rc >= 128:
            raise FedMobiLLMError(
                f"the runner crashed on {self.device.serial} ({signal_name(res.rc - 128)}, "
                f"exit {res.rc}); its last output:\n{tail}",
                hint="check that the runner matches the bundle (pte runner for .pte) and "
                "that the phone has enough free memory; try fewer --threads",
            )
        if res.rc != 0:
            raise FedMobiLLMError(
                f"the runner failed on {self.device.serial} (exit {res.rc}); its last "
                f"output:\n{tail}",
                hint="read the runner's message above; a bundle exported for other shapes or "
                "a runner without the XNNPACK backend are common causes",
            )
        return res.output
