"""An lm sample's loss mask is part of what a batch claims: its digest (idempotency) and
the re-send comparison both see a changed mask."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from test_lm_server import _store_lm_rows

from fedmobillm.device_runtime.serde import Batch
from fedmobillm.server.checks import batch_content, check_resent
from fedmobillm.server.store import Store


def _batch(store: Store, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> Batch:
    """The stored three samples as a device would re-send them (padded to T=5)."""
    (device,) = store.devices()
    rows = store.read_samples(0)
    act = np.zeros((3, 2, 5, 16), np.float16)
    for i, n in enumerate(lengths.tolist()):
        act[i, :, :n] = rows.raw[i]
    return Batch(
        device_id=device.device_id, bundle_sha256="sha", idempotency_key=uuid.uuid4().hex,
        split="train", encoding="fp16", activations=act, labels=np.full(3, -1, np.int64),
        sample_ids=np.arange(3, dtype=np.int64), scales=None, lengths=lengths.astype(np.int64),
        token_ids=ids.astype(np.int64), loss_mask=mask.astype(np.uint8),
    )  # fmt: skip


def test_a_resent_lm_sample_with_another_loss_mask_is_a_conflict(tmp_path):
    from fedmobillm.server.errors import Conflict

    store = Store(tmp_path / "store.sqlite3")
    ids, mask, lengths = _store_lm_rows(store)
    (device,) = store.devices()
    same = _batch(store, ids, mask, lengths)
    other_mask = mask.copy()
    other_mask[0, 1] = 0  # one scored token of sample 0 no longer scored
    other = _batch(store, ids, other_mask, lengths)
    with store.transaction() as db:
        stored = store.stored_samples(db, device, "train", same.sample_ids)
    check_resent(device, same, stored)  # the same content: fine
    with pytest.raises(Conflict, match="loss mask"):
        check_resent(device, other, stored)
    assert batch_content(same) != batch_content(other)
    assert batch_content(same) == batch_content(_batch(store, ids, mask, lengths))
    store.close()
