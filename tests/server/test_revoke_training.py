"""Revocation against a running trainer (issue 19): in a real server (uvicorn + SQLite +
the trainer thread), `fedmobillm server revoke --delete-data` refuses the device's token at
once (401) and its samples leave the trainer's cache, while another device's stay.
test_revoke.py checks the store and the cache on their own; this checks both together in
the running process."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from server_helpers import ADMIN, FAST, admin_headers, make_manifest, make_payload, register

from fedmobillm.device_runtime.messages import device_route

pytestmark = pytest.mark.integration


def trainer(url: str) -> dict:
    return httpx.get(f"{url}/v1/status", headers=admin_headers(), timeout=30).json()["trainer"]


def wait_trainer(url: str, pred, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        t = trainer(url)
        if pred(t):
            return t
        if time.monotonic() > deadline:
            raise AssertionError(f"trainer never satisfied the condition: {t}")
        time.sleep(0.3)


def test_revoked_device_gets_401_and_leaves_the_training_cache(server_factory):
    """Prepare: two devices, 40 train + 8 validation samples each, a trainer stepping on
    them. Execute: revoke one with --delete-data. Assert: its token answers 401 at once;
    the trainer's cache drops to the other device's 40 + 8 and lists the deletion; the
    trainer keeps stepping; the other device still uploads; after shutdown no byte string
    of the deleted samples' activations is left in any of the store's files."""
    srv = server_factory(FAST)
    m = make_manifest()
    keep, wipe = register(srv.url, "keep", m), register(srv.url, "wipe", m)
    for reg, seed in ((keep, 1), (wipe, 2)):
        for split, n in (("train", 40), ("validation", 8)):
            payload = make_payload(reg, m, range(n), split=split, seed=seed)
            r = httpx.post(f"{srv.url}/v1/batches", content=payload, timeout=30,
                           headers={"Authorization": f"Bearer {reg['token']}",
                                    "Content-Type": "application/octet-stream"})  # fmt: skip
            assert r.status_code == 200, r.text
    arch = keep["architecture"]
    with sqlite3.connect(srv.data_dir / "store.sqlite3", timeout=10) as db:
        sql = "SELECT device_id, act FROM samples"
        blobs = {d: [a for i, a in db.execute(sql) if i == d] for d in (keep["device_id"],
                                                                       wipe["device_id"])}  # fmt: skip
    wait_trainer(srv.url, lambda t: t["step"] > 0
                 and t["architectures"].get(arch, {}).get("train") == 80)  # fmt: skip

    out = subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", "server", "revoke", wipe["device_id"],
         "--delete-data", "--server", srv.url, "--admin-token", ADMIN],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    state = httpx.get(f"{srv.url}{device_route(wipe['device_id'])}",
                      headers={"Authorization": f"Bearer {wipe['token']}"})  # fmt: skip
    after = wait_trainer(srv.url, lambda t: wipe["device_id"] in t["data_deleted"])
    step = after["step"]
    later = wait_trainer(srv.url, lambda t: t["step"] > step)
    again = make_payload(keep, m, range(40, 44), seed=1)
    more = httpx.post(f"{srv.url}/v1/batches", content=again, timeout=30,
                      headers={"Authorization": f"Bearer {keep['token']}",
                               "Content-Type": "application/octet-stream"})  # fmt: skip

    assert out.returncode == 0 and "deleted 48 samples" in out.stdout, out.stderr
    assert state.status_code == 401
    cached = after["architectures"][arch]
    assert cached["train"] == 40 and cached["validation"] == 8 and cached["devices"] == 1
    assert keep["device_id"] not in after["data_deleted"]
    assert later["architectures"][arch]["train"] == 40  # never read back
    assert more.status_code == 200
    srv.stop()  # then read every file of the store: database, WAL, shared memory
    files = b"".join(p.read_bytes() for p in srv.data_dir.glob("store.sqlite3*"))
    assert len(blobs[wipe["device_id"]]) == 48 and len(blobs[keep["device_id"]]) == 48
    assert all(a in files for a in blobs[keep["device_id"]])  # the search finds stored rows
    # zeroed by secure_delete, and the WAL's older copies truncated at the deletion
    assert not any(a in files for a in blobs[wipe["device_id"]])
