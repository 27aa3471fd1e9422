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

# chosen on validation (``python -m benchmarks._mezo sweep``, docs/benchmarks.md#mezo)
LR = 1e-3
EPS = 1e-3
PERTURBATIONS = 1
ROUNDS = 20  # fixed budget: 1.7x FedAvg-LoRA's device FLOPs in the quick run (docs)
EVAL_EVERY = 4  # rounds between validation evaluations (one costs ~16 s of host forwards)


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
    lora_rank: int = 8
    max_seq_len: int = 64
    seed: int = 0
    eval_every: int = EVAL_EVERY
    extra: dict[str, Any] = field(default_factory=dict)

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


# -- the zeroth-order step and the replay --------------------------------------------------


def trainable(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


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
    model: Any, enc: dict, y: Any, seeds: list[int], eps: float
) -> tuple[list[float], float]:
    """MeZO's estimate along each seed's z: (L(w + eps z) - L(w - eps z)) / (2 eps), two
    forwards each; the weights are restored after each (up to float rounding). Also the
    mean of (L+ + L-) / 2, the batch's loss as the device sees it."""
    import torch

    model.eval()
    params = trainable(model)
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
    model: Any, enc: dict, y: Any, seeds: list[int], eps: float, lr: float
) -> tuple[list[tuple[int, float]], float]:
    """One MeZO step: the projected gradients along ``seeds``, then w -= (lr / P) sum g z.
    Returns the (seed, g) pairs a device uploads and the batch's loss before the step."""
    gs, loss = projected_grads(model, enc, y, seeds, eps)
    params = trainable(model)
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


# -- the federation -------------------------------------------------------------------------


def local_round(
    work: Any, job: MezoJob, device: int, server_round: int
) -> tuple[list[tuple[int, float]], int, float, int]:
    """A device's local MeZO epochs from the weights ``work.model`` holds: (pairs,
    num-examples, mean loss, steps). Seeds from (run seed, round, device)."""
    import torch

    from benchmarks import _models as M
    from benchmarks._fedavg import read_records

    records = read_records(Path(job.data_dir) / f"device-{device}.jsonl")
    rng = np.random.default_rng([job.seed, server_round, device])
    pairs: list[tuple[int, float]] = []
    losses, steps = [], 0
    for _ in range(job.local_epochs):
        for chunk in M._batches(records, job.local_batch, rng):
            enc = M.tokenize(work.tok, [r.text for r in chunk], job.max_seq_len)
            y = torch.tensor([r.label for r in chunk], dtype=torch.long)  # (B,)
            seeds = [int(x) for x in rng.integers(0, 2**32 - 1, job.perturbations)]
            got, loss = mezo_step(work.model, enc, y, seeds, job.eps, job.lr)
            pairs += got
            losses.append(loss)
            steps += 1
    return pairs, len(records) * job.local_epochs, float(np.mean(losses)), steps


def run_mezo(job: MezoJob, *, test: bool = True, start_eval: bool = True) -> dict[str, Any]:
    """The federation on the simulated clock: synchronous rounds as FedAvg's (the same device
    selection rule and RNG), each device's download (the log it missed), local MeZO epochs and
    upload (seeds and scalars), the server's replay; validation every ``eval_every`` rounds and
    at the last; the best-validation snapshot tested (``test``)."""
    import torch

    from benchmarks import _models as M
    from benchmarks._fedavg import ClientWork, RoundLog, ServerEval

    torch.set_num_threads(1)
    fj = job.fedavg_job()
    rng = np.random.default_rng(job.seed)
    work = ClientWork(fj)
    evaluator = ServerEval(fj)
    init = [a.copy() for a in work.init]
    params = trainable(work.model)
    d = int(sum(p.numel() for p in params))
    glob = [a.copy() for a in init]
    rl = RoundLog(
        replace(fj, method="mezo"),
        f"in-process MeZO (lr {job.lr}, eps {job.eps}, P {job.perturbations})",
    )
    if start_eval:  # the sweep skips it: every config starts from the same weights
        rl.add_eval(0, evaluator(glob))
    per_round = max(1, int(round(job.fraction_train * job.num_devices)))
    log_rounds: list[list[tuple[int, float]]] = []  # the server's log, one list per round
    synced = [0] * job.num_devices  # rounds of the log each device has replayed
    fwd = job.forward_flops_per_sample
    for r in range(1, job.rounds + 1):
        chosen = sorted(rng.choice(job.num_devices, per_round, replace=False).tolist())
        updates, metrics = [], []
        t0 = time.perf_counter()
        for dev in chosen:
            missed = log_rounds[synced[dev] :]
            down = download_bytes(missed)
            replayed = sum(len(x) for x in missed)
            M.set_trainable(work.model, glob)  # what the device's replay reconstructs
            pairs, n, loss, steps = local_round(work, job, dev, r)
            synced[dev] = len(log_rounds)
            up = upload_bytes(len(pairs))
            flops = 2 * job.perturbations * fwd * n + PASS_FLOPS_PER_VALUE * d * (
                4 * job.perturbations * steps + replayed
            )
            prof = DeviceProfile(**job.profiles[dev])
            updates.append((pairs, n))
            metrics.append(
                {
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
            )
        host = time.perf_counter() - t0
        for m in metrics:
            m["host_train_s"] = host / len(metrics)
        coefs = coefficients(updates, job.lr, job.perturbations)
        M.set_trainable(work.model, glob)
        replay(params, coefs)
        glob = [p.detach().cpu().numpy().copy() for p in params]
        log_rounds.append(coefs)
        rl.add_round(r, metrics)
        rl.rounds[-1]["log_bytes"] = download_bytes(log_rounds)  # a fresh device's replay
        rl.rounds[-1]["log_pairs"] = sum(len(x) for x in log_rounds)
        if r % job.eval_every == 0 or r == job.rounds:
            res = evaluator(glob)
            rl.add_eval(r, res)
            rl.keep_best(r, res["accuracy"], glob)
    out: dict[str, Any]
    if test:
        out = rl.result(evaluator, glob)
    else:
        out = {"curve": rl.curve, "rounds": rl.rounds, "best_round": rl.best_round}
    out |= {
        "method": "mezo",
        "config": asdict(job),
        "trainable_params": d,
        "trainable_bytes": int(4 * d),  # what FedAvg would send; MeZO sends the log instead
        "delivery_bytes_per_device": download_bytes(log_rounds),  # replay of the whole log
        "log_pairs": sum(len(x) for x in log_rounds),
        "best_validation": max((p["accuracy"] for p in rl.curve if p["round"] > 0), default=0.0),
    }
    return out


# -- the hyperparameter sweep (validation only) ----------------------------------------------

SWEEP = (  # (lr, eps, perturbations); first lr at eps 1e-3, P 1, then eps and P at the best lr
    {"lr": 1e-4, "eps": 1e-3, "perturbations": 1},
    {"lr": 1e-3, "eps": 1e-3, "perturbations": 1},
    {"lr": 1e-2, "eps": 1e-3, "perturbations": 1},
)


def sweep(out: Path, rounds: int, configs: list[dict[str, Any]], seed: int = 0) -> list[dict]:
    """Each config on the quick fleet (data, profiles and selection as ``benchmarks.run
    --quick``), ``rounds`` rounds, validation only (no test split read); rows to out."""
    from benchmarks._common import BenchConfig, fleet_profiles, load_fleet_data
    from benchmarks._models import model_dir_of
    from benchmarks.run import write_fedavg_data

    cfg = BenchConfig.for_mode("quick", seed=seed)
    data = load_fleet_data(cfg)
    write_fedavg_data(data, out / "fedavg-data")
    profiles = fleet_profiles(cfg)
    rows = []
    for c in configs:
        job = MezoJob(
            model_dir=model_dir_of(cfg.model),
            num_labels=len(data.label_names),
            data_dir=str(out / "fedavg-data"),
            num_devices=len(profiles),
            profiles=[asdict(p) for p in profiles],
            forward_flops_per_sample=1.0,
            rounds=rounds,
            fraction_train=cfg.fraction_train,
            local_batch=cfg.local_batch,
            lora_rank=cfg.lora_rank,
            max_seq_len=cfg.max_seq_len,
            seed=seed,
            eval_every=max(1, rounds // 3),
            **c,
        )
        t0 = time.perf_counter()
        res = run_mezo(job, test=False, start_eval=False)
        row = c | {
            "rounds": rounds,
            "curve": [(p["round"], p["accuracy"]) for p in res["curve"]],
            "best_validation": res["best_validation"],
            "host_s": time.perf_counter() - t0,
        }
        log.info("mezo sweep %s: best validation %.4f", c, row["best_validation"])
        rows.append(row)
        (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    return rows


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._mezo")
    p.add_argument("command", choices=["sweep", "one-batch"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="LR,EPS,P",
        help="a config to try (repeatable; default: the lr grid at eps 1e-3, P 1)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    configs = []
    for item in a.config:
        try:
            lr, eps, pp = item.split(",")
            configs.append({"lr": float(lr), "eps": float(eps), "perturbations": int(pp)})
        except ValueError:
            print(f"error: --config {item!r} is not LR,EPS,P (e.g. 1e-3,1e-3,1)", file=sys.stderr)
            return 2
    if a.rounds < 1 or any(c["perturbations"] < 1 or c["eps"] <= 0 for c in configs):
        print("error: --rounds and P must be >= 1 and eps > 0", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    if a.command == "one-batch":  # --config's lr values (default 1e-3 and 1e-2), 150 steps
        lrs = [c["lr"] for c in configs] or [1e-3, 1e-2]
        rows = one_batch(150, lrs)
        (a.out / "one_batch.json").write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows))
        return 0
    rows = sweep(a.out, a.rounds, configs or [dict(c) for c in SWEEP], a.seed)
    best = max(rows, key=lambda r: r["best_validation"])
    print(json.dumps({"best": {k: best[k] for k in ("lr", "eps", "perturbations")}, "rows": rows}))
    return 0 if not math.isnan(best["best_validation"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
