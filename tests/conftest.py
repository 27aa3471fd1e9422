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
