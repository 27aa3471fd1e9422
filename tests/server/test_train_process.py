"""`fedmobillm train` as its own process beside `fedmobillm serve --no-train` (issue 17):
a real uvicorn server that only ingests and a real trainer process on the same SQLite store
and data dir. The trainer process trains on the uploads, `/v1/status` of the server shows
its published status (which process trains), and the personal model the server hands out
is the one the trainer process exported. A second trainer on the same store is refused."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest
from server_helpers import FAST, ServerProc, register
from train_helpers import (
    TrainerProc,
    assert_served_model_is_the_trainers,
    start_ingest_only,
    tiny_manifest,
    upload_train_and_validation,
    wait_for,
    wait_trained_and_exported,
)
from train_helpers import trainer_status as _status

pytestmark = pytest.mark.integration


def test_trainer_process_trains_beside_an_ingest_only_server(tmp_path):
    data = tmp_path / "data"
    srv = ServerProc(data, FAST)
    trainer = start_ingest_only(srv)
    try:
        assert _status(srv.url)["running"] is False  # nothing published yet
        m = tiny_manifest()
        reg = register(srv.url, "a", m)
        auth = {"Authorization": f"Bearer {reg['token']}"}
        upload_train_and_validation(srv.url, reg, m)
        time.sleep(1.0)
        # the server alone trains nothing: no personal model
        assert httpx.get(f"{srv.url}/v1/personal-model", headers=auth).status_code == 409
        trainer.start()
        st = wait_trained_and_exported(srv.url, 180)
        assert st["process"]["command"] == "train"
        assert st["process"]["pid"] == trainer.proc.pid
        assert st["published_age_s"] < 30 and st["database_retry"] is None
        assert_served_model_is_the_trainers(srv.url, reg)
        # one trainer per store: a second `fedmobillm train` is refused
        second = subprocess.run(trainer.command(), capture_output=True, text=True, timeout=180)
        assert second.returncode != 0
        assert "another trainer is running" in second.stdout + second.stderr
        assert trainer.stop() == 0  # SIGTERM: final checkpoint
        assert (data / "checkpoints" / "LATEST").exists()
        assert "trainer process: data dir" in trainer.log()
        assert "trainer off" in srv.log_path.read_text()
    finally:
        trainer.kill()
        srv.stop()


def test_train_refuses_while_serve_trains(tmp_path):
    """`fedmobillm serve` (the embedded trainer) holds the store's trainer slot."""
    data = tmp_path / "data"
    srv = ServerProc(data, FAST).start()
    try:
        done = subprocess.run(
            TrainerProc(data, srv._config_file()).command(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode != 0
        assert "another trainer is running" in done.stdout + done.stderr
        assert wait_for(lambda: _status(srv.url)["process"]["command"] == "serve", 60, "status")
    finally:
        srv.stop()
