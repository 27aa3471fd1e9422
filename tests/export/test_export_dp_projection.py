"""``fedmobillm export --dp-projection R``: the option is validated before any work, and
the command line passes it to the pipeline. (The bundle it writes, its hashed basis and the
uploads in its subspace: tests/device_runtime/test_dp_projection.py.)"""

from __future__ import annotations

import argparse

import pytest

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.export.pipeline import ExportOptions


@pytest.mark.parametrize("rank", [0, -3])
def test_a_rank_below_one_is_refused(tmp_path, rank):
    with pytest.raises(FedMobiLLMError, match="must be a positive rank"):
        ExportOptions("minilm-l3", tmp_path / "b", formats=("onnx",), dp_projection=rank)


def test_the_flag_reaches_the_pipeline(monkeypatch, tmp_path):
    from fedmobillm.commands import export as cmd

    seen = {}

    def fake_export(model, out, **kw):
        seen.update(kw)
        raise FedMobiLLMError("stop here")

    monkeypatch.setattr("fedmobillm.export.pipeline.export_bundle", fake_export)
    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    args = p.parse_args(["minilm-l3", "--out", str(tmp_path / "b"), "--dp-projection", "16"])
    with pytest.raises(FedMobiLLMError, match="stop here"):
        cmd.run(args)
    assert seen["dp_projection"] == 16 and seen["dp_projection_whiten"] is True
    args = p.parse_args(["minilm-l3", "--out", str(tmp_path / "b"), "--dp-projection", "8",
                         "--dp-projection-plain"])  # fmt: skip
    with pytest.raises(FedMobiLLMError, match="stop here"):
        cmd.run(args)
    assert seen["dp_projection"] == 8 and seen["dp_projection_whiten"] is False
    assert seen["dp_projection_supervised"] == 0
    args = p.parse_args(["minilm-l3", "--out", str(tmp_path / "b"), "--dp-projection", "16",
                         "--dp-projection-supervised", "1"])  # fmt: skip
    with pytest.raises(FedMobiLLMError, match="stop here"):
        cmd.run(args)
    assert seen["dp_projection"] == 16 and seen["dp_projection_supervised"] == 1


def test_the_projection_needs_public_calibration_text(tmp_path):
    """Without --calibration the basis would be fitted on movie-snippets' train split, the
    text the documented device flows federate: refused before any work, with a hint."""
    with pytest.raises(FedMobiLLMError, match="--dp-projection needs --calibration") as err:
        ExportOptions("minilm-l3", tmp_path / "b", formats=("onnx",), dp_projection=8)
    assert "public text" in str(err.value)
    ok = ExportOptions("minilm-l3", tmp_path / "b", formats=("onnx",), dp_projection=8,
                       calibration="nyt-snippets")  # fmt: skip
    assert ok.calibration == "nyt-snippets"


class _Tok:
    """A whitespace tokenizer with the call signature calibrate.tokenize uses."""

    pad_token_id = 0

    def __call__(self, texts, max_length, **_):
        import numpy as np

        rows = [[1 + len(w) for w in t.split()][:max_length] for t in texts]
        width = max(len(r) for r in rows)
        ids = np.array([r + [0] * (width - len(r)) for r in rows])
        mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


def _wrapped(ids, mask):
    """(N, T) ids -> (N, K=2, d=6) pivot taps that vary with the text."""
    import torch

    x = torch.nn.functional.one_hot(ids % 6, 6).float() * mask[..., None]  # (N, T, 6)
    s = x.sum(dim=1) + ids.float().mean(dim=1, keepdim=True)  # (N, 6)
    return torch.stack([s, s * 2 + 1], dim=1)  # (N, 2, 6)


def test_the_fit_reads_the_named_calibration_and_records_it(tmp_path):
    """The manifest entry names the text the basis was fitted on (a file: its absolute
    path); with no calibration the fit refuses instead of falling back to built-ins."""
    from fedmobillm.export import pipeline

    public = tmp_path / "public.txt"
    words = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "g"]
    public.write_text("".join(
        " ".join(words[(i + j) % 7] for j in range(i % 5 + 1)) + "\n" for i in range(40)))  # fmt: skip
    opts = ExportOptions("minilm-l3", tmp_path / "b", formats=("onnx",), dp_projection=3,
                         calibration=str(public))  # fmt: skip
    entry = pipeline._dp_projection(opts, _wrapped, _Tok(), tmp_path, 3)
    assert entry["calibration"] == str(public.resolve()) and entry["texts"] == 40
    assert (tmp_path / entry["file"]).is_file()
    opts.calibration = None
    with pytest.raises(FedMobiLLMError, match="needs --calibration"):
        pipeline._dp_projection(opts, _wrapped, _Tok(), tmp_path, 3)
