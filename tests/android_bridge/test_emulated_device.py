"""The real adb against the emulated device: connect, shell, push/pull, and the bridge's
`android devices` / `android profile`, plus the errors for no adb, no device and an
unauthorised device."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

pytestmark = pytest.mark.integration


def test_adb_connect_shell_push_pull(adb_server, phone, tmp_path):
    """Prepare a 1 MB file; push, list and pull it with the real adb; bytes must survive."""
    blob = os.urandom(1 << 20)
    (tmp_path / "in.bin").write_bytes(blob)

    push = adb_server.adb(
        "-s", phone.serial, "push", str(tmp_path / "in.bin"), "/data/local/tmp/t/in.bin"
    )
    ls = adb_server.adb(
        "-s", phone.serial, "shell", "ls -l /data/local/tmp/t; getprop ro.product.model"
    )
    pull = adb_server.adb(
        "-s", phone.serial, "pull", "/data/local/tmp/t/in.bin", str(tmp_path / "out.bin")
    )
    adb_server.adb("-s", phone.serial, "shell", "rm -rf /data/local/tmp/t")

    assert push.returncode == 0, push.stderr
    assert "in.bin" in ls.stdout and "fedmobillm-emulated" in ls.stdout
    assert pull.returncode == 0, pull.stderr
    digest = hashlib.sha256(blob).hexdigest()
    assert hashlib.sha256((tmp_path / "out.bin").read_bytes()).hexdigest() == digest
    assert (phone.root / "data/local/tmp/t").exists() is False


def test_shell_exit_status_comes_back_through_the_marker(adb_server, phone):
    from fedmobillm.android_bridge.adb import Adb

    dev = Adb(server_port=adb_server.port).device(phone.serial)
    res = dev.shell("echo out; exit 3", check=False)
    assert (res.rc, res.output.strip()) == (3, "out")


def test_android_devices_lists_the_emulated_phone(adb_server, phone):
    res = adb_server.cli("android", "devices", "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["serial"]: r for r in json.loads(res.stdout)}
    row = rows[phone.serial]
    assert row["state"] == "device" and row["model"] == "fedmobillm-emulated"
    assert row["abi"] and row["android"] == "14"


def test_android_profile_writes_the_documented_fields(adb_server, phone, tmp_path):
    out = tmp_path / "profile.json"
    res = adb_server.cli("android", "profile", phone.serial, "--out", str(out))
    assert res.returncode == 0, res.stderr
    p = json.loads(out.read_text())
    assert p["schema"] == "fedmobillm.device-profile/1" and p["emulated"] is True
    assert p["cpu"]["cores"] == 8 and len(p["cpu"]["max_freq_khz"]) == 8
    assert [c["cores"] for c in p["cpu"]["clusters"]] == [4, 3, 1]
    assert p["ram_mb"] == 7680 and 0 < p["available_mb"] < p["ram_mb"]
    assert p["abi"] in p["abilist"] and p["soc"].startswith("FakeSoC")
    assert p["thermal"]["status_name"] == "none"
    assert p["battery"]["level_pct"] == 87 and p["battery"]["temperature_c"] == 31.2
    assert p["storage"]["tmp_free_mb"] > 1000


def test_profile_feeds_export_budget(adb_server, phone, tmp_path):
    """`export --budget-mb` reads ram_mb from the profile (export's budget_from_profile)."""
    from fedmobillm.export.budget import budget_from_profile

    out = tmp_path / "p.json"
    assert adb_server.cli("android", "profile", phone.serial, "--out", str(out)).returncode == 0
    assert budget_from_profile(out, None) > 0


def test_unauthorised_device_is_a_clear_error(adb_server, emulate):
    dev = emulate("--unauthorized", connect=False)
    adb_server.adb("connect", dev.serial)

    res = adb_server.cli("android", "profile", dev.serial)

    assert res.returncode == 1
    assert "unauthorised" in res.stderr and "Allow USB debugging" in res.stderr
    assert "Traceback" not in res.stderr


def test_no_device_and_no_adb(adb_server, phone):
    res = adb_server.cli("android", "profile", "no-such-phone")
    assert res.returncode == 1 and "no device 'no-such-phone'" in res.stderr
    assert phone.serial in res.stderr  # says what adb does see

    env = {**adb_server.env, "FEDMOBILLM_ADB": "/nonexistent/adb", "PATH": "/nonexistent"}
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", "android", "devices"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "adb is not installed" in res.stderr


def test_push_onto_a_full_device_fails_cleanly(adb_server, emulate, tmp_path):
    """The device fills up during the push itself: a clear error, no partial file left."""
    from fedmobillm.android_bridge.adb import Adb
    from fedmobillm.errors import FedMobiLLMError

    tiny = emulate("--storage-mb", "1")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    dev = Adb(server_port=adb_server.port).device(tiny.serial)

    with pytest.raises(FedMobiLLMError, match="the device is full") as err:
        dev.push(big, "/data/local/tmp/fedmobillm/big.bin")

    assert "free space" in str(err.value)
    assert not list((tiny.root / "data/local/tmp").rglob("*big*"))
