"""`fedmobillm serve --trainer-process`: the trainer as a child process of `serve`.

The embedded trainer is a thread of the serving process, and while it steps it holds the
GIL for most of each step: uploads wait behind it (bench_fleet, 128 devices on SQLite at
load 10-12: p99 1.24-1.25 s with the thread, 0.83-0.85 s with the trainer in its own
process; docs/server.md). With ``trainer_process`` the serving process trains nothing
(its `/v1/status`, back-pressure and personal-model downloads read what the trainer
publishes in the store, as with `serve --no-train`), and this module runs `fedmobillm train`
as its child on the same store and data dir: one command, two processes.

- Settings: the child builds the very settings `serve` resolved (flags, config file,
  environment), passed as JSON in ``TRAINER_SETTINGS_ENV`` (secrets included: the
  environment of the server's own processes only, never the command line).
- Lifetime: the child is in a session of its own (a Ctrl-C in the terminal reaches `serve`,
  which then stops it once, with SIGTERM: final checkpoint and personal models); on Linux
  it also gets SIGTERM if `serve` dies without stopping it (kill -9), so no trainer outlives
  its server.
- Supervision: a child that exits while `serve` runs is logged with its exit code and
  started again after a backoff (1 s, doubling to 60 s; back to 1 s after 5 minutes up).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

# the settings `serve` resolved, as JSON, for its trainer child (`fedmobillm train` reads it)
TRAINER_SETTINGS_ENV = "_FEDMOBILLM_TRAINER_SETTINGS"
BACKOFF_S = (1.0, 60.0)  # first and largest wait before a restart
HEALTHY_S = 300.0  # up this long: the next restart waits the first backoff again


def _die_with(parent: int) -> Any:
    """For the child, before exec: SIGTERM to it when the thread that started it dies (Linux
    PR_SET_PDEATHSIG; e.g. kill -9 of serve), at once if that already happened. Everything
    it calls is looked up here, in the parent: after a fork in a threaded process the child
    must not import (another thread may have held the import lock)."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    getppid, kill, getpid, sigterm = os.getppid, os.kill, os.getpid, int(signal.SIGTERM)

    def arm() -> None:  # pragma: no cover - runs in the child
        if prctl is not None:
            prctl(1, sigterm)  # PR_SET_PDEATHSIG
        if getppid() != parent:  # serve died between fork and prctl
            kill(getpid(), sigterm)

    return arm


class TrainerChild:
    """`python -m fedmobillm.cli train` with ``settings`` (a ServerSettings), supervised."""

    def __init__(self, settings: Any, grace_s: float = 600.0) -> None:
        payload = settings.model_dump(mode="json")
        for secret in ("admin_token", "database"):
            value = getattr(settings, secret)
            payload[secret] = value.get_secret_value() if value is not None else None
        payload.update(train=True, workers=1, trainer_process=False)
        self.env = {**os.environ, TRAINER_SETTINGS_ENV: json.dumps(payload)}
        self.grace_s = grace_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._spawn_lock = threading.Lock()
        self._watch: threading.Thread | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "fedmobillm.cli", "train"]

    def start(self) -> TrainerChild:
        """Start the child (from the caller's thread, which must outlive it: see
        ``_die_with_parent``) and the thread that restarts it if it exits."""
        self._spawn()
        self._watch = threading.Thread(target=self._supervise, name="trainer-child", daemon=True)
        self._watch.start()
        return self

    def _spawn(self) -> None:
        with self._spawn_lock:
            if self._stopping.is_set():
                return
            self.proc = subprocess.Popen(  # noqa: S603 - our own CLI, no shell
                self.command(),
                env=self.env,
                start_new_session=True,  # terminal signals reach serve, which stops it once
                preexec_fn=_die_with(os.getpid()),
            )
            self.started = time.monotonic()
            log.info("trainer process started (pid %d): `fedmobillm train`", self.proc.pid)

    def _supervise(self) -> None:
        backoff = BACKOFF_S[0]
        while not self._stopping.is_set():
            proc = self.proc
            if proc is None:
                return
            code = proc.wait()
            if self._stopping.is_set():
                return
            up = time.monotonic() - self.started
            backoff = BACKOFF_S[0] if up >= HEALTHY_S else backoff
            log.error(
                "the trainer process (pid %d) exited with code %s after %.0f s; starting it "
                "again in %.0f s (its log lines above say why)",
                proc.pid,
                code,
                up,
                backoff,
            )
            if self._stopping.wait(backoff):
                return
            backoff = min(2 * backoff, BACKOFF_S[1])
            self.restarts += 1
            self._spawn()

    def stop(self) -> int | None:
        """SIGTERM, then wait up to ``grace_s`` for its final checkpoint and personal models
        (SIGKILL after, said in the log); its exit code."""
        self._stopping.set()
        with self._spawn_lock:
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        log.info("stopping the trainer process (pid %d): final checkpoint", proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            log.error(
                "the trainer process (pid %d) did not finish within %.0f s: killed; its last "
                "checkpoint stands",
                proc.pid,
                self.grace_s,
            )
            proc.kill()
            code = proc.wait()
        if code != 0:
            log.error("the trainer process exited with code %s (its log says why)", code)
        return code


class _Stopped(BaseException):
    """SIGTERM, re-raised by uvicorn once it has shut down (see ``stopped_by_signal``)."""


class _Stop:
    signum: int | None = None

    def exit(self) -> int:
        """Die of the signal that stopped serve, as serve without a child does (uvicorn
        re-raises it), now that the child is stopped."""
        if self.signum is not None:
            signal.signal(self.signum, signal.SIG_DFL)
            os.kill(os.getpid(), self.signum)
        return 0


@contextlib.contextmanager
def stopped_by_signal() -> Any:
    """uvicorn handles SIGTERM itself and, after its graceful shutdown, re-raises it with the
    handler it found, the default one (the process dies at once, skipping ``finally``). This
    installs a handler that raises instead, so the caller's ``finally`` stops the trainer
    child first; ``exit()`` then ends the process with that signal."""
    stop = _Stop()

    def raise_stopped(signum: int, _frame: Any) -> None:
        raise _Stopped(signum)

    previous = signal.signal(signal.SIGTERM, raise_stopped)
    try:
        yield stop
    except _Stopped as exc:
        stop.signum = exc.args[0]
    finally:
        signal.signal(signal.SIGTERM, previous)
