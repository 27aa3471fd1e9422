"""The PostgreSQL store (issue 17) against a real PostgreSQL the tests start (pg_helpers):
the store contract (idempotent re-send, duplicate sample ids skipped, exactly-once
acknowledgement under concurrent re-sends, token rows, the same bytes as SQLite), the training
cursor that never skips a transaction committed late, and a real `fedmobillm serve --database
... --workers 2` that ingests, trains, and loses or duplicates no acknowledged sample across
kill -9 cycles. `--workers 2` on SQLite is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from pg_helpers import Postgres, pg_bin
from server_helpers import (
    FAST,
    LABELS,
    ServerProc,
    admin_headers,
    make_manifest,
    make_payload,
    register,
)
from test_crash import Device, latest_checkpoint, trainer_status, wait_for
from test_tokens import token_batch, token_manifest

from benchmarks.bench_crash import kill_worker
from fedmobillm.device_runtime.serde import encode_batch
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.errors import Conflict
from fedmobillm.server.service import Service
from fedmobillm.server.settings import load_settings
from fedmobillm.server.store import Store, open_store

KILLS = 2  # kill -9 cycles here (a start costs ~15 s of imports on a loaded machine)


@pytest.fixture(scope="module")
def postgres():
    bindir = pg_bin()
    if bindir is None:
        msg = "Debian's postgresql is not installed (/usr/lib/postgresql/*/bin/initdb)"
        if os.environ.get("CI"):
            pytest.fail(msg + "; .ci/run installs it")
        pytest.skip(msg + ": apt-get install postgresql")
    pg = Postgres(bindir).start()
    yield pg
    pg.stop()


@pytest.fixture
def pg_store(postgres):
    from fedmobillm.server.store_pg import PostgresStore

    store = PostgresStore(postgres.database())
    yield store
    store.close()


def _device(service: Service, reg: dict):
    return service.store.device(reg["device_id"])


# -- the store contract ----------------------------------------------------------------


def test_idempotent_resend_skips_duplicates_and_stores_what_sqlite_stores(pg_store, tmp_path):
    """A re-sent key returns the original acknowledgement; sample ids already stored are
    skipped; a key re-used for other content is a 409; the rows read back for training are
    byte for byte those SQLite reads back for the same uploads."""
    sqlite = Store(tmp_path / "store.sqlite3")
    got = {}
    for name, store in (("postgresql", pg_store), ("sqlite", sqlite)):
        service = Service(store)
        m = make_manifest("tiny-a")
        reg = service.register("a", m, LABELS)
        dev = _device(service, reg)
        first = make_payload(reg, m, range(8), key="k1")
        a1 = service.ingest(dev, first)
        again = service.ingest(dev, first)
        a2 = service.ingest(dev, make_payload(reg, m, range(4, 12), key="k2"))
        with pytest.raises(Conflict, match="idempotency key"):
            service.ingest(dev, make_payload(reg, m, range(20, 24), key="k1"))
        assert (a1["samples"], a1["duplicate"]) == (8, False)
        assert again["duplicate"] and again["batch_id"] == a1["batch_id"]
        assert (a2["samples"], a2["skipped"]) == (4, 4)
        assert a2["device_samples"] == {"train": 12, "validation": 0}
        assert store.totals() == {"devices": 1, "batches": 2, "samples": 12}
        rows = store.read_samples(0)
        assert len(store.read_samples(rows.cursor).ids) == 0
        got[name] = rows
    pg, sq = got["postgresql"], got["sqlite"]
    assert list(pg.sample_ids) == list(sq.sample_ids) == list(range(12))
    for a, b in zip(pg.raw + pg.scales, sq.raw + sq.scales, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert list(pg.labels) == list(sq.labels)
    sqlite.close()


def test_concurrent_resends_are_acknowledged_once(pg_store):
    """Eight connections send the same batch at once: one acknowledgement is new, the seven
    others are the same acknowledgement marked duplicate; every sample is stored once."""
    service = Service(pg_store)
    m = make_manifest("tiny-a")
    reg = service.register("a", m, LABELS)
    dev = _device(service, reg)
    payload = make_payload(reg, m, range(64), key="same")
    start = threading.Barrier(8)

    def send(_: int) -> dict:
        start.wait()
        return service.ingest(dev, payload)

    with ThreadPoolExecutor(8) as pool:
        acks = list(pool.map(send, range(8)))
    assert sum(not a["duplicate"] for a in acks) == 1
    assert len({a["batch_id"] for a in acks}) == 1
    assert pg_store._query("SELECT count(*), count(DISTINCT sample_id) FROM samples") == [(64, 64)]
    assert pg_store.totals()["samples"] == 64


def test_token_rows_unpadded(postgres):
    """A token federation on PostgreSQL: each sample stored unpadded (K * L * d bytes) with
    its real-token count, read back as (K, L, d)."""
    from fedmobillm.server.store_pg import PostgresStore

    store = PostgresStore(postgres.database())
    try:
        service = Service(store, inputs="tokens")
        reg = service.register("phone", token_manifest(), LABELS)
        batch = token_batch(reg, range(6))
        ack = service.ingest(_device(service, reg), encode_batch(batch))
        assert ack["samples"] == 6
        sizes = dict(store._query("SELECT sample_id, length(act) FROM samples"))
        rows = store.read_samples(0)
        for i, sid in enumerate(rows.sample_ids):
            n = int(batch.lengths[sid])
            assert rows.tokens[i] == n and rows.raw[i].shape == (2, n, 16)
            assert sizes[sid] == 2 * n * 16
            assert np.array_equal(rows.raw[i], batch.activations[sid][:, :n])
    finally:
        store.close()


def test_reopening_takes_no_table_lock(pg_store):
    """A worker (re)starting while others ingest or the trainer reads: opening the store on a
    current schema takes no lock on the tables (an ALTER TABLE at every open deadlocked the
    trainer's read against a restarting worker)."""
    import psycopg

    from fedmobillm.server.store_pg import PostgresStore

    with psycopg.connect(pg_store.url) as reader:  # a transaction holding a share lock
        reader.execute("SELECT count(*) FROM samples").fetchone()
        again = PostgresStore(pg_store.url + "?options=-c%20lock_timeout%3D2000")
        again.close()
        reader.rollback()
    from fedmobillm.server.store_pg import SCHEMA_VERSION

    assert pg_store._query("SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]


def test_read_cursor_waits_for_a_transaction_committed_late(pg_store):
    """Ingest A takes row ids first but commits after ingest B: reading "ids above the last
    one seen" would skip A for ever. The cursor holds back until A finished, then yields
    both: every acknowledged row reaches the trainer."""
    service = Service(pg_store)
    m = make_manifest("tiny-a")
    regs = [service.register(n, m, LABELS) for n in ("a", "b")]
    dev_a, dev_b = (_device(service, r) for r in regs)
    x = np.ones((4, 2, 16), np.int8)
    scales = np.full(2, 0.05, np.float32)
    late = pg_store.transaction()
    db = late.__enter__()
    try:
        pg_store.find_ack(db, dev_a.device_id, "late")
        pg_store.insert_samples(
            db, dev_a, "train", "b-late", "int8", x, scales, np.zeros(4), np.arange(4)
        )
        service.ingest(dev_b, make_payload(regs[1], m, range(4), key="early"))
        ids = dict(pg_store._query("SELECT device_id, max(id) FROM samples GROUP BY device_id"))
        assert ids == {dev_b.device_id: ids[dev_b.device_id]}  # A's rows not visible yet
        assert len(pg_store.read_samples(0).ids) == 0  # B waits behind A
    finally:
        late.__exit__(None, None, None)
    rows = pg_store.read_samples(0)
    assert sorted(set(rows.device_ids)) == sorted([dev_a.device_id, dev_b.device_id])
    by_dev = {d: i for d, i in zip(rows.device_ids, rows.ids, strict=True)}
    assert by_dev[dev_a.device_id] < by_dev[dev_b.device_id]  # A: smaller ids, later commit
    assert len(pg_store.read_samples(rows.cursor).ids) == 0


def test_one_trainer_per_database_and_revocation(pg_store, postgres):
    """The trainer slot is taken once per database; quarantine and revocation with deletion
    behave as on SQLite."""
    settings, _ = load_settings(dev=True, database=pg_store.url)
    first = open_store(settings, trainer=True)
    with pytest.raises(FedMobiLLMError, match="another trainer"):
        open_store(settings, trainer=True)
    first.close()
    open_store(settings, trainer=True).close()  # free again once the first closed

    service = Service(pg_store)
    m = make_manifest("tiny-a")
    reg = service.register("a", m, LABELS)
    service.ingest(_device(service, reg), make_payload(reg, m, range(10)))
    assert [pg_store.add_offence(reg["device_id"], "x", 2) for _ in range(2)] == [False, True]
    assert pg_store.quarantined() == {reg["device_id"]}
    assert pg_store.release(reg["device_id"]) and not pg_store.quarantined()
    revoked = service.revoke(reg["device_id"], delete_data=True)
    assert revoked["deleted_samples"] == 10
    assert pg_store.data_deleted() == {reg["device_id"]}
    assert pg_store.device_by_token(reg["token"]) is None
    assert pg_store.totals()["samples"] == 0


# -- a real server ---------------------------------------------------------------------


class PgServer(ServerProc):
    """`fedmobillm serve --database URL --workers N` on loopback."""

    def __init__(self, data_dir, settings: dict, database: str, workers: int = 2) -> None:
        super().__init__(data_dir, settings)
        self.args = ["--database", database, "--workers", str(workers)]


def test_workers_are_refused_on_sqlite(tmp_path):
    """SQLite has one writer: `serve --workers 2` without --database exits with a message."""
    done = subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", "serve", "--dev", "--workers", "2",
         "--data-dir", str(tmp_path / "data"), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--workers 2 needs --database postgresql://" in done.stdout + done.stderr


def _acked(devices: list[Device]) -> int:
    return sum(len(d.acked) for d in devices)


def _upload_while(devices: list[Device], url: str, stop: threading.Event) -> list[threading.Thread]:
    def loop(d: Device) -> None:
        while not stop.is_set():
            if not d.upload_one(url):
                return  # server down: the batch stays pending for the next start

    threads = [threading.Thread(target=loop, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    return threads


def _kill_one_worker(srv: PgServer, devices: list[Device]) -> None:
    """SIGKILL one uvicorn worker process (not the group) while devices upload; uvicorn's
    supervisor replaces it. An upload that died with it stays pending: the caller re-sends."""
    acked = _acked(devices)
    stop = threading.Event()
    threads = _upload_while(devices, srv.url, stop)
    wait_for(lambda: _acked(devices) >= acked + 16, 120, "uploads before the worker kill")
    kill_worker(srv, expected=2, timeout=120)
    stop.set()
    for t in threads:
        t.join(30)


@pytest.mark.integration
def test_serve_workers_on_postgres_ingests_trains_and_survives_kill9(postgres, tmp_path):
    """Two ingest workers and one trainer on PostgreSQL: four devices upload concurrently;
    the server is SIGKILLed mid-upload (KILLS times) and restarted, then one worker alone; the trainer checkpoints;
    afterwards every acknowledged sample is stored exactly once and the per-device counts
    match the rows."""
    url = postgres.database()
    data = tmp_path / "data"
    settings = {**FAST, "checkpoint_every": 5, "eval_every": 10_000, "export_every": 10_000}
    srv = PgServer(data, settings, url).start()
    manifests = [make_manifest("tiny-a"), make_manifest("tiny-b", 6, 24, [2, 4, 6])]
    devices = [
        Device(register(srv.url, f"d{i}", manifests[i % 2]), manifests[i % 2], f"d{i}")
        for i in range(4)
    ]
    try:
        for cycle in range(KILLS):
            if cycle:
                srv.start()
            step, acked = latest_checkpoint(data) or 0, _acked(devices)
            stop = threading.Event()
            threads = _upload_while(devices, srv.url, stop)
            wait_for(
                lambda s=step, a=acked: (
                    (latest_checkpoint(data) or 0) > s and _acked(devices) >= a + 32
                ),
                180,
                "a new checkpoint and new uploads",
            )
            srv.kill()  # SIGKILL to the whole process group, uploads in flight
            stop.set()
            for t in threads:
                t.join(30)
        srv.start()
        _kill_one_worker(srv, devices)
        for d in devices:  # re-send what was pending at the kills
            while d.pending is not None:
                assert d.upload_one(srv.url)
        log = srv.log_path.read_text()
        assert "2 worker(s)" in log and log.count("Started server process") >= 2
        r = httpx.get(f"{srv.url}/v1/status", headers=admin_headers(), timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["totals"]["samples"] == sum(len(d.acked) for d in devices)
        # a worker answers with the status the trainer (in the serve process) published
        wait_for(lambda: trainer_status(srv.url).get("step", 0) > 0, 60, "trainer status")
        status = trainer_status(srv.url)
        assert status["running"] and status["published_age_s"] < 30
    finally:
        srv.stop()

    import psycopg

    with psycopg.connect(url) as conn:
        for d in devices:
            stored = [
                r[0]
                for r in conn.execute(
                    "SELECT sample_id FROM samples WHERE device_id = %s", (d.reg["device_id"],)
                )
            ]
            assert len(stored) == len(set(stored)), "a sample is stored twice"
            assert d.acked <= set(stored), (
                f"lost acked samples: {sorted(d.acked - set(stored))[:5]}"
            )
            assert set(stored) <= set(range(d.next_id))
            counted = conn.execute(
                "SELECT coalesce(sum(n), 0) FROM device_counts WHERE device_id = %s",
                (d.reg["device_id"],),
            ).fetchone()[0]
            assert counted == len(stored)
    assert _acked(devices) >= 32 * KILLS
    assert latest_checkpoint(data) > 0
