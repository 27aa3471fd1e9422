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
  it gets SIGHUP if `serve` dies without stopping it (kill -9), which it takes as one
  request to finish the same way, so no trainer outlives its server.
- Supervision: a child that exits while `serve` runs is logged with its exit code and
  started again: at once if it had taken a training step, else after a backoff (1 s,
  doubling to 60 s; back to 1 s after 5 minutes up).
- Warm standby (setting ``trainer_standby``, on by default): a second child that has already
  imported torch and the trainer and done what only reads (settings, the store's task
  checked, the trainer object built), and waits on its channel (a socketpair) until told to
  take over. When the active child dies, the standby trains at once (no ~3 s import of torch) and
  a new standby is started STANDBY_DELAY_S later (its imports would otherwise compete with
  the new trainer's first steps for the CPU).
- One trainer at a time: the supervisor promotes the standby only once the active child has
  been reaped (it is dead), and every supervised child holds the data dir's
  ``trainer.process.lock`` (an flock, released by the kernel when its process exits) from
  its take-over to its exit, waiting for it first: a child of a `serve` killed with -9,
  still writing its final checkpoint (PDEATHSIG: SIGHUP), is waited for by the next
  `serve`'s child. The store's trainer slot (``open_store(trainer=True)``) is waited for
  too (PostgreSQL ends a dead trainer's session, and its advisory lock, a moment after).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# the settings `serve` resolved, as JSON, for its trainer child (`fedmobillm train` reads it)
TRAINER_SETTINGS_ENV = "_FEDMOBILLM_TRAINER_SETTINGS"
# the child's end of its channel to the supervisor (a file descriptor), and "1" for a standby
CHANNEL_ENV = "_FEDMOBILLM_TRAINER_CHANNEL"
STANDBY_ENV = "_FEDMOBILLM_TRAINER_STANDBY"
GO, STEPPED = b"g", b"s"  # supervisor -> standby: take over; child -> supervisor: it trains
LOCK_NAME = "trainer.process.lock"  # in the data dir: held by the one supervised trainer
BACKOFF_S = (1.0, 60.0)  # first and largest wait before restarting a child that never stepped
HEALTHY_S = 300.0  # up this long: the next restart waits the first backoff again
STANDBY_DELAY_S = 10.0  # a child's start (or take-over) to the next standby's spawn
WATCH_S = 0.5  # how often the supervisor looks at the standby while the active child runs
SLOT_WAIT_S = 30.0  # how long a supervised child waits for the store's trainer slot
PARENT_GONE = signal.SIGHUP  # the child's PR_SET_PDEATHSIG


def _die_with(parent: int) -> Any:
    """For the child, before exec: SIGHUP (PARENT_GONE) to it when the thread that started it
    dies (Linux PR_SET_PDEATHSIG; e.g. kill -9 of serve), at once if that already happened.
    Not SIGTERM: as serve's threads die one by one the kernel sends it at each re-parenting,
    and a second SIGTERM makes `fedmobillm train` exit without its final checkpoint (seen in
    bench_crash); the child handles SIGHUP as one request to finish (``on_parent_gone``). A
    standby, which has not installed that handler yet, dies of it at once. Everything it
    calls is looked up here, in the parent: after a fork in a threaded process the child
    must not import (another thread may have held the import lock)."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    getppid, kill, getpid, sig = os.getppid, os.kill, os.getpid, int(PARENT_GONE)

    def arm() -> None:  # pragma: no cover - runs in the child
        if prctl is not None:
            prctl(1, sig)  # PR_SET_PDEATHSIG
        if getppid() != parent:  # serve died between fork and prctl
            kill(getpid(), sig)

    return arm


def on_parent_gone(stop: threading.Event) -> None:
    """In a supervised child once it trains: PARENT_GONE (however often it comes) sets
    ``stop``: the trainer finishes (final checkpoint and personal models) and exits."""
    handle_in_thread([PARENT_GONE], lambda _sig: stop.set())


def handle_in_thread(signals: list[int], act: Any) -> None:
    """Handle ``signals`` with ``act(signum)`` in a thread of its own, never in the signal
    handler: a handler runs in the main thread between two bytecodes, possibly inside
    ``Event.wait`` holding the event's (non-reentrant) lock, and an ``Event.set`` there
    deadlocks (seen: the child of a killed serve, which gets PARENT_GONE more than once, hung
    in its handler holding the data dir's trainer lock). The handler only writes the signal's
    number to a pipe."""
    r, w = os.pipe()
    os.set_blocking(w, False)

    def handler(signum: int, _frame: Any) -> None:
        with contextlib.suppress(OSError):  # a full pipe: enough signals are pending already
            os.write(w, bytes([signum]))

    def deliver() -> None:
        while True:
            for signum in os.read(r, 64):
                act(signum)

    threading.Thread(target=deliver, name="signals", daemon=True).start()
    for sig in signals:
        signal.signal(sig, handler)


class _Child:
    """One `fedmobillm train` child: its process, the supervisor's end of its channel, since
    when it is the active trainer (None while a standby) and whether it said it stepped."""

    def __init__(self, proc: subprocess.Popen[bytes], chan: socket.socket, standby: bool):
        self.proc, self.chan = proc, chan
        self.started: float | None = None if standby else time.monotonic()
        self.stepped = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> bool:
        """Tell a standby to take over; False if it is gone."""
        if self.proc.poll() is not None:
            return False
        try:
            self.chan.sendall(GO)
        except OSError:
            return False
        self.started = time.monotonic()
        return True

    def has_stepped(self) -> bool:
        """Whether the child said it took a training step (read without blocking)."""
        if not self.stepped:
            with contextlib.suppress(OSError):
                self.stepped = STEPPED in self.chan.recv(64, socket.MSG_DONTWAIT)
        return self.stepped

    def up_s(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def end(self, grace_s: float) -> int:
        """SIGTERM (a standby dies at once; it holds nothing), SIGKILL after ``grace_s``."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.chan.close()


class TrainerChild:
    """`python -m fedmobillm.cli train` with ``settings`` (a ServerSettings), supervised, with
    a warm standby if ``settings.trainer_standby``."""

    def __init__(self, settings: Any, grace_s: float = 600.0) -> None:
        payload = settings.model_dump(mode="json")
        for secret in ("admin_token", "database"):
            value = getattr(settings, secret)
            payload[secret] = value.get_secret_value() if value is not None else None
        payload.update(train=True, workers=1, trainer_process=False)
        self.env = {**os.environ, TRAINER_SETTINGS_ENV: json.dumps(payload)}
        self.grace_s = grace_s
        self.use_standby = bool(getattr(settings, "trainer_standby", False))
        self.active: _Child | None = None
        self.standby: _Child | None = None
        self.restarts = 0
        self.takeovers = 0  # restarts the standby made
        self._standby_due = 0.0
        self._standby_wait = STANDBY_DELAY_S  # doubled while standbys exit on their own
        self._stopping = threading.Event()
        self._spawn_lock = threading.Lock()
        self._watch: threading.Thread | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The active trainer's process."""
        return None if self.active is None else self.active.proc

    def command(self) -> list[str]:
        return [sys.executable, "-m", "fedmobillm.cli", "train"]

    def start(self) -> TrainerChild:
        """Start the supervising thread, which starts the children (PR_SET_PDEATHSIG follows
        the thread that forks: this one lives until every child it started has exited)."""
        self._watch = threading.Thread(target=self._supervise, name="trainer-child", daemon=True)
        self._watch.start()
        return self

    def _spawn(self, standby: bool) -> _Child | None:
        with self._spawn_lock:
            if self._stopping.is_set():
                return None
            mine, theirs = socket.socketpair()
            env = {**self.env, CHANNEL_ENV: str(theirs.fileno()), STANDBY_ENV: str(int(standby))}
            try:
                proc = subprocess.Popen(  # noqa: S603 - our own CLI, no shell
                    self.command(),
                    env=env,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,  # terminal signals reach serve, which stops it once
                    preexec_fn=_die_with(os.getpid()),
                )
            finally:
                theirs.close()
            child = _Child(proc, mine, standby)
            if standby:
                self.standby = child
                log.info("standby trainer process started (pid %d): imports, then waits", proc.pid)
            else:
                self.active = child
                log.info("trainer process started (pid %d): `fedmobillm train`", proc.pid)
            self._standby_due = time.monotonic() + self._standby_wait
            return child

    def _supervise(self) -> None:
        try:
            self._supervise_loop()
        except Exception:  # the children get SIGHUP as this thread ends (PDEATHSIG)
            log.exception("the trainer supervisor failed: the trainer process stops with serve's")

    def _supervise_loop(self) -> None:
        backoff = BACKOFF_S[0]
        if self._spawn(standby=False) is None:
            return
        while True:
            child = self.active
            assert child is not None
            code = self._wait_active(child)
            if self._stopping.is_set():
                return
            stepped, up = child.has_stepped(), child.up_s()
            child.chan.close()
            backoff = BACKOFF_S[0] if up >= HEALTHY_S else backoff
            wait = 0.0 if stepped else backoff
            log.error(
                "the trainer process (pid %d) exited with code %s after %.0f s%s; %s (its log "
                "lines above say why)",
                child.pid,
                code,
                up,
                "" if stepped else " before its first training step",
                f"starting it again in {wait:.0f} s" if wait else "starting it again now",
            )
            if self._stopping.wait(wait):
                return
            if not stepped:
                backoff = min(2 * backoff, BACKOFF_S[1])
            self.restarts += 1
            if not self._promote() and self._spawn(standby=False) is None:
                return

    def _wait_active(self, child: _Child) -> int:
        """Wait for the active child's exit (stopping or not: this thread must outlive it),
        keeping a standby meanwhile."""
        while True:
            try:
                return child.proc.wait(WATCH_S)
            except subprocess.TimeoutExpired:
                if not self._stopping.is_set():
                    self._keep_standby()

    def _keep_standby(self) -> None:
        """A standby once it is due; one that exited on its own is said and replaced (the
        wait before the next doubles up to BACKOFF_S[1], so a standby that cannot start does
        not loop)."""
        if not self.use_standby:
            return
        spare = self.standby
        if spare is not None and spare.proc.poll() is not None:
            self._standby_wait = min(2 * self._standby_wait, BACKOFF_S[1])
            log.warning(
                "the standby trainer process (pid %d) exited with code %s; another in %.0f s",
                spare.pid,
                spare.proc.returncode,
                self._standby_wait,
            )
            spare.chan.close()
            self.standby, self._standby_due = None, time.monotonic() + self._standby_wait
        elif spare is None and time.monotonic() >= self._standby_due:
            self._spawn(standby=True)

    def _promote(self) -> bool:
        """The standby takes over (called once the active child is reaped); False if there
        is none, or it is gone."""
        with self._spawn_lock:
            spare, self.standby = self.standby, None
            if spare is None or self._stopping.is_set():
                return False
            if not spare.go():
                log.warning(
                    "the standby trainer process (pid %d) is gone (code %s): starting a new one",
                    spare.pid,
                    spare.proc.poll(),
                )
                spare.chan.close()
                return False
            self.active, self.takeovers = spare, self.takeovers + 1
            self._standby_wait = STANDBY_DELAY_S
            self._standby_due = time.monotonic() + STANDBY_DELAY_S
        log.info("the standby trainer process (pid %d) takes over", spare.pid)
        return True

    def stop(self) -> int | None:
        """SIGTERM to the standby, and to the active child, which is waited for up to
        ``grace_s`` for its final checkpoint and personal models (SIGKILL after, said in
        the log); the active child's exit code."""
        self._stopping.set()
        with self._spawn_lock:
            active, spare = self.active, self.standby
        if spare is not None:
            spare.end(10.0)
        if active is None or active.proc.poll() is not None:
            return None if active is None else active.proc.returncode
        log.info("stopping the trainer process (pid %d): final checkpoint", active.pid)
        with contextlib.suppress(ProcessLookupError):
            active.proc.send_signal(signal.SIGTERM)
        try:
            code = active.proc.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            log.error(
                "the trainer process (pid %d) did not finish within %.0f s: killed; its last "
                "checkpoint stands",
                active.pid,
                self.grace_s,
            )
            active.proc.kill()
            code = active.proc.wait()
        if code != 0:
            log.error("the trainer process exited with code %s (its log says why)", code)
        return code


# -- in the child (`fedmobillm train` started by the supervisor above) --


class Supervised:
    """A `fedmobillm train` started by serve's supervisor: its channel, and whether it is
    the standby."""

    def __init__(self, chan: socket.socket, standby: bool) -> None:
        self.chan, self.standby = chan, standby
        self.t0 = time.monotonic()

    def take_over(self, settings: Any) -> None:
        """A standby (everything read-only done: imports, settings, the store checked, the
        trainer built) says it is ready and blocks until told to take over, or exits 0 when
        its supervisor is gone (SIGTERM or SIGHUP, not yet handled, end it too). Then the
        data dir's trainer-process lock is taken, waiting while another trainer process of
        this data dir lives (said in the log every 30 s), and the store's trainer slot is
        waited for."""
        pid = os.getpid()
        if self.standby:
            took = time.monotonic() - self.t0
            log.info("standby trainer (pid %d): ready in %.1f s; waiting to take over", pid, took)
            if self.chan.recv(1) != GO:
                log.info("standby trainer (pid %d): serve is gone or stopping; exiting", pid)
                sys.exit(0)
            log.info("standby trainer (pid %d): taking over", pid)
        _hold_lock(Path(settings.data_dir) / LOCK_NAME)
        wait_for_slot(settings)


def supervised() -> Supervised | None:
    """Called first by `fedmobillm train`: None unless the supervisor started this process
    (its channel in CHANNEL_ENV); a standby imports here what the trainer needs."""
    fd = os.environ.pop(CHANNEL_ENV, None)
    if fd is None:
        return None
    sup = Supervised(socket.socket(fileno=int(fd)), os.environ.pop(STANDBY_ENV, "0") == "1")
    if sup.standby:
        warm_imports()
    return sup


def warm_imports() -> None:
    """What `fedmobillm train` imports before and during its first step and export."""
    from fedmobillm.server.app import _warm_imports, open_service  # noqa: F401
    from fedmobillm.server.trainer import create_trainer  # noqa: F401

    _warm_imports()


_held: list[Any] = []  # the lock file, open (and locked) for the life of this process


def _hold_lock(path: Path) -> None:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held open until this process exits
    t0 = said = time.monotonic()
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() - said >= 30.0:
                said = time.monotonic()
                log.info(
                    "waiting for the previous trainer process of this data dir to exit "
                    "(%.0f s; e.g. writing its final checkpoint): %s",
                    said - t0,
                    path,
                )
            time.sleep(0.02)
    if time.monotonic() - t0 > 0.1:
        log.info("the previous trainer process exited after %.1f s", time.monotonic() - t0)
    _held.append(handle)


def wait_for_slot(settings: Any) -> None:
    """Wait (up to SLOT_WAIT_S) until the store's trainer slot is free: the previous trainer
    is dead (``supervised`` holds the lock), but PostgreSQL may end its session a moment
    later. Another trainer that holds it past that is refused, as before (TrainerSlotTaken
    from the trainer)."""
    from fedmobillm.server.store import TrainerSlotTaken, open_store

    deadline = time.monotonic() + SLOT_WAIT_S
    while True:
        try:
            open_store(settings, trainer=True).close()
            return
        except TrainerSlotTaken:
            if time.monotonic() >= deadline:
                return  # the trainer's own claim says who holds it
            time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the trainer's own claim meets it and reports it
            log.debug("waiting for the trainer slot", exc_info=True)
            return


def report_first_step(trainer: Any, chan: socket.socket | None) -> threading.Thread:
    """Log the trainer's first training step (with its unix time: bench_crash and
    bench_restart read it) and tell the supervisor, which restarts a child that stepped at
    once (one that never did waits a backoff)."""
    t0 = time.monotonic()

    def watch() -> None:
        while trainer._thread.is_alive():
            side = trainer.side
            if side is not None and side.step > (trainer.resumed_from or 0):
                log.info(
                    "trainer process %d: first training step (%d) at unix %.3f, %.2f s after "
                    "it started training",
                    os.getpid(),
                    side.step,
                    time.time(),
                    time.monotonic() - t0,
                )
                if chan is not None:
                    with contextlib.suppress(OSError):
                        chan.sendall(STEPPED)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, name="trainer-first-step", daemon=True)
    thread.start()
    return thread


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
