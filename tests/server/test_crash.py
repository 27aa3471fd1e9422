"""Crash safety: 10 cycles of SIGKILL + restart of a real server during ingest and training.
Every acknowledged sample is stored exactly once; training resumes from its last checkpoint."""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest
from server_helpers import ServerProc, admin_headers, make_manifest, make_payload, register

from benchmarks.bench_crash import SETTINGS, latest_checkpoint

pytestmark = pytest.mark.integration

CYCLES = 10
BATCH = 8


class Device:
    """A simulated device: sequential uploads; an unacknowledged batch is re-sent as is."""

    def __init__(self, reg: dict, manifest: dict, name: str) -> None:
        self.reg, self.manifest, self.name = reg, manifest, name
        self.next_id = 0
        self.pending: bytes | None = None
        self.pending_ids: list[int] = []
        self.acked: set[int] = set()
        self.duplicates = 0

    def upload_one(self, url: str) -> bool:
        if self.pending is None:
            self.pending_ids = list(range(self.next_id, self.next_id + BATCH))
            self.pending = make_payload(
                self.reg, self.manifest, self.pending_ids, seed=self.next_id
            )
            self.next_id += BATCH
        try:
            r = httpx.post(
                f"{url}/v1/batches",
                content=self.pending,
                timeout=10,
                headers={
                    "Authorization": f"Bearer {self.reg['token']}",
                    "Content-Type": "application/octet-stream",
                },
            )
        except httpx.HTTPError:
            return False  # server down: keep the batch, re-send after restart
        assert r.status_code == 200, r.text
        self.duplicates += r.json()["duplicate"]
        self.acked.update(self.pending_ids)
        self.pending = None
        return True


def trainer_status(url: str) -> dict:
    return httpx.get(f"{url}/v1/status", headers=admin_headers(), timeout=10).json()["trainer"]


def wait_for(pred, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_restart_cycles_lose_nothing_and_resume(tmp_path):
    data = tmp_path / "data"
    srv = ServerProc(data, SETTINGS).start()
    devices = []
    for i, m in enumerate([make_manifest("tiny-a"), make_manifest("tiny-b", 6, 24, [2, 4, 6])]):
        devices.append(Device(register(srv.url, f"d{i}", m), m, f"d{i}"))
    resumed = []
    try:
        for cycle in range(CYCLES):
            expected = latest_checkpoint(data)
            if cycle:
                srv.start()
            if expected is not None:
                wait_for(lambda: trainer_status(srv.url)["resumed_from"] is not None, what="resume")
                assert trainer_status(srv.url)["resumed_from"] == expected
                resumed.append(expected)
            # ingest while training, then kill mid-flight
            t_end = time.monotonic() + 0.5
            while time.monotonic() < t_end:
                for d in devices:
                    d.upload_one(srv.url)
            start_step = expected or 0
            wait_for(lambda s=start_step: trainer_status(srv.url)["step"] >= s + 6, what="steps")
            for d in devices:  # one more upload in flight-ish, then SIGKILL
                d.upload_one(srv.url)
            srv.kill()
        srv.start()
        for d in devices:  # flush what was pending at the last kill
            while d.pending is not None:
                assert d.upload_one(srv.url)
    finally:
        srv.stop()

    assert len(resumed) >= CYCLES - 1
    assert resumed == sorted(resumed) and resumed[-1] > resumed[0]
    db = sqlite3.connect(data / "store.sqlite3")
    for d in devices:
        rows = db.execute(
            "SELECT sample_id FROM samples WHERE device_id = ?", (d.reg["device_id"],)
        ).fetchall()
        stored = [r[0] for r in rows]
        assert len(stored) == len(set(stored)), "a sample is stored twice"
        assert d.acked <= set(stored), f"lost acked samples: {sorted(d.acked - set(stored))[:5]}"
        assert set(stored) <= set(range(d.next_id))
