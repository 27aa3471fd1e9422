"""The lm trainer cache reads each architecture's vocabulary before it knows a device: a
database error in between, or a vocabulary not yet on record, never drops honest rows as
offences; a page read again after an error is counted once."""

from __future__ import annotations

import sqlite3

from test_lm_server import _store_lm_rows

from fedmobillm.server.service import VOCAB_KEY
from fedmobillm.server.store import Store
from fedmobillm.server.trainer import TrainingCache


class _FlakyMeta:
    """The store, whose ``meta`` raises a locked-database error ``fail`` times first."""

    def __init__(self, store: Store, fail: int) -> None:
        self._store, self.fail = store, fail

    def meta(self, key: str) -> str | None:
        if self.fail:
            self.fail -= 1
            raise sqlite3.OperationalError("database is locked")
        return self._store.meta(key)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def _put_vocab(store: Store) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO meta VALUES (?, ?)", (VOCAB_KEY + "arch-lm", "49152"))


def test_a_database_error_reading_the_vocab_drops_nothing_and_counts_once(tmp_path):
    store = Store(tmp_path / "store.sqlite3")
    _store_lm_rows(store)
    _put_vocab(store)
    cache = TrainingCache(inputs="tokens", task="lm")
    flaky = _FlakyMeta(store, fail=1)
    try:
        cache.refresh(flaky)
        raise AssertionError("the locked meta read should have raised")
    except sqlite3.OperationalError:
        pass
    assert cache.rows_read == 0 and cache.watermark == 0
    assert cache.refresh(flaky) == 3  # the page read again: all three cached
    assert cache.rows_read == 3
    assert cache.dropped == {} and cache.offences == {}
    store.close()


def test_a_vocab_not_on_record_is_read_again_and_never_an_offence(tmp_path):
    store = Store(tmp_path / "store.sqlite3")
    _store_lm_rows(store)
    cache = TrainingCache(inputs="tokens", task="lm")
    cache.refresh(store)
    assert cache.dropped == {} and cache.offences == {}
    assert cache._known_devices == set()  # unknown until its vocabulary is on record
    _put_vocab(store)
    cache._ensure_archs(store)
    assert cache.archs["arch-lm"].vocab == 49152 and len(cache._known_devices) == 1
    store.close()
