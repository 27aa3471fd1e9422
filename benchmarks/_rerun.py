"""One more method on the fleet of an earlier ``benchmarks.run`` (issue 22): its results.json,
configuration, fleet and data, so a rival added later (``python -m benchmarks._hetlora
--from RUN``, ``python -m benchmarks._mezo from --from RUN``) runs on the same seed, devices
and records, and is cut at the same target, as the methods of that run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks._common import BenchConfig, DeviceProfile, FleetData
from fedmobillm.errors import FedMobiLLMError


def load_run(src: Path, work: Path) -> tuple[dict[str, Any], BenchConfig, list, FleetData]:
    """(results, config, profiles, data) of the run in ``src``; the data written as FedAvg's
    per-device jsonl under ``work/fedavg-data`` (what the FedAvg-shaped methods read)."""
    from benchmarks._common import fleet_profiles, load_fleet_data
    from benchmarks.run import write_fedavg_data

    path = src / "results.json"
    if not path.is_file():
        raise FedMobiLLMError(
            f"{path} does not exist", hint=f"run benchmarks.run --out {src} first"
        )
    res = json.loads(path.read_text())
    c = res["config"]
    cfg = BenchConfig(**{k: v for k, v in c.items() if k in BenchConfig.__dataclass_fields__})
    profiles: list[DeviceProfile] = fleet_profiles(cfg)
    if [p.name for p in profiles] != [q["name"] for q in res["profiles"]]:
        raise FedMobiLLMError(
            f"{src}'s fleet was given by --profile files, which --from does not read back",
            hint="rerun benchmarks.run with the method in --methods instead",
        )
    data = load_fleet_data(cfg)
    write_fedavg_data(data, work / "fedavg-data")
    return res, cfg, profiles, data
