"""benchmarks/_lm_lora.py (fedavg-lora of the lm benchmark) on a tiny random Llama: FedAvg
is exact, the loss mask is the side network's, FLOPs and bytes are counted as torch counts
them, and fedmobillm's draws are the bench's own."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from benchmarks import _lm_lora as L  # noqa: E402
from fedmobillm.errors import FedMobiLLMError  # noqa: E402


def tiny_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      tie_word_embeddings=True)  # fmt: skip
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def tiny_lora(targets: str = "qv", rank: int = 4):
    return L.lora_model(tiny_base(), rank, targets, L.LoraFedConfig(dropout=0.0))


def lines(n_dev: int = 2, per: int = 6, seed: int = 0) -> L.Lines:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, 50, int(rng.integers(3, 9))) for _ in range(n_dev * per)]
    return L.Lines(ids, np.repeat(np.arange(n_dev), per))


def test_fedavg_of_identical_clients_is_the_same_weights_and_weighted_otherwise():
    model = tiny_lora()
    state = L.get_lora(model)
    for a in state.values():  # B starts at zero: give every array values
        a[...] = np.random.default_rng(1).normal(size=a.shape)
    same = L.fedavg([(state, 3), (state, 5), (state, 11)])
    assert all(np.array_equal(same[k], state[k]) for k in state)
    other = {k: v * 2 + 1 for k, v in state.items()}
    mean = L.fedavg([(state, 1), (other, 3)])
    for k in state:
        np.testing.assert_allclose(mean[k], 0.25 * state[k] + 0.75 * other[k], rtol=1e-6)
        assert mean[k].dtype == np.float32
    L.set_lora(model, mean)  # through the model and back
    assert all(np.array_equal(L.get_lora(model)[k], mean[k]) for k in state)
    with pytest.raises(FedMobiLLMError):
        L.fedavg([])
    with pytest.raises(FedMobiLLMError):
        L.fedavg([(state, 0)])
    with pytest.raises(FedMobiLLMError, match="does not match"):
        L.set_lora(model, {k: v for k, v in list(state.items())[1:]})


def test_loss_is_masked_as_the_side_network_masks_it():
    model = tiny_lora()
    data = L.Lines([np.array([5, 7, 9, 11, 13, 2]), np.array([4, 6, 8])], np.zeros(2, np.int64),
                   first_scored=[3, 1])  # fmt: skip
    ids, mask, lm = L.batch(data, np.arange(2))
    assert lm.tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]]
    loss, n = L.lm_loss(model, ids, mask, lm)
    assert n == (6 - 3) + (3 - 1)  # response tokens only; text: every token after the first
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    pred = torch.cat([logits[0, 2:5], logits[1, 0:2]])
    tgt = torch.tensor([11, 13, 2, 6, 8])
    assert loss.item() == pytest.approx(float(torch.nn.functional.cross_entropy(pred, tgt)), 1e-5)
    stats = L.evaluate(model, data)  # evaluation scores the same positions
    assert stats.tokens == 5
    assert stats.nll / 5 == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.parametrize("targets", ["qv", "attn"])
def test_flops_and_bytes_are_counted_as_torch_counts_them(targets):
    from torch.utils.flop_counter import FlopCounterMode

    base = tiny_base()
    shape = L.Shape.of(base.config)
    ids = torch.randint(0, 50, (1, 7))
    mask = torch.ones_like(ids)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        base.model(input_ids=ids, attention_mask=mask)
    assert fc.get_total_flops() == L.forward_flops(shape, 7, 3)
    model = tiny_lora(targets)
    model.train()
    with FlopCounterMode(display=False) as fc:
        loss, _ = L.lm_loss(model, ids, mask, mask)
        loss.backward()
    assert fc.get_total_flops() == L.lora_train_flops(shape, 7, 4, targets)
    assert L.lora_train_flops(shape, 7, 4, targets) > 2 * L.forward_flops(shape, 7, 3, head=True)
    assert sum(a.nbytes for a in L.get_lora(model).values()) == L.adapter_bytes(shape, 4, targets)


def test_fedavg_run_keeps_the_budget_and_its_costs_add_up():
    data = lines()
    cfg = L.LoraFedConfig(clients=1, local_steps=2, batch_lines=3, budget_tokens=40, dropout=0.0)
    run = L.run_fedavg(tiny_base, data, data.subset(np.arange(4)), 4, "qv", 1e-2, cfg)
    assert run.tokens >= 40 and run.tokens - run.curve[-1]["tokens_trained"] == 0
    assert len(run.curve) >= 2 and run.best is not None
    assert run.best_val == min(p["val_perplexity"] for p in run.curve)
    shape = L.Shape.of(tiny_base().config)
    size = L.adapter_bytes(shape, 4, "qv")
    last = run.curve[-1]["per_device"]
    assert sum(c["rounds"] for c in last.values()) == len(run.curve)  # one client per round
    for c in last.values():
        assert c["up"] == c["down"] == c["rounds"] * size
    # each round trains 2 x 3 lines: every line's FLOPs counted once per time it was used
    per_line = [L.lora_train_flops(shape, len(x), 4, "qv") for x in data.ids]
    total = sum(c["flops"] for c in last.values())
    assert min(per_line) * 6 * len(run.curve) <= total <= max(per_line) * 6 * len(run.curve)


def test_fedmobillm_draws_are_the_bench_draws(monkeypatch):
    from benchmarks import bench_lm

    cfg = bench_lm.LmBenchConfig(steps=5, seed=3)
    pools = {"a": (None, np.arange(0, 10)), "b": (None, np.arange(10, 17))}
    got: list[np.ndarray] = []
    monkeypatch.setattr(bench_lm, "group", lambda texts, rows: got.append(rows) or rows)

    class Dummy:
        def train_step(self, groups):
            return 0.0

    bench_lm.train(cfg, Dummy(), pools, {"a": 6, "b": 3})  # per-architecture lines a step
    mine = L.fedmobillm_draws(3, 5, [p[1] for p in pools.values()], [6, 3])
    assert [np.sort(x).tolist() for step in mine for x in step] == [g.tolist() for g in got]
    assert [len(x) for x in mine[0]] == [6, 3]


def test_fedmobillm_curve_and_equal_perplexity():
    data = lines(n_dev=2, per=4)
    shape = L.Shape.of(tiny_base().config)
    draws = [[np.array([0, 4])], [np.array([0, 5])], [np.array([1, 6])]]
    fm = L.fedmobillm_curve(draws, 0, data, [{"step": 1, "val_perplexity": 30.0},
                                             {"step": 3, "val_perplexity": 20.0}], 3, shape, 10.0)  # fmt: skip
    # step 3: lines 0, 1 of device 0 and 4, 5, 6 of device 1, each forwarded once
    want = sum(L.forward_flops(shape, len(data.ids[i]), 3) for i in (0, 1, 4, 5, 6)) / 2
    assert fm[1]["flops_per_device"] == pytest.approx(want)
    assert fm[1]["bytes_per_device"] == pytest.approx(
        10.0 * sum(len(data.ids[i]) for i in (0, 1, 4, 5, 6)) / 2)  # fmt: skip
    lora = [{"round": r, "val_perplexity": v, "flops_per_device": 1e6 * r,
             "bytes_per_device": 1e3 * r} for r, v in ((1, 40.0), (2, 25.0), (3, 22.0))]  # fmt: skip
    dc = L.equal_perplexity(lora, fm, 50.0, {"fedavg-lora": 100, "fedmobillm": 7},
                            {"lora": 900.0, "fedmobillm": 300.0})  # fmt: skip
    assert dc["target_val_perplexity"] == 22.0  # the worse method's best
    at = dc["at_target"]
    assert at["fedavg-lora"]["at"] == 3 and at["fedmobillm"]["at"] == 3
    r = dc["ratio_fedavg_lora_over_fedmobillm"]
    assert r["flops"] == pytest.approx(3e6 / fm[1]["flops_per_device"])
    assert r["bytes_all_in"] == pytest.approx((3e3 + 100) / (fm[1]["bytes_per_device"] + 7))
    assert r["peak_memory"] == 3.0
    assert all(t["target_val_perplexity"] < 50.0 for t in dc["targets"])
    assert not math.isnan(dc["targets"][0]["fedmobillm"]["flops"])


def test_bench_section_end_to_end_on_a_saved_tiny_llama(tmp_path):
    """bench_fedavg_lora on a saved tiny Llama folder: the row, the device-cost ratios
    (peak memory measured in fresh processes), lm.md's section and the cost plot."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
    from gen_helpers import tiny_llama

    folder = str(tiny_llama())
    train, val, test = lines(4, 6, 0), lines(4, 3, 1), lines(4, 3, 2)
    pools = [np.flatnonzero(np.isin(train.device, [0, 2])), np.flatnonzero(train.device % 2)]
    inp = L.BenchInputs(train, val, test, [0, 2], pools, 0,
                        [{"step": s, "val_perplexity": 400.0 - 10 * s} for s in (2, 4)],
                        500.0, 3 * 32 * 2 + 9.0, 1000, 4, 3, 0, folder, 3)  # fmt: skip
    cfg = L.LoraFedConfig(sweep=[(2, "qv", 5e-2), (4, "attn", 5e-2)], local_steps=1,
                          batch_lines=3, budget_fraction=0.5)  # fmt: skip
    row, extra = L.bench_fedavg_lora(inp, cfg)
    assert row["method"] == "fedavg-lora" and row["tokens"] == sum(
        len(test.ids[i]) - 1 for i in np.flatnonzero(np.isin(test.device, [0, 2])))  # fmt: skip
    assert cfg.budget_tokens > 0 and row["tokens_trained"] >= cfg.budget_tokens
    assert row["bytes_per_token"] > 0 and row["peak_train_memory_mb"] > 0
    dc = extra["device_cost"]
    assert set(dc["ratio_fedavg_lora_over_fedmobillm"]) >= {"peak_memory"}
    assert dc["memory"]["lora"]["peak_rss_mb"] >= dc["memory"]["imports"]["peak_rss_mb"]
    assert len(extra["fedavg_lora"]["sweep"]) == 2
    md = "\n".join(L.markdown(extra))
    assert "in-process FedAvg (not Flower" in md and "Device cost at equal perplexity" in md
    L.plot_cost(dc, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 1000
