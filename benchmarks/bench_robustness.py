"""Bounded influence, measured: one label-flipping device among honest ones.

Ten devices of one architecture; each honest device holds 200 samples of a task with
overlapping classes (about 89% reachable accuracy); with ``flooder`` the tenth instead holds
2,000 samples, every label flipped (53% of all training samples). The side network trains
with the server's own sampler (``server.policies.balanced_sample``: a device is drawn
uniformly for every sample) or, for comparison, with samples drawn uniformly from the pool.
Reported: validation accuracy (mean of the last four evaluations, 3,000 honest samples), per
seed, mean and standard deviation.

    python -m benchmarks.bench_robustness --out runs/robustness [--seeds 3] [--steps 400]

Writes results.json and results.md. This is the measurement behind the trainer's choice of
per-device balancing over per-sample loss or gradient clipping (docs/server.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

K, D = 2, 16  # taps, hidden size of the synthetic architecture
HONEST, FLOOD, DEVICES = 200, 2000, 10


def overlapping(ids, k: int, d: int, seed: int, flip: bool = False):
    """Two overlapping classes, one record per sample id: x (n, k, d), y (n,)."""
    direction = np.random.default_rng(1234 + d).normal(size=(2, k, d))  # (2, K, d)
    xs, ys = [], []
    for i in ids:
        rng = np.random.default_rng([seed, int(i)])
        y = int(rng.integers(2))
        xs.append(rng.normal(size=(k, d)) + 0.3 * direction[y])  # (K, d)
        ys.append(1 - y if flip else y)
    return np.stack(xs).astype(np.float32), np.asarray(ys, np.int64)


def fleet(flooder: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for i in range(DEVICES):
        flips = flooder and i == DEVICES - 1
        out[f"d{i}"] = overlapping(range(FLOOD if flips else HONEST), K, D, 100 + i, flips)
    return out


def train(sampler: str, flooder: bool, seed: int, steps: int) -> float:
    from fedmobillm.server.policies import balanced_sample
    from fedmobillm.server.side import SideConfig, SideTrainer

    data = fleet(flooder)
    xv, yv = overlapping(range(3000), K, D, 999)
    side = SideTrainer(SideConfig(width=32), ["neg", "pos"], seed=seed)
    side.add_architecture("a", [2, 4], 4, D)
    rng = np.random.default_rng(seed)
    pool_x = np.concatenate([x for x, _ in data.values()])  # (M, K, d)
    pool_y = np.concatenate([y for _, y in data.values()])  # (M,)
    accs = []
    for step in range(steps):
        if sampler == "pooled":
            idx = rng.integers(len(pool_y), size=64)
            groups = [("a", pool_x[idx], pool_y[idx])]
        else:
            groups = balanced_sample(rng, 64, {"a": sorted(data)}, lambda a, d: data[d])
        side.train_step(groups)
        if step % 25 == 24:
            accs.append(side.evaluate("a", xv, yv)["accuracy"])
    return float(np.mean(accs[-4:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/robustness"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.time()
    for sampler in ("balanced", "pooled"):
        for flooder in (False, True):
            accs = [train(sampler, flooder, s, args.steps) for s in range(args.seeds)]
            rows.append(
                {"sampler": sampler, "flooder": flooder, "accuracy": accs,
                 "mean": float(np.mean(accs)), "std": float(np.std(accs))}
            )  # fmt: skip
            print(f"{sampler:<9} flooder={flooder!s:<5} {rows[-1]['mean']:.4f}", flush=True)
    result = {"rows": rows, "seconds": time.time() - start, "load_average": os.getloadavg()}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    lines = ["| sampler | flipping flooder | validation accuracy |", "|---|---|---|"]
    lines += [
        f"| {r['sampler']} | {'yes' if r['flooder'] else 'no'} | "
        f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} |"
        for r in rows
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}/results.json and results.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
