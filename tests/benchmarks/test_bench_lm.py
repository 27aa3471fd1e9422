"""benchmarks/bench_lm.py: the targets' arithmetic and the report on a made-up result
(fast), and a tiny real run on SmolLM2 (slow: real weights, real friends lines)."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_lm import MODEL, LmBenchConfig, run, targets, write_report


def _row(method: str, backbone: str, ppl: float) -> dict:
    return {
        "method": method,
        "backbone": backbone,
        "perplexity": ppl,
        "next_token_top1": 0.3,
        "next_token_top3": 0.5,
        "tokens": 100,
        "bytes_per_token": 1728.0,
    }


def test_targets_say_met_or_missed_and_by_how_much():
    rows = [
        _row("frozen", MODEL, 100.0),
        _row("fedmobillm", MODEL, 78.0),
        _row("local", MODEL, 90.0),
        _row("centralised", MODEL, 75.0),
        _row("fedmobillm", "smollm2-135m-l12", 120.0),
    ]
    t = targets(rows)
    assert t["below_frozen_20pct"]["met"] and t["below_frozen_20pct"]["reduction"] == pytest.approx(
        0.22
    )
    assert t["below_local"]["met"]
    assert t["within_5pct_of_centralised"]["met"] is True  # 78 <= 78.75
    assert t["l12_personal_vs_full_frozen"]["ratio"] == pytest.approx(1.2)
    rows[1]["perplexity"] = 95.0
    t = targets(rows)
    assert not t["below_frozen_20pct"]["met"] and not t["below_local"]["met"]
    assert not t["within_5pct_of_centralised"]["met"]


def test_report_writes_json_markdown_and_plot(tmp_path):
    rows = [_row(m, b, p) for m, p in (("frozen", 50.0), ("fedmobillm", 40.0)) for b in (MODEL,)]
    result = {
        "config": {"taps_from": "torch"},
        "rows": rows,
        "timing": {"total_s": 1.0},
        "targets": targets(rows),
        "machine": {"load_avg": (1.0, 1.0, 1.0), "cpus": 2},
    }
    write_report(result, tmp_path, "python -m benchmarks.bench_lm --quick")
    data = json.loads((tmp_path / "lm.json").read_text())
    assert {"method", "backbone", "perplexity", "next_token_top1", "next_token_top3",
            "bytes_per_token"} <= set(data["rows"][0])  # fmt: skip
    md = (tmp_path / "lm.md").read_text()
    assert "| fedmobillm | smollm2-135m | 40.00 |" in md and "fedavg-lora: not run yet" in md
    assert (tmp_path / "lm.png").stat().st_size > 1000


@pytest.mark.slow
def test_tiny_run_on_smollm2_beats_frozen(tmp_path):
    cfg = LmBenchConfig(
        devices=2, train_lines=40, heldout_lines=10, steps=30, batch_lines=8, taps_from="torch"
    )
    result = run(cfg, tmp_path)
    ppl = {(r["method"], r["backbone"]): r["perplexity"] for r in result["rows"]}
    assert {m for m, _ in ppl} == {"frozen", "fedmobillm", "centralised", "local"}
    assert ppl[("fedmobillm", MODEL)] < ppl[("frozen", MODEL)]
