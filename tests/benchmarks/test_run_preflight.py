"""benchmarks.run checks what it needs before minutes of work, and says how FedAvg runs
(issue 22: the README's install must not end in a traceback)."""

from __future__ import annotations

import importlib.util
import logging

from benchmarks import run


def test_missing_package_is_a_clear_error_not_a_traceback(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    assert run.main(["--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs peft" in err and ".[all,dev]" in err
    assert not list(tmp_path.iterdir())  # nothing started


def test_bad_seeds_refused(tmp_path, capsys):
    assert run.main(["--quick", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


def test_says_fedavg_runs_in_process_without_flower(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr("benchmarks._flower_env.flower_pythonpath", lambda install=False: None)
    a = run.parse_args(["--quick", "--out", str(tmp_path)])
    with caplog.at_level(logging.INFO, logger="benchmarks"):
        run.preflight(a)
    assert "run in-process" in caplog.text and "--install-flower" in caplog.text
