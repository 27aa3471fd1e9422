"""`fedmobillm server start`, alias `fedmobillm serve`: run the training server (FastAPI under
uvicorn). Both spellings take the same options and do the same; `fedmobillm --help` lists
the server once, under `server`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedmobillm.server.settings import ServerSettings

NAME = "serve"
HELP = "run the training server: ingest activations, train the side network, serve personal models"
# an alias of `server start`: not listed by `fedmobillm --help` (see commands/server.py)
LISTED = False

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the store, checkpoints and personal models live (default ./fedmobillm-server)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML or JSON file of server settings (see docs/server.md and docs/deploy/server.toml)",
    )
    parser.add_argument(
        "--dev",
        action="store_true",
        help="development mode: generate and print an admin token if none is set",
    )
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="ingest only: do not run the trainer thread; run `fedmobillm train` with the "
        "same --data-dir (and --database) beside it, whose status /v1/status shows",
    )
    parser.add_argument(
        "--trainer-process",
        action="store_true",
        help="train in a child process (`fedmobillm train`, started, stopped and restarted "
        "by serve) instead of a thread of the serving process: uploads no longer wait behind "
        "training steps (config/env: trainer_process)",
    )
    parser.add_argument(
        "--ssl-certfile",
        type=Path,
        default=None,
        help="serve https with this PEM certificate (chain); devices verify it with "
        "--ca-bundle or --pin-sha256 (docs/privacy.md)",
    )
    parser.add_argument(
        "--ssl-keyfile", type=Path, default=None, help="the certificate's PEM private key"
    )
    parser.add_argument(
        "--inputs",
        choices=("pivot", "tokens"),
        default=None,
        help="what devices upload (side.inputs): pivot (one vector per tap and sample, the "
        "default) or tokens (every token's taps; bundles exported with --pivot none)",
    )
    parser.add_argument(
        "--task",
        choices=("classify", "lm"),
        default=None,
        help="the federation's task: classify (a label per sample, the default) or lm "
        "(causal language modelling on the devices' text: decoder bundles exported with "
        "--pivot none; implies --inputs tokens). A data dir keeps its task",
    )
    parser.add_argument(
        "--database",
        default=None,
        metavar="postgresql://USER@HOST:PORT/DB",
        help="store in PostgreSQL instead of the embedded SQLite file of --data-dir (which "
        "still holds checkpoints and personal models); needed for --workers above 1",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="ingest worker processes (default 1); more than 1 needs --database: they share "
        "it, and this process runs the one trainer beside them",
    )
    parser.add_argument(
        "--anchors",
        type=Path,
        default=None,
        help='public unlabelled anchor texts (one per line, or .jsonl with "text"): devices '
        "upload their activations (`device run --split anchor`) and the trainer aligns the "
        "architectures on them",
    )


# Seconds an idle keep-alive connection stays open on the server: longer than clients keep
# theirs (httpx, the device client's, closes one idle for 5 s), so that the client, not the
# server, ends it. At uvicorn's default (5 s) the two raced: a request sent as the server
# closed met a reset (bench_fleet, 4,096 devices: hundreds of failed uploads, ReadError).
KEEP_ALIVE_S = 20


def run(args: argparse.Namespace) -> int:
    from fedmobillm.server.settings import load_settings

    overrides = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir,
        "anchors": args.anchors,
        "database": args.database,
        "workers": args.workers,
        "ssl_certfile": args.ssl_certfile,
        "ssl_keyfile": args.ssl_keyfile,
        "task": args.task,
    }
    if args.no_train:
        overrides["train"] = False
    if args.trainer_process:
        overrides["trainer_process"] = True
    if args.inputs:
        overrides["side"] = {"inputs": args.inputs}
    settings, generated = load_settings(args.config, dev=args.dev, **overrides)
    if generated:
        print(f"admin token (--dev, shown once): {generated}", flush=True)
    child = settings.train and settings.trainer_process
    if settings.trainer_process and not settings.train:
        log.warning("trainer_process is ignored: training is off here (--no-train / train false)")
    log.info(
        "data dir %s; store %s; trainer %s; task %s; %s inputs%s; %d worker(s)",
        settings.data_dir.resolve(),
        _store_name(settings),
        ("a child process" if child else "on") if settings.train else "off",
        settings.task,
        settings.side.inputs,
        " (task lm: every token's taps, causal side network)" if settings.task == "lm" else "",
        settings.workers,
    )
    tls = _tls_options(settings)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "info",
        "timeout_graceful_shutdown": 30,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": settings.max_header_bytes,  # headers, under h11
        **tls,
    }
    if not child:
        return _serve(settings, options)
    from fedmobillm.server.app import open_service
    from fedmobillm.server.trainer_child import TrainerChild, stopped_by_signal

    open_service(settings).store.close()  # store, task and inputs recorded before the child
    trainer = TrainerChild(settings).start()  # this process serves; its child trains
    with stopped_by_signal() as stopped:
        try:
            return _serve(settings.model_copy(update={"train": False}), options)
        finally:
            trainer.stop()  # before this process exits: final checkpoint and models
    return stopped.exit()


def _serve(settings: ServerSettings, options: dict[str, Any]) -> int:
    import uvicorn

    from fedmobillm.server.app import create_app

    if settings.workers > 1:
        return _run_workers(settings, options)
    view = None
    if not settings.train:  # `fedmobillm train` may run beside: answer with its status
        from fedmobillm.server.trainer_view import TrainerView

        view = TrainerView
    uvicorn.run(create_app(settings, trainer_view=view), **options)
    return 0


def _store_name(settings: ServerSettings) -> str:
    if settings.database is None:
        return f"SQLite {settings.db_path}"
    from fedmobillm.server.store_pg import describe

    return describe(settings.database.get_secret_value())


def _run_workers(settings: ServerSettings, options: dict[str, Any]) -> int:
    """``settings.workers`` uvicorn worker processes (uvicorn's own supervisor: a worker that
    dies is replaced) on the PostgreSQL store, and the trainer thread in this process: one
    trainer, whatever the workers do (the store also refuses a second trainer per database)."""
    import json
    import os
    import threading

    import uvicorn

    from fedmobillm.errors import FedMobiLLMError
    from fedmobillm.server.app import WORKER_SETTINGS_ENV, open_service

    if settings.database is None:
        raise FedMobiLLMError(
            f"--workers {settings.workers} needs --database postgresql://...: the embedded "
            "SQLite store has one writer, so one process serves it",
            hint="leave --workers at 1, or store in PostgreSQL (docs/deploy.md)",
        )
    open_service(settings).store.close()  # schema, task and data-dir checks, once, here
    worker = settings.model_dump(mode="json")
    worker.update(
        admin_token=settings.admin_token.get_secret_value(),
        database=settings.database.get_secret_value(),
        train=False,
        workers=1,
    )
    os.environ[WORKER_SETTINGS_ENV] = json.dumps(worker)
    trainer, publisher, stop = None, None, threading.Event()
    if settings.train:
        from fedmobillm.server.store import open_store
        from fedmobillm.server.trainer import create_trainer
        from fedmobillm.server.trainer_view import publish_status

        trainer = create_trainer(settings)
        trainer.start()
        # named for the trainer (owner): its slot take-back after a network cut ends it too
        view_store = open_store(
            settings.model_copy(update={"database_pool": 1}), owner=trainer.slot_owner
        )
        publisher = threading.Thread(
            target=publish_status, args=(trainer, view_store, stop), name="trainer-status"
        )
        publisher.start()  # the workers' /v1/status reads what it publishes
    try:
        uvicorn.run(
            "fedmobillm.server.app:worker_app", factory=True, workers=settings.workers, **options
        )
    finally:
        if trainer is not None:
            trainer.stop()  # final checkpoint and export
            stop.set()
        if publisher is not None:
            publisher.join(10)
            view_store.close()
    return 0


def _tls_options(settings: ServerSettings) -> dict[str, str]:
    """uvicorn's ssl_certfile/ssl_keyfile (flags or the config file's ssl_certfile and
    ssl_keyfile), both or neither; plaintext on a host other than loopback is logged as a
    warning."""
    from fedmobillm.errors import FedMobiLLMError

    cert, key, host = settings.ssl_certfile, settings.ssl_keyfile, settings.host
    if (cert is None) != (key is None):
        raise FedMobiLLMError(
            "--ssl-certfile and --ssl-keyfile (ssl_certfile and ssl_keyfile in the config "
            "file) go together",
            hint="pass both the PEM certificate and its private key",
        )
    if cert is None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "PLAINTEXT on %s: activations, labels and tokens cross the network readable; "
                "serve with --ssl-certfile/--ssl-keyfile (docs/privacy.md)",
                host,
            )
        return {}
    for path in (cert, key):
        if not path.is_file():
            raise FedMobiLLMError(f"{path} does not exist", hint="pass PEM files")
    log.info("serving https with certificate %s", cert)
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
