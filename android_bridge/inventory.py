"""`android devices`: what adb sees, with model, ABI and Android version per device."""

from __future__ import annotations

from typing import Any

from fedmobillm.android_bridge.adb import Adb, Device
from fedmobillm.errors import FedMobiLLMError

_PROPS = ("ro.product.model", "ro.product.cpu.abi", "ro.build.version.release")


def describe(device: Device) -> dict[str, str | None]:
    """Model, ABI and Android version in one shell round trip."""
    script = "; ".join(f'echo "$(getprop {p})"' for p in _PROPS)
    lines = device.shell(script).output.splitlines() + [""] * len(_PROPS)
    model, abi, release = (v.strip() or None for v in lines[: len(_PROPS)])
    return {"model": model, "abi": abi, "android": release}


def list_devices(adb_port: int | None = None) -> list[dict[str, Any]]:
    adb = Adb(server_port=adb_port)
    rows: list[dict[str, Any]] = []
    for entry in adb.devices():
        row: dict[str, Any] = {
            "serial": entry.serial,
            "state": entry.state,
            "model": entry.info.get("model"),
            "abi": None,
            "android": None,
        }
        if entry.state == "device":
            try:
                row.update(describe(Device(adb, entry.serial)))
            except FedMobiLLMError as exc:  # listed but not answering: show, don't fail
                row["error"] = exc.message
        rows.append(row)
    return rows
