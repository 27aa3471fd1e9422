"""The lm demo's pure parts (fedmobillm.demo_lm, demo_report's lm functions): fleet parsing,
held-out splits, the per-backbone aggregate, the table and the plot, without a run."""

from __future__ import annotations

import math

import pytest

from fedmobillm.data.lm import LmRecord
from fedmobillm.demo_lm import (
    LmDemoConfig,
    lm_progress_row,
    parse_fleet,
    per_backbone,
    split_heldout,
)
from fedmobillm.demo_report import lm_table_lines, plot_lm_validation
from fedmobillm.errors import FedMobiLLMError


def test_parse_fleet_sorts_classes_by_depth_and_refuses_bad_blocks():
    assert parse_fleet("4,8/2,4") == [(2, 4), (4, 8)]
    assert parse_fleet("10,20,30") == [(10, 20, 30)]
    for bad in ("4,2", "a,b", "", "0,3", "2,4/"):
        with pytest.raises(FedMobiLLMError):
            parse_fleet(bad)


def test_config_needs_a_device_per_class():
    with pytest.raises(FedMobiLLMError, match="fewer than"):
        LmDemoConfig(fleet=[(2, 4), (4, 8)], devices=1)
    assert LmDemoConfig(quick=False).lines == 2000


def test_split_heldout_keeps_episodes_on_one_side():
    recs = [LmRecord(f"line {i}", "before", "Ross", f"ep{i % 6}") for i in range(60)]
    val, test = split_heldout(recs, 20, seed=0)
    assert len(val) == len(test) == 10
    assert not {r.group for r in val} & {r.group for r in test}


def test_split_heldout_says_when_it_alternates_records(caplog):
    """Records of one group (a user file without episodes): alternated by record, said."""
    recs = [LmRecord(f"note {i}") for i in range(10)]
    with caplog.at_level("WARNING", logger="fedmobillm.demo"):
        val, test = split_heldout(recs, 10, seed=0)
    assert len(val) == len(test) == 5 and not set(val) & set(test)
    assert "alternate by record, not by episode" in caplog.text


def _device(backbone: str, frozen: float, personal: float, tokens: int) -> dict:
    def ppl(p: float) -> dict:
        return {"perplexity": p, "nll_per_token": math.log(p), "tokens": tokens,
                "next_token_top1": 0.1}  # fmt: skip

    return {"device": f"d-{backbone}-{frozen}", "speaker": "Ross", "backbone": backbone,
            "layers": [2, int(backbone.rsplit("-b", 1)[1])], "frozen": ppl(frozen),
            "personal": ppl(personal)}  # fmt: skip


def test_per_backbone_weights_devices_by_tokens_and_reads_bytes_per_token():
    rows = [
        _device("smollm2-135m-b4", 1000.0, 100.0, 100),
        _device("smollm2-135m-b4", 10.0, 10.0, 300),
        _device("smollm2-135m-b8", 50.0, 20.0, 50),
        {"device": "broken", "error": "its device process failed"},
    ]
    trainer = {"architectures": {"a4": {"tokens_per_sample": 20.0, "bytes_per_sample": 46080.0}}}
    out = per_backbone(rows, {"smollm2-135m-b4": "a4", "smollm2-135m-b8": "a8"}, trainer)
    assert [b["backbone"] for b in out] == ["smollm2-135m-b4", "smollm2-135m-b8"]
    b4 = out[0]
    assert b4["devices"] == 2 and b4["heldout_tokens"] == 400
    assert b4["frozen_perplexity"] == pytest.approx(
        math.exp((100 * math.log(1000) + 300 * math.log(10)) / 400)
    )
    assert b4["bytes_per_token"] == pytest.approx(2304.0)
    assert out[1]["bytes_per_token"] is None
    lines = lm_table_lines(out, rows)
    assert "SmolLM2-135M 1-4" in lines[1] and "2,304" in lines[1]
    assert any("broken" in line and "error" in line for line in lines)


def test_progress_row_reads_the_latest_validation_perplexity():
    st = {
        "devices": [{"samples": {"train": 10, "validation": 4}}],
        "trainer": {"step": 50, "idle": False, "loss": 3.2, "history": [
            {"step": 25, "validation": {"a": {"perplexity": 400.0}}},
            {"step": 50, "validation": {"a": {"perplexity": 100.0}, "b": {"perplexity": 25.0}}},
            {"step": 60},
        ]},
    }  # fmt: skip
    row = lm_progress_row(st, 2, 1, 12.0)
    assert row["val_per_architecture"] == {"a": 100.0, "b": 25.0}
    assert row["val_perplexity"] == pytest.approx(50.0)
    assert (row["samples"], row["uploaded"], row["devices_running"]) == (10, 14, 1)


def test_plot_lm_validation_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    history = [
        {"t": float(t), "uploaded": t, "val_per_architecture": {"a": 1000.0 / (t + 1)}}
        for t in range(5)
    ]
    path = tmp_path / "v.png"
    assert plot_lm_validation(history, path, names={"a": "b4"}, frozen={"a": 2000.0})
    assert path.stat().st_size > 1000


def _parse(*argv: str):
    import argparse

    from fedmobillm.commands import demo as cmd

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    return cmd, parser.parse_args(list(argv))


def test_cli_routes_the_task_and_keeps_the_classify_defaults(monkeypatch):
    import fedmobillm.demo
    import fedmobillm.demo_lm

    seen = {}
    monkeypatch.setattr(fedmobillm.demo, "run_demo", lambda cfg: seen.setdefault("c", cfg))
    monkeypatch.setattr(fedmobillm.demo_lm, "run_lm_demo", lambda cfg: seen.setdefault("l", cfg))
    cmd, args = _parse()
    assert cmd.run(args) == 0
    c = seen["c"]
    assert (c.devices, c.data, str(c.out)) == (6, "movie-snippets", "runs/demo")
    cmd, args = _parse("--task", "lm", "--fleet", "4,8/2,4", "--lines", "50")
    assert cmd.run(args) == 0
    lm = seen["l"]
    assert lm.fleet == [(2, 4), (4, 8)] and lm.devices == 4 and lm.lines == 50
    assert (lm.data, str(lm.out), lm.heldout_lines) == ("friends", "runs/demo-lm", 80)
    cmd, args = _parse("--task", "lm", "--alpha", "0.5")
    with pytest.raises(FedMobiLLMError, match="--alpha"):
        cmd.run(args)


def test_prepare_data_from_a_user_jsonl_without_authors_splits_iid(tmp_path):
    import json

    from fedmobillm.demo_lm import LmDemo

    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"text": f"note number {i} about things"}) + "\n"
                            for i in range(400)))  # fmt: skip
    cfg = LmDemoConfig(fleet=[(2, 4), (4, 8)], devices=2, data=str(data), out=tmp_path / "run",
                       lines=100, heldout_lines=20)  # fmt: skip
    specs = LmDemo(cfg).prepare_data()
    assert [(s.klass, s.layers) for s in specs] == [("slow", (2, 4)), ("fast", (4, 8))]
    for s in specs:
        # ~10% of each device's 200 records held out (seeded), alternating val / test, <= 10 each
        assert s.counts["train"] == 100 and 5 <= s.counts["validation"] <= 10
        assert abs(s.counts["validation"] - s.counts["test"]) <= 1
        test = {json.loads(line)["text"] for line in s.files["test"].read_text().splitlines()}
        train = {json.loads(line)["text"] for line in s.files["train"].read_text().splitlines()}
        assert test and not test & train


def test_heldout_scores_every_target_of_long_records_once(smollm2_lm_bundle):
    """Prepare held-out records longer than the bundle's 64 tokens (a long text, a reply
    after a prompt that alone fills 64 tokens) and a short one; Execute score_heldout on the
    2-block SmolLM2 generator; Assert every target token is scored once (as many as the
    device uploads, more than Generator.perplexity's cut scores), frozen == score with a
    zero residual, and the short record's loss is Generator.perplexity's."""
    import numpy as np

    from fedmobillm.demo_lm import score_heldout
    from fedmobillm.device_runtime.generate import Generator
    from fedmobillm.device_runtime.lm_samples import lm_samples

    gen = Generator(smollm2_lm_bundle, threads=1)
    long = " ".join(f"line {i} of a long story told by the fire" for i in range(20))
    records = [LmRecord(long), LmRecord("We were on a break!", long),
               LmRecord("How you doin'?")]  # fmt: skip
    targets = lm_samples(records, gen.encode, 64).target_tokens
    full = len(gen.encode(long)) - 1 + len(gen.encode("We were on a break!", special=False))
    full += len(gen.encode("How you doin'?")) - 1
    assert targets == full and len(gen.encode(long)) > 64
    got = score_heldout(gen, records)
    assert got.tokens == targets and got.texts == 3
    assert gen.perplexity([r.scored() for r in records]).tokens < targets  # what it fixes
    zero = score_heldout(gen, records, delta=lambda taps, hidden: np.zeros_like(hidden))
    assert zero.tokens == got.tokens and zero.nll == pytest.approx(got.nll, rel=1e-6)
    short = score_heldout(gen, records[2:])
    ref = gen.perplexity([records[2].scored()])
    assert short.tokens == ref.tokens and short.nll == pytest.approx(ref.nll, rel=1e-6)


def test_evaluate_reports_a_device_whose_test_half_has_nothing_to_predict(
    smollm2_lm_bundle, tmp_path, monkeypatch
):
    """Prepare a device whose test lines are one token each (nothing to predict); Execute
    evaluate with fetch-model stubbed; Assert the device's row is an error that says so and
    the run goes on (no exception)."""
    import json

    from fedmobillm.demo_lm import LmDemo, LmDeviceSpec

    test = tmp_path / "d.test.jsonl"
    test.write_text(json.dumps({"text": "Hi"}) + "\n")
    spec = LmDeviceSpec("d0", "Ross", "phone", (1, 2), 20.0, tmp_path / "state",
                        {"test": test}, {"test": 1})  # fmt: skip
    demo = LmDemo(LmDemoConfig(fleet=[(1, 2)], devices=1, out=tmp_path / "run"))
    demo.specs = [spec]
    monkeypatch.setattr(demo, "_device_cli", lambda *a: None)  # the personal model "fetched"

    class Zero:  # a personal model that adds nothing
        def __init__(self, path) -> None:
            pass

        def check_compatible(self, manifest) -> None:
            pass

        def delta(self, taps, hidden):
            return 0 * hidden

    monkeypatch.setattr("fedmobillm.device_runtime.lm_personal.PersonalLM", Zero)
    rows = demo.evaluate("http://127.0.0.1:9", {spec.backbone: smollm2_lm_bundle})
    assert rows == [{"device": "d0", "error": rows[0]["error"]}]
    assert "held-out perplexity" in rows[0]["error"] and "token to predict" in rows[0]["error"]
