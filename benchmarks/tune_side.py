# Owner: H4.
"""How the side network's defaults were chosen: a small grid on real activations.

    python -m benchmarks.tune_side [--models minilm-l6,minilm-l3] [--train 4000]
        [--steps 600] --out DIR

Activations come from benchmarks._activations (real int8 bundles run by the device
runtime, cached). Every configuration trains one shared side network on the given
backbones together (balanced mini-batches, as the server's trainer does) and is scored by
validation accuracy per backbone at the end and at its best evaluation. A logistic
regression on the last tap (pivot token) is the reference. Writes DIR/tune_side.json and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from benchmarks.bench_accuracy import SIDE_LR  # the base: the measured defaults

log = logging.getLogger("benchmarks.tune_side")

GRID: dict[str, dict] = {
    "default": {},
    "transformer": {"block": "transformer"},
    "width64": {"width": 64},
    "width256": {"width": 256},
    "dropout0.3": {"dropout": 0.3},
    "lr1e-3": {"lr": 1e-3},
    "lr5e-3": {"lr": 5e-3},
    "wd0.1": {"weight_decay": 0.1},
    "smooth0.1": {"label_smoothing": 0.1},
    "cosine": {"schedule": "cosine"},
    "expansion4": {"expansion": 4},
    "lr5e-4": {"lr": 5e-4},
    "small": {"width": 64, "dropout": 0.3},
    "indrop0.2": {"input_dropout": 0.2},
    "indrop0.5": {"input_dropout": 0.5},
    "gateT0.5": {"gate_temperature": 0.5, "gate_init": 1.0},
    "blocks1": {"blocks": 1},
    "ema0.99": {"ema": 0.99},
    "ema0.999": {"ema": 0.999},
    "ema0.99+indrop0.5": {"ema": 0.99, "input_dropout": 0.5},
    "ema0.99+wd0.1+drop0.3": {"ema": 0.99, "weight_decay": 0.1, "dropout": 0.3},
    "lr1e-3+smooth0.1": {"lr": 1e-3, "label_smoothing": 0.1},
}


def load(models: list[str], n_train: int, n_val: int) -> dict:
    from benchmarks._activations import BundleSpec, bundle_for, extract

    data = {}
    for m in models:
        b = bundle_for(BundleSpec(m))
        tr = extract(b, "movie-snippets", "train", n_train, threads=1)
        va = extract(b, "movie-snippets", "validation", n_val, threads=1)
        data[tr.architecture] = (tr, va)
    return data


def run_config(name: str, overrides: dict, data: dict, steps: int, batch: int, seed: int) -> dict:
    import torch

    from fedmobillm.server.side import SideConfig, SideTrainer

    if overrides.get("schedule") == "cosine":
        overrides = {**overrides, "total_steps": steps}
    cfg = replace(SideConfig(lr=SIDE_LR), **overrides)
    t = SideTrainer(cfg, ["negative", "positive"], seed=seed)
    for arch, (tr, _) in data.items():
        t.add_architecture(arch, tr.taps, tr.depth, tr.hidden)
    rng = np.random.default_rng(seed)
    share = batch // len(data)
    best = {a: 0.0 for a in data}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        groups = []
        for arch, (tr, _) in data.items():
            i = rng.integers(len(tr.y), size=share)
            groups.append((arch, tr.x[i], tr.y[i]))
        t.train_step(groups)
        if step % 100 == 0 or step == steps:
            for arch, (_, va) in data.items():
                best[arch] = max(best[arch], t.evaluate(arch, va.x, va.y)["accuracy"])
    final = {a: t.evaluate(a, va.x, va.y)["accuracy"] for a, (_, va) in data.items()}
    row = {
        "config": name,
        "overrides": overrides,
        "final": final,
        "best": best,
        "seconds": round(time.perf_counter() - t0, 1),
        "params": t.num_parameters(),
        "threads": torch.get_num_threads(),
    }
    log.info("%-12s final %s best %s (%.0f s)", name, _r(final), _r(best), row["seconds"])
    return row


def linear_probe(data: dict) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    out = {}
    for arch, (tr, va) in data.items():
        sc = StandardScaler().fit(tr.x[:, -1])
        clf = LogisticRegression(max_iter=2000, C=0.1).fit(sc.transform(tr.x[:, -1]), tr.y)
        out[arch] = float(clf.score(sc.transform(va.x[:, -1]), va.y))
    return out


def _r(d: dict) -> dict:
    return {k.split("/")[1]: round(v, 3) for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune_side", description=__doc__)
    p.add_argument("--models", default="minilm-l6,minilm-l3")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated config names")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)
    data = load(args.models.split(","), args.train, args.val)
    probe = linear_probe(data)
    log.info("linear probe (last tap): %s", _r(probe))
    names = args.only.split(",") if args.only else list(GRID)
    rows = [run_config(n, GRID[n], data, args.steps, args.batch, args.seed) for n in names]
    args.out.mkdir(parents=True, exist_ok=True)
    from fedmobillm.server.side import SideConfig

    report = {
        "base": asdict(SideConfig(lr=SIDE_LR)),
        "steps": args.steps,
        "batch": args.batch,
        "train": args.train,
        "val": args.val,
        "linear_probe": probe,
        "rows": rows,
    }
    (args.out / "tune_side.json").write_text(json.dumps(report, indent=1))
    archs = list(data)
    print("| config | " + " | ".join(f"{a.split('/')[1]} final / best" for a in archs) + " | s |")
    print("|---" * (len(archs) + 2) + "|")
    print("| linear probe | " + " | ".join(f"{probe[a]:.3f}" for a in archs) + " | |")
    for r in rows:
        print(
            f"| {r['config']} | "
            + " | ".join(f"{r['final'][a]:.3f} / {r['best'][a]:.3f}" for a in archs)
            + f" | {r['seconds']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
