"""Fixtures of the benchmark tests: a two-device fleet on a tiny random BERT (the MeZO and
heterogeneous-rank LoRA rivals, issue 22)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class TinyFleet:
    model_dir: str  # benchmarks._selftest's tiny BERT (2 layers, width 32)
    data_dir: Path  # device-0.jsonl (8 records), device-1.jsonl (12), validation, test (6 each)
    profiles: list[dict[str, Any]]  # fast, slow (DeviceProfile dicts)


@pytest.fixture(scope="session")
def tiny_fleet(tmp_path_factory: pytest.TempPathFactory) -> TinyFleet:
    from benchmarks import _fedavg as FA
    from benchmarks._common import BenchConfig, fleet_profiles
    from benchmarks._selftest import records, tiny_model

    work = tmp_path_factory.mktemp("tiny-fleet")
    model = str(tiny_model(work / "tiny-bert"))
    data = work / "data"
    data.mkdir()
    for name, n, seed in (("device-0", 8, 0), ("device-1", 12, 1), ("validation", 6, 5)):
        FA.write_records(data / f"{name}.jsonl", records(n, seed))
    FA.write_records(data / "test.jsonl", records(6, 6))
    profiles = fleet_profiles(BenchConfig.for_mode("quick"))
    return TinyFleet(model, data, [asdict(profiles[0]), asdict(profiles[-1])])
