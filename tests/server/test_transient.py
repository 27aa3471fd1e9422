"""Which database errors the trainer retries: only SQLite's busy/locked (and PostgreSQL's
connection faults), followed through ``raise ... from`` only; and it gives up after
RETRY_GIVE_UP_S of continuous failure."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server import trainer as trainer_mod
from fedmobillm.server.store import is_transient


def _real_error(tmp_path, sql: str, lock: bool = False) -> sqlite3.OperationalError:
    path = tmp_path / "x.sqlite3"
    a = sqlite3.connect(path, timeout=0)
    a.execute("CREATE TABLE IF NOT EXISTS t (x)")
    a.commit()
    if lock:
        a.execute("BEGIN EXCLUSIVE")
    b = sqlite3.connect(path, timeout=0)
    try:
        b.execute(sql)
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        b.close()
        a.close()
    raise AssertionError(f"{sql} did not fail")


def test_only_busy_or_locked_sqlite_errors_are_transient(tmp_path):
    assert is_transient(_real_error(tmp_path, "SELECT * FROM t", lock=True))
    assert not is_transient(_real_error(tmp_path, "SELECT nope FROM t"))
    assert not is_transient(_real_error(tmp_path, "SELECT * FROM missing"))
    assert not is_transient(_real_error(tmp_path, "SELEC 1"))
    assert not is_transient(sqlite3.OperationalError("attempt to write a readonly database"))
    assert not is_transient(sqlite3.OperationalError("disk I/O error"))
    locked = sqlite3.OperationalError("database is locked")
    try:
        raise RuntimeError("wrapped") from locked
    except RuntimeError as exc:
        assert is_transient(exc)  # the cause is followed
    try:
        try:
            raise locked
        except sqlite3.OperationalError:
            raise KeyError("a bug while handling it")  # noqa: B904 - the context only
    except KeyError as exc:
        assert not is_transient(exc)


def test_trainer_gives_up_after_continuous_database_failure(monkeypatch):
    t = object.__new__(trainer_mod.Trainer)
    t._stop = threading.Event()
    t._stop.set()  # no real waiting
    t._resume_wait, t.database_retry = 0.5, None
    locked = sqlite3.OperationalError("database is locked")
    t._database_down(locked)
    assert t.database_retry["attempts"] == 1
    t._database_down(locked)  # still within the limit
    t.database_retry["since"] = time.time() - trainer_mod.RETRY_GIVE_UP_S - 1
    with pytest.raises(FedMobiLLMError, match="has failed for") as info:
        t._database_down(locked)
    assert not is_transient(info.value)
