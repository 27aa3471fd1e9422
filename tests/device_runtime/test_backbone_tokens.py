"""Token bundles (``--pivot none``) on the device: ``Backbone.forward_tokens`` returns every
real token's taps ``(B, K, T, d)`` zero-padded with the lengths, equal to each text's own
forward at its real positions; pivot calls are refused with a pointer to the other API.

Tiny random BERT and Llama models (seeded), exported to ONNX as the exporter does."""

from __future__ import annotations

import numpy as np
import pytest
from token_helpers import tiny_folder

from fedmobillm.device_runtime.backbone import Backbone
from fedmobillm.errors import FedMobiLLMError

TEXTS = [
    "a long and winding review of a film that never seems to end " * 2,
    "ok",
    "fine film",
    "good " * 9,
    "meh, not for me",
]


@pytest.fixture(scope="module", params=["bert", "llama"])
def token_backbone(request, make_bundle) -> Backbone:
    bundle = make_bundle(
        str(tiny_folder(request.param)), layers=[1, 3], pivot="none", formats=("onnx",)
    )
    return Backbone(bundle, threads=1)


def test_token_taps_equal_each_texts_own_forward(token_backbone):
    """Prepare texts of mixed lengths; Execute forward_tokens in length-ordered passes of
    2; Assert (B, K, T, d) float32 with T the longest text, lengths = token counts, each
    text's real positions equal its own unpadded forward, padding exactly zero."""
    b, m = token_backbone, token_backbone.manifest
    assert b.tokens and m.pivot == "none"
    x, lengths = b.forward_tokens(TEXTS, forward_batch=2)
    _, mask = b.encode(TEXTS)
    np.testing.assert_array_equal(lengths, mask.sum(axis=1))
    assert lengths.dtype == np.int64 and x.dtype == np.float32
    assert x.shape == (len(TEXTS), m.num_taps, int(lengths.max()), m.hidden_size)
    for i, text in enumerate(TEXTS):
        n = int(lengths[i])
        ids, mask_i = b.encode([text])  # (1, S), S = max(n, MIN_SEQ)
        alone = b.forward(ids, mask_i)[0, :, :n]  # (K, n, d)
        np.testing.assert_allclose(x[i, :, :n], alone, rtol=1e-4, atol=1e-4, err_msg=text)
        assert not x[i, :, n:].any(), f"padding of text {i} is not zero"
        assert np.abs(x[i, :, :n]).sum(axis=-1).min() > 0  # every real token has taps
    one_pass, lengths_1 = b.forward_tokens(TEXTS)  # one pass padded to the longest
    np.testing.assert_array_equal(lengths_1, lengths)
    np.testing.assert_allclose(one_pass, x, rtol=1e-4, atol=1e-4)


def test_pivot_calls_on_a_token_bundle_say_what_to_use(token_backbone):
    with pytest.raises(FedMobiLLMError, match="token bundle") as err:
        token_backbone(TEXTS)
    assert "forward_tokens" in (err.value.hint or "")
    with pytest.raises(FedMobiLLMError, match="forward_batch"):
        token_backbone.forward_tokens(TEXTS, forward_batch=0)


def test_forward_tokens_on_a_pivot_bundle_is_refused(make_bundle):
    bundle = make_bundle(str(tiny_folder("bert")), layers=[2], formats=("onnx",))
    b = Backbone(bundle, threads=1)
    assert not b.tokens and b(TEXTS[:2]).shape == (2, 1, 32)
    with pytest.raises(FedMobiLLMError, match="pivot bundle") as err:
        b.forward_tokens(TEXTS)
    assert "--pivot none" in (err.value.hint or "")
