"""The CI-sized kill -9 bench (issue 17): benchmarks.bench_crash while devices upload.

- `fedmobillm train` beside `serve --no-train` (slow: 3 cycles on SQLite and on PostgreSQL
  with 2 ingest workers; a `serve` start costs 5-8 s of imports on a loaded machine: ~85 s
  per backend): SIGKILL of the trainer and of serve (or one of its workers).
- `serve --trainer-process` (2 cycles on SQLite in CI; 4 on PostgreSQL with 2 workers,
  slow): SIGKILL of the trainer child (its ready standby takes over), and in the second
  cycle of serve itself (its children die of PDEATHSIG; serve is started again and its new
  child waits for the old one's final checkpoint).

Each time: 0 acknowledged samples lost, 0 duplicated, and the trainer resumes from the last
checkpoint. `python -m benchmarks.bench_crash --cycles 10 [--trainer-process]` is the full
run (docs/server.md)."""

from __future__ import annotations

import json

import pytest
from test_postgres import postgres  # noqa: F401 - the module's PostgreSQL fixture

from benchmarks.bench_crash import main

pytestmark = pytest.mark.integration


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill9_cycles_lose_and_duplicate_nothing(backend, request, tmp_path):
    argv = ["--backend", backend, "--cycles", "3", "--devices", "4", "--out", str(tmp_path)]
    if backend == "postgresql":
        argv += ["--database", request.getfixturevalue("postgres").database()]
    assert main(argv) == 0
    report = json.loads((tmp_path / "crash.json").read_text())
    (r,) = report["backends"]
    assert r["lost"] == 0 and r["duplicated"] == 0 and r["stored_never_sent"] == 0
    assert r["acked_samples"] >= 3 * 32 and r["stored_samples"] == r["acked_samples"]
    assert all(c["resumed_ok"] for c in r["cycles"]), r["cycles"]
    kinds = [k for c in r["cycles"] for k in c["killed"]]
    assert kinds.count("trainer") == 3
    if backend == "postgresql":
        assert "worker" in kinds and "serve" in kinds
    assert "| lost |" in (tmp_path / "crash.md").read_text()


def _check_trainer_process_run(tmp_path, cycles: int) -> dict:
    report = json.loads((tmp_path / "crash.json").read_text())
    (r,) = report["backends"]
    assert r["trainer_process"] and r["standby"]
    assert r["lost"] == 0 and r["duplicated"] == 0 and r["stored_never_sent"] == 0
    assert r["stored_samples"] == r["acked_samples"] >= cycles * 32
    assert all(c["resumed_ok"] for c in r["cycles"]), r["cycles"]
    kinds = [c["killed"][0] for c in r["cycles"]]
    assert kinds.count("trainer child") == cycles and kinds.count("serve") == cycles // 2
    child = [c for c in r["cycles"] if c["killed"] == ["trainer child"]]
    assert all(c["took_over"] for c in child), child  # the ready standby took over each time
    for c in r["cycles"]:
        assert c["first_step_s"] > 0 and c["status_s"] > 0 and c["new_pid"] > 0
    assert "| standby took over |" in (tmp_path / "crash.md").read_text()
    return r


def test_kill9_of_the_trainer_child_and_of_serve_loses_nothing(tmp_path):
    argv = ["--backend", "sqlite", "--trainer-process", "--cycles", "2", "--devices", "4",
            "--min-acked", "16", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    _check_trainer_process_run(tmp_path, 2)


@pytest.mark.slow
def test_kill9_of_the_trainer_child_and_of_serve_on_postgresql(postgres, tmp_path):  # noqa: F811
    argv = ["--backend", "postgresql", "--trainer-process", "--cycles", "4", "--devices", "4",
            "--database", postgres.database(), "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert _check_trainer_process_run(tmp_path, 4)["workers"] == 2
