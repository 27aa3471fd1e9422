"""Backbone: verified bundle -> tokens (right-padded, truncated) -> taps (B, K, d)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fedmobillm.device_runtime.backbone import Backbone
from fedmobillm.errors import FedMobiLLMError

L3 = {"num_taps": 3, "formats": ("onnx",)}


@pytest.fixture(scope="module")
def bundle(make_bundle) -> Path:
    return make_bundle("minilm-l3", **L3)


@pytest.fixture(scope="module")
def backbone(bundle) -> Backbone:
    return Backbone(bundle, threads=1)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_encode_pads_right_to_longest_and_truncates(backbone):
    """Prepare a short, a long and an over-long text; Execute encode; Assert shapes, right
    padding with the manifest's pad id and truncation at max_seq_len."""
    pad = backbone.manifest.tokenizer["pad_token_id"]
    ids, mask = backbone.encode(["short", "a somewhat longer sentence here"])
    assert ids.dtype == np.int64 and ids.shape == mask.shape
    assert mask[0].sum() < mask[1].sum() == ids.shape[1]
    assert (ids[0][mask[0] == 0] == pad).all() and mask[0][0] == 1 and mask[0][-1] == 0

    ids, _ = backbone.encode(["word " * 1000])
    assert ids.shape[1] == backbone.manifest.max_seq_len


def test_forward_shape_and_padding_invariance(backbone):
    """Taps are (B, K, d) float32, and a text's taps do not depend on its batch-mates'
    lengths (attention mask honoured)."""
    m = backbone.manifest
    alone = backbone(["the film was a delight"])  # (1, K, d)
    batch = backbone(["the film was a delight", "a much longer review " * 10])  # (2, K, d)
    assert batch.shape == (2, m.num_taps, m.hidden_size) and batch.dtype == np.float32
    for k in range(m.num_taps):
        assert _cos(alone[0, k], batch[0, k]) > 0.999


def test_length_ordered_forward_passes_keep_the_input_order(backbone):
    """Prepare texts of mixed lengths; Execute with forward_batch 2 (passes in order of
    token length, each padded to its own longest); Assert every text's taps equal its own
    single-text forward, row for row, and a bad forward_batch is refused."""
    texts = ["a long and winding review of a film " * 3, "ok", "fine film", "good " * 9, "meh"]
    got = backbone(texts, forward_batch=2)  # (5, K, d)
    assert got.shape[0] == len(texts)
    for i, text in enumerate(texts):
        alone = backbone([text])[0]  # (K, d)
        for k in range(backbone.manifest.num_taps):
            assert _cos(alone[k], got[i, k]) > 0.9999, (text, k)
    with pytest.raises(FedMobiLLMError, match="forward_batch"):
        backbone(texts, forward_batch=0)


def test_missing_bundle_folder(tmp_path):
    with pytest.raises(FedMobiLLMError, match="does not exist"):
        Backbone(tmp_path / "nope")


def test_folder_without_manifest(tmp_path):
    with pytest.raises(FedMobiLLMError, match="manifest.json is missing"):
        Backbone(tmp_path)


def _copy_bundle(src: Path, dst: Path) -> Path:
    """Copy a bundle cheaply: graphs as symlinks, small files copied."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix in (".onnx", ".pte", ".data"):
            (dst / f.name).symlink_to(f.resolve())
        else:
            shutil.copy(f, dst / f.name)
    return dst


def test_tampered_bundle_is_refused(bundle, tmp_path):
    """A tokenizer changed after export fails the sha256 check, naming the file."""
    copy = _copy_bundle(bundle, tmp_path / "b")
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(FedMobiLLMError, match="tokenizer.json: sha256 mismatch"):
        Backbone(copy)


def test_bundle_missing_graph_file(bundle, tmp_path):
    copy = _copy_bundle(bundle, tmp_path / "b")
    (copy / "backbone.onnx").unlink()
    with pytest.raises(FedMobiLLMError, match="backbone.onnx: missing"):
        Backbone(copy)


def test_pte_backend_on_onnx_only_bundle(bundle):
    with pytest.raises(FedMobiLLMError, match="has no backbone.pte") as err:
        Backbone(bundle, backend="pte")
    assert "--backend auto" in str(err.value)


def test_unknown_backend(bundle):
    with pytest.raises(FedMobiLLMError, match="backend must be one of"):
        Backbone(bundle, backend="tflite")


@pytest.mark.slow
def test_pte_agrees_with_onnx(make_bundle):
    """ExecuTorch and onnxruntime run the same exported backbone to the same taps."""
    both = make_bundle("minilm-l3", num_taps=3, formats=("onnx", "pte"))
    texts = ["a gripping, well acted thriller", "dull and far too long"]
    onnx = Backbone(both, backend="onnx")(texts)  # (2, K, d)
    pte = Backbone(both, backend="pte")(texts)  # (2, K, d)
    for b in range(2):
        for k in range(onnx.shape[1]):
            assert _cos(onnx[b, k], pte[b, k]) > 0.99


@pytest.mark.slow
def test_decoder_bundle_last_token_pivot_ignores_padding(make_bundle):
    """SmolLM2 (decoder, pivot = last real token): a text's taps are the same alone and
    right-padded beside a longer text."""
    bundle = make_bundle("smollm2-135m", num_taps=3, formats=("onnx",), max_seq_len=64)
    bb = Backbone(bundle, threads=2)
    assert bb.manifest.kind == "decoder" and bb.manifest.pivot == "last"
    alone = bb(["The capital of France is"])  # (1, K, d)
    batch = bb(["The capital of France is", "A much longer prompt " * 8])  # (2, K, d)
    for k in range(bb.manifest.num_taps):
        assert _cos(alone[0, k], batch[0, k]) > 0.99
