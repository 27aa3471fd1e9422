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
