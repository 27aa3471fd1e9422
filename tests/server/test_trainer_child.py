"""`fedmobillm serve --trainer-process` (issue 17): one command, the trainer in a child
process. A real uvicorn server on SQLite starts `fedmobillm train` as its child with its own
settings; the child trains on the uploads, publishes its status (which `/v1/status` shows),
exports the personal model the server hands out, is started again if it dies, is stopped
with a final checkpoint when serve stops, and does not outlive a serve killed with -9."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
from server_helpers import FAST, ServerProc, register
from train_helpers import (
    assert_served_model_is_the_trainers,
    tiny_manifest,
    upload_train_and_validation,
    wait_for,
    wait_trained_and_exported,
)
from train_helpers import trainer_status as _status

pytestmark = pytest.mark.integration


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _child_pid(srv: ServerProc) -> int:
    st = wait_for(lambda: (s := _status(srv.url)).get("process") and s, 180, "a published status")
    assert st["process"]["command"] == "train"
    return st["process"]["pid"]


def test_serve_runs_supervises_and_stops_its_trainer_child(tmp_path):
    data = tmp_path / "data"
    srv = ServerProc(data, {**FAST, "trainer_process": True}).start()
    try:
        m = tiny_manifest()
        reg = register(srv.url, "a", m)
        upload_train_and_validation(srv.url, reg, m)
        st = wait_trained_and_exported(srv.url, 240)
        pid = st["process"]["pid"]
        assert pid != srv.proc.pid and psutil.Process(pid).ppid() == srv.proc.pid
        assert_served_model_is_the_trainers(srv.url, reg)
        # the child dies: serve starts it again, and it resumes from its checkpoint
        os.kill(pid, signal.SIGKILL)
        again = wait_for(
            lambda: (
                (s := _status(srv.url)).get("process", {}).get("pid") not in (None, pid)
                and s.get("resumed_from") is not None
                and s
            ),
            240,
            "the restarted trainer child",
        )
        assert again["resumed_from"] >= 20
        child = again["process"]["pid"]
        srv.stop()  # SIGTERM: serve stops its child, which writes its final state, then exits
        assert _gone(child) and (data / "checkpoints" / "LATEST").exists()
        log = srv.log_path.read_text()
        assert "trainer a child process" in log and "exited with code -9" in log
        assert "stopping the trainer process" in log
        assert "final checkpoint (step" in log  # the child's own last words
    finally:
        srv.kill()


def test_a_killed_serve_takes_its_trainer_child_with_it(tmp_path):
    srv = ServerProc(tmp_path / "data", {**FAST, "trainer_process": True}).start()
    try:
        m = tiny_manifest()
        reg = register(srv.url, "a", m)
        upload_train_and_validation(srv.url, reg, m)
        child = _child_pid(srv)
        os.kill(srv.proc.pid, signal.SIGKILL)  # serve alone: the child is in its own session
        srv.proc.wait(30)
        assert wait_for(lambda: _gone(child), 120, "the orphaned trainer child to exit")
        # PDEATHSIG (SIGHUP, sent at each re-parenting as serve's threads die) is one request
        # to finish: the child writes its final checkpoint, not "exiting on a second signal"
        log = srv.log_path.read_text()
        assert "final checkpoint (step" in log and "second signal" not in log, log[-3000:]
    finally:
        srv.kill()
