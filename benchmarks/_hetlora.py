"""Heterogeneous-rank LoRA (FlexLoRA style), ``benchmarks.run --methods fedavg-hetlora``
(issue 22).

Devices of different classes train different LoRA ranks on FedAvg-LoRA's model (the same
mean-pooled MiniLM classifier, targets, alpha = 2 r, head trained): by default fast 8 (=
FedAvg-LoRA's rank), mid 4, slow 2, so a slow phone downloads and uploads a quarter of a fast
one's adapter.

Aggregation: SVD redistribution (FlexLoRA, Bai et al. 2024), not zero-padding (HetLoRA, Cho
et al. 2024). Each device's update is taken as its full-size product dW_c = (alpha / r) B_c A_c
per adapted matrix; the server averages the products weighted by num-examples (FedAvg's rule,
exact for the model's function, where averaging zero-padded A and B apart gives mean(B) mean(A)
!= mean(B A)) and sends a device of rank r the best rank-r approximation of the mean (truncated
SVD, Eckart-Young): B = U_r S_r / (alpha / r), A = V_r^T. The head is averaged as in FedAvg.
Round 1 starts every device from its own rank's initial adapter (B = 0, so dW = 0 as the
mean's SVD would say, but with peft's random A, which the zero matrix's SVD cannot give).

The server's model is the mean dW (rank up to the sum of the ranks that reached it); it is
evaluated, selected (best validation) and tested at the largest rank (what a fast device
runs); each class's own truncation is tested too (``test_by_rank``).

Device FLOPs per sample are FedAvg-LoRA's rank-8 training step for every rank (the adapter's
products are a small part of a step: an upper bound for the lower ranks); bytes are each
device's own rank's adapter and head, fp32, both ways.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import DeviceProfile

log = logging.getLogger("benchmarks")

RANKS = {"fast": 8, "mid": 4, "slow": 2}  # by device class; not tuned


def layout(names: list[str]) -> tuple[list[tuple[int, int]], list[int]]:
    """Indices of each adapted matrix's (A, B) in the trainable arrays, and of the rest (the
    head), from peft's parameter names."""
    pairs, rest = [], []
    for i, n in enumerate(names):
        if ".lora_A." in n:
            j = names.index(n.replace(".lora_A.", ".lora_B."))
            pairs.append((i, j))
        elif ".lora_B." not in n:
            rest.append(i)
    return pairs, rest


def products(arrays: list[np.ndarray], pairs: list[tuple[int, int]], scale: float) -> list:
    """dW = scale B A per adapted matrix, (d_out, d_in) float64 (torch's matmul: numpy's
    OpenBLAS threads spin on a loaded 2-core host, 25x slower here)."""
    import torch

    return [
        scale
        * (torch.from_numpy(arrays[b]).double() @ torch.from_numpy(arrays[a]).double()).numpy()
        for a, b in pairs
    ]


def _svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD with torch (one thread, see ``products``)."""
    import torch

    u, s, vt = torch.linalg.svd(torch.from_numpy(x), full_matrices=False)
    return u.numpy(), s.numpy(), vt.numpy()


def truncate(
    dw: np.ndarray, rank: int, scale: float, svd: tuple | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(A (r, d_in), B (d_out, r)) with scale B A the best rank-r approximation of dw
    (``svd``: dw's thin SVD when already computed)."""
    u, s, vt = svd if svd is not None else _svd(dw)
    b = (u[:, :rank] * s[:rank]) / scale
    return vt[:rank].astype(np.float32), b.astype(np.float32)


def arrays_for(
    glob: dict[str, Any], rank: int, template: list[np.ndarray], layout_: tuple, scale: float
) -> list[np.ndarray]:
    """A rank-``rank`` device's trainable arrays from the server's state (``glob``: mean
    products ``dw`` or None before the first aggregation, and the head arrays)."""
    pairs, rest = layout_
    out = [a.copy() for a in template]
    if glob["dw"] is not None:
        for (ia, ib), dw, svd in zip(pairs, glob["dw"], glob["svd"], strict=True):
            out[ia], out[ib] = truncate(dw, rank, scale, svd)
    for i, h in zip(rest, glob["head"], strict=True):
        out[i] = h.copy()
    return out


def aggregate(
    updates: list[tuple[list[np.ndarray], int, int]],
    layouts: dict[int, tuple],
    scales: dict[int, float],
) -> dict[str, Any]:
    """The server's state from each device's (arrays, num-examples, rank): the num-examples
    weighted mean of the products and of the head arrays."""
    total = sum(n for _, n, _ in updates)
    dw: list[np.ndarray] | None = None
    head: list[np.ndarray] | None = None
    for arrays, n, r in updates:
        pairs, rest = layouts[r]
        w = n / total
        p = [w * x for x in products(arrays, pairs, scales[r])]
        h = [w * arrays[i].astype(np.float64) for i in rest]
        dw = p if dw is None else [x + y for x, y in zip(dw, p, strict=True)]
        head = h if head is None else [x + y for x, y in zip(head, h, strict=True)]
    if dw is None or head is None:
        raise ValueError("no update to aggregate")
    svd = [_svd(x) for x in dw]  # once per round, for every rank
    return {"dw": dw, "svd": svd, "head": [h.astype(np.float32) for h in head]}


def run_hetlora(job: Any, ranks: list[int]) -> dict[str, Any]:
    """FedAvg rounds as ``benchmarks._fedavg.run_inprocess`` (same selection RNG, local
    training, clock), each device at its own rank (``ranks[i]``), FlexLoRA aggregation."""
    from benchmarks import _fedavg as FA
    from benchmarks import _models as M

    if len(ranks) != job.num_devices:
        raise ValueError(f"{len(ranks)} ranks for {job.num_devices} devices")
    rng = np.random.default_rng(job.seed)
    top = max(ranks)
    works = {r: FA.ClientWork(replace(job, lora_rank=r)) for r in sorted(set(ranks))}
    layouts = {r: layout(M.trainable_names(w.model)) for r, w in works.items()}
    scales = {r: _scale(w.model) for r, w in works.items()}
    evaluator = FA.ServerEval(replace(job, lora_rank=top))
    glob: dict[str, Any] = {"dw": None, "head": [works[top].init[i] for i in layouts[top][1]]}

    def model_at(r: int, state: dict[str, Any] | None = None) -> list[np.ndarray]:
        return arrays_for(state or glob, r, works[r].init, layouts[r], scales[r])

    rl = FA.RoundLog(replace(job, method="hetlora"), "in-process FlexLoRA (SVD redistribution)")
    rl.add_eval(0, evaluator(model_at(top)))
    per_round = max(1, int(round(job.fraction_train * job.num_devices)))
    best_state = glob
    for rnd in range(1, job.rounds + 1):
        chosen = sorted(rng.choice(job.num_devices, per_round, replace=False).tolist())
        updates, metrics = [], []
        for dev in chosen:
            r = ranks[dev]
            start = model_at(r)
            out, m = works[r].fit(start, dev, rnd)  # sim_s / bytes from its own arrays
            updates.append((out, int(m["num-examples"]), r))
            metrics.append(m | {"rank": r})
        glob = aggregate(updates, layouts, scales)
        rl.add_round(rnd, metrics)
        res = evaluator(model_at(top))
        rl.add_eval(rnd, res)
        if res["accuracy"] > rl.best_accuracy:
            best_state = glob
        rl.keep_best(rnd, res["accuracy"], model_at(top))
    out = rl.result(evaluator, model_at(top))
    out["method"] = "fedavg-hetlora"
    out["ranks"] = ranks
    out["aggregation"] = "FlexLoRA: num-examples weighted mean of B A, truncated SVD per rank"
    out["test_by_rank"] = {  # the best-validation state at each class's rank
        str(r): FA.ServerEval(replace(job, lora_rank=r))(model_at(r, best_state), "test")
        for r in sorted(set(ranks))
    }
    out["delivery_bytes_by_rank"] = {
        str(r): int(sum(a.nbytes for a in model_at(r))) for r in sorted(set(ranks))
    }
    n = job.num_devices
    out["trainable_bytes"] = int(
        sum(out["delivery_bytes_by_rank"][str(r)] for r in ranks) / n
    )  # the mean final delivery per device (each its own rank)
    return out


def _scale(model: Any) -> float:
    cfg = model.peft_config["default"]
    return float(cfg.lora_alpha) / float(cfg.r)


def ranks_of(profiles: list[DeviceProfile], ranks: dict[str, int] | None = None) -> list[int]:
    ranks = ranks or RANKS
    missing = sorted({p.name for p in profiles} - set(ranks))
    if missing:
        from fedmobillm.errors import FedMobiLLMError

        raise FedMobiLLMError(
            f"fedavg-hetlora has no LoRA rank for device class(es) {', '.join(missing)}",
            hint=f"classes with a rank: {', '.join(f'{k}={v}' for k, v in ranks.items())}",
        )
    return [ranks[p.name] for p in profiles]


def job_for(cfg: Any, model_dir: str, data: Any, profiles: list, flops: dict, work: Path) -> Any:
    """FedAvg-LoRA's job (same data, lr, rounds, batch, seed) for the heterogeneous ranks."""
    from benchmarks._fedavg import FedAvgJob

    return FedAvgJob(
        method="lora",
        model_dir=model_dir,
        num_labels=len(data.label_names),
        data_dir=str(work / "fedavg-data"),
        num_devices=len(profiles),
        profiles=[asdict(p) for p in profiles],
        train_flops_per_sample=flops["lora_train_step"],
        rounds=cfg.rounds,
        fraction_train=cfg.fraction_train,
        local_epochs=cfg.local_epochs,
        local_batch=cfg.local_batch,
        lr=cfg.lora_lr,
        lora_rank=cfg.lora_rank,
        max_seq_len=cfg.max_seq_len,
        seed=cfg.seed,
    )


def alone(seed: int, target: float, train_flops: float, out: Path) -> dict[str, Any]:
    """fedavg-hetlora alone on ``benchmarks.run --quick``'s fleet and data at ``seed``, cut
    at ``target`` (e.g. that seed's headline target), ``train_flops`` the LoRA step's FLOPs a
    sample (``flops_per_sample.lora_train_step`` of a run): for seeds whose run's
    results.json is not at hand; FedAvg-LoRA's own figures then come from that run."""
    import time

    import torch

    from benchmarks import _report as R
    from benchmarks._common import BenchConfig, fleet_profiles, load_fleet_data, write_json
    from benchmarks._models import model_dir_of
    from benchmarks.run import write_fedavg_data

    torch.set_num_threads(1)
    cfg = BenchConfig.for_mode("quick", seed=seed)
    data = load_fleet_data(cfg)
    write_fedavg_data(data, out / "fedavg-data")
    profiles = fleet_profiles(cfg)
    flops = {"lora_train_step": train_flops}
    t0 = time.perf_counter()
    run = run_hetlora(
        job_for(cfg, model_dir_of(cfg.model), data, profiles, flops, out), ranks_of(profiles)
    )
    run["host_s"] = time.perf_counter() - t0
    cut = R.fedavg_to_target(run, target, len(profiles))
    write_json(out / "hetlora.json", {"seed": seed, "target": target, "run": run, "to_target": cut})
    return {"seed": seed, "target": target, "to_target": cut | {"per_device": None},
            "test": run["test"], "by_rank": run["test_by_rank"], "host_s": run["host_s"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks._hetlora --from RUN --out DIR`` (or ``--seed N --target T
    --train-flops F``, see ``alone``): fedavg-hetlora alone on the
    fleet, data, seed, FLOPs and target of an earlier ``benchmarks.run`` (its results.json),
    then that run's cost-to-target curves with this method added (DIR/cost_to_target.*)."""
    import argparse
    import json
    import sys
    import time

    from benchmarks import _curves
    from benchmarks import _report as R
    from benchmarks._common import write_json
    from benchmarks._models import model_dir_of
    from benchmarks._rerun import load_run
    from fedmobillm.errors import FedMobiLLMError

    p = argparse.ArgumentParser(prog="python -m benchmarks._hetlora")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="src", type=Path, help="a benchmarks.run DIR")
    src.add_argument("--seed", type=int, help="alone on the quick fleet at this seed")
    p.add_argument("--target", type=float, help="--seed: the validation target to cut at")
    p.add_argument("--train-flops", type=float, help="--seed: the LoRA step's FLOPs a sample")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if a.seed is not None:
        if a.target is None or a.train_flops is None:
            print("error: --seed needs --target T and --train-flops F", file=sys.stderr)
            return 2
        print(json.dumps(alone(a.seed, a.target, a.train_flops, a.out), default=float))
        return 0
    work = a.out / "work"
    try:
        res, cfg, profiles, data = load_run(a.src, work)
    except FedMobiLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    job = job_for(cfg, model_dir_of(cfg.model), data, profiles, res["flops_per_sample"], work)
    run = run_hetlora(job, ranks_of(profiles))
    run["host_s"] = time.perf_counter() - t0
    res["fedavg"]["hetlora"] = run
    res["fedavg_to_target"]["hetlora"] = R.fedavg_to_target(run, res["target"], len(profiles))
    write_json(a.out / "results.json", res)
    _curves.write(a.out, res)
    lora = res["fedavg"]["lora"]
    print(
        json.dumps(
            {
                "target": res["target"],
                "hetlora": res["fedavg_to_target"]["hetlora"] | {"per_device": None},
                "lora": res["fedavg_to_target"]["lora"] | {"per_device": None},
                "test": {"hetlora": run["test"], "by_rank": run["test_by_rank"]},
                "lora_test": lora["test"],
                "host_s": run["host_s"],
            },
            default=float,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
