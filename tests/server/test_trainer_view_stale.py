"""A trainer that stopped publishing (killed, crashed) no longer holds back ingest: its
last backlog is ignored and the status says it is not running."""

from __future__ import annotations

import json
import time

from fedmobillm.server import trainer_view
from fedmobillm.server.store import Store
from fedmobillm.server.trainer_view import STATUS_KEY, TrainerView


def publish(store: Store, age_s: float, backlog: int) -> None:
    status = {"running": True, "step": 7, "backlog": backlog, "published": time.time() - age_s}
    store.put_meta(STATUS_KEY, json.dumps(status))


def wait_backlog(view: TrainerView, want: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while view.backlog != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return view.backlog


def test_a_fresh_publication_is_the_trainers_state(tmp_path):
    store = Store(tmp_path / "store.sqlite3")
    publish(store, age_s=0.5, backlog=50_000)
    view = TrainerView(store)
    assert wait_backlog(view, 50_000) == 50_000
    status = view.status()
    assert status["running"] is True and "stale" not in status


def test_a_stale_publication_lets_ingest_through_and_says_the_trainer_stopped(tmp_path):
    store = Store(tmp_path / "store.sqlite3")
    publish(store, age_s=trainer_view.STALE_AFTER_S + 5, backlog=50_000)
    view = TrainerView(store)
    assert wait_backlog(view, 0) == 0
    status = view.status()
    assert status["running"] is False and status["stale"] is True
    assert status["backlog"] == 0 and "fedmobillm train" in status["note"]
