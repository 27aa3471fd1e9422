"""Shared fixtures. Exported bundles are cached under the fedmobillm cache, keyed by their
export options, so each is built once per machine."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def make_bundle():
    """`make_bundle("minilm-l6", num_taps=3, quant="int8", formats=("onnx",))` -> bundle dir.

    Built with fedmobillm.export.pipeline.export_bundle once per option set and cached;
    a cached bundle that fails verification is rebuilt."""
    from fedmobillm.export.pipeline import bundle_is_current, export_bundle
    from fedmobillm.paths import cache_dir

    def build(model: str, **opts) -> Path:
        opts.setdefault("formats", ("onnx",))
        opts["formats"] = tuple(opts["formats"])
        key = hashlib.sha256(json.dumps([model, opts], sort_keys=True, default=str).encode())
        out = cache_dir() / "test-bundles" / key.hexdigest()[:16]
        if bundle_is_current(out, model, opts.get("pivot", "auto")):
            return out
        shutil.rmtree(out, ignore_errors=True)
        export_bundle(model, out, **opts)
        return out

    return build


# SmolLM2-135M blocks 1-2 as an lm token bundle with generation graphs: the one real-weights
# lm bundle of the CI tests (test_lm_federation, server/test_lm_server, test_demo_lm,
# device_runtime/test_device_lm*); another option set is another export (minutes, cold cache)
SMOLLM2_LM = {"layers": [1, 2], "pivot": "none", "quant": "fp32", "formats": ("onnx",),
              "max_seq_len": 64, "generate": True}  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_lm_bundle(make_bundle) -> Path:
    """A 2-block truncation of SmolLM2-135M (taps 1, 2; hidden 576) as a decoder token bundle
    (``--pivot none --quant fp32 --format onnx --max-seq-len 64 --generate``), cached."""
    return make_bundle("smollm2-135m", **SMOLLM2_LM)
