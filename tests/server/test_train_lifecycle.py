"""`fedmobillm train` from start to stop (issue 17 review), real processes on real SQLite:

- started first on a fresh data dir it pins nothing: it waits for `fedmobillm serve` to record
  the federation's task and inputs (here `serve --task lm`, which the old trainer's pinned
  classify refused), takes them, and a --task that disagrees is refused;
- a refused second trainer publishes nothing: the status row stays the live trainer's;
- SIGTERM waits for the final checkpoint and personal models however long they take (the old
  60 s bound exited 0 without them), and a second SIGTERM exits non-zero saying what was not
  written."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from server_helpers import FAST, ServerProc, make_payload, register, upload
from train_helpers import TrainerProc, assert_refused_publishing_nothing, tiny_manifest, wait_for
from train_helpers import trainer_status as _status

pytestmark = pytest.mark.integration

# the trainer never idles and writes no checkpoint or export of its own after the first
# step: the final ones are left to the stop
NO_PERIODIC = {
    **FAST,
    "checkpoint_every": 1_000_000,
    "export_every": 1_000_000,
    "eval_every": 1_000_000,
    "step_sleep_s": 0.02,
}

# `fedmobillm train` whose final write (Trainer._finish) first sleeps FINAL_DELAY_S
SLOW_FINISH = """
import os, sys, time
from fedmobillm.server import trainer as t
finish = t.Trainer._finish
def slow(self):
    print(f"SLOW FINISH at step {self.side.step if self.side else 0}", flush=True)
    time.sleep(float(os.environ["FINAL_DELAY_S"]))
    finish(self)
t.Trainer._finish = slow
from fedmobillm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _published(db: Path) -> dict | None:
    """The trainer status row as published in the SQLite store (None before any)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'trainer_status'").fetchone()
    return json.loads(row[0]) if row else None


def test_train_started_first_waits_for_serve_and_a_refused_one_publishes_nothing(tmp_path):
    data = tmp_path / "data"
    config = tmp_path / "trainer.json"
    config.write_text(json.dumps(FAST))  # no task: the trainer takes what serve records
    trainer = TrainerProc(data, config).start()
    srv = ServerProc(data, FAST)
    srv.args += ["--no-train", "--task", "lm"]
    try:
        started = ("waiting for `fedmobillm serve`", "trainer process: data dir")
        wait_for(lambda: any(s in trainer.log() for s in started), 120, "the trainer to start")
        time.sleep(2.0)  # the trainer polls the store meanwhile: it records nothing
        assert trainer.running, trainer.log()[-3000:]
        srv.start()  # refused ("holds a classify federation") when the trainer pinned it
        assert "waiting for `fedmobillm serve`" in trainer.log()
        wait_for(lambda: "task lm, tokens inputs: as `fedmobillm serve`" in trainer.log(), 60, "lm")
        st = wait_for(
            lambda: (s := _status(srv.url)).get("process", {}).get("pid") == trainer.proc.pid and s,
            120,
            "the trainer's published status",
        )
        assert st["task"] == "lm" and st["inputs"] == "tokens" and st["running"] is True
        # a second trainer is refused and publishes nothing, not even for a second
        assert_refused_publishing_nothing(
            TrainerProc(data, config).command() + ["--task", "lm"],
            lambda: _published(data / "store.sqlite3"),
            trainer.proc.pid,
        )
        # a --task the store does not record is refused with what to do
        other = subprocess.run(
            TrainerProc(data, config).command() + ["--task", "classify"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert other.returncode != 0
        assert "federation of task lm" in other.stderr and "--task classify" in other.stderr
        assert trainer.stop() == 0  # nothing trained: nothing to write
        assert "records none itself" in trainer.log()
    finally:
        trainer.kill()
        srv.stop()


def _slow_trainer(tmp_path: Path, delay_s: float) -> tuple[ServerProc, subprocess.Popen, Path]:
    """`serve --no-train` with 300 uploaded samples and a training `fedmobillm train` whose
    final write is delay_s late; (server, trainer process, its log)."""
    data = tmp_path / "data"
    srv = ServerProc(data, NO_PERIODIC)
    srv.args.append("--no-train")
    srv.start()
    m = tiny_manifest()
    reg = register(srv.url, "a", m)
    r = upload(srv.url, reg, make_payload(reg, m, range(300), seed=1))
    assert r.status_code == 200, r.text
    log = tmp_path / "trainer.log"
    cmd = TrainerProc(data, srv._config_file()).command()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_FINISH, *cmd[3:]],  # cmd: python -m fedmobillm.cli
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "FINAL_DELAY_S": str(delay_s)},
            start_new_session=True,
        )
    wait_for(lambda: _status(srv.url).get("step", 0) >= 5, 180, "training steps")
    return srv, proc, log


def test_a_second_sigterm_exits_non_zero_naming_what_was_not_written(tmp_path):
    srv, proc, log = _slow_trainer(tmp_path, delay_s=600)
    try:
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "SLOW FINISH" in log.read_text(), 60, "the final write to begin")
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(90)  # the old trainer waited 60 s, then exited 0 without them
        text = log.read_text()
        assert rc == 1, text[-3000:]
        step = int(text.split("SLOW FINISH at step ")[1].split()[0])
        assert f"not written: the checkpoint of step {step}" in text, text[-3000:]
        assert "the personal model of " in text and f"at step {step}" in text, text[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        srv.stop()


@pytest.mark.slow
def test_sigterm_waits_for_a_final_write_longer_than_a_minute(tmp_path):
    srv, proc, log = _slow_trainer(tmp_path, delay_s=70)
    data = tmp_path / "data"
    try:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(300)
        text = log.read_text()
        assert rc == 0, text[-3000:]
        step = int(text.split("SLOW FINISH at step ")[1].split()[0])
        latest = json.loads((data / "checkpoints" / "LATEST").read_text())
        assert latest["step"] == step, (latest, text[-2000:])  # the final checkpoint
        (personal,) = (data / "personal").glob("*/personal.json")
        assert json.loads(personal.read_text())["trainer_step"] == step  # the final export
        assert "final checkpoint (step" in text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        srv.stop()


# -- the trainer slot in-process (issue 17 review): real Trainer, real SQLite store --------


def _sqlite_trainer(tmp_path: Path) -> Any:
    from fedmobillm.server.settings import load_settings
    from fedmobillm.server.trainer import Trainer

    settings, _ = load_settings(None, dev=True, data_dir=tmp_path, train=True)
    return Trainer(settings)


class _Flaky:
    """``open_store`` for the trainer module: the real store, whose quarantine poll fails
    once with SQLITE_BUSY (a transient database error); ``before_reopen`` runs before each
    later open (a rival claiming the slot meanwhile)."""

    def __init__(self, before_reopen: Any = None) -> None:
        from fedmobillm.server import store as store_mod

        self.real, self.opened, self.before_reopen = store_mod.open_store, 0, before_reopen

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.opened += 1
        if self.opened > 1 and self.before_reopen is not None:
            self.before_reopen()
        store = self.real(*args, **kwargs)
        if self.opened == 1:

            def busy() -> Any:
                raise sqlite3.OperationalError("database is locked")

            store.quarantined = busy
        return store


def test_a_database_error_clears_slot_claimed_and_the_status_is_not_published(
    tmp_path, monkeypatch
):
    """While the trainer retries a database error it holds no slot (its store is given up;
    another trainer may claim it): slot_claimed is cleared and publish_status publishes
    nothing until the trainer holds the slot again (the old flag stayed set: it published
    all through the outage, over another trainer's status)."""
    import threading
    from types import SimpleNamespace

    from fedmobillm.server import trainer as trainer_mod
    from fedmobillm.server.store import Store
    from fedmobillm.server.trainer_view import STATUS_KEY, publish_status

    trainer = _sqlite_trainer(tmp_path)
    flaky = _Flaky()
    monkeypatch.setattr(trainer_mod, "open_store", flaky)
    store = trainer._claim()
    assert trainer.slot_claimed.is_set()
    trainer._train_on(store)  # the quarantine poll fails: said, waited for, store closed
    assert trainer.database_retry is not None and not trainer.slot_claimed.is_set()

    # publish_status follows slot_claimed: publishing, paused, publishing again
    claimed, stop = threading.Event(), threading.Event()
    fake = SimpleNamespace(
        slot_claimed=claimed, slot_refused=False, error=None, status=lambda: {"pid": 1}
    )
    view = Store(tmp_path / "view.sqlite3")
    published = lambda: (json.loads(view.get_meta(STATUS_KEY) or "{}")).get("published")  # noqa: E731
    claimed.set()
    thread = threading.Thread(target=publish_status, args=(fake, view, stop), daemon=True)
    thread.start()
    try:
        first = wait_for(published, 10, "a first status")
        claimed.clear()
        time.sleep(1.5)  # longer than PUBLISH_EVERY_S: one tick in flight may still land
        paused = published()
        time.sleep(2.5)
        assert published() == paused, "published while the slot was not held"
        assert paused - first < 2.5
        claimed.set()
        wait_for(lambda: published() > paused, 10, "publishing again once the slot is held")
    finally:
        stop.set()
        thread.join(10)
        view.close()


def test_a_refusal_after_a_database_error_says_lost_the_trainer_slot(tmp_path, monkeypatch, caplog):
    """The slot taken by a rival while the trainer retried a database error: TrainerSlotTaken,
    logged as "lost the trainer slot" (not "trainer not started"), no traceback."""
    from fedmobillm.server import trainer as trainer_mod
    from fedmobillm.server.store import Store

    trainer = _sqlite_trainer(tmp_path)
    rival = Store(trainer.settings.db_path)

    monkeypatch.setattr(trainer_mod, "open_store", _Flaky(before_reopen=rival.claim_trainer))
    caplog.set_level(logging.INFO)
    try:
        trainer.start()
        trainer._thread.join(60)
        assert not trainer._thread.is_alive() and trainer.slot_refused
        assert "TrainerSlotTaken: another trainer is running" in trainer.error
        records = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [r.getMessage().split(":")[0] for r in records] == ["lost the trainer slot"]
        assert records[0].exc_info is None
    finally:
        rival.close()


def test_a_non_refusal_open_error_keeps_its_traceback(tmp_path, monkeypatch, caplog):
    """An error opening the store that is neither transient nor a refusal (a bug, a broken
    file) is no "trainer not started": slot_refused stays False and it is logged with its
    traceback."""
    from fedmobillm.server import trainer as trainer_mod

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.DatabaseError("file is not a database")

    trainer = _sqlite_trainer(tmp_path)
    monkeypatch.setattr(trainer_mod, "open_store", broken)
    caplog.set_level(logging.INFO)
    trainer.start()
    trainer._thread.join(60)
    assert not trainer.slot_refused and "file is not a database" in trainer.error
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == ["trainer stopped on an error"]
    assert errors[0].exc_info is not None


def test_waiting_names_the_store_creates_no_file_and_says_errors_once(tmp_path):
    """`fedmobillm train` waiting for serve says at once where it waits (the resolved SQLite
    path; a PostgreSQL URL without its password), creates no store.sqlite3 in a data dir that
    has none (a mistyped --data-dir no longer gets an empty store), and says a database it
    cannot reach once per WAIT_LOG_S, not at every 1 s poll."""
    config = tmp_path / "trainer.json"
    config.write_text(json.dumps(FAST))
    typo = tmp_path / "typo"
    sqlite = TrainerProc(typo, config).start()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://fed:sekrit@127.0.0.1:{port}/nodb"
    pg = TrainerProc(tmp_path / "pgdata", config, database=url).start()
    try:
        for proc in (sqlite, pg):
            wait_for(lambda p=proc: "waiting for `fedmobillm serve`" in p.log(), 120, "waiting")
        time.sleep(4.0)  # four polls more
        assert sqlite.running and pg.running, sqlite.log()[-2000:] + pg.log()[-2000:]
        assert not (typo / "store.sqlite3").exists()
        said = sqlite.log()
        assert f"in the store {(typo / 'store.sqlite3').resolve()} (SQLite" in said, said
        assert "no store.sqlite3 there yet" in said and said.count("waiting for") == 1
        said = pg.log()
        assert f"postgresql://fed@127.0.0.1:{port}/nodb" in said and "sekrit" not in said, said
        assert said.count("cannot read the store") == 1, said
    finally:
        for proc in (sqlite, pg):
            proc.stop(30)
            proc.kill()
