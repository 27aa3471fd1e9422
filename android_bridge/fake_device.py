"""The emulated phone's file system: a sandbox folder with a plausible, clearly fake device
profile ("fedmobillm-emulated") that getprop, /proc, /sys, df, dumpsys and logcat answer from.

Layout under the root::

    data/local/tmp/            what `adb push` writes (the phone's /data/local/tmp)
    sdcard/
    proc/cpuinfo, proc/meminfo
    sys/devices/system/cpu/cpuN/cpufreq/cpuinfo_max_freq, sys/class/thermal/thermal_zoneN/
    .emulator/bin/             getprop, dumpsys, df, logcat (shell scripts, first on PATH)
    .emulator/getprop.txt, battery.txt, thermalservice.txt, storage_kb
"""

from __future__ import annotations

import os
import platform
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from fedmobillm.errors import FedMobiLLMError

EMULATED_MODEL = "fedmobillm-emulated"

# Device paths that the emulated shell maps into the sandbox folder.
_MAPPED = re.compile(
    r"(?<![\w.~/-])(/data(?=[/\s'\";|&)<>]|$)|/sdcard|/storage|/proc/cpuinfo|/proc/meminfo"
    r"|/sys/devices/system/cpu|/sys/class/thermal)"
)


def host_abi() -> str:
    """The Android ABI name of this machine's CPU (what host-built runners are)."""
    machine = platform.machine().lower()
    return {
        "x86_64": "x86_64",
        "amd64": "x86_64",
        "aarch64": "arm64-v8a",
        "arm64": "arm64-v8a",
        "i686": "x86",
        "armv7l": "armeabi-v7a",
    }.get(machine, machine)


@dataclass
class FakeProfile:
    """What the emulated phone claims to be. Numbers are plausible, names say it is fake."""

    abi: str = field(default_factory=host_abi)
    android_release: str = "14"
    sdk: int = 34
    soc: str = "FakeSoC-8 (fedmobillm emulated)"
    # (count, max kHz) per cluster: 4 little, 3 big, 1 prime.
    clusters: tuple[tuple[int, int], ...] = ((4, 1_804_800), (3, 2_419_200), (1, 3_187_200))
    ram_total_kb: int = 7_864_320  # 7.5 GiB
    ram_available_kb: int = 4_194_304
    storage_mb: int = 65_536
    battery_level: int = 87
    battery_temp_decic: int = 312
    thermal_status: int = 0
    serialno: str = "EMU0FEDMOBILLM"

    @property
    def num_cores(self) -> int:
        return sum(n for n, _ in self.clusters)

    def props(self) -> dict[str, str]:
        abilist = {
            "x86_64": "x86_64,x86",
            "arm64-v8a": "arm64-v8a,armeabi-v7a,armeabi",
        }.get(self.abi, self.abi)
        return {
            "ro.product.model": EMULATED_MODEL,
            "ro.product.name": "fedmobillm_emulated",
            "ro.product.device": "emulated",
            "ro.product.brand": "fedmobillm",
            "ro.product.manufacturer": "fedmobillm (emulated, not a phone)",
            "ro.product.cpu.abi": self.abi,
            "ro.product.cpu.abilist": abilist,
            "ro.build.version.release": self.android_release,
            "ro.build.version.sdk": str(self.sdk),
            "ro.build.fingerprint": f"fedmobillm/emulated/emulated:{self.android_release}/EMU/1:user/test-keys",
            "ro.soc.manufacturer": "fedmobillm",
            "ro.soc.model": self.soc,
            "ro.hardware": "emulated",
            "ro.board.platform": "fakesoc",
            "ro.serialno": self.serialno,
            "ro.kernel.qemu": "0",
            "ro.fedmobillm.emulated": "1",
        }

    def banner(self) -> bytes:
        p = self.props()
        return (
            f"device::ro.product.name={p['ro.product.name']};"
            f"ro.product.model={p['ro.product.model']};"
            f"ro.product.device={p['ro.product.device']};features="
        ).encode()


def _cpuinfo(profile: FakeProfile) -> str:
    blocks = []
    for i in range(profile.num_cores):
        blocks.append(
            f"processor\t: {i}\nBogoMIPS\t: 38.40\nFeatures\t: fp asimd evtstrm aes pmull sha1 "
            f"sha2 crc32 atomics fphp asimdhp\nCPU implementer\t: 0x41\nCPU part\t: 0xd05\n"
        )
    blocks.append(f"Hardware\t: {profile.soc}\n")
    return "\n".join(blocks)


def _meminfo(profile: FakeProfile) -> str:
    free = profile.ram_available_kb // 2
    return (
        f"MemTotal:       {profile.ram_total_kb:>9} kB\n"
        f"MemFree:        {free:>9} kB\n"
        f"MemAvailable:   {profile.ram_available_kb:>9} kB\n"
        f"Buffers:        {4096:>9} kB\n"
        f"Cached:         {profile.ram_available_kb - free:>9} kB\n"
        f"SwapTotal:      {2097148:>9} kB\n"
        f"SwapFree:       {2097148:>9} kB\n"
    )


def _battery(profile: FakeProfile) -> str:
    return (
        "Current Battery Service state:\n"
        "  AC powered: false\n  USB powered: true\n  Wireless powered: false\n"
        "  Max charging current: 500000\n  Max charging voltage: 5000000\n"
        "  Charge counter: 3612000\n  status: 2\n  health: 2\n  present: true\n"
        f"  level: {profile.battery_level}\n  scale: 100\n  voltage: 4231\n"
        f"  temperature: {profile.battery_temp_decic}\n  technology: Li-ion\n"
    )


def _thermal(profile: FakeProfile) -> str:
    return (
        "IsStatusOverride: false\n"
        "ThermalEventListeners:\n\tcallbacks: 0\n\tkilled: false\n\tbroadcasts count: -1\n"
        "ThermalStatusListeners:\n\tcallbacks: 0\n\tkilled: false\n\tbroadcasts count: -1\n"
        f"Thermal Status: {profile.thermal_status}\n"
        "Cached temperatures:\n"
        "\tTemperature{mValue=36.5, mType=0, mName=cpu-0-0, mStatus=0}\n"
        "\tTemperature{mValue=31.2, mType=2, mName=battery, mStatus=0}\n"
        "\tTemperature{mValue=33.0, mType=3, mName=skin, mStatus=0}\n"
        "HAL Ready: true\n"
    )


_GETPROP = """#!/bin/sh
# Emulated getprop: answers from the fake profile.
P="$FEDMOBILLM_EMU_ROOT/.emulator/getprop.txt"
if [ $# -eq 0 ]; then cat "$P"; exit 0; fi
grep -F "[$1]: " "$P" | head -n 1 | sed 's/^[^:]*: \\[\\(.*\\)\\]$/\\1/'
grep -qF "[$1]: " "$P" || echo
"""

_DUMPSYS = """#!/bin/sh
# Emulated dumpsys: battery and thermalservice only.
case "$1" in
  battery) cat "$FEDMOBILLM_EMU_ROOT/.emulator/battery.txt" ;;
  thermalservice) cat "$FEDMOBILLM_EMU_ROOT/.emulator/thermalservice.txt" ;;
  *) echo "Can't find service: $1"; exit 1 ;;
esac
"""

_DF = """#!/bin/sh
# Emulated df: one /data file system whose size is the emulator's --storage-mb.
total=$(cat "$FEDMOBILLM_EMU_ROOT/.emulator/storage_kb")
used=$(du -sk "$FEDMOBILLM_EMU_ROOT/data" | cut -f1)
avail=$((total - used)); [ "$avail" -lt 0 ] && avail=0
pct=$((used * 100 / total))
echo "Filesystem       1K-blocks     Used Available Use% Mounted on"
echo "/dev/block/dm-48 $total $used $avail $pct% /data"
"""

_LOGCAT = """#!/bin/sh
# Emulated logcat: an empty log buffer (host runners log to stderr instead).
exit 0
"""


def _write(path: Path, text: str, executable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def build_fake_fs(root: Path, profile: FakeProfile) -> Path:
    """Create (or refresh) the sandbox under ``root``; returns the resolved root."""
    root = Path(root).expanduser().resolve()
    if re.search(r"[\s'\"\\$`]", str(root)):
        raise FedMobiLLMError(
            f"emulator root {root} contains spaces or shell characters",
            hint="pick a plain path such as /tmp/fedmobillm-phone",
        )
    (root / "data" / "local" / "tmp").mkdir(parents=True, exist_ok=True)
    (root / "sdcard").mkdir(parents=True, exist_ok=True)
    _write(root / "proc" / "cpuinfo", _cpuinfo(profile))
    _write(root / "proc" / "meminfo", _meminfo(profile))
    cpu = root / "sys" / "devices" / "system" / "cpu"
    _write(cpu / "possible", f"0-{profile.num_cores - 1}\n")
    _write(cpu / "present", f"0-{profile.num_cores - 1}\n")
    i = 0
    for count, khz in profile.clusters:
        for _ in range(count):
            _write(cpu / f"cpu{i}" / "cpufreq" / "cpuinfo_max_freq", f"{khz}\n")
            _write(cpu / f"cpu{i}" / "cpufreq" / "cpuinfo_min_freq", "300000\n")
            i += 1
    thermal = root / "sys" / "class" / "thermal" / "thermal_zone0"
    _write(thermal / "type", "cpu-0-0\n")
    _write(thermal / "temp", "36500\n")
    emu = root / ".emulator"
    props = "".join(f"[{k}]: [{v}]\n" for k, v in sorted(profile.props().items()))
    _write(emu / "getprop.txt", props)
    _write(emu / "battery.txt", _battery(profile))
    _write(emu / "thermalservice.txt", _thermal(profile))
    _write(emu / "storage_kb", f"{profile.storage_mb * 1024}\n")
    for name, text in (
        ("getprop", _GETPROP),
        ("dumpsys", _DUMPSYS),
        ("df", _DF),
        ("logcat", _LOGCAT),
    ):
        _write(emu / "bin" / name, text, executable=True)
    return root


def map_command(command: str, root: Path) -> str:
    """Rewrite device paths in a shell command line to their place in the sandbox."""
    return _MAPPED.sub(lambda m: f"{root}{m.group(1)}", command)


def map_path(device_path: str, root: Path) -> Path:
    """A device path (as sent by sync) -> its file in the sandbox; never outside it."""
    norm = os.path.normpath("/" + device_path.lstrip("/"))
    return root / norm.lstrip("/")


def shell_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{root / '.emulator' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["FEDMOBILLM_EMU_ROOT"] = str(root)
    env["TMPDIR"] = str(root / "data" / "local" / "tmp")
    env["ANDROID_DATA"] = str(root / "data")
    return env


def used_kb(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root / "data"):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total // 1024
