"""SQLite group commit (server/store.py ``Store.write``, issue 17): concurrent ingests share
one transaction and one fsync, each in its own savepoint; nothing is acknowledged before the
COMMIT that holds it; a refused ingest fails alone; a failed COMMIT fails the whole group;
exactly-once holds within a group and across groups. Commits are counted from the WAL file
itself (its commit frames), not from the store's own counter."""

from __future__ import annotations

import sqlite3
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import ServerProc, make_manifest, make_payload, register, upload

from fedmobillm.device_runtime.messages import ROUTE_METRICS
from fedmobillm.server.errors import Conflict
from fedmobillm.server.limits import IngestGate, TooManyRequests
from fedmobillm.server.service import Service
from fedmobillm.server.store import Store, WriteWaitExpired

LABELS = ["negative", "positive"]


def wal_commits(db_path: Path) -> int:
    """Commit frames in the SQLite WAL file: one per committed transaction since the WAL
    last restarted (frames whose salts match the header; the commit field is non-zero)."""
    data = (db_path.parent / (db_path.name + "-wal")).read_bytes()
    if len(data) < 32:
        return 0
    page_size = struct.unpack(">I", data[8:12])[0]
    salts = data[16:24]
    commits, pos = 0, 32
    while pos + 24 + page_size <= len(data):
        _, commit_size = struct.unpack(">II", data[pos : pos + 8])
        if data[pos + 8 : pos + 16] != salts:
            break  # a frame of an earlier WAL generation: the end of this one
        commits += commit_size != 0
        pos += 24 + page_size
    return commits


def _store(tmp_path: Path, **bounds: int) -> Store:
    store = Store(tmp_path / "store.sqlite3", **bounds)
    store._db.execute("PRAGMA wal_autocheckpoint=0")  # the WAL keeps every commit frame
    return store


def _run_held(store: Store, calls: list) -> list:
    """Hold the store's write lock while the calls start, each in its own thread, one after
    the other once the previous one waits for a group (so the queue is in call order);
    release it: [result or exception] in call order."""
    out: list = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - returned to the test
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    with store._lock:
        for i, t in enumerate(threads):
            t.start()
            deadline = time.monotonic() + 30
            while len(store._queue) < i + 1:
                assert time.monotonic() < deadline, f"{len(store._queue)} writes queued"
                time.sleep(0.005)
        assert not any(o is not None for o in out), "a write returned while the lock was held"
    for t in threads:
        t.join(30)
    return out


def put_meta(key: str, ran: list[str] | None = None):
    """A write's work: one meta row ``key`` = 'v', the key as its result; ``ran`` records
    that the work ran."""

    def run(db):
        if ran is not None:
            ran.append(key)
        db.execute("INSERT INTO meta VALUES (?, 'v')", (key,))
        return key

    return run


def _stored(store: Store) -> dict[str, list[int]]:
    """device id -> its stored sample ids (each once per row: a duplicate would show)."""
    rows = store.read_samples(0, limit=1_000_000)
    out: dict[str, list[int]] = {}
    for dev, sid in zip(rows.device_ids, rows.sample_ids.tolist(), strict=True):
        out.setdefault(dev, []).append(sid)
    return {d: sorted(ids) for d, ids in out.items()}


def _fleet(store: Store, n: int) -> tuple[Service, list[dict], dict]:
    service = Service(store)
    m = make_manifest()
    regs = [service.register(f"phone-{i}", m, LABELS) for i in range(n)]
    return service, regs, m


def test_concurrent_ingests_share_one_commit_and_get_their_own_acks(tmp_path):
    """Prepare: 16 devices, each with a batch of 8 samples. Execute: the 16 ingests run at
    once while the writer is busy. Assert: one commit frame in the WAL for all of them
    (the old code: 16), each its own acknowledgement (its batch id, 8 samples, not a
    duplicate), every sample stored once; the store's counter agrees with the WAL."""
    store = _store(tmp_path)
    service, regs, m = _fleet(store, 16)
    devices = [store.device(r["device_id"]) for r in regs]
    bodies = [make_payload(r, m, range(i * 8, i * 8 + 8), seed=i) for i, r in enumerate(regs)]
    before = wal_commits(store.path)

    acks = _run_held(
        store, [lambda d=d, b=b: service.ingest(d, b) for d, b in zip(devices, bodies, strict=True)]
    )

    assert all(isinstance(a, dict) for a in acks), acks
    assert wal_commits(store.path) - before == 1
    assert store.write_stats.snapshot() == {"commits": 1, "writes": 16, "largest": 16}
    assert len({a["batch_id"] for a in acks}) == 16
    assert all(a["samples"] == 8 and not a["duplicate"] for a in acks)
    assert all(a["device_samples"] == {"train": 8, "validation": 0} for a in acks)
    assert _stored(store) == {
        r["device_id"]: list(range(i * 8, i * 8 + 8)) for i, r in enumerate(regs)
    }
    assert service.counters.acked_batches == 16 and service.counters.acked_samples == 128
    store.close()


def test_a_refused_ingest_fails_alone_and_the_others_commit(tmp_path):
    """Prepare: device 1 has a batch acknowledged under key "k". Execute: in one group, device
    0's batch, device 1 re-using "k" for other samples (a conflict found inside the
    transaction, after its checks had read the store) and device 2's batch. Assert: the
    conflict is raised to its caller alone; the other two are acknowledged and stored; one
    commit; device 1 still holds only its first batch."""
    store = _store(tmp_path)
    service, regs, m = _fleet(store, 3)
    devices = [store.device(r["device_id"]) for r in regs]
    first = service.ingest(devices[1], make_payload(regs[1], m, range(4), key="k"))
    bodies = [
        make_payload(regs[0], m, range(4), seed=0),
        make_payload(regs[1], m, range(10, 14), key="k"),
        make_payload(regs[2], m, range(4), seed=2),
    ]
    before = wal_commits(store.path)

    out = _run_held(store, [lambda i=i: service.ingest(devices[i], bodies[i]) for i in range(3)])

    assert isinstance(out[1], Conflict) and "was acknowledged for other" in out[1].message
    assert out[0]["samples"] == 4 and out[2]["samples"] == 4
    assert wal_commits(store.path) - before == 1
    held = _stored(store)
    assert held == {
        regs[0]["device_id"]: [0, 1, 2, 3],
        regs[1]["device_id"]: [0, 1, 2, 3],
        regs[2]["device_id"]: [0, 1, 2, 3],
    }
    assert store.device_samples(regs[1]["device_id"]) == {"train": 4, "validation": 0}
    assert store.device_batches(regs[1]["device_id"]) == ["k"]
    assert first["batch_id"] != out[0]["batch_id"]
    assert service.counters.conflicts == 1
    store.close()


def test_a_write_that_raises_is_rolled_back_alone(tmp_path):
    """Store level: three writes in one group, the second writes a row then raises. Its row
    is gone (its savepoint rolled back), the first and third rows are committed, and the
    second's own exception reaches its caller."""
    store = _store(tmp_path)

    def put(key: str, fail: bool = False):
        def work(db):
            db.execute("INSERT INTO meta VALUES (?, 'v')", (key,))
            if fail:
                raise ValueError(f"refused {key}")
            return key

        return lambda: store.write(work, samples=1)

    out = _run_held(store, [put("a"), put("b", fail=True), put("c")])

    assert out[0] == "a" and out[2] == "c"
    assert isinstance(out[1], ValueError) and str(out[1]) == "refused b"
    assert [store.meta(k) for k in "abc"] == ["v", None, "v"]
    assert store.write_stats.snapshot() == {"commits": 1, "writes": 2, "largest": 2}
    store.close()


def test_a_group_whose_writes_all_were_refused_counts_no_commit(tmp_path):
    """Two writes in one group, both refused (their savepoints rolled back): each gets its
    error, nothing is stored, and /metrics' counters show no commit holding uploads."""
    store = _store(tmp_path)

    def refused(key: str):
        def work(db):
            db.execute("INSERT INTO meta VALUES (?, 'v')", (key,))
            raise ValueError(f"refused {key}")

        return lambda: store.write(work, samples=1)

    out = _run_held(store, [refused("a"), refused("b")])

    assert [str(o) for o in out] == ["refused a", "refused b"]
    assert store.meta("a") is None and store.meta("b") is None
    assert store.write_stats.snapshot() == {"commits": 0, "writes": 0, "largest": 0}
    store.close()


def test_a_failed_commit_fails_every_write_of_its_group(tmp_path):
    """Prepare: a group whose last write takes 0.3 s and leaves a deferred foreign-key
    violation, so that the COMMIT fails (every savepoint succeeded). Assert: all three
    writers get the commit's error, the first two included (an implementation answering a
    write before its COMMIT returned answers them during the 0.3 s), none of their rows is
    stored, and the store takes the next write normally."""
    store = _store(tmp_path)

    def bad(db):
        time.sleep(0.3)
        db.execute("PRAGMA defer_foreign_keys=ON")
        db.execute(
            "INSERT INTO batches (batch_id, device_id, idempotency_key, split, samples, ack, "
            "created) VALUES ('b-x', 'dev-none', 'k', 'train', 0, '{}', 0)"
        )
        return "bad"

    def good(key: str):
        def work(db):
            db.execute("INSERT INTO meta VALUES (?, 'v')", (key,))
            return key

        return work

    before = wal_commits(store.path)
    out = _run_held(
        store,
        [
            lambda: store.write(good("x"), samples=1),
            lambda: store.write(good("y"), samples=1),
            lambda: store.write(bad, samples=1),
        ],
    )

    assert all(isinstance(o, sqlite3.IntegrityError) for o in out), out
    assert "FOREIGN KEY" in str(out[0])
    # each writer its own exception (raised in its own thread: its own traceback), chained
    # to the one the COMMIT raised, which none of them re-raised
    assert len({id(o) for o in out}) == 3
    cause = out[0].__cause__
    assert isinstance(cause, sqlite3.IntegrityError) and all(o.__cause__ is cause for o in out)
    assert all(o.sqlite_errorcode == cause.sqlite_errorcode for o in out)
    assert all(o.__traceback__ is not cause.__traceback__ for o in out)
    assert wal_commits(store.path) == before
    assert store.meta("x") is None and store.meta("y") is None
    assert store._query("SELECT count(*) FROM batches") == [(0,)]
    assert store.write_stats.snapshot()["commits"] == 0
    assert store.write(good("z"), samples=1) == "z" and store.meta("z") == "v"
    store.close()


def test_a_resend_racing_its_original_in_one_group_gets_the_original_ack(tmp_path):
    """Prepare: one batch under key "k". Execute: it and its re-send (same bytes) in one
    group, then a third re-send in a later group. Assert: one is stored (duplicate False),
    the others answered with its acknowledgement (same batch id, duplicate True); the
    samples are stored once."""
    store = _store(tmp_path)
    service, regs, m = _fleet(store, 1)
    device = store.device(regs[0]["device_id"])
    body = make_payload(regs[0], m, range(6), key="k")

    out = _run_held(store, [lambda: service.ingest(device, body) for _ in range(2)])
    later = service.ingest(device, body)

    assert all(isinstance(o, dict) for o in out), out
    assert sorted(o["duplicate"] for o in out) == [False, True]
    assert {o["batch_id"] for o in out} == {later["batch_id"]} and later["duplicate"]
    assert all(o["samples"] == 6 for o in [*out, later])
    assert store.device_samples(device.device_id) == {"train": 6, "validation": 0}
    assert store._query("SELECT count(*) FROM batches") == [(1,)]
    assert service.counters.duplicate_batches == 2
    store.close()


def test_groups_keep_their_bounds(tmp_path):
    """10 queued writes with group_max 4 commit in groups of at most 4 (3 commits); with
    group_samples 10, writes of 4 samples go 2 a group, and one larger than the bound alone."""
    store = _store(tmp_path / "a", group_max=4)

    def put(key: str, samples: int):
        return lambda: store.write(put_meta(key), samples=samples)

    before = wal_commits(store.path)
    out = _run_held(store, [put(f"k{i}", 1) for i in range(10)])
    assert out == [f"k{i}" for i in range(10)]
    assert wal_commits(store.path) - before == 3
    assert store.write_stats.snapshot() == {"commits": 3, "writes": 10, "largest": 4}
    store.close()

    store = _store(tmp_path / "b", group_samples=10)
    out = _run_held(store, [put(f"s{i}", 4) for i in range(4)] + [put("big", 50)])
    assert out == ["s0", "s1", "s2", "s3", "big"]
    assert store.write_stats.snapshot() == {"commits": 3, "writes": 5, "largest": 2}
    store.close()


def test_one_write_a_commit_when_group_max_is_1(tmp_path):
    """group_max 1 is the old behaviour: a transaction per write, whatever is waiting. Four
    writes start while the write lock is held, so they are all waiting at once (with group
    commit on they would share one commit: checked beside it)."""
    for group_max, commits in ((1, 4), (64, 1)):
        store = _store(tmp_path / str(group_max), group_max=group_max)

        def put(key: str, store: Store = store):
            return store.write(put_meta(key), samples=1)

        out: dict[str, object] = {}
        threads = [
            threading.Thread(target=lambda k=k, out=out: out.setdefault(k, put(k))) for k in "abcd"
        ]
        before = wal_commits(store.path)
        with store._lock:
            for t in threads:
                t.start()
            time.sleep(0.5)  # every writer is waiting: for the lock (1) or in the queue (64)
            assert not out, "a write returned while the lock was held"
        for t in threads:
            t.join(30)
        assert out == {k: k for k in "abcd"}
        assert wal_commits(store.path) - before == commits, group_max
        assert store.write_stats.snapshot()["commits"] == commits
        store.close()


def test_a_leader_that_fails_before_its_group_leaves_its_own_write_unrun(tmp_path):
    """The leader raises before taking its own write into a group (here: _lead fails at
    once): its write is withdrawn from the queue, not left there for a later group to commit
    unacknowledged; the next write commits alone."""
    store = _store(tmp_path)
    ran: list[str] = []

    lead = store._lead
    store._lead = lambda: (_ for _ in ()).throw(RuntimeError("leader failed"))
    with pytest.raises(RuntimeError, match="leader failed"):
        store.write(put_meta("lost", ran), samples=1)
    assert not store._queue and not store._leading
    store._lead = lead
    assert store.write(put_meta("next", ran), samples=1) == "next"
    assert ran == ["next"] and store.meta("lost") is None and store.meta("next") == "v"
    store.close()


def test_a_write_waiting_past_its_budget_is_withdrawn_unrun(tmp_path):
    """Prepare: the writer is busy (a group's leader waits for the write lock). Execute: a
    write with a 0.2 s budget, alone and through the IngestGate's write slot. Assert:
    WriteWaitExpired / 429 after ~0.2 s, its work never ran (nothing stored); the leader's
    write commits once the writer is free."""
    store = _store(tmp_path)
    ran: list[str] = []

    gate = IngestGate(8, 0.2, 0, 1, write_slots=8)
    leader: list = []
    with store._lock:
        t = threading.Thread(target=lambda: leader.append(store.write(put_meta("lead", ran), 1)))
        t.start()
        while not store._leading:
            time.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(WriteWaitExpired, match="waited 0.2 s"):
            store.write(put_meta("late", ran), 1, wait_s=0.2)
        waited = time.monotonic() - t0
        with pytest.raises(TooManyRequests, match="group commit"):
            with gate.write_slot() as left:
                assert 0 < left <= 0.2
                store.write(put_meta("gated", ran), 1, wait_s=left)
        assert list(store._queue) != [] and len(store._queue) == 1  # the leader's own
    t.join(30)
    assert 0.2 <= waited < 5
    assert leader == ["lead"] and ran == ["lead"]
    assert store.meta("late") is None and store.meta("gated") is None
    assert gate.stats()["refused"]["write_wait"] == 1
    store.close()


def _metric(url: str, name: str) -> int:
    text = httpx.get(f"{url}{ROUTE_METRICS}", timeout=10).text
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return int(float(line.split()[1]))


@pytest.mark.integration
def test_sigkill_mid_groups_loses_no_acknowledged_sample(tmp_path):
    """Prepare: a real `fedmobillm serve --no-train` (group commit on, the default); 16
    devices upload batches of 8 from their own threads without pause, each re-sending its
    unacknowledged batch as is. Execute: 3 cycles of: wait until groups of several uploads
    commit (``/metrics``: fewer commits than committed uploads) and 64 more samples are
    acknowledged, SIGKILL the server (its process group) mid-flight, restart it. Assert:
    every acknowledged sample is stored, none twice, nothing stored that was never sent."""
    srv = ServerProc(tmp_path / "data", {"train": False}).start()
    m = make_manifest()
    regs = [register(srv.url, f"g{i}", m) for i in range(16)]
    acked: list[set[int]] = [set() for _ in regs]
    sent: list[int] = [0] * len(regs)
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []

    def device(i: int) -> None:
        body, ids = None, []
        while not stop.is_set():
            if body is None:
                ids = list(range(sent[i], sent[i] + 8))
                body = make_payload(regs[i], m, ids, seed=i)
                sent[i] += 8
            try:
                r = upload(srv.url, regs[i], body, timeout=15)
            except httpx.HTTPError:
                time.sleep(0.05)  # down: re-send the same bytes once it is back
                continue
            if r.status_code == 200:
                with lock:
                    acked[i].update(ids)
                body = None
            elif r.status_code != 429:
                errors.append(f"{r.status_code} {r.text}")
                return
        while body is not None:  # flush: the pending batch is acknowledged (or was before)
            r = upload(srv.url, regs[i], body, timeout=30)
            if r.status_code == 200:
                with lock:
                    acked[i].update(ids)
                body = None

    threads = [threading.Thread(target=device, args=(i,)) for i in range(len(regs))]
    for t in threads:
        t.start()
    grouped = []
    try:
        for _ in range(3):
            with lock:
                goal = sum(len(a) for a in acked) + 64
            deadline = time.monotonic() + 120
            while True:
                assert time.monotonic() < deadline and not errors, errors
                with lock:
                    done = sum(len(a) for a in acked)
                commits = _metric(srv.url, "fedmobillm_ingest_commits_total")
                uploads = _metric(srv.url, "fedmobillm_ingest_committed_uploads_total")
                if done >= goal and uploads > commits:
                    break
                time.sleep(0.05)
            grouped.append(_metric(srv.url, "fedmobillm_ingest_largest_group"))
            srv.kill()  # uploads in flight, a group may be mid-commit
            srv.start()
        stop.set()
        for t in threads:
            t.join(120)
    finally:
        stop.set()
        srv.stop()
    assert not errors, errors
    assert all(g > 1 for g in grouped), grouped
    db = sqlite3.connect(srv.data_dir / "store.sqlite3")
    for reg, ack, n in zip(regs, acked, sent, strict=True):
        rows = db.execute(
            "SELECT sample_id FROM samples WHERE device_id = ?", (reg["device_id"],)
        ).fetchall()
        stored = [r[0] for r in rows]
        assert len(stored) == len(set(stored)), "a sample is stored twice"
        assert ack <= set(stored), f"lost acked samples: {sorted(ack - set(stored))[:5]}"
        assert set(stored) <= set(range(n))
    db.close()
