"""Federated zeroth-order fine-tuning (MeZO local steps, FedKSeed-style seeds and scalars on
the wire), ``benchmarks.run --methods mezo`` (issue 22).

The model is FedAvg-LoRA's: the same MiniLM classifier, mean-pooled, LoRA r on the attention
projections plus the classification head, built with the same seed (the same starting
weights); LoRA dropout off (both forwards of a perturbation must see the same function).

A device's local step (MeZO, Malladi et al. 2023) on a batch: for each of P seeds s, draw
z ~ N(0, I) over the trainable values from s, perturb in place, w + eps z, forward; w - eps z,
forward; restore; the projected gradient g = (L+ - L-) / (2 eps). Then w -= (lr / P) sum g z
(z regenerated from its seed: no gradient, no optimiser state, one parameter tensor of noise
at a time: memory close to inference). Plain ZO-SGD, no momentum, so a device's whole round
is linear in its z's: its model is w - sum_k c_k z(s_k). It uploads only its (seed, g) pairs
(4 + 4 bytes each) and its sample count.

The server replays: w_{r+1} = w_r - sum over devices c, pairs k of (lr / P) (n_c / N) g_ck
z(s_ck) (FedAvg's num-examples weights), each coefficient rounded to float32 as it is sent.
A device syncs by downloading the (seed, coefficient) pairs of the rounds since it last
synced and replaying them from the initial weights, which it builds from the run's seed
(FedKSeed's premise: server and devices draw the same z from a seed); its first download is
the whole log. Model delivery at the end is the same replay of the whole log. Bytes: 8 per
pair, 8 of header per message.

Device FLOPs: 2 P forwards per sample per step (``lora_forward`` per sample, counted with
``torch.utils.flop_counter`` on the same model and batch) plus the element-wise passes over
the d trainable values that FlopCounterMode does not count, added analytically as AdamW's
are: 2 d per pass (draw z, add it), 4 P passes per step (+eps, -2 eps, +eps, update) and one
per replayed pair. Rounds are synchronous as FedAvg's (``benchmarks._fedavg.RoundLog``).

    python -m benchmarks._mezo sweep --out DIR [--rounds 12]   # lr / eps / P on validation
    python -m benchmarks._mezo one-batch --out DIR     # the step alone: one batch's loss
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import DeviceProfile

log = logging.getLogger("benchmarks")

PAIR_BYTES = 8  # uint32 seed + float32 scalar
HEADER_BYTES = 8  # round + sample count (upload) / round + pair count (download)
PASS_FLOPS_PER_VALUE = 2.0  # draw one normal and add it: one pass over the trainable values

# chosen on validation (``python -m benchmarks._mezo sweep``, docs/benchmarks.md#mezo;
# 2026-12-08: the best validation of every row, +0.5 pt over its probe start, within noise)
LR = 1e-4
EPS = 1e-3  # not swept on LoRA + head to its end (eps 1e-2 stopped after 2 rounds)
PERTURBATIONS = 1
TUNE = "lora+head"  # what the perturbations move: one of TUNES
LP_ROUNDS = 30  # rounds of federated linear probe that initialise the head (0: random head)
ROUNDS = 12  # MeZO rounds of 1 epoch at P 1: about FedAvg-LoRA's device FLOPs (6 x 2 epochs)
EVAL_EVERY = 2  # rounds between validation evaluations (one costs ~16 s of host forwards)
TUNES = ("lora+head", "head", "lora")
KEYS: dict[str, type] = {  # what ``--mezo KEY=VALUE`` and ``--config`` may set
    "lr": float, "eps": float, "perturbations": int, "rounds": int, "eval_every": int,
    "local_epochs": int, "tune": str, "lp_rounds": int,
}  # fmt: skip


@dataclass
class MezoJob:
    model_dir: str
    num_labels: int
    data_dir: str  # device-<i>.jsonl, validation.jsonl, test.jsonl (benchmarks._fedavg)
    num_devices: int
    profiles: list[dict[str, Any]]  # DeviceProfile dicts, one per device
    forward_flops_per_sample: float  # the LoRA classifier's forward (``lora_forward``)
    rounds: int = ROUNDS
    fraction_train: float = 0.5
    local_epochs: int = 1
    local_batch: int = 8
    lr: float = LR
    eps: float = EPS
    perturbations: int = PERTURBATIONS
    tune: str = TUNE
    lp_rounds: int = LP_ROUNDS
    lora_rank: int = 8
    max_seq_len: int = 64
    seed: int = 0
    eval_every: int = EVAL_EVERY
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tune not in TUNES:
            raise ValueError(f"tune must be one of {', '.join(TUNES)}, not {self.tune!r}")

    def fedavg_job(self) -> Any:
        """The ``FedAvgJob`` whose model (``method='fwdgrad'``: LoRA + head, dropout off) and
        data ``benchmarks._fedavg``'s client and evaluator build."""
        from benchmarks._fedavg import FedAvgJob

        return FedAvgJob(
            method="fwdgrad",
            model_dir=self.model_dir,
            num_labels=self.num_labels,
            data_dir=self.data_dir,
            num_devices=self.num_devices,
            profiles=self.profiles,
            train_flops_per_sample=0.0,
            rounds=self.rounds,
            fraction_train=self.fraction_train,
            local_epochs=self.local_epochs,
            local_batch=self.local_batch,
            lr=self.lr,
            lora_rank=self.lora_rank,
            max_seq_len=self.max_seq_len,
            seed=self.seed,
        )


def parse_overrides(items: list[str], flag: str = "--mezo") -> dict[str, Any]:
    """``KEY=VALUE`` items (``KEYS``) as typed ``MezoJob`` overrides; a clear error for a
    wrong key, type or range."""
    from fedmobillm.errors import FedMobiLLMError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise FedMobiLLMError(
                f"{flag} {item!r} is not KEY=VALUE with KEY one of {', '.join(KEYS)}",
                hint=f"e.g. {flag} lr=1e-3 {flag} rounds=40",
            )
        try:
            out[key] = KEYS[key](value)
        except ValueError as exc:
            raise FedMobiLLMError(f"{flag} {key}={value!r}: not a {KEYS[key].__name__}") from exc
        if key == "tune":
            if value not in TUNES:
                raise FedMobiLLMError(f"{flag} tune={value}: one of {', '.join(TUNES)}")
        elif out[key] < 0 or (out[key] == 0 and key != "lp_rounds"):
            raise FedMobiLLMError(f"{flag} {key}={value} must be > 0 (lp_rounds >= 0)")
    return out


def job_for(
    cfg: Any, model_dir: str, data: Any, profiles: list, work: Path, fwd_flops: float,
    overrides: dict[str, Any],
) -> MezoJob:  # fmt: skip
    """FedAvg-LoRA's model, data (``work/fedavg-data``), fleet, selection and batch of a
    ``benchmarks.run`` configuration, with MeZO's hyperparameters (``overrides`` over the
    defaults)."""
    return MezoJob(
        model_dir=model_dir,
        num_labels=len(data.label_names),
        data_dir=str(work / "fedavg-data"),
        num_devices=len(profiles),
        profiles=[asdict(p) for p in profiles],
        forward_flops_per_sample=fwd_flops,
        fraction_train=cfg.fraction_train,
        local_batch=cfg.local_batch,
        lora_rank=cfg.lora_rank,
        max_seq_len=cfg.max_seq_len,
        seed=cfg.seed,
        **overrides,
    )


# -- the zeroth-order step and the replay --------------------------------------------------


def trainable(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def tuned(model: Any, tune: str = "lora+head") -> list[Any]:
    """The trainable tensors MeZO perturbs: all (``lora+head``), the classification head
    only (``head``: LoRA stays at its initial B = 0, the backbone unchanged) or the LoRA
    factors only (``lora``: the head stays as it started, e.g. the linear probe's)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if tune == "lora+head":
        return [p for _, p in named]
    if tune in ("head", "lora"):
        return [p for n, p in named if ("lora_" in n) == (tune == "lora")]
    raise ValueError(f"tune must be one of {', '.join(TUNES)}, not {tune!r}")


def perturb(params: list[Any], seed: int, scale: float) -> None:
    """In place: w += scale * z(seed), z ~ N(0, I) drawn tensor by tensor from ``seed`` (the
    same z on every machine that runs this code with the same seed)."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=scale)


def _loss(model: Any, enc: dict, y: Any) -> float:
    import torch

    return float(torch.nn.functional.cross_entropy(model(**enc).logits, y))


def projected_grads(
    model: Any, enc: dict, y: Any, seeds: list[int], eps: float, params: list | None = None
) -> tuple[list[float], float]:
    """MeZO's estimate along each seed's z: (L(w + eps z) - L(w - eps z)) / (2 eps), two
    forwards each; the weights are restored after each (up to float rounding). Also the
    mean of (L+ + L-) / 2, the batch's loss as the device sees it. ``params``: the tensors
    perturbed (default: every trainable one)."""
    import torch

    model.eval()
    params = trainable(model) if params is None else params
    out, mid = [], []
    with torch.no_grad():
        for s in seeds:
            perturb(params, s, eps)
            plus = _loss(model, enc, y)
            perturb(params, s, -2.0 * eps)
            minus = _loss(model, enc, y)
            perturb(params, s, eps)
            out.append((plus - minus) / (2.0 * eps))
            mid.append((plus + minus) / 2.0)
    return out, float(np.mean(mid))


def mezo_step(
    model: Any, enc: dict, y: Any, seeds: list[int], eps: float, lr: float,
    params: list | None = None,
) -> tuple[list[tuple[int, float]], float]:  # fmt: skip
    """One MeZO step: the projected gradients along ``seeds``, then w -= (lr / P) sum g z.
    Returns the (seed, g) pairs a device uploads and the batch's loss before the step."""
    params = trainable(model) if params is None else params
    gs, loss = projected_grads(model, enc, y, seeds, eps, params)
    for s, g in zip(seeds, gs, strict=True):
        perturb(params, s, -lr * g / len(seeds))
    return list(zip(seeds, gs, strict=True)), loss


def replay(params: list[Any], pairs: list[tuple[int, float]]) -> None:
    """Apply a log of (seed, coefficient) pairs in order: w -= c z(seed)."""
    for s, c in pairs:
        perturb(params, s, -float(c))


def coefficients(
    updates: list[tuple[list[tuple[int, float]], int]], lr: float, perturbations: int
) -> list[tuple[int, float]]:
    """The server's round log from each device's (pairs, num-examples): coefficient
    (lr / P) (n_c / N) g, rounded to float32 as it goes on the wire."""
    total = sum(n for _, n in updates)
    out = []
    for pairs, n in updates:
        w = lr / perturbations * n / total
        out += [(int(s), float(np.float32(w * g))) for s, g in pairs]
    return out


def upload_bytes(pairs: int) -> int:
    return PAIR_BYTES * pairs + HEADER_BYTES


def download_bytes(log_rounds: list[list[tuple[int, float]]]) -> int:
    """The (seed, coefficient) pairs of the rounds a device missed, one header each."""
    return sum(PAIR_BYTES * len(r) + HEADER_BYTES for r in log_rounds)


# -- the linear-probe warm start --------------------------------------------------------------

_FEATURES: dict[tuple, Any] = {}  # (model_dir, data_dir, seed, max_seq_len) -> ProbeData


def pooled(work: Any, records: list[Any], max_seq_len: int, batch: int = 32) -> np.ndarray:
    """The model's pooled features (the head's input, (n, d)) at the weights it holds."""
    import torch

    from benchmarks import _models as M

    base = work.model.get_base_model()
    encoder = getattr(base, base.base_model_prefix)
    out = []
    with torch.no_grad():
        for i in range(0, len(records), batch):
            enc = M.tokenize(work.tok, [r.text for r in records[i : i + batch]], max_seq_len)
            out.append(encoder(**enc).pooler_output.numpy())
    return np.concatenate(out).astype(np.float32)


def probe_data(job: MezoJob, work: Any) -> Any:
    """Every device's and the validation split's pooled features at the initial weights (LoRA
    B = 0: the frozen backbone's mean-pooled output), once per process and fleet."""
    from benchmarks import _models as M
    from benchmarks import _probe as P
    from benchmarks._fedavg import read_records

    key = (job.model_dir, job.data_dir, job.seed, job.max_seq_len)
    if key not in _FEATURES:
        M.set_trainable(work.model, work.init)
        d = Path(job.data_dir)
        recs = [read_records(d / f"device-{i}.jsonl") for i in range(job.num_devices)]
        val = read_records(d / "validation.jsonl")
        _FEATURES[key] = P.ProbeData(
            [pooled(work, r, job.max_seq_len) for r in recs],
            [np.array([x.label for x in r]) for r in recs],
            pooled(work, val, job.max_seq_len),
            np.array([x.label for x in val]),
            {},
        )
    return _FEATURES[key]


def head_from_probe(head: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The probe's head on standardised features, w (d + 1, C), mean and std (d,), folded into
    the model's linear head on raw features: weight (C, d), bias (C,)."""
    w, mu, sd = head["w"][:-1], head["mean"], head["std"]
    weight = (w / sd[:, None]).T
    bias = head["w"][-1] - (mu / sd) @ w
    return weight.astype(np.float32), bias.astype(np.float32)


def linear_probe_start(run: _Run) -> None:
    """Rounds 1..b of the run: the federated linear probe (``benchmarks._probe``: same
    selection fraction, local epochs, batch and clock; lr from its sweep, on validation) on
    the model's own pooled features for up to ``lp_rounds`` rounds, cut at its
    best-validation round b; its head becomes MeZO's starting head. Every round's bytes,
    FLOPs (a device's first round pays its forward of every record) and time are logged as
    MeZO's own; the head (fp32) is each device's first download in MeZO's rounds."""
    from benchmarks import _models as M
    from benchmarks import _probe as P

    job = run.job
    pj = P.ProbeJob(
        job.num_labels, [DeviceProfile(**p) for p in job.profiles], job.forward_flops_per_sample,
        job.lp_rounds, job.fraction_train, job.local_epochs, job.local_batch, job.seed,
    )  # fmt: skip
    data = probe_data(job, run.work)
    runs = {lr: P.run(pj, data, lr, keep_head=True) for lr in P.LR_SWEEP}
    sweep = {lr: max(p["accuracy"] for p in r["curve"][1:]) for lr, r in runs.items()}
    lr = max(sweep, key=lambda k: sweep[k])
    res = runs[lr]
    b = res["best_round"]
    weight, bias = head_from_probe(res["head"])
    names = M.trainable_names(run.work.model)
    for i, n in enumerate(names):
        if "classifier" in n and "lora_" not in n:
            run.glob[i] = weight if n.endswith("weight") else bias
    run.head_bytes = int(weight.nbytes + bias.nbytes)
    for rnd, point in zip(res["rounds"][:b], res["curve"][1 : b + 1], strict=True):
        nan = float("nan")
        run.rl.add_round(
            rnd["round"], [c | {"loss": nan, "host_train_s": 0.0} for c in rnd["clients"]]
        )
        run.rl.rounds[-1] |= {"stage": "linear probe", "log_bytes": run.head_bytes}
        if rnd["round"] < b:
            run.rl.add_eval(rnd["round"], {"accuracy": point["accuracy"], "loss": nan})
    if run.cached is not None:  # the probe's devices forwarded their records already
        run.cached.forwarded |= {int(c["device"]) for x in res["rounds"][:b] for c in x["clients"]}
    start = run.evaluator(run.glob)  # the folded head on the model: the probe's accuracy
    run.rl.add_eval(b, start)
    run.rl.keep_best(b, start["accuracy"], run.glob)
    run.first_round = b + 1
    run.lp = {"lr": lr, "lr_sweep": {str(k): v for k, v in sweep.items()}, "rounds": b,
              "validation": start["accuracy"], "probe_validation": point["accuracy"]}  # fmt: skip
    log.info(
        "mezo: linear-probe head (lr %g, %d rounds), validation %.4f", lr, b, start["accuracy"]
    )


# -- head only: the frozen backbone's features, computed once ---------------------------------


class CachedHead:
    """``tune='head'`` leaves the backbone and LoRA (B = 0) as they started, so every forward
    of a record gives the same pooled features: a device computes them once (one forward per
    record, its first round, as the linear probe does) and each MeZO step only runs the head
    on them; the server evaluates the same way. Same losses as the full forward (up to float
    rounding), far fewer FLOPs; also what makes the head-only runs cheap on this host."""

    def __init__(self, job: MezoJob, work: Any) -> None:
        import torch

        from benchmarks._fedavg import read_records

        self.job, self.work = job, work
        self.data = probe_data(job, work)  # devices' and validation's features
        test = read_records(Path(job.data_dir) / "test.jsonl")
        self.test = (None, np.array([r.label for r in test]), test)  # features when first asked
        base = work.model.get_base_model()
        self.head = base.classifier  # peft's wrapper: runs the trained copy
        self.model = _HeadModel(self.head)
        self.forwarded: set[int] = set()
        self.torch = torch

    def batch(self, device: int, rows: list[int]) -> dict[str, Any]:
        return {"feats": self.torch.from_numpy(self.data.dev_x[device][rows])}  # (B, d)

    def __call__(self, arrays: list[np.ndarray], split: str = "validation") -> dict[str, Any]:
        """``ServerEval``'s result from the cached features."""
        from benchmarks import _models as M

        if split == "validation":
            x, y = self.data.val_x, self.data.val_y
        else:
            if self.test[0] is None:
                M.set_trainable(self.work.model, self.work.init)
                self.test = (pooled(self.work, self.test[2], self.job.max_seq_len), *self.test[1:])
            x, y = self.test[0], self.test[1]
        M.set_trainable(self.work.model, arrays)
        with self.torch.no_grad():
            logits = self.head(self.torch.from_numpy(x))  # (N, C)
            yt = self.torch.from_numpy(y).long()
            loss = float(self.torch.nn.functional.cross_entropy(logits, yt))
        return {"accuracy": float((logits.argmax(-1) == yt).float().mean()), "loss": loss,
                "n": len(y)}  # fmt: skip


class _HeadModel:
    """The head as ``mezo_step`` calls a model: ``model(feats=...).logits``."""

    def __init__(self, head: Any) -> None:
        self.head = head

    def eval(self) -> None:
        self.head.eval()

    def __call__(self, feats: Any) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.head(feats))


# -- the federation -------------------------------------------------------------------------


def local_round(
    work: Any, job: MezoJob, device: int, server_round: int, params: list | None = None,
    cached: CachedHead | None = None,
) -> tuple[list[tuple[int, float]], int, float, int]:  # fmt: skip
    """A device's local MeZO epochs from the weights ``work.model`` holds: (pairs,
    num-examples, mean loss, steps). Seeds from (run seed, round, device). ``cached``: the
    head alone on the device's cached features."""
    import torch

    from benchmarks import _models as M
    from benchmarks._fedavg import read_records

    records = read_records(Path(job.data_dir) / f"device-{device}.jsonl")
    rng = np.random.default_rng([job.seed, server_round, device])
    pairs: list[tuple[int, float]] = []
    losses, steps = [], 0
    pos = {id(r): i for i, r in enumerate(records)}
    model = work.model if cached is None else cached.model
    for _ in range(job.local_epochs):
        for chunk in M._batches(records, job.local_batch, rng):
            if cached is None:
                enc = M.tokenize(work.tok, [r.text for r in chunk], job.max_seq_len)
            else:
                enc = cached.batch(device, [pos[id(r)] for r in chunk])
            y = torch.tensor([r.label for r in chunk], dtype=torch.long)  # (B,)
            seeds = [int(x) for x in rng.integers(0, 2**32 - 1, job.perturbations)]
            got, loss = mezo_step(model, enc, y, seeds, job.eps, job.lr, params)
            pairs += got
            losses.append(loss)
            steps += 1
    return pairs, len(records) * job.local_epochs, float(np.mean(losses)), steps


@dataclass
class _Run:
    """One federation's state: the model, the server's weights and log, who synced what."""

    job: MezoJob
    work: Any  # benchmarks._fedavg.ClientWork
    evaluator: Any  # benchmarks._fedavg.ServerEval
    params: list[Any]  # the tensors MeZO perturbs (``tuned``)
    glob: list[np.ndarray]  # the server's trainable arrays
    rl: Any  # benchmarks._fedavg.RoundLog
    log_rounds: list[list[tuple[int, float]]] = field(default_factory=list)  # one per round
    synced: dict[int, int] = field(default_factory=dict)  # device -> log rounds replayed
    head_bytes: int = 0  # the linear probe's head, downloaded once (0: none)
    first_round: int = 1  # of MeZO's (after the linear probe's)
    lp: dict[str, Any] = field(default_factory=dict)
    cached: CachedHead | None = None  # tune='head': features once, the head on them

    @property
    def d(self) -> int:
        return int(sum(p.numel() for p in self.params))


def _device(run: _Run, dev: int, r: int) -> tuple[tuple[list, int], dict[str, Any]]:
    """Device ``dev``'s round ``r``: download what it missed (the probe's head first), replay,
    local MeZO epochs, upload; its (pairs, num-examples) and metrics."""
    from benchmarks import _models as M

    job = run.job
    missed = run.log_rounds[run.synced.get(dev, 0) :]
    down = download_bytes(missed) + (0 if dev in run.synced else run.head_bytes)
    replayed = sum(len(x) for x in missed)
    M.set_trainable(run.work.model, run.glob)  # what the device's replay reconstructs
    pairs, n, loss, steps = local_round(run.work, job, dev, r, run.params, run.cached)
    run.synced[dev] = len(run.log_rounds)
    up = upload_bytes(len(pairs))
    passes = PASS_FLOPS_PER_VALUE * run.d * (4 * job.perturbations * steps + replayed)
    if run.cached is None:
        flops = 2 * job.perturbations * job.forward_flops_per_sample * n + passes
    else:  # its records' forward once; then 2 P head forwards (2 d FLOPs) a sample a step
        first = dev not in run.cached.forwarded
        run.cached.forwarded.add(dev)
        flops = job.forward_flops_per_sample * n / job.local_epochs if first else 0.0
        flops += 2 * job.perturbations * 2 * run.d * n + passes
    prof = DeviceProfile(**job.profiles[dev])
    return (pairs, n), {
        "num-examples": n,
        "loss": loss,  # mean of (L+ + L-) / 2 over its steps
        "device": dev,
        "sim_s": prof.down_s(down) + prof.compute_s(flops) + prof.up_s(up),
        "bytes_down": down,
        "bytes_up": up,
        "flops": flops,
        "host_train_s": 0.0,
        "pairs": len(pairs),
        "steps": steps,
    }


def _round(run: _Run, r: int, chosen: list[int]) -> None:
    """One synchronous round: the chosen devices' updates, the server's replay and log."""
    from benchmarks import _models as M

    job = run.job
    t0 = time.perf_counter()
    done = [_device(run, dev, r) for dev in chosen]
    metrics = [m | {"host_train_s": (time.perf_counter() - t0) / len(done)} for _, m in done]
    coefs = coefficients([u for u, _ in done], job.lr, job.perturbations)
    M.set_trainable(run.work.model, run.glob)
    replay(run.params, coefs)
    run.glob = M.get_trainable(run.work.model)
    run.log_rounds.append(coefs)
    run.rl.add_round(r, metrics)
    run.rl.rounds[-1]["log_bytes"] = download_bytes(run.log_rounds) + run.head_bytes
    run.rl.rounds[-1]["log_pairs"] = sum(len(x) for x in run.log_rounds)


def run_mezo(job: MezoJob, *, test: bool = True, start_eval: bool = True) -> dict[str, Any]:
    """The federation on the simulated clock: the linear probe's rounds (``lp_rounds`` > 0),
    then synchronous rounds as FedAvg's (the same device selection rule and RNG), each
    device's download (the log it missed), local MeZO epochs and upload (seeds and scalars),
    the server's replay; validation every ``eval_every`` rounds and at the last; the
    best-validation snapshot tested (``test``)."""
    import torch

    from benchmarks._fedavg import ClientWork, RoundLog, ServerEval

    torch.set_num_threads(1)
    fj = job.fedavg_job()
    work = ClientWork(fj)
    engine = f"in-process MeZO (lr {job.lr}, eps {job.eps}, P {job.perturbations}, {job.tune})"
    run = _Run(job, work, ServerEval(fj), tuned(work.model, job.tune),
               [a.copy() for a in work.init], RoundLog(replace(fj, method="mezo"), engine))  # fmt: skip
    if job.tune == "head":
        run.cached = run.evaluator = CachedHead(job, work)
    if start_eval:  # the sweep skips it: every config starts from the same weights
        run.rl.add_eval(0, run.evaluator(run.glob))
    if job.lp_rounds > 0:
        linear_probe_start(run)
    rng = np.random.default_rng(job.seed)
    per_round = max(1, int(round(job.fraction_train * job.num_devices)))
    last = run.first_round + job.rounds - 1
    for r in range(run.first_round, last + 1):
        _round(run, r, sorted(rng.choice(job.num_devices, per_round, replace=False).tolist()))
        if (r - run.first_round + 1) % job.eval_every == 0 or r == last:
            res = run.evaluator(run.glob)
            run.rl.add_eval(r, res)
            run.rl.keep_best(r, res["accuracy"], run.glob)
    return _result(run, test)


def _result(run: _Run, test: bool) -> dict[str, Any]:
    rl = run.rl
    if test:
        out = rl.result(run.evaluator, run.glob)
    else:
        out = {"curve": rl.curve, "rounds": rl.rounds, "best_round": rl.best_round}
    return out | {
        "method": "mezo",
        "config": asdict(run.job),
        "trainable_params": run.d,  # the values MeZO perturbs
        "trainable_bytes": int(4 * run.d),  # what FedAvg would send; MeZO sends the log instead
        # the probe's head and the replay of the whole log
        "delivery_bytes_per_device": download_bytes(run.log_rounds) + run.head_bytes,
        "log_pairs": sum(len(x) for x in run.log_rounds),
        "best_validation": max((p["accuracy"] for p in rl.curve if p["round"] > 0), default=0.0),
        "linear_probe_start": run.lp or None,
    }


# -- the hyperparameter sweep (validation only) ----------------------------------------------

SWEEP = ({"lr": 1e-4}, {"lr": 1e-3}, {"lr": 1e-2})  # the default grid, eps and P as the defaults


def quick_fleet(out: Path, seed: int) -> tuple[Any, Any, list]:
    """``benchmarks.run --quick``'s config, data (written under out/fedavg-data) and fleet."""
    from benchmarks._common import BenchConfig, fleet_profiles, load_fleet_data
    from benchmarks.run import write_fedavg_data

    cfg = BenchConfig.for_mode("quick", seed=seed)
    data = load_fleet_data(cfg)
    write_fedavg_data(data, out / "fedavg-data")
    return cfg, data, fleet_profiles(cfg)


def sweep(out: Path, rounds: int, configs: list[dict[str, Any]], seed: int = 0) -> list[dict]:
    """Each config (``KEYS`` overrides; ``rounds`` unless it sets its own) on the quick fleet
    (data, profiles and selection as ``benchmarks.run --quick``), validation only (no test
    split read); rows to out/sweep.json, appended as each config ends."""
    from benchmarks._models import model_dir_of

    cfg, data, profiles = quick_fleet(out, seed)
    path = out / "sweep.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    for c in configs:
        c = {"rounds": rounds} | c
        c.setdefault("eval_every", max(1, c["rounds"] // 3))
        job = job_for(cfg, model_dir_of(cfg.model), data, profiles, out, 1.0, c)
        t0 = time.perf_counter()
        res = run_mezo(job, test=False, start_eval=False)
        lp = res["linear_probe_start"] or {}
        row = c | {
            "tune": job.tune,
            "lp_rounds": job.lp_rounds,
            "local_epochs": job.local_epochs,
            "curve": [(p["round"], p["accuracy"]) for p in res["curve"]],
            "start_validation": lp.get("validation"),  # the probe's head on the model
            "best_validation": res["best_validation"],
            "best_round": res["best_round"],
            "host_s": time.perf_counter() - t0,
            "load_average": _load(),
        }
        log.info("mezo sweep %s: best validation %.4f", c, row["best_validation"])
        rows.append(row)
        path.write_text(json.dumps(rows, indent=1))
    return rows


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def one_batch(steps: int, lrs: list[float], eps: float = EPS, seed: int = 0) -> list[dict]:
    """MeZO on one training batch (8 records of the quick fleet's device 4) of the real
    model: the batch's loss before and after ``steps`` steps per lr (is the step sound?)."""
    import torch

    from benchmarks import _models as M
    from benchmarks._common import BenchConfig, load_fleet_data

    torch.set_num_threads(1)
    cfg = BenchConfig.for_mode("quick", seed=seed)
    data = load_fleet_data(cfg)
    md = M.model_dir_of(cfg.model)
    tok = M.load_tokenizer(md)
    recs = data.devices[4][:8]
    enc = M.tokenize(tok, [r.text for r in recs], cfg.max_seq_len)
    y = torch.tensor([r.label for r in recs])  # (8,)
    rows = []
    for lr in lrs:
        spec = M.ClassifierSpec(md, len(data.label_names), "fwdgrad", cfg.lora_rank,
                                cfg.max_seq_len, seed)  # fmt: skip
        model = M.build_classifier(spec)
        model.eval()
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            before = _loss(model, enc, y)
        for _ in range(steps):
            mezo_step(model, enc, y, [int(rng.integers(0, 2**32 - 1))], eps, lr)
        with torch.no_grad():
            after = _loss(model, enc, y)
        rows.append({"lr": lr, "steps": steps, "before": before, "after": after,
                     "host_s": time.perf_counter() - t0})  # fmt: skip
        log.info("one batch, lr %g: loss %.4f -> %.4f in %d steps", lr, before, after, steps)
    return rows


def _tested(job: MezoJob, overrides: dict[str, Any]) -> dict[str, Any]:
    """``run_mezo(job)`` with its best-validation snapshot tested, timed, with the overrides
    it ran with and the load average at its end."""
    t0 = time.perf_counter()
    run = run_mezo(job)
    return run | {"host_s": time.perf_counter() - t0, "overrides": overrides,
                  "load_average": _load()}  # fmt: skip


def from_run(src: Path, out: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """MeZO (defaults, or ``overrides``) on an earlier ``benchmarks.run``'s fleet, data, seed
    and target, tested; that run's results with ``mezo`` added to out/ (results.json and
    cost_to_target.*) and a summary beside FedAvg-LoRA's."""
    from benchmarks import _curves
    from benchmarks import _report as R
    from benchmarks._common import write_json
    from benchmarks._models import model_dir_of
    from benchmarks._rerun import load_run

    res, cfg, profiles, data = load_run(src, out / "work")
    fwd = res["flops_per_sample"]["lora_forward"]
    job = job_for(cfg, model_dir_of(cfg.model), data, profiles, out / "work", fwd, overrides)
    run = _tested(job, overrides)
    cut = R.fedavg_to_target(run, res["target"], len(profiles))
    res["mezo"] = {"run": run, "to_target": cut}
    write_json(out / "results.json", res)
    _curves.write(out, res)
    lora = res["fedavg"]["lora"]
    return {
        "seed": cfg.seed,
        "target": res["target"],
        "mezo": {"test": run["test"]["accuracy"], "best_validation": run["best_validation"],
                 "best_round": run["best_round"], "start": run["linear_probe_start"]}
        | {k: cut[k] for k in ("reached", "round", "flops_per_device", "bytes_per_device")},
        "lora": {"test": lora["test"]["accuracy"], "best_round": lora["best_round"]},
        "host_s": run["host_s"],
    }  # fmt: skip


def test_run(out: Path, seed: int, overrides: dict[str, Any], fwd: float) -> dict[str, Any]:
    """One config on the quick fleet at ``seed``, its best-validation snapshot tested (the
    run to out/mezo.json): for seeds whose ``benchmarks.run`` results are not at hand;
    ``fwd``, the LoRA classifier's forward FLOPs a sample, from another run (``from``
    cuts at a run's own target and FLOPs instead)."""
    from benchmarks._models import model_dir_of

    cfg, data, profiles = quick_fleet(out, seed)
    job = job_for(cfg, model_dir_of(cfg.model), data, profiles, out, fwd, overrides)
    run = _tested(job, overrides)
    (out / "mezo.json").write_text(json.dumps(run, indent=1, default=float))
    return {"seed": seed, "test": run["test"]["accuracy"], "best_round": run["best_round"],
            "best_validation": run["best_validation"], "start": run["linear_probe_start"],
            "host_s": run["host_s"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from fedmobillm.errors import FedMobiLLMError

    p = argparse.ArgumentParser(prog="python -m benchmarks._mezo")
    p.add_argument("command", choices=["sweep", "one-batch", "from", "test"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--from", dest="src", type=Path, help="from: a benchmarks.run DIR")
    p.add_argument("--rounds", type=int, default=12, help="sweep: rounds of a config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forward-flops", type=float, help="test: the LoRA forward's FLOPs a sample")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE,...",
        help=f"a config, KEYs of {', '.join(KEYS)} (repeatable: sweep tries each; default: "
        "the lr grid at eps 1e-3, P 1; from takes one)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        configs = [parse_overrides(c.split(","), "--config") for c in a.config]
        if a.rounds < 1:
            raise FedMobiLLMError(f"--rounds must be >= 1, not {a.rounds}")
        if a.command == "from" and (a.src is None or len(configs) > 1):
            raise FedMobiLLMError("from needs --from RUN and at most one --config")
        a.out.mkdir(parents=True, exist_ok=True)
        if a.command == "from":
            print(json.dumps(from_run(a.src, a.out, configs[0] if configs else {}), default=float))
            return 0
        if a.command == "test":
            if a.forward_flops is None or len(configs) > 1:
                raise FedMobiLLMError("test needs --forward-flops F and at most one --config")
            got = test_run(a.out, a.seed, configs[0] if configs else {}, a.forward_flops)
            print(json.dumps(got, default=float))
            return 0
    except FedMobiLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.command == "one-batch":  # --config's lr values (default 1e-3 and 1e-2), 150 steps
        lrs = [c["lr"] for c in configs if "lr" in c] or [1e-3, 1e-2]
        rows = one_batch(150, lrs)
        (a.out / "one_batch.json").write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows))
        return 0
    rows = sweep(a.out, a.rounds, configs or [dict(c) for c in SWEEP], a.seed)
    best = max(rows, key=lambda r: r["best_validation"])
    print(json.dumps({"best": {k: best[k] for k in KEYS if k in best}, "rows": rows}))
    return 0 if not math.isnan(best["best_validation"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
