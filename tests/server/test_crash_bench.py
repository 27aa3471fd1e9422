"""The CI-sized kill -9 bench (issue 17): benchmarks.bench_crash with 3 cycles on SQLite and
on PostgreSQL (2 ingest workers): SIGKILL of `fedmobillm train` and of `serve --no-train`
(or one of its workers) while devices upload. 0 acknowledged samples lost, 0 duplicated,
and the trainer resumes from its last checkpoint each time. Slow (a `serve` start costs
5-8 s of imports on a loaded machine: ~85 s per backend); `python -m benchmarks.bench_crash
--cycles 10` is the full run (docs/server.md)."""

from __future__ import annotations

import json

import pytest
from test_postgres import postgres  # noqa: F401 - the module's PostgreSQL fixture

from benchmarks.bench_crash import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
