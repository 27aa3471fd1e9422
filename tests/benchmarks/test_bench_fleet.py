"""bench_fleet end to end with a handful of devices on Ray against a real server."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray", reason="bench_fleet needs ray (the bench extra)")


@pytest.mark.slow
def test_bench_fleet_writes_its_report(tmp_path):
    """Prepare: 6 devices, 2 Ray actors, 6 s, a server that admits 2 uploads at a time (so
    some 429s are likely, and each is retried). Execute: the benchmark's main. Assert: the
    report's files exist; every response is a 200 or a 429; samples were acknowledged; the
    timeline and the status polls cover the run."""
    from benchmarks import bench_fleet

    out = tmp_path / "out"
    rc = bench_fleet.main(
        ["--devices", "6", "--duration", "6", "--register-s", "4", "--jitter", "1",
         "--poll", "1", "--set", "max_inflight_uploads=2", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "fleet.json").read_text())
    (row,) = report["rows"]
    assert row["devices"] == 6 and row["acked_samples"] > 0
    assert row["errors"] == 0 and row["timeouts"] == 0 and row["failures"] == {}
    assert row["server_cpu_ms_per_ack"] > 0 and row["server_cpu_cores"] > 0
    assert row["acked_batches"] + round(row["share_429"] * row["responses"]) == row["responses"]
    assert len(row["timeline"]) == 6 and row["polled"]
    assert (out / "fleet.png").stat().st_size > 0 and "| 6 |" in (out / "fleet.md").read_text()
