"""Durable store: SQLite in WAL mode, activations as per-sample blobs in the same database.

Durability (fsync policy): ``journal_mode=WAL`` with ``synchronous=FULL``. Every ingest runs
in a ``BEGIN IMMEDIATE`` transaction (batch row + its samples); SQLite fsyncs the WAL before
``COMMIT`` returns, and the server acknowledges only after ``COMMIT``. An acknowledged batch
therefore survives a process kill and (on a file system that honours fsync) a power loss.
WAL checkpoints into the main file are SQLite's automatic ones (fsynced as well).

Group commit (``Store.write``): ingests that arrive while a commit is under way wait in a
queue; the next one to lead takes the queue (up to ``group_max`` writes and
``group_samples`` samples) into one transaction, each write inside its own ``SAVEPOINT`` (a
write that raises is rolled back alone and gets its own error, the others go on), commits
once (one fsync) and only then hands every write its result. A failed ``COMMIT`` (or an
error that ends the whole transaction) fails every write of the group: none is acknowledged.

Uniqueness: ``UNIQUE(device_id, idempotency_key)`` on batches and
``UNIQUE(device_id, split, sample_id)`` on samples. A re-sent batch (same key) returns the
original acknowledgement; samples a device already uploaded under another key are skipped
(counted in the acknowledgement as ``skipped``), so no sample is ever stored twice.

Tokens are stored as sha256 hex digests (they are 256-bit random strings, so no salt is
needed); a token is shown once, at registration.

One ``Store`` object = one write connection guarded by a lock and one read connection (WAL
readers do not wait for the writer's commit, so uploads are authenticated and checked while a
group commits): the API shares one, the trainer opens its own.

The store API itself (devices, batches, samples, flags, views) is ``store_sql.SqlStore``,
shared with the PostgreSQL backend (``store_pg.PostgresStore``, ``--database
postgresql://...``); ``open_store(settings)`` picks the backend.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.store_sql import (
    READ_COLUMNS,
    SAMPLE_ORDER_INDEX,
    Device,
    SampleRows,
    SqlStore,
    WriteStats,
    WriteWaitExpired,
    dequantize_sample,
    hash_token,
    sample_rows,
)

if TYPE_CHECKING:
    from fedmobillm.server.settings import ServerSettings

__all__ = [
    "Device",
    "SampleRows",
    "SqlStore",
    "Store",
    "TrainerSlotTaken",
    "WriteWaitExpired",
    "dequantize_sample",
    "hash_token",
    "is_transient",
    "open_store",
]


class TrainerSlotTaken(FedMobiLLMError):
    """The store's one trainer slot is held by another trainer (``claim_trainer``): not
    transient, the claiming trainer stops (a refusal, not a bug: no traceback)."""


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    architecture TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    num_taps INTEGER NOT NULL,
    hidden_size INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    idempotency_key TEXT NOT NULL,
    split TEXT NOT NULL,
    samples INTEGER NOT NULL,
    ack TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (device_id, idempotency_key)
);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    architecture TEXT NOT NULL,
    split TEXT NOT NULL,
    sample_id INTEGER NOT NULL,
    label INTEGER NOT NULL,
    batch_id TEXT NOT NULL,
    encoding TEXT NOT NULL,
    act BLOB NOT NULL,
    scales BLOB,
    UNIQUE (device_id, split, sample_id)
);
CREATE TABLE IF NOT EXISTS device_flags (
    device_id TEXT PRIMARY KEY,
    offences INTEGER NOT NULL DEFAULT 0,
    last_reason TEXT NOT NULL DEFAULT '',
    quarantined REAL
);
CREATE TABLE IF NOT EXISTS device_counts (
    device_id TEXT NOT NULL,
    split TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (device_id, split)
);
"""


def open_store(
    settings: ServerSettings, trainer: bool = False, owner: str | None = None
) -> SqlStore:
    """The store ``settings`` name: PostgreSQL at ``settings.database`` when it is set, else
    the embedded SQLite file in the data dir. ``trainer``: the store of the trainer, which on
    PostgreSQL also claims the database's one trainer slot (TrainerSlotTaken if another
    trainer holds it); ``owner``: the trainer's id (``claim_trainer``; also given to the
    trainer's other stores, e.g. its status publisher's): on PostgreSQL every connection of
    the store is named ``fedmobillm-trainer-data OWNER``, so that the trainer taking its slot
    back after a network cut ends them too."""
    if settings.database is None:
        store: SqlStore = Store(
            settings.db_path,
            group_max=settings.ingest_group_max,
            group_samples=settings.ingest_group_samples,
        )
    else:
        from fedmobillm.server.store_pg import TRAINER_DATA_APP, PostgresStore

        store = PostgresStore(
            settings.database.get_secret_value(),
            pool_size=settings.database_pool,
            application_name=f"{TRAINER_DATA_APP} {owner}" if owner else None,
        )
    if trainer:
        try:
            store.claim_trainer(owner)
        except BaseException:
            store.close()
            raise
    return store


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a database error that a retry
    can outlive: a connection dropped or refused (PostgreSQL restarted, pg_terminate_backend,
    network), an admin shutdown, a locked or busy SQLite file (SQLITE_BUSY / SQLITE_LOCKED).
    A bug or a permanent fault (a wrong query, no such table or column, a read-only or
    failing disk, bad data) is not transient. Follows ``__cause__`` only (``raise ... from``):
    an error raised while handling a transient one is not itself transient."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlite3.OperationalError) and _sqlite_busy(exc):
            return True
        mod = type(exc).__module__ or ""
        if mod.startswith("psycopg") and type(exc).__name__ in TRANSIENT_PG:
            return True
        if mod.startswith("psycopg"):
            import psycopg

            if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                return True
        exc = exc.__cause__
    return False


SQLITE_BUSY, SQLITE_LOCKED = 5, 6  # primary result codes (extended codes keep the low byte)


def _sqlite_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: by its error code (Python >= 3.11), else its message."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)
    msg = str(exc).lower()
    return "database is locked" in msg or "database table is locked" in msg or "busy" in msg


TRANSIENT_PG = {"AdminShutdown", "CannotConnectNow", "ConnectionException", "CrashShutdown"}

T = TypeVar("T")
# group commit bounds (settings ingest_group_max / ingest_group_samples; 1 = one write a commit)
GROUP_MAX = 64
GROUP_SAMPLES = 8192


@dataclass(eq=False)
class _Write:
    """One write waiting for its group (``Store.write``). ``wake``: its own condition on the
    store's group lock, so that a group's end wakes its writers only and a leader's end one
    writer (the next to lead), not every thread waiting."""

    work: Callable[[sqlite3.Connection], Any]
    samples: int
    wake: threading.Condition
    taken: bool = False  # in a group being committed: no longer withdrawn at its deadline
    done: bool = False  # its group ended: ``value`` or ``error`` is final
    value: Any = None
    error: BaseException | None = None


class GroupCommitFailed(Exception):
    """A write's own error for its group's failed COMMIT when the COMMIT's exception cannot
    be re-made (``_own_error``); chained to that exception (``__cause__``)."""


def _own_error(failed: BaseException) -> BaseException:
    """One write's own exception for the failed COMMIT of its group: the same type, message
    and SQLite error code as ``failed``, chained to it (``__cause__``). Every write of the
    group raises its own in its own thread: one object raised in several threads gathers all
    their frames in one traceback."""
    try:
        err = type(failed)(*failed.args)
    except Exception:  # noqa: BLE001 - a type whose constructor takes other arguments
        err = GroupCommitFailed(
            f"the group commit holding this write failed ({type(failed).__name__}: {failed}); "
            "nothing of it was stored"
        )
    for attr in ("sqlite_errorcode", "sqlite_errorname"):  # is_transient reads the code
        if hasattr(failed, attr):
            setattr(err, attr, getattr(failed, attr))
    err.__cause__ = failed
    return err


class Store(SqlStore):
    """The embedded SQLite store (the default): one file, one writer. ``group_max`` /
    ``group_samples``: the most writes / samples one group commit joins (``write``; 1: a
    commit per write)."""

    backend = "sqlite"

    def __init__(
        self, path: Path, group_max: int = GROUP_MAX, group_samples: int = GROUP_SAMPLES
    ) -> None:
        if group_max < 1 or group_samples < 1:
            raise FedMobiLLMError(
                f"group commit bounds must be >= 1 (got {group_max} writes, {group_samples} "
                "samples)",
                hint="set ingest_group_max / ingest_group_samples to 1 or more",
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.group_max = group_max
        self.group_samples = group_samples
        self.write_stats = WriteStats()
        self._lock = threading.RLock()  # the write connection
        self._writing = threading.local()  # .active: this thread is in a write transaction
        self._queue: deque[_Write] = deque()  # writes waiting for a group
        self._group = threading.Lock()  # guards _queue, _leading and every _Write
        self._leading = False  # a thread is committing a group
        self._trainer_lock: Any = None  # open file holding the flock of claim_trainer
        self._db = sqlite3.connect(
            str(path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # deleted rows (revoke --delete-data) are overwritten with zeros, not left in free
        # pages (many builds default to this already; docs/privacy.md)
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA busy_timeout=30000")
        for stmt in SCHEMA.strip().split(";\n"):
            if stmt.strip():
                self._db.execute(stmt)
        self._migrate()
        # reads (``_query``) outside a write transaction: they see every committed write and
        # never wait for a commit's fsync
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(
            str(path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._reader.execute("PRAGMA busy_timeout=30000")
        self._reader.execute("PRAGMA query_only=ON")

    def _migrate(self) -> None:
        """Columns added since a store was created (SQLite has no ADD COLUMN IF NOT EXISTS)."""
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(batches)")}
        if "content" not in cols:  # digest of (split, sample ids, labels); NULL for old rows
            self._db.execute("ALTER TABLE batches ADD COLUMN content TEXT")
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(devices)")}
        if "revoked" not in cols:  # time its token was revoked; NULL while it works
            self._db.execute("ALTER TABLE devices ADD COLUMN revoked REAL")
        if "data_deleted" not in cols:  # 1 once its samples were removed
            self._db.execute(
                "ALTER TABLE devices ADD COLUMN data_deleted INTEGER NOT NULL DEFAULT 0"
            )
        if "privacy" not in cols:  # JSON of its declared privacy mechanism; NULL: none
            self._db.execute("ALTER TABLE devices ADD COLUMN privacy TEXT")
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(samples)")}
        if "tokens" not in cols:  # real tokens of a token sample (K, L, d); NULL = pivot (K, d)
            self._db.execute("ALTER TABLE samples ADD COLUMN tokens INTEGER")
        if "token_ids" not in cols:  # an lm sample's token ids, int32 x L; NULL otherwise
            self._db.execute("ALTER TABLE samples ADD COLUMN token_ids BLOB")
        if "loss_mask" not in cols:  # an lm sample's loss mask, uint8 x L; NULL otherwise
            self._db.execute("ALTER TABLE samples ADD COLUMN loss_mask BLOB")
        # a restarting trainer's sampled read-back (stream_sample); built once, on an old
        # store at its first open (~3 s per million rows)
        self._db.execute(SAMPLE_ORDER_INDEX)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()
        if self._trainer_lock is not None:
            self._trainer_lock.close()  # releases the trainer slot
            self._trainer_lock = None

    def claim_trainer(self, owner: str | None = None) -> None:
        """Take the data dir's one trainer slot: an exclusive ``flock`` on
        ``store.sqlite3.trainer.lock`` beside the store, held while this store is open and
        released by the kernel when its process dies (kill -9 included). ``owner`` is not
        needed here: a trainer's previous store is closed (its flock released) before it
        claims again."""
        import fcntl

        lock_path = self.path.with_name(self.path.name + ".trainer.lock")
        handle = open(lock_path, "a+")  # noqa: SIM115 - held open while this store is
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise TrainerSlotTaken(
                f"another trainer is running on {self.path}; one trainer per store",
                hint="run `fedmobillm serve --no-train` beside `fedmobillm train`, or stop "
                "the other trainer",
            ) from None
        self._trainer_lock = handle

    def check_trainer(self) -> None:
        """Nothing to check: the flock lives as long as this process."""

    def put_meta(self, key: str, value: str) -> None:
        """Upsert one meta row (its own short transaction): for values only one process
        writes (the trainer's published status), never the task's pinned rows."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) "
                "DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def get_meta(self, key: str) -> str | None:
        return self.meta(key)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error), under the lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._writing.active = True
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._writing.active = False
            self._db.execute("COMMIT")

    def write(self, work: Callable[[Any], T], samples: int = 0, wait_s: float | None = None) -> T:
        """``work(db)`` committed with the writes of other threads waiting at the same time
        (group commit, see the module docstring); its result once that ``COMMIT`` returned.
        ``wait_s``: the longest it waits for a place in a group; past it the write is
        withdrawn, unrun, and ``WriteWaitExpired`` raised. ``group_max`` 1: a transaction of
        its own, as ``SqlStore.write``."""
        if self.group_max == 1:
            return super().write(work, samples, wait_s)
        item = _Write(work, samples, threading.Condition(self._group))
        deadline = None if wait_s is None else time.monotonic() + wait_s
        with self._group:
            self._queue.append(item)
        while True:
            with self._group:
                while not item.done and (self._leading or item.taken):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0 and not item.taken:
                        self._queue.remove(item)
                        raise WriteWaitExpired(
                            f"waited {wait_s:g} s for a place in a group commit; nothing of "
                            "this write was stored"
                        )
                    item.wake.wait(None if item.taken else left)
                if item.done:
                    break
                self._leading = True  # no group is being committed: lead the next one
            try:
                self._lead()
            except BaseException:
                with self._group:  # our own write, if no group took it, leaves unrun
                    if not item.taken and item in self._queue:
                        self._queue.remove(item)
                raise
            finally:
                with self._group:
                    self._leading = False
                    if self._queue:  # the first writer waiting leads the next group
                        self._queue[0].wake.notify()
        if item.error is not None:
            raise item.error
        return item.value

    def _lead(self) -> None:
        """Take the queue's first writes (within the bounds) into a group and commit it. The
        write lock first: writes that arrive while another transaction holds it join."""
        with self._lock:
            with self._group:
                group: list[_Write] = []
                samples = 0
                while self._queue and len(group) < self.group_max:
                    nxt = self._queue[0]
                    if group and samples + nxt.samples > self.group_samples:
                        break
                    group.append(self._queue.popleft())
                    nxt.taken = True
                    samples += nxt.samples
            if group:
                self._commit_group(group)

    def _commit_group(self, group: list[_Write]) -> None:
        """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` holding every write of ``group``, each in
        its own savepoint; then every write is done (under the write lock)."""
        db = self._db
        failed: BaseException | None = None
        self._writing.active = True
        try:
            db.execute("BEGIN IMMEDIATE")
            for item in group:
                db.execute("SAVEPOINT write")
                try:
                    item.value = item.work(db)
                except Exception as exc:
                    if not db.in_transaction:  # SQLite rolled back all of it (I/O, full, ...)
                        raise
                    db.execute("ROLLBACK TO write")
                    item.value, item.error = None, exc
                db.execute("RELEASE write")
            db.execute("COMMIT")
        except BaseException as exc:
            failed = exc
            with contextlib.suppress(sqlite3.Error):  # a closed connection raises here too
                if db.in_transaction:
                    db.execute("ROLLBACK")
        finally:
            self._writing.active = False
            with self._group:
                for item in group:
                    if failed is not None and item.error is None:  # none acknowledged
                        item.value, item.error = None, _own_error(failed)
                    item.done = True
                    item.wake.notify()
        committed = sum(1 for item in group if item.error is None)
        if failed is None and committed:  # a group whose writes all were refused holds none
            self.write_stats.count(committed)
        elif failed is not None and not isinstance(failed, Exception):
            raise failed  # KeyboardInterrupt, SystemExit: after every write got its answer

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        if getattr(self._writing, "active", False):  # inside this thread's write transaction
            return self._db.execute(sql, args).fetchall()
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def _insert_rows(self, db: sqlite3.Connection, rows: list[tuple]) -> int:
        before = db.total_changes
        db.executemany(
            "INSERT OR IGNORE INTO samples (device_id, architecture, split, sample_id, label, "
            "batch_id, encoding, act, scales, tokens, token_ids, loss_mask) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        return db.total_changes - before

    def _series_bucket(self) -> str:
        return "min(CAST((b.created - ?) / ? AS INTEGER), ?)"

    def _after_delete(self) -> None:
        self._forget_wal()

    def _forget_wal(self) -> None:
        """Copy the WAL into the database file and truncate it, so that the pages holding
        deleted rows (zeroed by secure_delete) replace the old copies everywhere. Best
        effort: a reader's open snapshot (the trainer mid-read) can keep it from finishing;
        the next automatic checkpoint and a clean shutdown do it then."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def sample_horizon(self) -> int:
        """The largest row id (0: none). One writer and AUTOINCREMENT: every row at or below
        it is committed, and a row stored later has a larger id."""
        return int(self._query("SELECT coalesce(max(id), 0) FROM samples")[0][0])

    def read_samples(self, after: int, limit: int = 10_000) -> SampleRows:
        """Samples with row id > ``after``, oldest first, as stored (``SampleRows``). One
        writer: row ids grow in commit order, so the last id is the cursor."""
        rows = self._query(
            f"SELECT {READ_COLUMNS} FROM samples s JOIN devices d "
            "ON s.device_id = d.device_id WHERE s.id > ? ORDER BY s.id LIMIT ?",
            (after, limit),
        )
        return sample_rows(rows, int(rows[-1][0]) if rows else after)
