"""The lm batch on the wire: token_ids + loss_mask beside token taps, checked both ways."""

from __future__ import annotations

import numpy as np
import pytest

from fedmobillm.device_runtime.serde import Batch, PayloadError, decode_batch, encode_batch


def lm_batch(**over) -> Batch:
    act = np.zeros((2, 3, 4, 8), np.float16)
    act[0] = 1
    act[1, :, :2] = 1
    ids = np.array([[5, 6, 7, 8], [3, 4, 0, 0]], np.int64)
    mask = np.array([[0, 1, 1, 1], [0, 1, 0, 0]], np.uint8)
    kw = dict(
        device_id="d",
        bundle_sha256="s",
        idempotency_key="k",
        split="train",
        encoding="fp16",
        activations=act,
        labels=np.full(2, -1, np.int64),
        sample_ids=np.arange(2, dtype=np.int64),
        lengths=np.array([4, 2], np.int64),
        token_ids=ids,
        loss_mask=mask,
    )
    kw.update(over)
    return Batch(**kw)


def test_round_trip_keeps_ids_and_mask():
    b = decode_batch(encode_batch(lm_batch()))
    assert b.lm and b.tokens
    np.testing.assert_array_equal(b.token_ids, [[5, 6, 7, 8], [3, 4, 0, 0]])
    np.testing.assert_array_equal(b.loss_mask, [[0, 1, 1, 1], [0, 1, 0, 0]])


def test_a_token_batch_without_ids_is_not_lm():
    b = decode_batch(encode_batch(lm_batch(token_ids=None, loss_mask=None)))
    assert b.tokens and not b.lm


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"loss_mask": None}, "has token_ids but not loss_mask"),
        ({"token_ids": np.array([[5, 6, 7, 8], [3, 4, 9, 0]])}, "0 at padding"),
        ({"loss_mask": np.array([[1, 1, 1, 1], [0, 1, 0, 0]], np.uint8)}, "t = 0"),
        ({"loss_mask": np.array([[0, 1, 1, 1], [0, 0, 0, 0]], np.uint8)}, "at least one target"),
        ({"loss_mask": np.array([[0, 1, 1, 2], [0, 1, 0, 0]], np.uint8)}, "0 or 1"),
        ({"loss_mask": np.array([[0, 1, 1, 1], [0, 1, 0, 0]], np.int64)}, "uint8"),
        ({"token_ids": np.array([[5, 6, 7], [3, 4, 0]])}, "int64 [2, 4]"),
        ({"labels": np.array([1, -1])}, "labels must all be -1"),
    ],
)
def test_bad_lm_fields_are_refused_with_the_reason(over, words):
    with pytest.raises(PayloadError, match=None) as err:
        encode_batch(lm_batch(**over))
    assert words in str(err.value)


def test_the_server_side_decode_refuses_what_encode_would(monkeypatch):
    """A device that skips the check: decode (the server) refuses the payload itself."""
    import fedmobillm.device_runtime.serde as serde

    monkeypatch.setattr(serde, "check_lm", lambda *a: None)
    payload = serde.encode_batch(lm_batch(labels=np.array([1, -1])))
    monkeypatch.undo()
    with pytest.raises(PayloadError, match="labels must all be -1"):
        decode_batch(payload)


def test_ids_without_token_taps_are_refused():
    act = np.ones((2, 3, 8), np.float16)
    with pytest.raises(PayloadError, match="only with token taps"):
        encode_batch(lm_batch(activations=act, lengths=None))
