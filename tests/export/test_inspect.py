"""`fedmobillm inspect BUNDLE`: table, sha256 verification, tampering reported."""

from __future__ import annotations

import shutil

from fedmobillm.cli import main


def test_inspect_prints_table_and_verifies(make_bundle, capsys):
    bundle = make_bundle("minilm-l6", num_taps=3, formats=("onnx", "pte"))
    rc = main(["inspect", str(bundle)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "graph params" in out and "backbone.pte" in out
    assert "backbone.onnx " in out and "backbone.onnx.data" in out  # graph and its weights
    assert "ok: all 4 files match" in out


def test_inspect_reports_tampered_file(make_bundle, tmp_path, capsys):
    bundle = tmp_path / "copy"
    shutil.copytree(make_bundle("minilm-l6", num_taps=3, formats=("onnx", "pte")), bundle)
    with open(bundle / "tokenizer.json", "a") as f:
        f.write(" ")
    (bundle / "backbone.pte").unlink()
    rc = main(["inspect", str(bundle)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "TAMPERED tokenizer.json: sha256 mismatch" in err
    assert "TAMPERED backbone.pte: missing" in err
