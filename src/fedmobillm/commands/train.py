"""`fedmobillm train`: the trainer as its own process, beside `fedmobillm serve --no-train`.

It reads the samples ingest stored (the SQLite file of --data-dir, or --database
postgresql://...), writes checkpoints and personal models into --data-dir (where `serve`
reads them: give both the same --data-dir) and publishes its status into the store's meta
table every second, which `serve --no-train` (and every `--workers N` worker) answers
`/v1/status` and back-pressure from. One trainer per store: a second is refused. A transient
database error (PostgreSQL restarted, a dropped connection) is retried with backoff, said in
the log and in the status's ``database_retry``."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

NAME = "train"
HELP = "run the trainer as its own process beside `fedmobillm serve --no-train`"

log = logging.getLogger(__name__)


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
        help="default: the task the store was started with (classify for a new store)",
    )
    parser.add_argument(
        "--inputs",
        choices=("pivot", "tokens"),
        default=None,
        help="default: the inputs the store was started with (pivot for a new store)",
    )


def run(args: argparse.Namespace) -> int:
    from fedmobillm.server.app import open_service
    from fedmobillm.server.trainer import create_trainer

    settings = _settings(args, args.task, args.inputs)
    task, inputs = _pinned(settings)
    if (args.task is None and task) or (args.inputs is None and inputs):
        log.info("task %s, %s inputs: as the store was started", task, inputs)
        settings = _settings(args, args.task or task, args.inputs or inputs)
    open_service(settings).store.close()  # data dir, schema, task and inputs checked here
    trainer = create_trainer(settings)
    trainer.process = "train"
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info(
        "trainer process: data dir %s; store %s; task %s; %s inputs",
        settings.data_dir.resolve(),
        "SQLite " + str(settings.db_path) if settings.database is None else "PostgreSQL",
        settings.task,
        settings.side.inputs,
    )
    trainer.start()
    publisher = threading.Thread(
        target=_publish, args=(trainer, settings, stop), name="trainer-status", daemon=True
    )
    publisher.start()
    while not stop.wait(1.0):
        if not trainer._thread.is_alive():  # stopped on an error that is not transient
            log.error("the trainer stopped: %s", trainer.error)
            stop.set()
            publisher.join(5)
            return 1
    trainer.stop()  # final checkpoint and export
    publisher.join(5)
    return 0


def _settings(args: argparse.Namespace, task: str | None, inputs: str | None) -> Any:
    from fedmobillm.server.settings import load_settings

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


def _pinned(settings: Any) -> tuple[str | None, str | None]:
    """The task and inputs the store pins (None while it pins none): a data dir keeps its
    task and inputs, and the flags left out default to them."""
    from fedmobillm.server.store import open_store

    store = open_store(settings)
    try:
        return store.meta("task"), store.meta("inputs")
    finally:
        store.close()


def _publish(trainer: Any, settings: Any, stop: threading.Event) -> None:
    """publish_status on a store of its own (reopened after a transient error)."""
    import time

    from fedmobillm.server.store import open_store
    from fedmobillm.server.trainer_view import publish_status

    while not stop.is_set():
        try:
            store = open_store(settings.model_copy(update={"database_pool": 1}))
        except Exception:  # noqa: BLE001 - the database is down: the trainer says so too
            log.warning("cannot open the store to publish the status; retrying", exc_info=True)
            time.sleep(2.0)
            continue
        try:
            publish_status(trainer, store, stop)
        finally:
            store.close()
