"""The trainer as `serve --workers N` workers see it: the trainer runs in the `serve` process
(one per database), the workers answer `/v1/status`, `/metrics` and personal-model downloads.

``publish_status`` (a thread in the `serve` process, or in `fedmobillm train`) writes
``trainer.status()`` into the store's meta table every PUBLISH_EVERY_S seconds while the
trainer holds the store's trainer slot; ``TrainerView`` (each worker's ``app.state.trainer``)
reads it back, its ``backlog`` too (ingest's back-pressure reads it). ``export_fresh`` cannot
reach the trainer from a worker: a download gets the latest periodic export
(``export_every``)."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from fedmobillm.server.store import is_transient
from fedmobillm.server.store_pg import PostgresStore

log = logging.getLogger(__name__)

STATUS_KEY = "trainer_status"
PUBLISH_EVERY_S = 1.0
# A publication older than this is a trainer that stopped (killed, crashed, shut down):
# its backlog no longer holds back ingest, and its status says it is not running. Wide
# enough for a publisher waiting on a busy database and for clock skew between hosts.
STALE_AFTER_S = 30.0


def _age_s(status: dict[str, Any]) -> float:
    return time.time() - float(status.get("published", 0) or 0)


class TrainerView:
    """``status()`` as the trainer last published it, with ``published`` (unix time) and
    ``published_age_s``; ``{"running": False, ...}`` before the first publication, and
    ``running: False, stale: True`` (backlog 0) once the last is older than STALE_AFTER_S."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self._backlog = 0
        self._poller: threading.Thread | None = None

    @property
    def backlog(self) -> int:
        """The trainer's published backlog (stored samples it has not read; 0 if it publishes
        none). Ingest asks per upload, on the event loop: this never touches the database;
        a daemon thread re-reads it every PUBLISH_EVERY_S seconds (0 while it cannot)."""
        if self._poller is None:
            self._poller = threading.Thread(
                target=self._poll_backlog, name="trainer-backlog", daemon=True
            )
            self._poller.start()
        return self._backlog

    def _poll_backlog(self) -> None:
        while True:
            try:
                raw = self.store.get_meta(STATUS_KEY)
                status = json.loads(raw) if raw else {}
                fresh = status and _age_s(status) <= STALE_AFTER_S
                self._backlog = int(status.get("backlog") or 0) if fresh else 0
            except Exception:  # noqa: BLE001 - a view: no back-pressure from a failed read
                log.debug("could not read the trainer's backlog", exc_info=True)
                self._backlog = 0
            time.sleep(PUBLISH_EVERY_S)

    def status(self) -> dict[str, Any]:
        raw = self.store.get_meta(STATUS_KEY)
        if raw is None:
            return {"running": False, "note": "the trainer has not published its status yet"}
        status = json.loads(raw)
        age = _age_s(status)
        status["published_age_s"] = round(age, 3)
        if age > STALE_AFTER_S:  # the trainer stopped publishing: it is not running
            status.update(running=False, stale=True, backlog=0)
            status["note"] = (
                f"the trainer last published {age:.0f} s ago: it is not running (start "
                f"`fedmobillm train` with this store); uploads are stored, none trained"
            )
        return status

    def export_fresh(self, architecture: str, timeout: float = 120.0) -> None:
        """No-op: a worker serves the latest periodic export of ``architecture``."""


def publish_status(trainer: Any, store: PostgresStore, stop: threading.Event) -> None:
    """Until ``stop``: ``trainer.status()`` into the store every PUBLISH_EVERY_S seconds (one
    upsert of one meta row, outside the write lock: it never waits for ingest). Errors are
    logged and retried: the status is a view, training goes on without it.

    Only a trainer that holds the store's trainer slot publishes: nothing before it claimed
    the slot, nothing while it retries a database error (``slot_claimed`` cleared: another
    trainer may claim the slot meanwhile), nothing once a (re)claim was refused (the status
    row is the slot holder's; a refused second trainer must not overwrite it, even for a
    second)."""
    held = False  # whether it held the slot at the last tick
    while not trainer.slot_refused:
        if not trainer.slot_claimed.is_set():
            if held:
                log.info(
                    "the trainer gave the slot up (database error): no status published "
                    "until it holds the slot again"
                )
            if not _wait_for_slot(trainer, stop):
                return
        held = True
        try:
            status = {**trainer.status(), "published": time.time()}
            store.put_meta(STATUS_KEY, json.dumps(status, default=_jsonable))
        except Exception as exc:  # noqa: BLE001 - the next tick retries
            if is_transient(exc):  # the database restarting: one line, not a traceback
                log.warning("could not publish the trainer status (%s); retrying", exc)
            else:
                log.exception("could not publish the trainer status")
        if stop.wait(PUBLISH_EVERY_S):
            return


def _wait_for_slot(trainer: Any, stop: threading.Event) -> bool:
    """Wait until ``trainer`` holds the trainer slot (True), or until ``stop``, a refused
    claim or the trainer's thread ending without the slot (False: publish nothing)."""
    while not trainer.slot_claimed.wait(0.1):
        if stop.is_set() or trainer.slot_refused or trainer.error is not None:
            log.info("the trainer does not hold the trainer slot: no status published")
            return False
    return not trainer.slot_refused


def _jsonable(value: Any) -> Any:
    """numpy scalars and anything else json cannot write: as float, else str."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
