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


def test_seeds_run_each_seed_apart_and_summarise(monkeypatch, tmp_path):
    import json

    seen = []

    def fake_main(a):  # one seed's run: its own folder, its own headline.json
        seen.append((a.seed, a.out))
        a.out.mkdir(parents=True)
        head = {
            "seed": a.seed,
            "comm_reduction": {"value": 0.8 + 0.01 * a.seed},
            "test_accuracy": {"fedmobillm": 0.7},
            "figures": {"x": float(a.seed)},
        }
        (a.out / "headline.json").write_text(json.dumps(head))
        return 0

    monkeypatch.setattr(run, "_main", fake_main)
    monkeypatch.setattr(run, "preflight", lambda a: None)
    assert run.main(["--quick", "--seeds", "3", "--seed", "5", "--out", str(tmp_path)]) == 0
    assert seen == [(s, tmp_path / f"seed-{s}") for s in (5, 6, 7)]
    summary = json.loads((tmp_path / "headline.json").read_text())
    assert summary["seeds"] == [5, 6, 7]
    assert abs(summary["comm_reduction"]["mean"] - 0.86) < 1e-9
    assert "| comm_reduction |" in (tmp_path / "report.md").read_text()
