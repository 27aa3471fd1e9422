"""Task lm against the real server (issue 16): `fedmobillm serve --task lm --no-train`
(uvicorn on loopback, SQLite) and the device runtime on the 2-block SmolLM2 token bundle
of test_device_lm.py. The server stores exactly the token ids and loss masks the device
made from its records (read back from its SQLite file), refuses a classify device, and
answers a re-sent batch whose ack the device never journaled as a duplicate."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from test_device_lm import RECORDS, lm_records

from fedmobillm.device_runtime.client import DeviceClient, RunConfig, register
from fedmobillm.device_runtime.journal import JOURNAL_NAME
from fedmobillm.device_runtime.uploader import ServerRejected
from fedmobillm.server.local import LocalServer

pytestmark = pytest.mark.integration

ADMIN = secrets.token_urlsafe(24)


def stored_lm(data_dir: Path, device_id: str, split: str) -> dict[int, tuple[list, list]]:
    """sample id -> (token ids, loss mask) as the server's SQLite holds them."""
    with sqlite3.connect(data_dir / "store.sqlite3", timeout=10) as db:
        rows = db.execute(
            "SELECT sample_id, token_ids, loss_mask FROM samples WHERE device_id = ? AND split = ?",
            (device_id, split),
        ).fetchall()
    return {
        int(sid): (np.frombuffer(ids, np.int32).tolist(), np.frombuffer(mask, np.uint8).tolist())
        for sid, ids, mask in rows
    }


def test_real_server_stores_the_devices_ids_and_masks(smollm2_lm_bundle, tmp_path):
    """Prepare `serve --task lm --no-train` and a registered lm device; Execute a train
    run, a validation run, a classify registration, and a run after the journal lost its
    last ack line; Assert the server holds each window's token ids and loss mask as the
    device made them, refuses the classify device (409, with the fix), and answers the
    re-sent batch as a duplicate without storing anything twice."""
    bundle = smollm2_lm_bundle
    data_dir = tmp_path / "server"
    with LocalServer(data_dir, admin_token=ADMIN, args=["--task", "lm", "--no-train"],
                     log_path=tmp_path / "server.log", startup_timeout=180.0) as srv:  # fmt: skip
        state, _ = register(srv.url, ADMIN, "me", bundle, [], tmp_path / "me", task="lm")
        assert state.task == "lm"
        with pytest.raises(ServerRejected, match="--task lm") as err:
            register(srv.url, ADMIN, "other", bundle, ["a", "b"], tmp_path / "other")
        assert err.value.status == 409

        config = RunConfig(task="lm", batch_size=3, threads=1)
        client = DeviceClient(tmp_path / "me", bundle, config)
        summary = client.run(lm_records(RECORDS))
        samples = client.lm.samples
        assert summary.samples == len(samples) and summary.encoding == "fp16"
        held = DeviceClient(tmp_path / "me", bundle, RunConfig(task="lm", split="validation"))
        assert held.run(lm_records(RECORDS[:2])).samples == 2

        train = stored_lm(data_dir, state.device_id, "train")
        assert sorted(train) == list(range(len(samples)))
        for sid, (ids, mask) in train.items():
            assert ids == list(samples[sid].token_ids)
            assert mask == samples[sid].loss_mask().tolist()
        assert len(stored_lm(data_dir, state.device_id, "validation")) == 2

        journal = tmp_path / "me" / JOURNAL_NAME  # the last ack never reached the journal
        lines = journal.read_text().splitlines(keepends=True)
        last = max(i for i, x in enumerate(lines) if '"event":"ack"' in x and '"train"' in x)
        journal.write_text("".join(lines[:last] + lines[last + 1 :]))
        again = DeviceClient(tmp_path / "me", bundle, config).run(lm_records(RECORDS))
        assert again.duplicates == 1 and again.batches == 1
        assert again.server_samples == {"train": len(samples), "validation": 2, "anchor": 0}
        assert stored_lm(data_dir, state.device_id, "train") == train
