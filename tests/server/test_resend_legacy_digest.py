"""An lm batch acknowledged before its loss mask joined the content digest (the batch row
holds the older digest: split, ids, labels, token ids) is answered with its acknowledgement
when re-sent under the same key with the same masks, and still refused (409) with another
mask: the masks are compared with the stored samples'. Real SQLite and real PostgreSQL."""

from __future__ import annotations

import dataclasses

import pytest
from test_lm_server import _store_lm_rows
from test_postgres import pg_store, postgres  # noqa: F401 - the module's PostgreSQL fixture
from test_resend_mask import _batch

from fedmobillm.server.checks import batch_content
from fedmobillm.server.errors import Conflict
from fedmobillm.server.service import Service
from fedmobillm.server.store import Store

KEY = "key-acknowledged-before-the-mask-digest"


def _acknowledged_before_the_mask_digest(store) -> tuple[Service, object, object]:
    """A Service on ``store`` holding 3 lm samples acknowledged under KEY with the digest the
    server wrote before loss masks joined it; (service, device, the batch as re-sent)."""
    service = Service(store, inputs="tokens", task="lm")
    ids, mask, lengths = _store_lm_rows(store)
    (device,) = store.devices()
    batch = dataclasses.replace(_batch(store, ids, mask, lengths), idempotency_key=KEY)
    old_digest = batch_content(dataclasses.replace(batch, loss_mask=None))
    assert old_digest != batch_content(batch)  # the digest changed with the mask
    ack = {"batch_id": "b-1", "samples": 3, "skipped": 0, "split": "train", "duplicate": False}
    with store.transaction() as db:
        store.add_batch(db, "b-1", device.device_id, KEY, "train", 3, ack, old_digest)
    return service, device, batch


def _check(store) -> None:
    service, device, batch = _acknowledged_before_the_mask_digest(store)
    ack = service._commit(device, batch)  # the same content re-sent: its acknowledgement
    assert ack["duplicate"] is True and ack["batch_id"] == "b-1"
    other = batch.loss_mask.copy()
    other[0, 1] = 0  # one scored token no longer scored
    # the old digest matches, so the stored samples' check refuses it (not the key's: both
    # messages name the loss mask)
    with pytest.raises(Conflict, match="were uploaded before with other content"):
        service._commit(device, dataclasses.replace(batch, loss_mask=other))
    changed = batch.token_ids.copy()
    changed[1, 1] += 1  # other token ids: the old digest no longer matches either
    with pytest.raises(Conflict, match="idempotency key"):
        service._commit(device, dataclasses.replace(batch, token_ids=changed))
    assert len(store.read_samples(0).ids) == 3  # nothing stored twice


def test_sqlite_answers_a_resend_acknowledged_before_the_mask_digest(tmp_path):
    store = Store(tmp_path / "store.sqlite3")
    try:
        _check(store)
    finally:
        store.close()


@pytest.mark.integration
def test_postgres_answers_a_resend_acknowledged_before_the_mask_digest(pg_store):  # noqa: F811
    _check(pg_store)
