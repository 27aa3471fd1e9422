"""`fedmobillm train` on PostgreSQL (issue 17 review), real processes on a real PostgreSQL:

- the PostgreSQL variant of test_train_process: `serve --no-train --workers 2` and a real
  `fedmobillm train` on one database: the trainer trains on the uploads, `/v1/status` of the
  workers names it, the personal model served is its export, and a second trainer is refused
  and publishes nothing (the status row stays the live trainer's);
- a trainer whose connections drop on its side (a network cut: PostgreSQL keeps its backends,
  the trainer slot's advisory lock included, until it notices) takes its own slot back when
  it reconnects (the old code refused it: "another trainer is running", and it stopped),
  ending with it its pool's and publisher's backends cut at the same time (one of them cut
  inside a write transaction blocked every ingest until PostgreSQL saw it die), never
  another owner's, while another trainer is still refused; a holder that exits between the
  failed try-lock and the look-up is no refusal; the refusal says how to end a gone one."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time

import httpx
import psycopg
import pytest
from server_helpers import FAST, register
from test_postgres import PgServer, postgres  # noqa: F401 - the module's PostgreSQL fixture
from train_helpers import (
    TrainerProc,
    assert_refused_publishing_nothing,
    assert_served_model_is_the_trainers,
    start_ingest_only,
    tiny_manifest,
    upload_train_and_validation,
    wait_for,
    wait_trained_and_exported,
)
from train_helpers import trainer_status as _status

from fedmobillm.server.service import Service
from fedmobillm.server.store import TrainerSlotTaken, is_transient
from fedmobillm.server.store_pg import (
    TRAINER_APP,
    TRAINER_DATA_APP,
    TRAINER_LOCK,
    WRITE_LOCK,
    PostgresStore,
)

pytestmark = pytest.mark.integration


def _published(url: str) -> dict | None:
    """The trainer status row as published in the database (None before any)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'trainer_status'").fetchone()
    return json.loads(row[0]) if row else None


def _slot_holder(url: str) -> tuple[int, str] | None:
    """(backend pid, application_name) of the session holding the trainer slot, or None."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT l.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a "
            "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.objid = %s "
            "AND l.objsubid = 1 AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())",
            (TRAINER_LOCK & 0xFFFFFFFF,),
        ).fetchone()


def test_pg_trainer_process_trains_beside_ingest_workers(postgres, tmp_path):  # noqa: F811
    url = postgres.database()
    data = tmp_path / "data"
    srv = PgServer(data, FAST, url, workers=2)
    trainer = start_ingest_only(srv, database=url)
    try:
        assert _status(srv.url)["running"] is False  # nothing published yet
        m = tiny_manifest()
        reg = register(srv.url, "a", m)
        auth = {"Authorization": f"Bearer {reg['token']}"}
        upload_train_and_validation(srv.url, reg, m)
        assert httpx.get(f"{srv.url}/v1/personal-model", headers=auth).status_code == 409
        trainer.start()
        st = wait_trained_and_exported(srv.url, 240)
        assert st["process"]["command"] == "train" and st["process"]["pid"] == trainer.proc.pid
        assert st["published_age_s"] < 30 and st["database_retry"] is None
        holder = _slot_holder(url)
        assert holder is not None and holder[1].startswith(TRAINER_APP + " "), holder
        assert_served_model_is_the_trainers(srv.url, reg)
        assert_refused_publishing_nothing(
            trainer.command(), lambda: _published(url), trainer.proc.pid
        )
        assert trainer.stop() == 0  # SIGTERM: final checkpoint and export
        latest = json.loads((data / "checkpoints" / "LATEST").read_text())
        assert latest["step"] >= st["step"]
        assert "final checkpoint (step" in trainer.log()
    finally:
        trainer.kill()
        srv.stop()


class DropProxy:
    """A loopback TCP proxy to PostgreSQL. ``drop_clients()`` cuts every connection open now
    on the client's side only: the client sees its connection gone, PostgreSQL sees nothing
    (its side stays open) and keeps the backend, and whatever locks it holds, alive."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[dict] = []
        self.closed = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            pair = {"client": client, "upstream": upstream, "dropped": False}
            with self._lock:
                self.pairs.append(pair)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(pair, src, dst), daemon=True).start()

    def _pump(self, pair: dict, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        if not pair["dropped"] and not self.closed:  # an ordinary close: pass it on
            for s in (pair["client"], pair["upstream"]):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def drop_clients(self) -> int:
        with self._lock:
            live = [p for p in self.pairs if not p["dropped"]]
            for pair in live:
                pair["dropped"] = True
                with contextlib.suppress(OSError):
                    pair["client"].shutdown(socket.SHUT_RDWR)
        return len(live)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self._lock:
            for pair in self.pairs:
                for s in (pair["client"], pair["upstream"]):
                    with contextlib.suppress(OSError):
                        s.close()


def test_trainer_takes_back_its_own_slot_after_its_connections_drop(postgres, tmp_path):  # noqa: F811
    url = postgres.database()
    Service(PostgresStore(url)).store.close()  # what `serve` records at its start
    proxy = DropProxy(postgres.port)
    via_proxy = url.replace(f":{postgres.port}/", f":{proxy.port}/")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(FAST))
    trainer = TrainerProc(tmp_path / "data", config, database=via_proxy).start()
    try:
        wait_for(
            lambda: (_published(url) or {}).get("process", {}).get("pid") == trainer.proc.pid,
            120,
            "the trainer's first status",
        )
        before = _slot_holder(url)
        assert before is not None and before[1].startswith(TRAINER_APP + " "), before
        data_app = f"{TRAINER_DATA_APP} {before[1].split()[-1]}"  # its pool and publisher
        stale = {pid for pid, app in _backends(url).items() if app == data_app}
        assert stale, _backends(url)
        cut = time.time()
        assert proxy.drop_clients() >= 2  # the slot's session and the pool's
        wait_for(lambda: "trainer: database error" in trainer.log(), 60, "the trainer's retry")
        after = wait_for(
            lambda: (h := _slot_holder(url)) is not None and h[0] != before[0] and h,
            90,
            f"the trainer to take its slot back; log: {trainer.log()[-1500:]}",
        )
        assert after[1] == before[1]  # the same trainer (owner id), a new session
        # its data and publisher backends cut with the slot's were ended with it, not left
        # alive on the server (where one cut inside a write transaction blocks every ingest)
        assert not stale & set(_backends(url)), (stale, _backends(url))
        wait_for(
            lambda: (
                (s := _published(url) or {}).get("published", 0) > cut + 1
                and s["database_retry"] is None
                and s["running"]
            ),
            60,
            "a fresh status after the reconnect",
        )
        assert trainer.running, trainer.log()[-3000:]
        # it found the slot still held by its old backend (PostgreSQL had not noticed the cut)
        assert f"own previous session (backend pid {before[0]};" in trainer.log()
        # another trainer (another owner) is still refused, directly or through the proxy
        second = subprocess.run(
            TrainerProc(tmp_path / "data", config, database=url).command(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert second.returncode != 0
        assert "another trainer is running" in second.stdout + second.stderr
        assert _slot_holder(url) == after and trainer.running
        assert trainer.stop() == 0
    finally:
        trainer.kill()
        proxy.close()


def _backends(url: str) -> dict[int, str]:
    """pid -> application_name of every backend of the database."""
    with psycopg.connect(url, autocommit=True) as conn:
        return dict(
            conn.execute(
                "SELECT pid, application_name FROM pg_stat_activity "
                "WHERE datname = current_database()"
            ).fetchall()
        )


def test_take_back_ends_every_stale_backend_of_its_owner_and_no_other(postgres):  # noqa: F811
    """A cut that lands inside a write transaction of the trainer's pool (add_offence: the
    exclusive write lock) leaves that backend alive on the server; the take-back ends it with
    the slot session, so ingest no longer waits behind it (for ~2 h, until PostgreSQL sees
    the dead peer). Another owner's trainer connections and anyone else's are left alone."""
    url = postgres.database()
    PostgresStore(url).close()
    owner = "abc123"

    def session(name: str) -> psycopg.Connection:
        return psycopg.connect(url, autocommit=True, application_name=name)

    stale_slot = session(f"{TRAINER_APP} {owner}")
    stale_slot.execute("SELECT pg_advisory_lock(%s)", (TRAINER_LOCK,))
    stale_pool = session(f"{TRAINER_DATA_APP} {owner}")
    stale_pool.execute("BEGIN")
    stale_pool.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
    stale_pool.execute("INSERT INTO meta VALUES ('cut', 'mid-transaction')")
    others = [session(f"{TRAINER_DATA_APP} someone-else"), session("psql")]
    # the trainer reconnects: a fresh store named for the same owner takes its slot back
    store = PostgresStore(url, application_name=f"{TRAINER_DATA_APP} {owner}")
    try:
        store.claim_trainer(owner)
        alive = _backends(url)
        assert stale_slot.info.backend_pid not in alive
        assert stale_pool.info.backend_pid not in alive
        for conn in others:  # never another owner's or anyone else's
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(url, autocommit=True) as ingest:  # not blocked any more
            ingest.execute("SET lock_timeout = '2s'")
            with ingest.transaction():
                ingest.execute("SELECT pg_advisory_xact_lock_shared(%s)", (WRITE_LOCK,))
        assert store.get_meta("cut") is None  # the cut transaction rolled back
        # the store's own connections: named for the owner, with client TCP keepalives
        assert _slot_holder(url)[1] == f"{TRAINER_APP} {owner}"
        assert f"{TRAINER_DATA_APP} {owner}" in _backends(url).values()
        conn = store._idle.get_nowait()
        params = conn.info.get_parameters()
        store._idle.put(conn)
        assert (params["keepalives_idle"], params["keepalives_interval"]) == ("30", "10")
        assert params["keepalives_count"] == "3"
    finally:
        store.close()
        for conn in [stale_slot, stale_pool, *others]:
            conn.close()


def test_a_holder_gone_before_the_look_up_is_not_another_trainer(postgres, monkeypatch):  # noqa: F811
    """The slot's holder exits between the failed try-lock and the look-up of who holds it:
    the slot is free, and the trainer takes it (the old code found no holder and refused,
    not transient: the trainer stopped for good)."""
    url = postgres.database()
    PostgresStore(url).close()
    holder = psycopg.connect(url, autocommit=True, application_name=f"{TRAINER_APP} gone")
    holder.execute("SELECT pg_advisory_lock(%s)", (TRAINER_LOCK,))
    reclaim = PostgresStore._reclaim_trainer

    def holder_exits_first(self, conn, name, owner):
        holder.close()  # the holder's backend exits right after the try-lock failed
        wait_for(lambda: _slot_holder(url) is None, 10, "the holder's backend to exit")
        return reclaim(self, conn, name, owner)

    monkeypatch.setattr(PostgresStore, "_reclaim_trainer", holder_exits_first)
    store = PostgresStore(url)
    try:
        store.claim_trainer("another-owner")
        assert _slot_holder(url)[1] == f"{TRAINER_APP} another-owner"
    finally:
        store.close()


def test_another_trainer_is_refused_with_how_to_end_a_gone_one(postgres):  # noqa: F811
    """The refusal (TrainerSlotTaken, not transient) names the holder's backend pid and how
    to end its session if that trainer is gone."""
    url = postgres.database()
    PostgresStore(url).close()
    first = PostgresStore(url)
    first.claim_trainer("first")
    pid = _slot_holder(url)[0]
    second = PostgresStore(url)
    try:
        with pytest.raises(TrainerSlotTaken, match="another trainer is running") as info:
            second.claim_trainer("second")
        assert not is_transient(info.value)
        assert f"SELECT pg_terminate_backend({pid})" in str(info.value)
        assert "wait for TCP keepalive to end its session" in str(info.value)
        assert _slot_holder(url)[0] == pid  # nothing was ended
    finally:
        second.close()
        first.close()
