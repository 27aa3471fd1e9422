"""benchmarks/bench_lm.py: the targets' arithmetic and the report on a made-up result
(fast), and a tiny real run on SmolLM2 (slow: real weights, real friends lines)."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_lm import (
    MODEL,
    LmBenchConfig,
    plotted_methods,
    run,
    targets,
    write_report,
)


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


def test_the_plot_omits_methods_that_were_not_run():
    order = ["frozen", "frozen-tuned-lens", "local", "fedmobillm", "centralised", "fedavg-lora"]
    rows = [_row(m, MODEL, 50.0) for m in ("fedmobillm", "frozen", "centralised")]
    assert plotted_methods(rows, order) == ["frozen", "fedmobillm", "centralised"]
    rows.append(_row("fedavg-lora", MODEL, 40.0))
    rows.append(_row("other", MODEL, 40.0))
    assert plotted_methods(rows, order)[-2:] == ["fedavg-lora", "other"]


@pytest.mark.slow
def test_tiny_run_on_smollm2_beats_frozen(tmp_path):
    cfg = LmBenchConfig(
        devices=2,
        train_lines=40,
        heldout_lines=10,
        steps=30,
        batch_lines=8,
        taps_from="torch",
        select_every=10,
        fedavg_lora=False,
    )
    result = run(cfg, tmp_path)
    ppl = {(r["method"], r["backbone"]): r["perplexity"] for r in result["rows"]}
    assert {m for m, _ in ppl} == {"frozen", "frozen-tuned-lens", "fedmobillm", "centralised",
                                   "local"}  # fmt: skip
    assert ppl[("fedmobillm", MODEL)] < ppl[("frozen", MODEL)]
    l12 = "smollm2-135m-l12"  # its tuned lens is a language model, its logit lens is not
    assert ppl[("frozen-tuned-lens", l12)] < ppl[("frozen", l12)] / 1000


def test_validation_lines_come_from_other_episodes_than_training_and_test():
    from benchmarks.bench_lm import fleet

    cfg = LmBenchConfig.quick()
    devices, val = fleet(cfg)
    assert len(devices) == len(val) == cfg.devices
    for d, v in zip(devices, val, strict=True):
        assert len(d.train) == cfg.train_lines and len(v) == cfg.val_lines
        episodes = {r.group for r in v}
        assert not episodes & {r.group for r in d.train}
        assert not episodes & {r.group for r in d.heldout}


class _FakeSource:
    """Two backbones' taps of a text: K = 3 taps of d = 4, L = len(text.split())."""

    def __init__(self) -> None:
        import numpy as np

        from benchmarks.bench_lm import BACKBONES

        self.scales = {b: np.full(3, 0.01, np.float32) for b in BACKBONES}
        self.architecture = {b: b for b in BACKBONES}
        self.digest = dict.fromkeys(BACKBONES, "fake")

    def taps(self, texts):
        import numpy as np

        from benchmarks.bench_lm import BACKBONES

        rng = np.random.default_rng(0)
        items = [(rng.normal(size=(3, len(t.split()), 4)).astype(np.float32) * 3,
                  np.arange(len(t.split()))) for t in texts]  # fmt: skip
        return dict.fromkeys(BACKBONES, items)


def test_fp16_uploads_keep_the_deepest_tap_and_int8_clips_it():
    import numpy as np

    from benchmarks.bench_lm import MODEL, encode_lines

    source = _FakeSource()
    lines = ["a b c", "d e"]
    want = source.taps(lines)[MODEL]
    fp16 = encode_lines(source, lines, np.zeros(2), "fp16")[MODEL]
    int8 = encode_lines(source, lines, np.zeros(2), "int8")[MODEL]
    assert fp16.acts.q.dtype == np.float16 and int8.acts.q.dtype == np.int8
    x16, mask = fp16.acts.batch(np.arange(2))
    x8, _ = int8.acts.batch(np.arange(2))
    real = want[0][0]  # (K, 3, d)
    assert np.abs(x16[0, :, :3] - real).max() < 1e-2 * np.abs(real).max()
    assert np.abs(x8[0, :, :3]).max() <= 127 * 0.01 + 1e-6 < np.abs(real).max()  # clipped
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    from benchmarks.bench_lm import _bytes

    assert _bytes(fp16)["bytes_per_token"] == 2 * _bytes(int8)["bytes_per_token"] == 24.0
    with pytest.raises(Exception, match="int8 or fp16"):
        encode_lines(source, lines, np.zeros(2), "int4")


def test_selected_keeps_each_architectures_best_model_on_validation():
    from benchmarks.bench_lm import Selected

    class _Trainer:
        def __init__(self):
            self.version = 0

        def model(self, arch, averaged=True):
            return {"arch": arch, "version": self.version}

        def num_parameters(self, arch=None):
            return 7

    t = _Trainer()
    chosen = Selected(t)
    for step, ppl in ((10, 50.0), (20, 40.0), (30, 45.0)):
        t.version = step
        chosen.offer("a", step, ppl)
        chosen.offer("b", step, 100.0 - step)
    assert chosen.model("a") == {"arch": "a", "version": 20} and chosen.chosen["a"] == (20, 40.0)
    assert chosen.model("b")["version"] == 30 and chosen.num_parameters("a") == 7


def test_no_centralised_and_no_local_reach_the_config(monkeypatch, tmp_path, capsys):
    from benchmarks import bench_lm

    with pytest.raises(SystemExit):
        bench_lm.main(["--quick", "--out", str(tmp_path), "--centralised", bench_lm.MODEL,
                       "--no-centralised"])  # fmt: skip
    assert "contradict" in capsys.readouterr().err
    seen = {}

    def fake_run(cfg, out, command):
        seen["cfg"] = cfg
        raise KeyboardInterrupt  # stop before the report

    monkeypatch.setattr(bench_lm, "run", fake_run)
    with pytest.raises(KeyboardInterrupt):
        bench_lm.main(["--quick", "--out", str(tmp_path), "--no-centralised", "--no-local"])
    assert seen["cfg"].centralised == [] and seen["cfg"].local == 0
    with pytest.raises(KeyboardInterrupt):
        bench_lm.main(["--quick", "--out", str(tmp_path)])
    assert seen["cfg"].centralised == list(bench_lm.BACKBONES) and seen["cfg"].local == 1
