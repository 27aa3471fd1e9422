"""Device profile: what a phone is (CPU, RAM, ABI, thermal, battery), read over adb.

Profile JSON (``fedmobillm android profile SERIAL --out FILE``), schema
``fedmobillm.device-profile/1``::

    {
      "schema": "fedmobillm.device-profile/1",
      "serial": "R58M123ABC",
      "model": "SM-G991B", "manufacturer": "samsung",
      "android_release": "14", "sdk": 34,
      "abi": "arm64-v8a", "abilist": ["arm64-v8a", "armeabi-v7a", "armeabi"],
      "soc": "SM8350",                       # ro.soc.model, else /proc/cpuinfo Hardware
      "emulated": false,                     # true for `fedmobillm android emulate`
      "cpu": {"cores": 8,
              "max_freq_khz": [1804800, ...],          # per core, null if unreadable
              "clusters": [{"cores": 4, "max_freq_khz": 1804800}, ...]},
      "ram_mb": 7680,                        # MemTotal (what `export --budget-mb` reads)
      "available_mb": 4096,                  # MemAvailable at profiling time
      "storage": {"tmp_free_mb": 51234},     # free space under /data/local/tmp
      "thermal": {"status": 0, "status_name": "none"},   # PowerManager THERMAL_STATUS_*
      "battery": {"level_pct": 87, "temperature_c": 31.2, "status": "charging",
                  "plugged": "usb"},
      "collected_at": "2026-11-24T16:30:00+00:00",
      # optional, for the benchmarks' fleet (`--bench FILE --uplink-mbps X`):
      "bench": {"effective_gflops": 21.3, "latency_ms_p50": 65.2, "backend": "pte", ...},
      "link": {"uplink_mbps": 10.0, "downlink_mbps": 10.0}
    }

Fields a phone does not answer are null.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmobillm.android_bridge.adb import Device
from fedmobillm.device_runtime.files import write_atomic
from fedmobillm.errors import FedMobiLLMError

SCHEMA = "fedmobillm.device-profile/1"
THERMAL_NAMES = ["none", "light", "moderate", "severe", "critical", "emergency", "shutdown"]
BATTERY_STATUS = {1: "unknown", 2: "charging", 3: "discharging", 4: "not charging", 5: "full"}
DEVICE_TMP = "/data/local/tmp"

# One shell round trip collects everything; sections are separated by markers.
_SCRIPT = "; ".join(
    [
        "echo @@getprop; getprop",
        "echo @@cpuinfo; cat /proc/cpuinfo",
        "echo @@freqs; for f in /sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq; "
        'do echo "$f $(cat $f 2>/dev/null)"; done',
        "echo @@meminfo; cat /proc/meminfo",
        "echo @@df; df -k /data/local/tmp",
        "echo @@battery; dumpsys battery",
        "echo @@thermal; dumpsys thermalservice",
        "echo @@end",
    ]
)


def sections(text: str) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("@@"):
            current = line[2:].strip()
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def parse_getprop(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\[([^\]]+)\]: \[(.*)\]\s*$", text, flags=re.M))


def parse_meminfo(text: str) -> dict[str, int]:
    """kB values by key."""
    return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+)\s*kB", text, flags=re.M)}


def parse_df_free_kb(text: str) -> int | None:
    """Available 1K blocks from ``df -k PATH`` (toybox and coreutils layouts; a long device
    name may wrap the row). Reads the numbers before the last "Use%" field."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) < 2 or "avail" not in lines[0].lower():
        return None
    tokens = " ".join(lines[1:]).split()
    pct = [i for i, t in enumerate(tokens) if t.endswith("%") and t[:-1].isdigit()]
    nums = tokens[: pct[-1]] if pct else tokens
    ints = [int(t) for t in nums if t.isdigit()]
    return ints[-1] if len(ints) >= 3 else None


def parse_freqs(text: str) -> list[int | None]:
    by_cpu: dict[int, int | None] = {}
    for line in text.splitlines():
        m = re.search(r"cpu(\d+)/cpufreq/cpuinfo_max_freq\s*(\d*)", line)
        if m:
            by_cpu[int(m.group(1))] = int(m.group(2)) if m.group(2) else None
    return [by_cpu[i] for i in sorted(by_cpu)]


def _field(text: str, key: str, conv: Callable[[str], Any] = str) -> Any:
    m = re.search(rf"^\s*{re.escape(key)}:\s*(.+?)\s*$", text, flags=re.M)
    if not m:
        return None
    try:
        return conv(m.group(1))
    except ValueError:
        return None


def parse_battery(text: str) -> dict[str, Any]:
    temp = _field(text, "temperature", int)
    status = _field(text, "status", int)
    plugged = [p for p in ("AC", "USB", "Wireless") if _field(text, f"{p} powered") == "true"]
    return {
        "level_pct": _field(text, "level", int),
        "temperature_c": temp / 10 if temp is not None else None,
        "status": BATTERY_STATUS.get(status, None) if status is not None else None,
        "plugged": plugged[0].lower() if plugged else ("none" if text.strip() else None),
    }


def parse_thermal(text: str) -> dict[str, Any]:
    status = _field(text, "Thermal Status", int)
    name = THERMAL_NAMES[status] if status is not None and 0 <= status < 7 else None
    return {"status": status, "status_name": name}


def clusters(freqs: list[int | None]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted(freqs, key=lambda x: x or 0):
        if out and out[-1]["max_freq_khz"] == f:
            out[-1]["cores"] += 1
        else:
            out.append({"cores": 1, "max_freq_khz": f})
    return out


def build_profile(serial: str, raw: str) -> dict[str, Any]:
    """The profile dict from the collection script's output (pure: unit-testable)."""
    sec = sections(raw)
    props = parse_getprop(sec.get("getprop", ""))
    cpuinfo = sec.get("cpuinfo", "")
    mem = parse_meminfo(sec.get("meminfo", ""))
    freqs = parse_freqs(sec.get("freqs", ""))
    cores = len(re.findall(r"^processor\s*:", cpuinfo, flags=re.M)) or len(freqs) or None
    hardware = _field(cpuinfo, "Hardware")
    free_kb = parse_df_free_kb(sec.get("df", ""))
    sdk = props.get("ro.build.version.sdk")
    abilist = props.get("ro.product.cpu.abilist", "")
    return {
        "schema": SCHEMA,
        "serial": serial,
        "model": props.get("ro.product.model"),
        "manufacturer": props.get("ro.product.manufacturer"),
        "android_release": props.get("ro.build.version.release"),
        "sdk": int(sdk) if sdk and sdk.isdigit() else None,
        "abi": props.get("ro.product.cpu.abi"),
        "abilist": [a for a in abilist.split(",") if a] or [props.get("ro.product.cpu.abi")],
        "soc": props.get("ro.soc.model") or hardware or props.get("ro.board.platform"),
        "emulated": props.get("ro.fedmobillm.emulated") == "1",
        "cpu": {"cores": cores, "max_freq_khz": freqs, "clusters": clusters(freqs)},
        "ram_mb": mem["MemTotal"] // 1024 if "MemTotal" in mem else None,
        "available_mb": mem["MemAvailable"] // 1024 if "MemAvailable" in mem else None,
        "storage": {"tmp_free_mb": free_kb // 1024 if free_kb is not None else None},
        "thermal": parse_thermal(sec.get("thermal", "")),
        "battery": parse_battery(sec.get("battery", "")),
        "collected_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def collect(device: Device) -> dict[str, Any]:
    return build_profile(device.serial, device.shell(_SCRIPT, check=False).output)


def attach_fleet_figures(
    profile: dict[str, Any],
    bench: dict[str, Any] | None,
    uplink_mbps: float | None,
    downlink_mbps: float | None,
) -> None:
    """Add what the benchmarks' fleet needs (benchmarks/_common.load_profile): measured
    compute from an `android bench` JSON, and the phone's network link as given."""
    if bench is not None:
        if not bench.get("effective_gflops"):
            raise FedMobiLLMError(
                "the bench JSON has no effective_gflops",
                hint="write it with `fedmobillm android bench ... --json F`",
            )
        profile["bench"] = {
            "effective_gflops": bench["effective_gflops"],
            "latency_ms_p50": bench["latency_ms"]["p50"],
            "backend": bench["backend"],
            "architecture": bench["architecture"],
            "quant": bench["quant"],
            "input": [bench["config"]["batch"], bench["config"]["seq"]],
        }
    if uplink_mbps is not None or downlink_mbps is not None:
        up = uplink_mbps if uplink_mbps is not None else downlink_mbps
        profile["link"] = {
            "uplink_mbps": up,
            "downlink_mbps": downlink_mbps if downlink_mbps is not None else up,
        }


def write_profile(profile: dict[str, Any], out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(profile, indent=2) + "\n")


def summary_lines(p: dict[str, Any]) -> list[str]:
    cpu = p["cpu"]
    cl = " + ".join(
        f"{c['cores']}x{(c['max_freq_khz'] or 0) / 1e6:.2f} GHz" for c in cpu["clusters"]
    )
    bat = p["battery"]
    return [
        f"device:   {p['serial']}  {p['manufacturer']} {p['model']}"
        f"{'  (EMULATED, not a phone)' if p['emulated'] else ''}",
        f"android:  {p['android_release']} (sdk {p['sdk']}), abi {p['abi']}",
        f"soc:      {p['soc']}",
        f"cpu:      {cpu['cores']} cores ({cl or 'frequencies unknown'})",
        f"ram:      {p['ram_mb']} MB total, {p['available_mb']} MB available",
        f"storage:  {p['storage']['tmp_free_mb']} MB free in {DEVICE_TMP}",
        f"thermal:  {p['thermal']['status_name']}",
        f"battery:  {bat['level_pct']}% {bat['status']}, {bat['temperature_c']} C, "
        f"plugged {bat['plugged']}",
    ]
