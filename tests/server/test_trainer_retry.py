"""Trainer resilience (issue 17): `fedmobillm train` on PostgreSQL beside `fedmobillm serve
--no-train --database ...` outlives its connections being terminated (pg_terminate_backend)
and PostgreSQL itself restarting (immediate shutdown: a crash of the database server): it
says so in its log, retries with backoff, and trains on what devices upload afterwards; it
never stops on a transient database error."""

from __future__ import annotations

import time

import httpx
import psycopg
import pytest
from server_helpers import FAST, make_payload, register
from test_postgres import PgServer, postgres  # noqa: F401 - the module's PostgreSQL fixture
from train_helpers import start_ingest_only, tiny_manifest, wait_for
from train_helpers import trainer_status as _status

pytestmark = pytest.mark.integration

# the server between database connections answers errors or partial status: ask again
_BETWEEN_CONNECTIONS = (httpx.HTTPError, KeyError, ValueError)


def _wait(pred, timeout: float, what: str):
    return wait_for(pred, timeout, what, transient=_BETWEEN_CONNECTIONS)


def _upload(url: str, reg: dict, body: bytes) -> None:
    """POST until acknowledged (the server may answer 5xx while PostgreSQL restarts)."""
    headers = {
        "Authorization": f"Bearer {reg['token']}",
        "Content-Type": "application/octet-stream",
    }
    last = ""

    def once() -> bool:
        nonlocal last
        r = httpx.post(f"{url}/v1/batches", content=body, headers=headers, timeout=30)
        last = f"{r.status_code} {r.text[:200]}"
        return r.status_code == 200

    _wait(once, 120, f"an acknowledgement (last answer {last})")


def _restart(pg) -> None:
    """Immediate shutdown (no checkpoint: a crash) and start on the same files."""
    pg._run(str(pg.bindir / "pg_ctl"), "-D", str(pg.data), "-m", "immediate", "stop")
    time.sleep(2.0)
    options = f"-k {pg.root} -c listen_addresses=127.0.0.1 -p {pg.port}"
    pg._run(
        str(pg.bindir / "pg_ctl"), "-D", str(pg.data), "-o", options,
        "-l", str(pg.root / "log"), "-w", "-t", "60", "start",
    )  # fmt: skip


def test_trainer_retries_through_terminated_connections_and_a_restart(postgres, tmp_path):  # noqa: F811
    url = postgres.database()
    data = tmp_path / "data"
    srv = PgServer(data, FAST, url, workers=1)
    trainer = start_ingest_only(srv, database=url)
    m = tiny_manifest()
    try:
        reg = register(srv.url, "a", m)
        trainer.start()
        arch = reg["architecture"]
        sent = 0

        def send(n: int) -> None:
            nonlocal sent
            _upload(srv.url, reg, make_payload(reg, m, range(sent, sent + n), seed=sent))
            sent += n

        def trained_on_all() -> bool:
            st = _status(srv.url)
            return st["architectures"][arch]["train"] == sent and st["database_retry"] is None

        send(64)
        _wait(trained_on_all, 180, "the trainer to read the first uploads")
        # 1. every connection of the database dropped (the trainer's slot too)
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (url.rsplit("/", 1)[1],),
            ).fetchone()[0]
        assert killed >= 2
        _wait(lambda: "trainer: database error" in trainer.log(), 60, "the trainer's retry")
        send(64)
        _wait(trained_on_all, 180, "training on uploads after the terminated connections")
        # 2. PostgreSQL crashes and comes back
        _restart(postgres)
        send(64)
        _wait(trained_on_all, 180, "training on uploads after the restart")
        assert trainer.running, trainer.log()[-3000:]
        log = trainer.log()
        assert log.count("trainer: database error") >= 2, log[-3000:]
        assert "the database is back" in log
        st = _status(srv.url)
        assert st["process"]["command"] == "train" and st["error"] is None
        step = st["step"]
        _wait(lambda: _status(srv.url)["step"] > step, 60, "steps after the restart")
    finally:
        trainer.kill()
        srv.stop()
