"""`serve --trainer-process` with its warm standby (setting ``trainer_standby``, issue 17): a
real serve on SQLite keeps a second `fedmobillm train` child that has imported torch and the
trainer and waits; kill -9 of the active child and the standby takes over (no imports:
it trains again within seconds, resuming from the checkpoint), a new standby is started,
and at every point exactly one process holds the trainer locks (the data dir's
``trainer.process.lock`` and the store's trainer slot), read from the kernel's /proc/locks."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from server_helpers import FAST, ServerProc, register
from train_helpers import tiny_manifest, upload_train_and_validation, wait_for
from train_helpers import trainer_status as _status

from fedmobillm.server.trainer_child import LOCK_NAME

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/locks: Linux"),
]


def lock_holders(path: Path) -> set[int]:
    """Pids holding an flock on ``path`` (/proc/locks lists device:inode)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if "->" not in f and f[1] == "FLOCK" and f[5] == dev:
            pids.add(int(f[4]))
    return pids


def _children(srv: ServerProc) -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process(srv.proc.pid).children() if "train" in p.cmdline()}


def _ready_standby(srv: ServerProc, active: int) -> int:
    """The pid of the standby, once its log says it has imported everything and waits."""

    def ready() -> int | None:
        log = srv.log_path.read_text()
        for pid in _children(srv):
            if pid != active and f"standby trainer (pid {pid}): ready in" in log:
                return pid
        return None

    return wait_for(ready, 180, "a warm standby trainer")


def test_the_standby_takes_over_a_killed_trainer(tmp_path):
    data = tmp_path / "data"
    srv = ServerProc(data, {**FAST, "trainer_process": True, "trainer_standby": True}).start()
    locks = (data / LOCK_NAME, data / "store.sqlite3.trainer.lock")
    try:
        m = tiny_manifest()
        upload_train_and_validation(srv.url, register(srv.url, "a", m), m)
        st = wait_for(lambda: (s := _status(srv.url)).get("step", 0) >= 25 and s, 240, "steps")
        active = st["process"]["pid"]
        standby = _ready_standby(srv, active)
        assert set(_children(srv)) == {active, standby}
        assert all(lock_holders(p) == {active} for p in locks)  # the standby holds nothing
        checkpoint = st["checkpoint_step"]
        assert checkpoint and checkpoint >= 20

        os.kill(active, signal.SIGKILL)
        t0 = time.monotonic()
        again = wait_for(
            lambda: (
                (s := _status(srv.url))["process"]["pid"] == standby
                and s["step"] > (s["resumed_from"] or 0)
                and s
            ),
            60,
            "the standby to train",
        )
        took = time.monotonic() - t0
        assert again["resumed_from"] >= checkpoint  # from the checkpoint, not from scratch
        assert all(lock_holders(p) == {standby} for p in locks)
        log = srv.log_path.read_text()
        assert f"the standby trainer process (pid {standby}) takes over" in log
        assert re.search(rf"trainer process {standby}: first training step \(\d+\) at unix", log)
        assert took < 30, took  # no imports: seconds, where a cold start loads torch again

        # a new standby comes; still one trainer holding the locks
        fresh = _ready_standby(srv, standby)
        assert fresh not in (active, standby)
        assert set(_children(srv)) == {standby, fresh}
        assert all(lock_holders(p) == {standby} for p in locks)
        srv.stop()  # SIGTERM: the standby ends, the active child writes its final checkpoint
        assert not psutil.pid_exists(fresh) or psutil.Process(fresh).status() == "zombie"
        assert "final checkpoint (step" in srv.log_path.read_text()
    finally:
        srv.kill()


@pytest.mark.slow  # CI runs the take-over above; this is the supervisor without a standby
def test_without_standby_a_killed_trainer_is_started_cold(tmp_path):
    data = tmp_path / "data"
    srv = ServerProc(data, {**FAST, "trainer_process": True, "trainer_standby": False}).start()
    try:
        m = tiny_manifest()
        upload_train_and_validation(srv.url, register(srv.url, "a", m), m)
        st = wait_for(lambda: (s := _status(srv.url)).get("step", 0) >= 25 and s, 240, "steps")
        active = st["process"]["pid"]
        time.sleep(1.0)
        assert set(_children(srv)) == {active}  # no standby
        os.kill(active, signal.SIGKILL)
        again = wait_for(
            lambda: (
                (s := _status(srv.url))["process"]["pid"] not in (None, active)
                and s["step"] > (s["resumed_from"] or 0)
                and s
            ),
            240,
            "a new trainer process",
        )
        assert again["resumed_from"] >= 20
        log = srv.log_path.read_text()
        assert "standby trainer" not in log and "starting it again now" in log  # it had stepped
    finally:
        srv.kill()
