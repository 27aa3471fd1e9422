"""`fedmobillm train`: the trainer as its own process, beside `fedmobillm serve --no-train`.

It reads the samples ingest stored (the SQLite file of --data-dir, or --database
postgresql://...), writes checkpoints and personal models into --data-dir (where `serve`
reads them: give both the same --data-dir) and publishes its status into the store's meta
table every second, which `serve --no-train` (and every `--workers N` worker) answers
`/v1/status` and back-pressure from. One trainer per store: a second is refused and publishes nothing.
The task and inputs are the ones `serve` records in the store (waited for on a store that
records none yet; the trainer never pins them). A transient database error (PostgreSQL
restarted, a dropped connection) is retried with backoff, said in the log and in the
status's ``database_retry``. SIGTERM waits, without a time limit, for the final checkpoint
and personal models (exit 0 once written, 1 saying what is missing); a second SIGTERM exits
at once, non-zero."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

NAME = "train"
HELP = "run the trainer as its own process beside `fedmobillm serve --no-train`"

log = logging.getLogger(__name__)

WAIT_LOG_S = 30.0  # how often a wait (for serve's task, for the final write) is logged
PIN_POLL_S = 1.0  # how often the store is asked for the task serve records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the server's data dir: the SQLite store (without --database), checkpoints and "
        "personal models; the same as `serve --data-dir` (default ./fedmobillm-server)",
    )
    parser.add_argument(
        "--database",
        default=None,
        metavar="postgresql://USER@HOST:PORT/DB",
        help="read samples from this PostgreSQL store (the one `serve --database` writes)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML or JSON file of server settings (the trainer's: batch_size, "
        "trainer_memory_mb, checkpoint_every, ...; docs/server.md)",
    )
    parser.add_argument(
        "--task",
        choices=("classify", "lm"),
        default=None,
        help="default: the task `fedmobillm serve` recorded in the store (a store that has "
        "none yet is waited for); given, it must match it",
    )
    parser.add_argument(
        "--inputs",
        choices=("pivot", "tokens"),
        default=None,
        help="default: the inputs `fedmobillm serve` recorded in the store (waited for "
        "likewise); given, they must match them",
    )


def run(args: argparse.Namespace) -> int:
    from fedmobillm.server import trainer_child

    sup = trainer_child.supervised()  # serve's child (a standby imports here)
    from fedmobillm.server.app import open_service
    from fedmobillm.server.trainer import create_trainer

    stop, again = threading.Event(), threading.Event()
    if sup is None or not sup.standby:  # a standby: once it takes over (SIGTERM ends it)
        _on_signals(stop, again)
    pinned = _wait_for_federation(args, stop)
    if pinned is None:
        log.info("stopped before the store recorded a task: nothing trained")
        return 0
    settings = _settings(args, *pinned)
    open_service(settings).store.close()  # data dir, schema, task and inputs checked here
    trainer = create_trainer(settings)
    trainer.process = "train"
    if sup is not None:
        sup.take_over(settings)  # a standby waits here; then the one-trainer lock and slot
        if sup.standby:
            _on_signals(stop, again)
        trainer_child.on_parent_gone(stop)  # serve killed: finish as on a first SIGTERM
    log.info(
        "trainer process: data dir %s; store %s; task %s; %s inputs",
        settings.data_dir.resolve(),
        "SQLite " + str(settings.db_path) if settings.database is None else "PostgreSQL",
        settings.task,
        settings.side.inputs,
    )
    trainer.start()
    trainer_child.report_first_step(trainer, None if sup is None else sup.chan)
    publisher = threading.Thread(
        target=_publish, args=(trainer, settings, stop), name="trainer-status", daemon=True
    )
    publisher.start()  # publishes only once the trainer holds the store's trainer slot
    while not stop.wait(1.0):
        if not trainer._thread.is_alive():  # stopped on an error that is not transient
            log.error("the trainer stopped: %s", trainer.error)
            stop.set()
            publisher.join(5)
            return 1
    return _finish(trainer, publisher, again)


def _on_signals(stop: threading.Event, again: threading.Event) -> None:
    """SIGTERM / SIGINT: the first sets ``stop`` (finish: final checkpoint and export), a
    second ``again`` (exit at once, non-zero, saying what was not written). Acted on in a
    thread, not in the handler (``handle_in_thread``: an ``Event.set`` in a handler can
    deadlock the main thread waiting on that event)."""
    from fedmobillm.server.trainer_child import handle_in_thread

    def handle(_sig: int) -> None:
        if stop.is_set():
            again.set()
        stop.set()

    handle_in_thread([signal.SIGTERM, signal.SIGINT], handle)


def _finish(trainer: Any, publisher: threading.Thread, again: threading.Event) -> int:
    """Wait, without a time limit, for the trainer's final checkpoint and personal-model
    export; 0 once they are written, 1 (saying what is missing) if the trainer failed,
    wrote less, or a second signal cut the wait short."""
    log.info(
        "stopping: writing the final checkpoint and personal models (a second SIGTERM or "
        "Ctrl-C exits at once without them)"
    )
    trainer.stop(timeout=0)  # asks the trainer thread to finish; waited for below
    began = said = time.monotonic()
    while trainer._thread.is_alive():
        if again.wait(0.5):
            missing = trainer.unwritten()
            log.error(
                "exiting on a second signal before the final write: not written: %s",
                "; ".join(missing) or "nothing (it had just finished)",
            )
            return 1 if missing else 0
        if time.monotonic() - said >= WAIT_LOG_S:
            said = time.monotonic()
            log.info(
                "still writing the final checkpoint and personal models (%.0f s): %s",
                said - began,
                "; ".join(trainer.unwritten()) or "finishing",
            )
    publisher.join(5)
    if trainer.error is not None:
        log.error("the trainer failed while finishing: %s", trainer.error)
        return 1
    missing = trainer.unwritten()
    if missing:
        log.error("the trainer stopped without writing: %s", "; ".join(missing))
        return 1
    log.info(
        "final checkpoint (step %s) and personal models written in %.1f s",
        trainer.checkpoint_step,
        time.monotonic() - began,
    )
    return 0


def _wait_for_federation(args: argparse.Namespace, stop: threading.Event) -> tuple | None:
    """The (task, inputs) the store records, once `fedmobillm serve` has recorded them (it
    does at its start; the trainer never pins a federation, so a store that records none yet
    is waited for, said in the log at once and every WAIT_LOG_S, naming the store waited on).
    --task / --inputs given must agree with them (FedMobiLLMError). None if ``stop`` came
    first."""
    settings = _settings(args, args.task, args.inputs)  # where the store is
    poll = _PinPoll(settings)
    said = -math.inf  # the first turn says it
    try:
        while True:
            task, inputs = poll.pinned()
            if task is not None and inputs is not None:
                break
            if time.monotonic() - said >= WAIT_LOG_S:
                said = time.monotonic()
                log.info(
                    "waiting for `fedmobillm serve` to record the federation's task and inputs "
                    "in the store %s (%s; serve does at its start; the trainer takes them and "
                    "records none itself; is this the --data-dir / --database serve uses?)%s",
                    poll.where,
                    poll.state,
                    "" if args.task is None else f"; --task {args.task} must match it",
                )
            if stop.wait(PIN_POLL_S):
                return None
    finally:
        poll.close()
    _check_flags(args, task, inputs)
    log.info("task %s, %s inputs: as `fedmobillm serve` recorded them in the store", task, inputs)
    return task, inputs


def _check_flags(args: argparse.Namespace, task: str, inputs: str) -> None:
    """FedMobiLLMError if --task / --inputs were given and differ from the recorded ones."""
    for flag, given, recorded in (("task", args.task, task), ("inputs", args.inputs, inputs)):
        if given is not None and given != recorded:
            from fedmobillm.errors import FedMobiLLMError

            raise FedMobiLLMError(
                f"the store holds a federation of {flag} {recorded} (recorded by `fedmobillm "
                f"serve`); this trainer was started with --{flag} {given}",
                hint=f"start `fedmobillm train` with --{flag} {recorded} or without --{flag} "
                "(it takes the store's)",
            )


def _settings(args: argparse.Namespace, task: str | None, inputs: str | None) -> Any:
    import json
    import os

    from fedmobillm.server.settings import ServerSettings, load_settings
    from fedmobillm.server.trainer_child import TRAINER_SETTINGS_ENV

    given = os.environ.get(TRAINER_SETTINGS_ENV)
    if given is not None:  # the child of `serve --trainer-process`: serve's own settings
        settings = ServerSettings(**json.loads(given))
        for what, recorded, own in (
            ("task", task, settings.task),
            ("inputs", inputs, settings.side.inputs),
        ):
            if recorded is not None and recorded != own:  # serve recorded its own at start
                from fedmobillm.errors import FedMobiLLMError

                raise FedMobiLLMError(
                    f"the store records {what} {recorded}, the serving process has {own}",
                    hint="start `fedmobillm serve` with the store's task and inputs",
                )
        return settings

    # dev=True: the trainer serves no HTTP, so it needs no admin token (none is printed)
    settings, _ = load_settings(
        args.config,
        dev=True,
        data_dir=args.data_dir,
        database=args.database,
        task=task,
        side={"inputs": inputs} if inputs else None,
        train=True,
        workers=1,
    )
    return settings


class _PinPoll:
    """Reads the task and inputs the store records, for the wait before training: one store
    kept open across polls (reopened after a transient error, said at most every
    WAIT_LOG_S); on SQLite nothing is opened while the data dir has no store.sqlite3 (a
    mistyped --data-dir must not get an empty store: `serve` creates it). ``where``: the
    store, as said in the log (a PostgreSQL password left out); ``state``: what the last
    poll found."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.store: Any = None
        self.state = "not read yet"
        self._warned = -math.inf
        if settings.database is None:
            self.where = f"{settings.db_path.resolve()} (SQLite in the data dir)"
        else:
            from fedmobillm.server.store_pg import describe

            self.where = describe(settings.database.get_secret_value())

    def pinned(self) -> tuple[str | None, str | None]:
        """(task, inputs) as recorded, None for each while none is (or on a transient error:
        the caller polls again)."""
        from fedmobillm.server.store import is_transient

        try:
            if self.store is None:
                if self.settings.database is None and not self.settings.db_path.exists():
                    self.state = "no store.sqlite3 there yet"
                    return None, None
                self.store = self._open()
            task, inputs = self.store.meta("task"), self.store.meta("inputs")
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._transient(exc)
            return None, None
        self.state = "it records no task yet"
        return task, inputs

    def _open(self) -> Any:
        from fedmobillm.server.store import open_store

        return open_store(self.settings)

    def _transient(self, exc: BaseException) -> None:
        self.state = f"cannot read it: {type(exc).__name__}"
        self.close()
        if time.monotonic() - self._warned >= WAIT_LOG_S:
            self._warned = time.monotonic()
            log.warning(
                "cannot read the store %s (%s); retrying every %.0f s (said again in %.0f s)",
                self.where,
                str(exc).strip(),
                PIN_POLL_S,
                WAIT_LOG_S,
            )

    def close(self) -> None:
        if self.store is not None:
            try:
                self.store.close()
            except Exception:  # noqa: BLE001 - a broken connection may not close cleanly
                log.debug("closing the store after a database error", exc_info=True)
            self.store = None


def _publish(trainer: Any, settings: Any, stop: threading.Event) -> None:
    """publish_status on a store of its own (opened again while the database is down);
    it publishes nothing until the trainer holds the slot, and nothing if it was refused."""
    from fedmobillm.server.store import open_store
    from fedmobillm.server.trainer_view import publish_status

    while not stop.is_set() and not trainer.slot_refused:
        try:
            # named for the trainer (owner): its slot take-back after a cut ends it too
            store = open_store(
                settings.model_copy(update={"database_pool": 1}), owner=trainer.slot_owner
            )
        except Exception:  # noqa: BLE001 - the database is down: the trainer says so too
            log.warning("cannot open the store to publish the status; retrying", exc_info=True)
            stop.wait(2.0)
            continue
        try:
            publish_status(trainer, store, stop)
        finally:
            store.close()
        return
