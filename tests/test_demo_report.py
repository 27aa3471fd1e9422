"""The demo's report, run folder and quieting, without a run (see tests/test_demo.py)."""

from __future__ import annotations

import json
import logging
import os
import warnings

import pytest

from fedmobillm.demo import RUN_MARKER, fresh_run_dir, quiet_third_party
from fedmobillm.demo_report import (
    first_upload_time,
    model_name,
    plot_validation,
    quant_change,
    table_lines,
)
from fedmobillm.errors import FedMobiLLMError

VERIFY_ERROR = (
    "int8: stage verify failed: onnx int8 graph disagrees with eager PyTorch "
    "(min cosine 0.6120 < 0.95)\n  hint: the backend mis-compiled this architecture"
)


def _row(name: str, quant: str, errors: list[str]) -> dict:
    return {
        "name": name,
        **quant_change("int8", quant, errors),
        "accuracy": 0.7,
        "bytes_uploaded": 240716.0,
        "forward_ms_per_sample": 31.9,
        "peak_mb": 140.0,
    }


def test_quant_change_says_why_only_when_it_changed():
    """Prepare/Execute: a bundle at the quant asked for, and one that fell back.
    Assert: only the fallback carries a reason, the export errors of the variant tried first."""
    same = quant_change("int8", "int8", [])
    fell = quant_change("int8", "fp32", [VERIFY_ERROR])
    assert same == {"quant": "int8", "quant_requested": "int8", "quant_fallback": None}
    assert fell["quant"] == "fp32" and fell["quant_requested"] == "int8"
    assert "min cosine 0.6120" in fell["quant_fallback"]
    assert quant_change("int8", "fp32", [])["quant_fallback"] == "no int8 bundle"


def test_table_shows_each_quant_and_why_it_fell_back():
    """Prepare: one backbone at int8, one that fell back to fp32, one not exported.
    Execute: the final table. Assert: every backbone's quant is in its line, the fallback is
    starred and explained in one line (no hint), the export failure and majority rate shown."""
    rows = [_row("minilm-l3", "int8", []), _row("smollm2-135m", "fp32", [VERIFY_ERROR])]
    lines = table_lines(rows, 0.517, {"minilm-l6": "fp32: stage load failed: no weights"})
    text = "\n".join(lines)
    assert "quant" in lines[0] and "model" in lines[0]
    l3 = next(x for x in lines if x.startswith("minilm-l3"))
    smol = next(x for x in lines if x.startswith("smollm2-135m"))
    assert " int8 " in l3 and "*" not in l3 and "MiniLM-L3" in l3
    assert " fp32* " in smol and "SmolLM2-135M" in smol and "70.0%" in smol
    note = next(x for x in lines if x.startswith("* smollm2-135m"))
    assert "int8 -> fp32" in note and "min cosine 0.6120 < 0.95" in note and "hint" not in note
    assert "minilm-l6" in text and "not exported: fp32: stage load failed" in text
    assert lines[-1] == "majority-class rate: 51.7%"


def test_table_with_an_evaluation_error_keeps_the_quant():
    """Assert: a backbone whose evaluation failed still shows its quant and the error."""
    row = {"name": "minilm-l6", **quant_change("int8", "fp32", ["int8: boom"]), "error": "x\ny"}
    lines = table_lines([row], 0.5)
    assert " fp32* " in lines[1] and "error: x" in lines[1]
    assert any(x.startswith("* minilm-l6: int8 -> fp32: int8: boom") for x in lines)


def test_model_names():
    assert model_name("minilm-l6") == "MiniLM-L6"
    assert model_name("smollm2-135m") == "SmolLM2-135M"
    assert model_name("org/some-model") == "some-model"


def test_plot_starts_at_the_first_upload(tmp_path):
    """Prepare: a history whose first upload comes 40 s after the start, two architectures.
    Execute: plot. Assert: a PNG is written and the time axis starts at the first upload."""
    pytest.importorskip("matplotlib")
    a, b = "bert/minilm-l3/d384/L3/taps1,2,3", "bert/minilm-l6/d384/L6/taps2,4,6"
    history = [
        {"t": 10.0, "uploaded": 0, "step": 0, "val_per_architecture": {}},
        {"t": 40.0, "uploaded": 32, "step": 0, "val_per_architecture": {}},
        {"t": 50.0, "uploaded": 800, "step": 100, "val_per_architecture": {a: 0.7, b: 0.72}},
        {"t": 52.0, "uploaded": 800, "step": 150, "val_per_architecture": {a: 0.69, b: 0.73}},
    ]
    out = tmp_path / "validation.png"
    ok = plot_validation(
        history,
        out,
        names={a: "MiniLM-L3", b: "MiniLM-L6"},
        kept={a: {"step": 100, "accuracy": 0.7}, b: {"step": 150, "accuracy": 0.73}},
        test_accuracy={a: 0.71, b: 0.74},
        majority_rate=0.517,
    )
    assert ok and out.stat().st_size > 0
    assert first_upload_time(history) == 40.0


def test_fresh_run_dir_removes_only_an_earlier_runs_state(tmp_path):
    """Prepare: a folder as an interrupted earlier run left it, plus a file of the user's.
    Execute: fresh_run_dir. Assert: the run's state is gone, the user's file stays, and the
    folder is marked as this process's run."""
    for d in ("server", "devices/dev00", "data"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "devices/dev00/device.json").write_text("{}")
    (tmp_path / "data/test.jsonl").write_text("")
    (tmp_path / "server.log").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    removed = fresh_run_dir(tmp_path)
    assert set(removed) == {"server", "devices", "data", "server.log"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_MARKER, "notes.txt"]
    assert json.loads((tmp_path / RUN_MARKER).read_text())["pid"] == os.getpid()
    assert fresh_run_dir(tmp_path) == []  # our own marker: a rerun of this process is fine


def test_fresh_run_dir_refuses_a_folder_no_demo_wrote(tmp_path):
    (tmp_path / "server").mkdir()
    with pytest.raises(FedMobiLLMError, match="no demo run wrote"):
        fresh_run_dir(tmp_path)
    assert (tmp_path / "server").is_dir()


def test_fresh_run_dir_refuses_while_another_demo_runs(tmp_path, monkeypatch):
    (tmp_path / RUN_MARKER).write_text(json.dumps({"pid": 4242}))
    (tmp_path / "server").mkdir()
    monkeypatch.setattr("fedmobillm.demo._demo_alive", lambda pid: pid == 4242)
    with pytest.raises(FedMobiLLMError, match="pid 4242"):
        fresh_run_dir(tmp_path)
    assert (tmp_path / "server").is_dir()


def test_quiet_third_party_drops_library_noise_until_it_ends(caplog):
    """Execute: warn and log from a library inside and after quiet_third_party(False).
    Assert: inside, only fedmobillm's records and errors pass and warnings are ignored; after,
    the library logs again; with debug nothing is dropped."""
    lib, ours = logging.getLogger("transformers"), logging.getLogger("fedmobillm.demo")
    caplog.set_level(logging.INFO)
    # the library's logger as a fresh process has it: transformers' own logging setup, run by
    # any earlier test in this process, stops it propagating to the root (where caplog
    # listens) and may leave a level on it
    level, propagate = lib.level, lib.propagate
    lib.setLevel(logging.NOTSET)
    lib.propagate = True
    try:
        _quiet_then_loud(lib, ours, caplog)
    finally:
        lib.setLevel(level)
        lib.propagate = propagate


def _quiet_then_loud(lib: logging.Logger, ours: logging.Logger, caplog) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_third_party(False):
            warnings.warn("deprecated inside", DeprecationWarning, stacklevel=1)
            lib.warning("library chatter")
            lib.error("library error")
            ours.info("our line")
        warnings.warn("after", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["after"]
    with quiet_third_party(True):
        lib.warning("debug chatter")
    lib.warning("after chatter")
    text = caplog.text
    assert "library chatter" not in text and "library error" in text and "our line" in text
    assert "debug chatter" in text and "after chatter" in text
