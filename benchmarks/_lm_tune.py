"""Choose the lm side network's training settings on the VALIDATION lines (never the
held-out test episodes): ``python -m benchmarks._lm_tune --quick --taps-from torch --out F``.

Each setting ``key=value,...`` (numeric fields of ``LmBenchConfig``: steps, lr, width,
warmup, ema, dropout, batch_lines, blocks, share_out, arch_balance, align_lr_scale,
full_batch_lines) trains ``fedmobillm`` (the heterogeneous fleet, one shared
body) on the training lines and scores the validation lines of each backbone (the last
``val_lines`` lines of each device's training episodes, from episodes its training lines
do not come from; see ``bench_lm.fleet``). One JSON line per setting is appended to ``F``
(so a long search can be read, and stopped, part way); the test split is never scored here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_lm import BACKBONES, MODEL, Bench, LmBenchConfig, fleet, splits
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks.lm.tune")


def parse_setting(text: str) -> dict[str, Any]:
    """Parse "lr=3e-3,steps=80" -> {"lr": 0.003, "steps": 80}, typed by LmBenchConfig's fields."""
    types = {f.name: f.type for f in dataclasses.fields(LmBenchConfig)}
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in types or not value:
            raise FedMobiLLMError(f"bad setting {part!r}", hint=f"key=value, keys: {sorted(types)}")
        out[key] = float(value) if types[key] in ("float", float) else int(value)
    return out


def tune(cfg: LmBenchConfig, settings: list[str], out: Path, methods: tuple[str, ...]) -> None:
    """Append one JSON line per setting (and method) to ``out``: validation perplexity,
    top-1 per backbone, training loss and seconds."""
    import torch

    from fedmobillm.server.lm import FrozenLMHead

    torch.set_num_threads(cfg.threads)
    devices, val = fleet(cfg)
    arch_of = {i: list(BACKBONES)[i % 2] for i in range(len(devices))}
    data = splits(cfg, devices, val, ("train", "val"))  # the test split is never read here
    head = FrozenLMHead.from_model(MODEL)
    frozen = Bench(cfg, data, arch_of, head)
    line = {"setting": "frozen", "load": os.getloadavg()}
    for b in BACKBONES:
        line[b] = frozen.score(None, "val", b)["perplexity"]
        line[f"{b}.server_hidden"] = frozen.score(None, "val", b, phone=False)["perplexity"]
    _append(out, line)
    if cfg.lens:  # the 12-block backbone through its tuned lens: its personal model's start
        from benchmarks.bench_lm import new_trainer

        l12 = list(BACKBONES)[1]
        start = new_trainer(cfg, dict.fromkeys(BACKBONES, head), data["train"].texts, [l12])
        line = {"setting": "frozen-tuned-lens", l12: frozen.score(start, "val", l12)["perplexity"]}
        _append(out, line)
    for text in settings:
        run_cfg = dataclasses.replace(cfg, **parse_setting(text))
        bench = Bench(run_cfg, data, arch_of, head)
        for method in methods:
            t = time.perf_counter()
            if method == "fedmobillm":
                trainer, losses = bench.fit(list(BACKBONES), "fleet", run_cfg.batch_lines)
                scored = {b: bench.score(trainer, "val", b) for b in BACKBONES}
            elif method == "full-only":  # the fleet's full-model devices, no l12 arch
                trainer, losses = bench.fit([MODEL], "fleet", run_cfg.batch_lines)
                scored = {MODEL: bench.score(trainer, "val", MODEL)}
            else:  # centralised on the full backbone
                trainer, losses = bench.fit([MODEL], "all", run_cfg.batch_lines * 2)
                scored = {MODEL: bench.score(trainer, "val", MODEL)}
            line = {"setting": text, "method": method, "seconds": time.perf_counter() - t,
                    "loss_first": float(np.mean(losses[:5])),
                    "loss_last": float(np.mean(losses[-10:])), "load": os.getloadavg()}  # fmt: skip
            for b, r in scored.items():
                line[b], line[f"{b}.top1"] = r["perplexity"], r["next_token_top1"]
            if hasattr(trainer, "chosen"):  # Selected: each personal model's (step, val ppl)
                line["chosen"] = {a: list(v) for a, v in trainer.chosen.items()}
            if method == "fedmobillm" and bench.curve:  # validation per logged step
                line["curve"] = [(p["step"], p["backbone"], round(p["val_perplexity"], 3))
                                 for p in bench.curve]  # fmt: skip
                bench.curve.clear()
            _append(out, line)


def _append(out: Path, line: dict[str, Any]) -> None:
    log.info("%s", line)
    with out.open("a") as f:
        f.write(json.dumps(line) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._lm_tune", description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--taps-from", choices=("bundle", "torch"), default="bundle")
    p.add_argument("--encoding", choices=("fp16", "int8"), default="fp16")
    p.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    p.add_argument("--method", action="append", choices=("fedmobillm", "full-only", "centralised"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("settings", nargs="+", help="key=value,... (LmBenchConfig fields)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = LmBenchConfig.quick() if a.quick else LmBenchConfig()
    cfg.taps_from, cfg.encoding, cfg.threads = a.taps_from, a.encoding, a.threads
    tune(cfg, a.settings, a.out, tuple(a.method or ("fedmobillm",)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
