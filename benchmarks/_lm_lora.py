"""FedAvg + peft LoRA on the full decoder: the lm benchmark's ``fedavg-lora`` baseline
(issue 16), and the device cost of each method at equal perplexity.

**In-process FedAvg, not Flower.** ``flwr`` cannot be installed with this project's
constraints, so rounds run in this process: each round samples ``clients`` devices; each
loads the global LoRA weights into SmolLM2 (``peft``, fp32, the whole 30-block decoder),
takes ``local_steps`` AdamW steps of causal-LM loss on ``batch_lines`` of its own training
lines (a fresh optimizer each round), and returns its LoRA weights; the server averages
them weighted by the scored tokens each client trained on (``fedavg``: Flower's FedAvg rule
with tokens as num-examples). A and B matrices are averaged separately, as FedAvg-LoRA does.

Loss masking is the side network's: ``server.lm.next_token_targets`` (a position is scored
when the next token is real and in the loss mask: the response for prompt/response lines,
every token after the first for text). The lines are the bench's own token ids
(``Texts.ids``), so both methods train and score exactly the same tokens.

Device cost, counted per line at its own length (no padding), matmul FLOPs as
``torch.utils.flop_counter`` counts them (2 per multiply-add; norms, softmax, activations
not counted; checked equal on a tiny Llama in ``tests/benchmarks/test_lm_lora.py``):
- FedAvg-LoRA, per training line: forward through every block and the LM head at every
  position, backward: input gradients of every matmul downstream of the first adapter
  (the first block's frozen q/k/v projections need none), weight gradients of the
  adapters only (``lora_train_flops``);
- fedmobillm, per line forwarded once: the blocks up to the deepest tap, no head, no
  backward (``forward_flops``).
Bytes: FedAvg-LoRA downloads and uploads the adapter (fp32) every round it is sampled;
fedmobillm uploads each line's taps once (``bytes_per_token`` + 9 bytes of id and mask per
token). Peak memory: ``measure_peak`` runs one step at the bench's shapes in a fresh
process and reads its peak RSS (``python -m benchmarks._lm_lora --measure ...``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks.lm")

ENGINE = "in-process FedAvg (not Flower: flwr conflicts with constraints.txt), weighted by tokens"
TARGET_MODULES = {"qv": ["q_proj", "v_proj"],
                  "attn": ["q_proj", "k_proj", "v_proj", "o_proj"]}  # fmt: skip


@dataclass
class LoraFedConfig:
    """FedAvg-LoRA settings. ``sweep``: (rank, target modules key, lr) tried, chosen on
    validation perplexity; ``budget_tokens``: rounds run until this many scored training
    tokens were trained on (the bench sets it from fedmobillm's steps)."""

    sweep: list[tuple[int, str, float]] = field(
        default_factory=lambda: [(4, "qv", 2e-3), (16, "qv", 2e-3)]
    )
    clients: int = 2  # sampled per round
    local_steps: int = 2
    batch_lines: int = 8
    alpha_per_rank: float = 2.0  # lora_alpha = rank * this
    dropout: float = 0.05
    budget_tokens: int = 0
    budget_fraction: float = 1.0  # of fedmobillm's tokens (``bench_fedavg_lora`` sets the budget)
    max_rounds: int = 200
    seed: int = 0
    threads: int = 2


@dataclass
class Lines:
    """Token ids of lines (each (L,) int64), the owning device, and per line the first
    position whose token is scored (1 for text; the response's first token for
    prompt/response)."""

    ids: list[np.ndarray]
    device: np.ndarray
    first_scored: list[int] | None = None

    def subset(self, rows: np.ndarray) -> Lines:
        fs = None if self.first_scored is None else [self.first_scored[i] for i in rows]
        return Lines([self.ids[i] for i in rows], self.device[rows], fs)


# -- model, weights, averaging -------------------------------------------------------------------


def lora_model(base: Any, rank: int, targets: str, cfg: LoraFedConfig) -> Any:
    """``base`` (a Hugging Face causal LM, frozen) wrapped by peft LoRA on ``targets``."""
    import torch
    from peft import LoraConfig, get_peft_model

    if targets not in TARGET_MODULES:
        raise FedMobiLLMError(f"LoRA targets must be one of {sorted(TARGET_MODULES)}, "
                              f"not {targets!r}")  # fmt: skip
    torch.manual_seed(cfg.seed)
    conf = LoraConfig(r=rank, lora_alpha=rank * cfg.alpha_per_rank, lora_dropout=cfg.dropout,
                      target_modules=TARGET_MODULES[targets], bias="none")  # fmt: skip
    return get_peft_model(base, conf)


def get_lora(model: Any) -> dict[str, np.ndarray]:
    """The trainable (adapter) weights by name, float32 copies."""
    return {n: p.detach().cpu().numpy().copy() for n, p in model.named_parameters()
            if p.requires_grad}  # fmt: skip


def set_lora(model: Any, state: dict[str, np.ndarray]) -> None:
    """Load adapter weights; every trainable parameter must be given, with its shape."""
    import torch

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise FedMobiLLMError("LoRA state does not match the model's adapters",
                              hint=f"missing {sorted(set(params) - set(state))[:3]}")  # fmt: skip
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(state[n], np.float32)))


def fedavg(results: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """FedAvg: per array, the mean of the clients' arrays weighted by their weight (scored
    tokens), in float64, returned float32."""
    if not results:
        raise FedMobiLLMError("FedAvg over no clients")
    total = float(sum(w for _, w in results))
    if total <= 0:
        raise FedMobiLLMError("FedAvg weights sum to zero (no client trained on a token)")
    return {k: sum(s[k].astype(np.float64) * (w / total) for s, w in results).astype(np.float32)
            for k in results[0][0]}  # fmt: skip


# -- batches, loss, evaluation --------------------------------------------------------------------


def batch(lines: Lines, rows: np.ndarray) -> tuple[Any, Any, Any]:
    """Right-padded ids (B, T) int64, attention mask (B, T) and loss mask (B, T) of
    ``rows`` (loss mask 1 from each line's first scored position)."""
    import torch

    width = max(len(lines.ids[i]) for i in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.int64)
    mask, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for j, i in enumerate(rows):
        n = len(lines.ids[i])
        ids[j, :n] = torch.from_numpy(np.asarray(lines.ids[i], np.int64))
        mask[j, :n] = 1
        start = 1 if lines.first_scored is None else lines.first_scored[i]
        loss_mask[j, start:n] = 1
    return ids, mask, loss_mask


def lm_loss(model: Any, ids: Any, mask: Any, loss_mask: Any) -> tuple[Any, int]:
    """Mean next-token NLL over the scored positions (``next_token_targets``, the side
    network's rule) and how many were scored."""
    import torch

    from fedmobillm.server.lm import next_token_targets

    scored, target = next_token_targets(ids, mask, loss_mask)
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    n = int(scored.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    return torch.nn.functional.cross_entropy(logits[scored], target[scored]), n


def evaluate(model: Any, lines: Lines, rows: np.ndarray | None = None) -> Any:
    """``NextTokenStats`` of ``rows`` (default all), length-sorted batches of 16."""
    import torch

    from fedmobillm.server.lm import NextTokenStats, next_token_targets

    rows = np.arange(len(lines.ids)) if rows is None else np.asarray(rows)
    order = rows[np.argsort([len(lines.ids[i]) for i in rows], kind="stable")]
    stats = NextTokenStats()
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(order), 16):
            ids, mask, lm = batch(lines, order[s : s + 16])
            scored, target = next_token_targets(ids, mask, lm)
            stats.add(model(input_ids=ids, attention_mask=mask).logits, scored, target)
    return stats


def local_round(model: Any, state: dict[str, np.ndarray], lines: Lines, rows: np.ndarray,
                cfg: LoraFedConfig, lr: float, rng: np.random.Generator) -> tuple[dict, int, float, list[int]]:  # fmt: skip
    """One client's round: ``local_steps`` AdamW steps of ``batch_lines`` of its ``rows``
    (a shuffled pass, wrapping), from ``state``. Returns (its adapter weights, scored tokens
    trained, mean loss, the lines it trained on, in order)."""
    import torch

    set_lora(model, state)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)  # fmt: skip
    order = rng.permutation(rows)
    tokens, losses, used = 0, [], []
    for step in range(cfg.local_steps):
        pick = np.take(order, range(step * cfg.batch_lines, (step + 1) * cfg.batch_lines),
                       mode="wrap")[: len(order)]  # fmt: skip
        loss, n = lm_loss(model, *batch(lines, pick))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tokens, used = tokens + n, used + [int(i) for i in pick]
        losses.append(loss.item())
    return get_lora(model), tokens, float(np.mean(losses)), used


# -- FLOPs ----------------------------------------------------------------------------------------


@dataclass
class Shape:
    """What the FLOP count needs of a Llama-style decoder config."""

    d: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    blocks: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                   hd, config.intermediate_size, config.vocab_size,
                   config.num_hidden_layers)  # fmt: skip

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.d, q), "k_proj": (self.d, kv), "v_proj": (self.d, kv),
                "o_proj": (q, self.d), "gate_proj": (self.d, self.inter),
                "up_proj": (self.d, self.inter), "down_proj": (self.inter, self.d)}  # fmt: skip

    def attention(self, length: int) -> int:
        """Multiply-adds of one of the two attention matmuls (QK^T or PV) of one block over a
        line of ``length``: the full L x L, as eager attention computes it."""
        return self.heads * length * length * self.head_dim


def forward_flops(shape: Shape, length: int, blocks: int, head: bool = False) -> int:
    """Forward FLOPs of one line of ``length`` tokens through ``blocks`` blocks (and the LM
    head at every position when ``head``): fedmobillm's device work per line."""
    macs = blocks * (length * sum(i * o for i, o in shape.linears().values())
                     + 2 * shape.attention(length))  # fmt: skip
    if head:
        macs += length * shape.d * shape.vocab
    return 2 * macs


def lora_train_flops(shape: Shape, length: int, rank: int, targets: str) -> int:
    """Forward + backward FLOPs of one line of ``length`` through the whole decoder with
    LoRA adapters of ``rank`` on ``targets`` (module docstring: what is counted)."""
    lin, names = shape.linears(), TARGET_MODULES[targets]
    adapter = sum(rank * (lin[n][0] + lin[n][1]) for n in names)  # MACs per token per block
    all_lin = sum(i * o for i, o in lin.values())
    att = shape.attention(length)
    fwd = shape.blocks * (length * (all_lin + adapter) + 2 * att) + length * shape.d * shape.vocab
    bwd = length * shape.d * shape.vocab  # head: input gradient only (frozen weight)
    bwd += (shape.blocks - 1) * (length * (all_lin + 2 * adapter) + 4 * att)
    # block 1: its input (the embedding) needs no gradient, so its q/k/v projections and
    # their adapters' A inputs need none either
    first_in = {"q_proj", "k_proj", "v_proj"}
    bwd += length * sum(i * o for n, (i, o) in lin.items() if n not in first_in)
    for n in names:
        i, o = lin[n]
        bwd += length * rank * ((i if n in first_in else 2 * i) + 2 * o)
    needs = {n: n in names for n in ("q_proj", "k_proj", "v_proj")}
    bwd += att * (needs["q_proj"] + needs["k_proj"] + (needs["q_proj"] or needs["k_proj"])
                  + needs["v_proj"])  # fmt: skip
    return 2 * (fwd + bwd)


def adapter_bytes(shape: Shape, rank: int, targets: str) -> int:
    """fp32 bytes of the adapters (A and B of every target module of every block)."""
    lin = shape.linears()
    return 4 * shape.blocks * sum(rank * (lin[n][0] + lin[n][1]) for n in TARGET_MODULES[targets])


# -- the FedAvg run ---------------------------------------------------------------------------------


@dataclass
class FedRun:
    """One FedAvg-LoRA run: per round the validation perplexity and each device's cumulative
    cost; the best-validation round's adapter kept (``best``)."""

    rank: int
    targets: str
    lr: float
    curve: list[dict[str, Any]] = field(default_factory=list)
    best_round: int = 0
    best_val: float = math.inf
    best: dict[str, np.ndarray] | None = None
    tokens: int = 0
    host_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"rank": self.rank, "targets": self.targets, "lr": self.lr,
                "best_round": self.best_round, "best_val_perplexity": self.best_val,
                "rounds": len(self.curve), "tokens_trained": self.tokens,
                "host_s": self.host_s, "curve": self.curve}  # fmt: skip


def run_fedavg(base_loader: Any, train: Lines, val: Lines, rank: int, targets: str, lr: float,
               cfg: LoraFedConfig) -> FedRun:  # fmt: skip
    """FedAvg rounds until ``cfg.budget_tokens`` scored tokens were trained (or
    ``max_rounds``); ``val`` scored after every round (perplexity over its lines). Device
    cost per round per sampled client: adapter bytes down and up, ``lora_train_flops`` of
    each line it trained on."""
    model = lora_model(base_loader(), rank, targets, cfg)
    shape = Shape.of(model.config)
    size = adapter_bytes(shape, rank, targets)
    state = get_lora(model)
    if sum(a.nbytes for a in state.values()) != size:
        raise FedMobiLLMError("adapter bytes counted != the model's adapter arrays")
    devices = np.unique(train.device)
    cum = {int(d): {"flops": 0.0, "up": 0, "down": 0, "rounds": 0} for d in devices}
    run, t0 = FedRun(rank, targets, lr), time.perf_counter()
    for r in range(1, cfg.max_rounds + 1):
        if run.tokens >= cfg.budget_tokens:
            break
        rng = np.random.default_rng([cfg.seed, r])
        chosen = sorted(rng.choice(devices, min(cfg.clients, len(devices)), replace=False))
        results, losses = [], []
        for dev in chosen:
            rows = np.flatnonzero(train.device == dev)
            out, n, loss, used = local_round(model, state, train, rows, cfg, lr,
                                             np.random.default_rng([cfg.seed, r, int(dev)]))  # fmt: skip
            results.append((out, n))
            losses.append(loss)
            run.tokens += n
            c = cum[int(dev)]
            c["flops"] += sum(lora_train_flops(shape, len(train.ids[i]), rank, targets)
                              for i in used)  # fmt: skip
            c["up"], c["down"], c["rounds"] = c["up"] + size, c["down"] + size, c["rounds"] + 1
        state = fedavg(results)
        set_lora(model, state)
        v = evaluate(model, val).to_dict()
        run.curve.append(_round_point(r, run.tokens, v, losses, cum))
        log.info("fedavg-lora r=%d %s lr=%g round %d: %d tokens, loss %.3f, validation %.2f",
                 rank, targets, lr, r, run.tokens, np.mean(losses), v["perplexity"])  # fmt: skip
        if v["perplexity"] < run.best_val:
            run.best_round, run.best_val, run.best = r, v["perplexity"], state
    run.host_s = time.perf_counter() - t0
    return run


def _round_point(r: int, tokens: int, v: dict[str, float], losses: list[float],
                 cum: dict[int, dict[str, float]]) -> dict[str, Any]:  # fmt: skip
    """A curve point: validation figures and the mean cumulative cost per device."""
    n = len(cum)
    up = sum(c["up"] for c in cum.values()) / n
    down = sum(c["down"] for c in cum.values()) / n
    return {"round": r, "tokens_trained": tokens, "val_perplexity": v["perplexity"],
            "val_top1": v["next_token_top1"], "train_loss": float(np.mean(losses)),
            "flops_per_device": sum(c["flops"] for c in cum.values()) / n,
            "bytes_up_per_device": up, "bytes_down_per_device": down,
            "bytes_per_device": up + down,
            "per_device": {str(k): dict(c) for k, c in cum.items()}}  # fmt: skip


def sweep(base_loader: Any, train: Lines, val: Lines, cfg: LoraFedConfig) -> tuple[FedRun, list]:
    """Every (rank, targets, lr) of ``cfg.sweep`` with the same budget; the run of lowest
    best-validation perplexity, and every run's summary."""
    runs = [run_fedavg(base_loader, train, val, r, t, lr, cfg) for r, t, lr in cfg.sweep]
    best = min(runs, key=lambda x: x.best_val)
    return best, [x.summary() for x in runs]


# -- fedmobillm's side of the comparison ------------------------------------------------------------


def fedmobillm_draws(seed: int, steps: int, pools: list[np.ndarray],
                     batch_lines: list[int]) -> list:  # fmt: skip
    """Per step, per pool, the line rows ``bench_lm.train`` draws (the same generator calls:
    ``default_rng([seed, step])``, one ``choice`` of ``batch_lines[i]`` rows per pool i in
    order; checked against ``train`` in the tests)."""
    out = []
    for step in range(steps):
        rng = np.random.default_rng([seed, step])
        out.append([rng.choice(rows, min(n, len(rows)), replace=False)
                    for rows, n in zip(pools, batch_lines, strict=True)])  # fmt: skip
    return out


def fedmobillm_curve(draws: list, pool: int, lines: Lines, val_curve: list[dict[str, Any]],
                     blocks: int, shape: Shape, bytes_per_token: float) -> list[dict[str, Any]]:  # fmt: skip
    """fedmobillm's perplexity-vs-device-cost curve for one architecture's pool: at each
    logged step (``val_curve``: {"step", "val_perplexity"}), each device has forwarded
    (``blocks`` blocks) and uploaded (``bytes_per_token`` per token) the lines the server
    had drawn from it so far, once each; cost = mean over the pool's devices."""
    devices = np.unique(lines.device[np.unique(np.concatenate([d[pool] for d in draws]))])
    out = []
    for p in val_curve:
        seen = np.unique(np.concatenate([d[pool] for d in draws[: p["step"]]]))
        per = {int(d): {"flops": 0.0, "up": 0.0, "lines": 0} for d in devices}
        for i in seen:
            c, n = per[int(lines.device[i])], len(lines.ids[i])
            c["flops"] += forward_flops(shape, n, blocks)
            c["up"] += n * bytes_per_token
            c["lines"] += 1
        k = len(per)
        up = sum(c["up"] for c in per.values()) / k
        out.append({"step": p["step"], "val_perplexity": p["val_perplexity"],
                    "flops_per_device": sum(c["flops"] for c in per.values()) / k,
                    "bytes_up_per_device": up, "bytes_down_per_device": 0.0,
                    "bytes_per_device": up,
                    "per_device": {str(d): c for d, c in per.items()}})  # fmt: skip
    return out


def scored_tokens_drawn(draws: list, pool: int, lines: Lines) -> int:
    """Scored training tokens over every step's draw of ``pool`` (repeats counted)."""
    fs = lines.first_scored
    return int(sum(len(lines.ids[i]) - (1 if fs is None else fs[i])
                   for d in draws for i in d[pool]))  # fmt: skip


def first_reach(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first point whose validation perplexity is <= ``target``."""
    return next((p for p in curve if p["val_perplexity"] <= target), None)


def equal_perplexity(lora: list[dict], fm: list[dict], frozen_val: float, delivery: dict,
                     memory: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """Device cost of each method to reach the worse method's best validation perplexity
    (and a few easier targets between frozen and it), and the ratios FedAvg-LoRA /
    fedmobillm. ``delivery``: final-model bytes each device downloads once (all-in bytes);
    ``memory``: measured peak MiB of one device step of each (``lora``, ``fedmobillm``)."""
    best = {"fedavg-lora": min(p["val_perplexity"] for p in lora),
            "fedmobillm": min(p["val_perplexity"] for p in fm)}  # fmt: skip
    worse = max(best.values())
    hi = frozen_val if frozen_val > worse else worse
    targets = sorted({float(t) for t in np.geomspace(hi, worse, 5)[1:]} | {worse}, reverse=True)
    curves = {"fedavg-lora": lora, "fedmobillm": fm}
    table = []
    for t in targets:
        row: dict[str, Any] = {"target_val_perplexity": t}
        for name, c in curves.items():
            p = first_reach(c, t)
            row[name] = None if p is None else {
                "at": p.get("round", p.get("step")), "flops": p["flops_per_device"],
                "bytes_training": p["bytes_per_device"],
                "bytes_all_in": p["bytes_per_device"] + delivery[name]}  # fmt: skip
        table.append(row)
    last = table[-1]
    ratios = {}
    if last["fedavg-lora"] and last["fedmobillm"]:
        a, b = last["fedavg-lora"], last["fedmobillm"]
        ratios = {k: a[k] / b[k] if b[k] else math.inf
                  for k in ("flops", "bytes_training", "bytes_all_in")}  # fmt: skip
    ratios["peak_memory"] = memory["lora"] / memory["fedmobillm"]
    return {"target_val_perplexity": worse, "best_val_perplexity": best,
            "frozen_val_perplexity": frozen_val, "at_target": last, "targets": table,
            "ratio_fedavg_lora_over_fedmobillm": ratios, "delivery_bytes": delivery,
            "peak_memory_mb": memory}  # fmt: skip


# -- the bench's fedavg-lora rows ----------------------------------------------------------------------


@dataclass
class BenchInputs:
    """What ``bench_lm`` hands over: the splits' token ids per device (train / val / test),
    which devices run the full decoder, fedmobillm's pools and draws, and its curve."""

    train: Lines
    val: Lines
    test: Lines
    full_devices: list[int]
    pools: list[np.ndarray]  # fedmobillm's training rows per architecture, in its order
    pool: int  # the full decoder's pool
    fm_curve: list[dict[str, Any]]  # {"step", "val_perplexity"} of the full decoder's model
    frozen_val: float
    bytes_per_token: float  # fedmobillm's upload per token (taps + id and mask)
    personal_bytes: int  # fedmobillm's personal model (fp32) each device downloads
    steps: int
    batch_lines: int  # lines of one device step (both methods' memory is measured at it)
    seed: int
    model: str = "smollm2-135m"
    blocks: int = 30  # deepest tap of the full decoder
    # fedmobillm's lines a step per pool (``bench_lm.Bench.batches``); None: batch_lines each
    pool_lines: list[int] | None = None


def bench_fedavg_lora(inp: BenchInputs, cfg: LoraFedConfig) -> tuple[dict, dict[str, Any]]:
    """The ``fedavg-lora`` row (test lines of the full-decoder devices, read once, with the
    round and settings chosen on their validation lines) and the ``device_cost`` comparison."""
    from fedmobillm.export.generate import load_causal_lm
    from fedmobillm.export.models import resolve_model

    def loader() -> Any:
        return load_causal_lm(resolve_model(inp.model))

    lines = inp.pool_lines or [inp.batch_lines] * len(inp.pools)
    draws = fedmobillm_draws(inp.seed, inp.steps, inp.pools, lines)
    cfg.budget_tokens = int(cfg.budget_fraction * scored_tokens_drawn(draws, inp.pool, inp.train))
    is_full = np.isin(inp.val.device, inp.full_devices)
    best, runs = sweep(loader, inp.train, inp.val.subset(np.flatnonzero(is_full)), cfg)
    net = lora_model(loader(), best.rank, best.targets, cfg)
    set_lora(net, best.best if best.best is not None else get_lora(net))
    full_rows = np.flatnonzero(np.isin(inp.test.device, inp.full_devices))
    test = evaluate(net, inp.test, full_rows).to_dict()
    other = evaluate(net, inp.test, np.setdiff1d(np.arange(len(inp.test.ids)), full_rows))
    shape = Shape.of(net.config)
    size = adapter_bytes(shape, best.rank, best.targets)
    last = best.curve[-1]
    row = {"method": "fedavg-lora", "backbone": inp.model, **test,
           "val_perplexity": best.best_val, "engine": ENGINE, "chosen_round": best.best_round,
           "rounds": len(best.curve), "rank": best.rank, "lora_targets": best.targets,
           "lr": best.lr, "adapter_bytes": size, "tokens_trained": best.tokens,
           "budget_tokens": cfg.budget_tokens, "budget_fraction": cfg.budget_fraction,
           "bytes_per_token": last["bytes_up_per_device"] * len(last["per_device"]) / best.tokens,
           "bytes_up_per_device": last["bytes_up_per_device"],
           "bytes_down_per_device": last["bytes_down_per_device"],
           "train_flops_per_token": last["flops_per_device"] * len(last["per_device"])
           / best.tokens,
           "test_other_devices": other.to_dict()}  # fmt: skip
    fm = fedmobillm_curve(draws, inp.pool, inp.train, inp.fm_curve, inp.blocks, shape,
                          inp.bytes_per_token)  # fmt: skip
    mem = _memory(inp, best)
    row["peak_train_memory_mb"] = mem["lora"]["peak_rss_mb"]
    dc = equal_perplexity(best.curve, fm, inp.frozen_val,
                          {"fedavg-lora": size, "fedmobillm": inp.personal_bytes},
                          {"lora": mem["lora"]["peak_rss_mb"],
                           "fedmobillm": mem["forward"]["peak_rss_mb"]})  # fmt: skip
    dc |= {"memory": mem, "fedmobillm_curve": fm, "fedavg_lora_curve": best.curve,
           "flops_per_token": {"fedavg_lora_train": row["train_flops_per_token"],
                               "fedmobillm_forward": _fm_flops_per_token(fm, inp)},
           "counted": __doc__.split("Device cost, ")[1].split("Peak memory")[0].strip()}  # fmt: skip
    info = {"engine": ENGINE, "config": asdict(cfg), "sweep": runs,
            "chosen": {"rank": best.rank, "targets": best.targets, "lr": best.lr,
                       "round": best.best_round}}  # fmt: skip
    return row, {"device_cost": dc, "fedavg_lora": info}


def _fm_flops_per_token(fm: list[dict], inp: BenchInputs) -> float:
    """fedmobillm's device FLOPs per uploaded token (forward to the deepest tap)."""
    if not fm:
        return math.nan
    tokens = fm[-1]["bytes_up_per_device"] / inp.bytes_per_token
    return fm[-1]["flops_per_device"] / tokens if tokens else math.nan


def _memory(inp: BenchInputs, best: FedRun) -> dict[str, Any]:
    """Peak RSS of one device step at the bench's shapes, each in a fresh process: the
    ``batch_lines`` longest training lines (the largest step either method takes)."""
    lengths = sorted((len(x) for x in inp.train.ids), reverse=True)[: inp.batch_lines]
    out = {"lora": measure_peak("lora", inp.model, lengths, rank=best.rank,
                                targets=best.targets),
           "forward": measure_peak("forward", inp.model, lengths, blocks=inp.blocks),
           "imports": measure_peak("imports", inp.model, lengths)}  # fmt: skip
    log.info("peak RSS (MiB): lora step %.0f, fedmobillm forward %.0f, imports %.0f",
             out["lora"]["peak_rss_mb"], out["forward"]["peak_rss_mb"],
             out["imports"]["peak_rss_mb"])  # fmt: skip
    return out


# -- report -------------------------------------------------------------------------------------------


def _fmt_cost(c: dict[str, Any] | None, key: str, scale: float) -> str:
    return "never" if c is None else f"{c[key] * scale:.4g}"


def markdown(result: dict[str, Any]) -> list[str]:
    """lm.md's fedavg-lora section: engine, settings tried, and the device cost of each
    method at equal validation perplexity."""
    info, dc = result["fedavg_lora"], result["device_cost"]
    ch = info["chosen"]
    lines = ["## fedavg-lora", "", f"Engine: {info['engine']}. peft LoRA on the whole decoder; "
             f"chosen on validation: rank {ch['rank']}, targets {ch['targets']}, lr {ch['lr']:g}, "
             f"round {ch['round']}. Tried, each with the same budget of "
             f"{info['config']['budget_tokens']} scored training tokens "
             f"({info['config']['budget_fraction']:g} x those fedmobillm's steps drew for the "
             "full decoder):", "",
             "| rank | targets | lr | rounds | tokens | best round | best validation ppl |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in info["sweep"]:
        lines.append(f"| {r['rank']} | {r['targets']} | {r['lr']:g} | {r['rounds']} | "
                     f"{r['tokens_trained']} | {r['best_round']} | "
                     f"{r['best_val_perplexity']:.2f} |")  # fmt: skip
    ratio = dc["ratio_fedavg_lora_over_fedmobillm"]
    fpt, mem = dc["flops_per_token"], dc["memory"]
    lines += ["", "## Device cost at equal perplexity (full decoder, per device)", "",
              f"Target: the worse method's best validation perplexity, "
              f"{dc['target_val_perplexity']:.2f} (best: "
              + ", ".join(f"{k} {v:.2f}" for k, v in dc["best_val_perplexity"].items())
              + f"; frozen {dc['frozen_val_perplexity']:.2f}). " + dc["counted"], "",
              "| target val ppl | fedavg-lora GFLOP | fedmobillm GFLOP | fedavg-lora MB "
              "(all in) | fedmobillm MB (all in) |", "|---|---|---|---|---|"]  # fmt: skip
    for t in dc["targets"]:
        a, b = t["fedavg-lora"], t["fedmobillm"]
        lines.append(f"| {t['target_val_perplexity']:.2f} | {_fmt_cost(a, 'flops', 1e-9)} | "
                     f"{_fmt_cost(b, 'flops', 1e-9)} | {_fmt_cost(a, 'bytes_all_in', 1e-6)} | "
                     f"{_fmt_cost(b, 'bytes_all_in', 1e-6)} |")  # fmt: skip
    lines += ["", "Ratios fedavg-lora / fedmobillm at the target: "
              + ", ".join(f"{k} {v:.3g}" for k, v in ratio.items()) + ".",
              f"Training FLOPs per token: fedavg-lora {fpt['fedavg_lora_train'] / 1e6:.1f} M "
              f"(forward + backward, whole decoder), fedmobillm "
              f"{fpt['fedmobillm_forward'] / 1e6:.1f} M (forward to the deepest tap).",
              "Peak RSS of one device step (fresh process, batch of the "
              f"{len(mem['lora']['lengths'])} longest training lines): fedavg-lora "
              f"{mem['lora']['peak_rss_mb']:.0f} MiB, fedmobillm forward "
              f"{mem['forward']['peak_rss_mb']:.0f} MiB; torch + transformers imported only: "
              f"{mem['imports']['peak_rss_mb']:.0f} MiB."]  # fmt: skip
    return lines


def plot_cost(dc: dict[str, Any], path: Any) -> None:
    """Validation perplexity against device GFLOP and MB per device, both methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label, scale in ((axes[0], "flops_per_device", "device GFLOP", 1e-9),
                                  (axes[1], "bytes_per_device", "device MB (training)", 1e-6)):  # fmt: skip
        for name, curve in (("fedavg-lora", dc["fedavg_lora_curve"]),
                            ("fedmobillm", dc["fedmobillm_curve"])):  # fmt: skip
            ax.plot([p[key] * scale for p in curve], [p["val_perplexity"] for p in curve],
                    marker="o", label=name)  # fmt: skip
        ax.axhline(dc["target_val_perplexity"], color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ticks = matplotlib.ticker  # 1-2-5 ticks in plain numbers, no crowded minor labels
        ax.xaxis.set_major_locator(ticks.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticks.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticks.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("validation perplexity")
    axes[0].legend()
    fig.suptitle("Device cost against validation perplexity (full SmolLM2 devices)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- peak memory of one device step ------------------------------------------------------------------


def _rss_mb(field_name: str) -> float:
    """VmRSS / VmHWM of this process in MiB (/proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    raise FedMobiLLMError(f"no {field_name} in /proc/self/status", hint="Linux only")


def _reset_peak() -> bool:
    """Reset this process's peak RSS (``clear_refs`` 5); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_step(kind: str, model: str, lengths: list[int], rank: int = 8, targets: str = "qv",
                 blocks: int = 0, threads: int = 2) -> dict[str, Any]:  # fmt: skip
    """In this process: load ``model`` (fp32), then one device step on a batch of lines of
    ``lengths`` (random ids): ``lora`` = one LoRA AdamW step through the whole decoder,
    ``forward`` = a no-grad forward through the first ``blocks`` blocks (later blocks
    deleted, as a truncated bundle holds none), ``imports`` = nothing loaded. Peak RSS of
    the whole process, RSS once loaded, and the step's own peak above it (MiB)."""
    import gc

    import torch

    from fedmobillm.export.generate import load_causal_lm
    from fedmobillm.export.models import resolve_model

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"kind": kind, "lengths": lengths, "imports_rss_mb": _rss_mb("VmRSS")}
    if kind == "imports":
        return out | {"peak_rss_mb": _rss_mb("VmHWM")}
    net = load_causal_lm(resolve_model(model))
    if kind == "forward":
        net.model.layers = net.model.layers[:blocks]
        out["blocks"] = blocks
    elif kind == "lora":
        net = lora_model(net, rank, targets, LoraFedConfig())
        out |= {"rank": rank, "targets": targets}
    else:
        raise FedMobiLLMError(f"unknown measure kind {kind!r} (lora, forward, imports)")
    rng = np.random.default_rng(0)
    vocab = net.config.vocab_size
    lines = Lines([rng.integers(0, vocab, n) for n in lengths], np.zeros(len(lengths), np.int64))
    ids, mask, lm = batch(lines, np.arange(len(lengths)))
    with torch.no_grad():  # page every (memory-mapped) weight in before "loaded"
        for t in net.parameters():
            t.sum()
    gc.collect()
    out["loaded_rss_mb"] = _rss_mb("VmRSS")
    out["peak_reset"] = _reset_peak()
    if kind == "forward":
        with torch.inference_mode():
            net.model(input_ids=ids, attention_mask=mask)
    else:
        net.train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
        loss, _ = lm_loss(net, ids, mask, lm)
        loss.backward()
        opt.step()
    out["peak_rss_mb"] = _rss_mb("VmHWM")
    out["step_peak_above_loaded_mb"] = out["peak_rss_mb"] - out["loaded_rss_mb"]
    return out


def measure_peak(kind: str, model: str, lengths: list[int], **kw: Any) -> dict[str, Any]:
    """``measure_step`` in a fresh Python process (its peak RSS is the step's alone)."""
    cmd = [sys.executable, "-m", "benchmarks._lm_lora", "--measure", kind, "--model", model,
           "--lengths", ",".join(map(str, lengths))]  # fmt: skip
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if p.returncode != 0:
        raise FedMobiLLMError(f"peak-memory measurement {kind} failed: {p.stderr[-800:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._lm_lora",
                                description="peak RSS of one device step (fresh process)")  # fmt: skip
    p.add_argument("--measure", choices=("lora", "forward", "imports"), required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", required=True, help="token lengths of the batch's lines, a,b,c")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", choices=sorted(TARGET_MODULES), default="qv")
    p.add_argument("--blocks", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    lengths = [int(x) for x in a.lengths.split(",")]
    print(json.dumps(measure_step(a.measure, a.model, lengths, a.rank, a.targets, a.blocks,
                                  a.threads)))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
