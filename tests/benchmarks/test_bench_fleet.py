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


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--database", "postgresql://x/y"], "add --backend postgresql"),
        (["--workers", "2"], "SQLite store has one writer"),
        (["--backend", "postgresql", "--database", "postgresql://x/y", "--devices", "32,128"],
         "one fleet size"),
        (["--backend", "postgresql", "--workers", "0"], "at least 1"),
    ],
)  # fmt: skip
def test_bench_fleet_refuses_store_options_that_cannot_work(argv, says, capsys):
    """Each contradictory combination stops before anything starts, saying how to fix it."""
    from benchmarks import bench_fleet

    with pytest.raises(SystemExit) as exc:
        bench_fleet.parse_args(argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.slow
def test_bench_fleet_on_postgresql_with_workers_and_a_trainer_process(tmp_path):
    """Prepare: 6 devices against `serve --no-train --workers 2` on a throwaway PostgreSQL
    and `fedmobillm train` beside it. Execute: the benchmark's main. Assert: uploads are
    acknowledged through the workers with no error, the trainer process steps on them, and
    the report names the store, the workers and the trainer."""
    from benchmarks import bench_fleet

    out = tmp_path / "out"
    rc = bench_fleet.main(
        ["--devices", "6", "--duration", "20", "--register-s", "4", "--jitter", "1",
         "--poll", "1", "--backend", "postgresql", "--trainer", "process", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "fleet.json").read_text())
    assert (report["backend"], report["workers"], report["trainer"]) == ("postgresql", 2, "process")
    (row,) = report["rows"]
    assert row["acked_samples"] > 0 and row["errors"] == 0 and row["timeouts"] == 0
    assert row["polled"][-1]["samples_seen"] > 0  # the separate trainer trained
    assert "store postgresql, 2 ingest worker(s), trainer process" in (out / "fleet.md").read_text()
