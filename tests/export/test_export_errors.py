"""Bad input to `fedmobillm export`: a clear error, a non-zero exit, no bundle left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmobillm.cli import main
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.export.pipeline import export_bundle


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_unknown_model(tmp_path, capsys):
    rc, err = _cli(["export", "no-such-model", "--out", str(tmp_path / "b")], capsys)
    assert rc == 1 and "unknown model" in err
    assert not (tmp_path / "b").exists()


def test_taps_beyond_depth(tmp_path, capsys):
    rc, err = _cli(
        ["export", "minilm-l6", "--out", str(tmp_path / "b"), "--taps", "9", "--format", "onnx"],
        capsys,
    )
    assert rc == 1 and "6 blocks" in err and "stage wrap" in err
    rc, err = _cli(
        [
            "export",
            "minilm-l6",
            "--out",
            str(tmp_path / "b"),
            "--layers",
            "2,7",
            "--format",
            "onnx",
        ],
        capsys,
    )
    assert rc == 1 and "outside 1..6" in err
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either


def test_unknown_format(tmp_path):
    with pytest.raises(FedMobiLLMError, match="unknown format 'tflite'"):
        export_bundle("minilm-l6", tmp_path / "b", formats=("tflite",))


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc, err = _cli(["export", "minilm-l6", "--out", str(blocker / "bundle")], capsys)
    assert rc == 1 and "cannot write the bundle" in err


def test_out_dir_not_a_bundle(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "precious.txt").write_text("keep me")
    rc, err = _cli(["export", "minilm-l6", "--out", str(tmp_path / "b")], capsys)
    assert rc == 1 and "not empty and is not a bundle" in err
    assert (tmp_path / "b" / "precious.txt").read_text() == "keep me"


def test_bad_device_profile(tmp_path, capsys):
    profile = tmp_path / "phone.json"
    profile.write_text('{"model": "x"}')
    rc, err = _cli(
        ["export", "minilm-l6", "--out", str(tmp_path / "b"), "--device-profile", str(profile)],
        capsys,
    )
    assert rc == 1 and "no memory figure" in err


def test_failing_stage_is_named(tmp_path):
    """A model folder whose weights cannot load fails in stage `load`."""
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(FedMobiLLMError, match="stage load failed"):
        export_bundle(str(folder), tmp_path / "b", formats=("onnx",))
    assert not (tmp_path / "b").exists()


def test_budget_too_small_is_reported(tmp_path):
    from fedmobillm.export.budget import budget_from_profile

    profile = tmp_path / "p.json"
    profile.write_text('{"ram_mb": 4096, "available_mb": 1000}')
    assert budget_from_profile(profile, None) == pytest.approx(500.0)
    assert budget_from_profile(profile, 300.0) == pytest.approx(300.0)
    with pytest.raises(FedMobiLLMError, match="must be positive"):
        export_bundle("minilm-l6", tmp_path / "b", budget_mb=-5, formats=("onnx",))


def test_inspect_missing_bundle(tmp_path, capsys):
    rc, err = _cli(["inspect", str(tmp_path)], capsys)
    assert rc == 1 and "manifest.json is missing" in err


def test_export_cli_writes_a_bundle(tmp_path, capsys, make_bundle):
    """The CLI path end to end on a cached-size model (tiny: minilm-l6 cut to one block)."""
    out = tmp_path / "b"
    rc = main(
        [
            "export",
            "minilm-l6",
            "--out",
            str(out),
            "--layers",
            "1",
            "--format",
            "onnx",
            "--max-seq-len",
            "32",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "verify onnx" in text and "parameters in the graph" in text
    assert (out / "manifest.json").is_file() and (out / "backbone.onnx").is_file()
    assert Path(out / "tokenizer.json").is_file()


def test_failure_marker_is_retried_once_the_exporter_changed(tmp_path, monkeypatch):
    """A remembered failed variant is skipped while the exporter revision is the same; a
    marker from another revision (or an unreadable one) is dropped so the variant is tried."""
    from fedmobillm.export import pipeline

    marker = tmp_path / "m" / "x.failed"
    assert pipeline.failed_before(marker) is None
    pipeline.remember_failure(marker, "stage verify failed: cosine 0.87", spec={"quant": "int8"})
    assert pipeline.failed_before(marker) == "stage verify failed: cosine 0.87"
    monkeypatch.setattr(pipeline, "EXPORTER_REVISION", pipeline.EXPORTER_REVISION + 1)
    assert pipeline.failed_before(marker) is None and not marker.exists()
    marker.write_text("not json")
    assert pipeline.failed_before(marker) is None and not marker.exists()
