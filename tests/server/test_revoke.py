"""Ops commands against a real server (`fedmobillm serve`, uvicorn + SQLite): `fedmobillm
server devices` lists every device, `fedmobillm server revoke` refuses a device's token at
once and, with --delete-data, removes its samples from the store and from training."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import httpx
import numpy as np
import pytest
from server_helpers import (
    ADMIN,
    admin_headers,
    make_manifest,
    make_payload,
    register,
    upload,
)

from fedmobillm.device_runtime.messages import DeviceInfo, Revoked, device_route
from fedmobillm.server.service import Service
from fedmobillm.server.store import Store
from fedmobillm.server.trainer import TrainingCache

pytestmark = pytest.mark.integration


def cli(url: str, *args: str, token: str = ADMIN) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", "server", *args, "--server", url,
         "--admin-token", token],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def stored(server, device_id: str) -> int:
    with sqlite3.connect(server.data_dir / "store.sqlite3", timeout=10) as db:
        sql = "SELECT count(*) FROM samples WHERE device_id = ?"
        return db.execute(sql, (device_id,)).fetchone()[0]


def test_devices_and_revoke(server_factory):
    """Prepare: two devices with 12 train + 4 validation samples each. Execute: list, revoke
    one (samples kept), revoke the other with --delete-data. Assert: tokens refused at once
    (401), both listed as revoked, only the second one's samples gone; --json parses."""
    srv = server_factory()
    m = make_manifest()
    a, b = register(srv.url, "keep", m), register(srv.url, "wipe", m)
    for reg in (a, b):
        assert upload(srv.url, reg, make_payload(reg, m, range(12))).status_code == 200
        payload = make_payload(reg, m, range(4), split="validation")
        assert upload(srv.url, reg, payload).status_code == 200

    listed = cli(srv.url, "devices", "--json")
    keep = cli(srv.url, "revoke", a["device_id"], "--json")
    wipe = cli(srv.url, "revoke", b["device_id"], "--delete-data")
    after = cli(srv.url, "devices", "--json")
    table = cli(srv.url, "devices")

    assert listed.returncode == 0, listed.stderr
    before = {d.name: d for d in map(DeviceInfo.from_dict, json.loads(listed.stdout))}
    assert before["keep"].samples.train == 12 and before["keep"].samples.validation == 4
    assert before["keep"].last_upload is not None and before["keep"].revoked is None
    assert keep.returncode == 0, keep.stderr
    assert Revoked.from_dict(json.loads(keep.stdout)).deleted_samples == 0
    assert wipe.returncode == 0 and "deleted 16 samples" in wipe.stdout, wipe.stderr
    for reg in (a, b):
        again = upload(srv.url, reg, make_payload(reg, m, range(12, 14)))
        state = httpx.get(
            f"{srv.url}{device_route(reg['device_id'])}",
            headers={"Authorization": f"Bearer {reg['token']}"},
        )
        assert again.status_code == state.status_code == 401
    now = {d.name: d for d in map(DeviceInfo.from_dict, json.loads(after.stdout))}
    assert now["keep"].revoked is not None and not now["keep"].data_deleted
    assert now["keep"].samples.train == 12 and stored(srv, a["device_id"]) == 16
    assert now["wipe"].revoked is not None and now["wipe"].data_deleted
    assert now["wipe"].samples.train == 0 and stored(srv, b["device_id"]) == 0
    assert table.returncode == 0 and "revoked (data deleted)" in table.stdout


def test_revoke_errors_are_messages(server_factory):
    srv = server_factory()

    unknown = cli(srv.url, "revoke", "dev-nope")
    wrong = cli(srv.url, "devices", token="not-the-admin-token")

    assert unknown.returncode == 1 and "no device 'dev-nope'" in unknown.stderr
    assert "server devices" in unknown.stderr and "Traceback" not in unknown.stderr
    assert wrong.returncode == 1 and "refused the admin token (401)" in wrong.stderr
    r = httpx.get(f"{srv.url}/v1/devices", headers=admin_headers())
    assert r.status_code == 200 and r.json() == []


def test_trainer_drops_deleted_data_and_keeps_revoked(tmp_path):
    """Prepare: a store with two devices' train, validation and a trainer cache of them.
    Execute: revoke one, revoke the other deleting its data, poll as the trainer does.
    Assert: only the deleted device's samples leave the cache, and never come back."""
    store = Store(tmp_path / "store.sqlite3")
    service = Service(store, max_samples_per_batch=1000)
    m = make_manifest()
    regs = [service.register(n, m, ["negative", "positive"]) for n in ("keep", "wipe")]
    for reg in regs:
        service.ingest(store.device(reg["device_id"]), make_payload(reg, m, range(10)))
        payload = make_payload(reg, m, range(3), split="validation")
        service.ingest(store.device(reg["device_id"]), payload)
    cache = TrainingCache()
    cache.refresh(store)
    (arch,) = cache.archs.values()
    assert arch.num_train == 20 and len(arch.val_y) == 6

    service.revoke(regs[0]["device_id"], delete_data=False)
    service.revoke(regs[1]["device_id"], delete_data=True)
    cache.set_deleted(store.data_deleted())
    cache.refresh(store)

    assert set(arch.train_y) == {regs[0]["device_id"]} and arch.num_train == 10
    assert len(arch.val_y) == len(arch.val_x) == 3 and set(arch.val_from) == {regs[0]["device_id"]}
    assert np.all(np.isfinite(np.stack(arch.val_x)))
    assert cache.deleted == {regs[1]["device_id"]}


def test_an_upload_that_waited_past_a_revocation_stores_nothing(tmp_path):
    """Prepare: a device authenticated (its Device row read) before `revoke --delete-data`
    commits. Execute: its upload reaches the transaction afterwards. Assert: 401 and no
    sample or batch of it is stored (the deletion holds)."""
    from fedmobillm.server.errors import Unauthorized

    store = Store(tmp_path / "store.sqlite3")
    service = Service(store)
    m = make_manifest()
    reg = service.register("phone", m, ["negative", "positive"])
    device = store.device(reg["device_id"])  # what authentication handed the route
    service.ingest(device, make_payload(reg, m, range(4)))
    store.revoke(reg["device_id"], delete_data=True)
    with pytest.raises(Unauthorized, match="revoked while this upload waited"):
        service.ingest(device, make_payload(reg, m, range(4, 8)))
    assert not any(store.device_samples(reg["device_id"]).values())
    assert store.device_batches(reg["device_id"]) == []
    store.close()


def test_the_upload_cache_of_devices_forgets_a_revoked_device(tmp_path):
    """Batch uploads find their device by token in the service's cache (filled by
    ``device_by_token``); revoking the device through the service forgets it there, so its
    token is unknown at once (a revocation by another process is refused in the write
    transaction: the test above)."""
    store = Store(tmp_path / "store.sqlite3")
    service = Service(store)
    reg = service.register("phone", make_manifest(), ["negative", "positive"])
    other = service.register("other", make_manifest(), ["negative", "positive"])
    assert service.cached_device(reg["token"]) is None  # nothing looked up yet
    for r in (reg, other):
        assert service.device_by_token(r["token"]).device_id == r["device_id"]
    assert service.cached_device(reg["token"]).device_id == reg["device_id"]
    assert service.cached_device("not-a-token") is None
    assert service.device_by_token("not-a-token") is None

    service.revoke(reg["device_id"], delete_data=False)

    assert service.cached_device(reg["token"]) is None
    assert service.device_by_token(reg["token"]) is None
    assert service.cached_device(other["token"]).device_id == other["device_id"]
    store.close()
