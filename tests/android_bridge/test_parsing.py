"""Pure parsing and checks (no adb): adb listings, profile sources, runner outputs, ELF
headers, path mapping of the emulated shell, the wire encoding."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmobillm.android_bridge import adb_wire as w
from fedmobillm.android_bridge.adb import parse_devices
from fedmobillm.android_bridge.bench import parse_executor_runner, parse_perf_test
from fedmobillm.android_bridge.fake_device import map_command, map_path
from fedmobillm.android_bridge.profile import build_profile, parse_df_free_kb
from fedmobillm.android_bridge.session import check_runner_abi, runner_abi
from fedmobillm.errors import FedMobiLLMError


def _elf(path: Path, machine: int) -> Path:
    head = bytearray(64)
    head[:4] = b"\x7fELF"
    head[4], head[5] = 2, 1  # 64-bit, little endian
    head[18:20] = machine.to_bytes(2, "little")
    path.write_bytes(bytes(head))
    return path


def test_parse_devices_reads_states_and_details():
    text = (
        "List of devices attached\n"
        "R58M123ABC             device usb:1-1 product:o1sxx model:SM_G991B device:o1s "
        "transport_id:3\n"
        "127.0.0.1:5557         unauthorized transport_id:4\n\n"
    )
    rows = parse_devices(text)
    assert [(r.serial, r.state) for r in rows] == [
        ("R58M123ABC", "device"),
        ("127.0.0.1:5557", "unauthorized"),
    ]
    assert rows[0].info["model"] == "SM_G991B"


def test_df_free_space_from_toybox_and_coreutils_layouts():
    toybox = "Filesystem 1K-blocks Used Available Use% Mounted on\n/dev/block/dm-48 1000 400 600 40% /data\n"
    wrapped = "Filesystem 1K-blocks Used Available Use% Mounted on\n/dev/block/bootdevice/by-name/userdata\n 1000 400 600 40% /data\n"
    assert parse_df_free_kb(toybox) == 600
    assert parse_df_free_kb(wrapped) == 600
    assert parse_df_free_kb("df: /x: No such file") is None


def test_profile_from_a_phone_like_answer():
    raw = "\n".join(
        [
            "@@getprop",
            "[ro.product.model]: [Pixel 7]",
            "[ro.product.cpu.abi]: [arm64-v8a]",
            "[ro.product.cpu.abilist]: [arm64-v8a,armeabi-v7a]",
            "[ro.build.version.release]: [14]",
            "[ro.build.version.sdk]: [34]",
            "[ro.soc.model]: [GS201]",
            "@@cpuinfo",
            "processor\t: 0",
            "processor\t: 1",
            "@@freqs",
            "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq 1803000",
            "/sys/devices/system/cpu/cpu1/cpufreq/cpuinfo_max_freq 2850000",
            "@@meminfo",
            "MemTotal:        7869000 kB",
            "MemAvailable:    3000000 kB",
            "@@df",
            "Filesystem 1K-blocks Used Available Use% Mounted on",
            "/dev/block/dm-48 100000000 1000 99999000 1% /data",
            "@@battery",
            "  AC powered: false",
            "  USB powered: true",
            "  status: 2",
            "  level: 55",
            "  temperature: 298",
            "@@thermal",
            "Thermal Status: 2",
            "@@end",
        ]
    )
    p = build_profile("SER", raw)
    assert p["model"] == "Pixel 7" and p["abi"] == "arm64-v8a" and p["soc"] == "GS201"
    assert p["cpu"]["cores"] == 2 and p["cpu"]["max_freq_khz"] == [1803000, 2850000]
    assert p["ram_mb"] == 7869000 // 1024 and p["available_mb"] == 3000000 // 1024
    assert p["thermal"] == {"status": 2, "status_name": "moderate"}
    assert p["battery"] == {
        "level_pct": 55,
        "temperature_c": 29.8,
        "status": "charging",
        "plugged": "usb",
    }
    assert p["emulated"] is False and p["sdk"] == 34


def test_executor_runner_output_drops_warmup():
    text = (
        "I 00:00:00.1 executorch:executor_runner.cpp:1] Model loaded in 12.5 ms.\n"
        + "".join(
            f"I 00:00:01 executorch:x] Iteration {i} of 4: {ms} ms\n"
            for i, ms in enumerate([90.0, 10.0, 12.0, 11.0], 1)
        )
        + "I 00:00:02 executorch:x] Model executed successfully 4 time(s) in 123.0 ms.\n"
        "I 00:00:02 executorch:x] Peak memory: 2048 kB (VmHWM).\n"
    )
    r = parse_executor_runner(text, warmup=1)
    assert r["load_ms"] == 12.5 and r["per_iteration_ms"] == [10.0, 12.0, 11.0]
    assert r["latency_ms"]["min"] == 10.0 and r["latency_ms"]["p50"] == 11.0
    assert r["peak_memory_mb"] == 2.0


def test_executor_runner_total_only_and_garbage():
    r = parse_executor_runner("Model executed successfully 4 time(s) in 40.0 ms.", warmup=0)
    assert r["latency_ms"]["mean"] == 10.0 and "note" in r
    with pytest.raises(FedMobiLLMError, match="no executor_runner timings"):
        parse_executor_runner("Segmentation fault", warmup=0)


def test_perf_test_summary():
    text = (
        "Session creation time cost: 0.25 s\nAverage inference time cost: 20.5 ms\n"
        "Peak working set size: 104857600 bytes\nMin Latency: 0.018 s\nMax Latency: 0.03 s\n"
        "P50 Latency: 0.02 s\nP90 Latency: 0.025 s\n"
    )
    r = parse_perf_test(text)
    assert r["load_ms"] == 250.0 and r["peak_memory_mb"] == 100.0
    assert r["latency_ms"] == {"mean": 20.5, "p50": 20.0, "p90": 25.0, "min": 18.0, "max": 30.0}


def test_runner_abi_from_elf_header(tmp_path):
    assert runner_abi(_elf(tmp_path / "a", 183)) == "arm64-v8a"
    assert runner_abi(_elf(tmp_path / "b", 62)) == "x86_64"
    (tmp_path / "s").write_text("#!/bin/sh\n")
    assert runner_abi(tmp_path / "s") is None
    (tmp_path / "t").write_text("hello")
    with pytest.raises(FedMobiLLMError, match="not an executable"):
        runner_abi(tmp_path / "t")
    with pytest.raises(FedMobiLLMError, match="built for arm64-v8a, the device runs x86_64"):
        check_runner_abi(tmp_path / "a", ["x86_64", "x86"])


def test_emulated_shell_maps_device_paths_only(tmp_path):
    cmd = "cd /data/local/tmp/x && cat /proc/cpuinfo /proc/self/status; ls /sdcard; echo a/data"
    out = map_command(cmd, tmp_path)
    assert f"cd {tmp_path}/data/local/tmp/x" in out and f"{tmp_path}/proc/cpuinfo" in out
    assert "/proc/self/status" in out and f"{tmp_path}/proc/self" not in out
    assert out.endswith("echo a/data")
    assert map_path("/data/../../etc/passwd", tmp_path) == tmp_path / "etc" / "passwd"


def test_wire_packet_round_trip():
    raw = w.encode_packet(w.A_WRTE, 3, 7, b"hello")
    assert w.decode_header(raw[:24]) == (w.A_WRTE, 3, 7, 5)
    bad = bytearray(raw)
    bad[20] ^= 1
    with pytest.raises(w.WireError):
        w.decode_header(bytes(bad[:24]))


def test_python_fallback_runner_when_cxx_fails(tmp_path, monkeypatch):
    """A compiler that fails (here /bin/false) leaves the Python executor_runner in place."""
    from fedmobillm.android_bridge.runners import host_pte_runner

    monkeypatch.setenv("FEDMOBILLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")

    runner = host_pte_runner()

    assert runner.name == "executor_runner.py" and runner_abi(runner) is None
    assert runner.read_text().startswith("#!") and "--model_path" in runner.read_text()
