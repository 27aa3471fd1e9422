"""benchmarks._models.build_classifier leaves the process's transformers logging as it found it."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("peft")

from transformers.utils import logging as hf_logging  # noqa: E402

from benchmarks import _models as M  # noqa: E402
from benchmarks._selftest import tiny_model  # noqa: E402


@pytest.mark.parametrize("method", ["full", "lora"])
def test_build_classifier_restores_transformers_verbosity(tmp_path: Path, method: str) -> None:
    """Execute: build a classifier (its new head warns "newly initialized") at INFO verbosity.
    Assert: the model is built with the requested head, and the verbosity is INFO again after
    (it used to be left at ERROR for the rest of the process)."""
    model_dir = str(tiny_model(tmp_path / "tiny-bert"))
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        model = M.build_classifier(M.ClassifierSpec(model_dir, 3, method, 4, 32, 0))
        assert hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        hf_logging.set_verbosity(before)
    tok = M.load_tokenizer(model_dir)
    logits = model(**M.tokenize(tok, ["a short review"], 32)).logits
    assert tuple(logits.shape) == (1, 3)
