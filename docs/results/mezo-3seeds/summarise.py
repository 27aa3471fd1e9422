"""The three-seed MeZO tables of docs/benchmarks.md: each seed's ``benchmarks._mezo test`` run
(DIR/seed-N/mezo.json) cut at that seed's headline target, beside FedAvg-LoRA's figures of
the same seed in docs/results/headline-3seeds; DIR/summary.json.

    PYTHONPATH=. python docs/results/mezo-3seeds/summarise.py docs/results/mezo-3seeds/lora-head
    PYTHONPATH=. python docs/results/mezo-3seeds/summarise.py docs/results/mezo-3seeds/head
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from benchmarks._curves import delivery_bytes
from benchmarks._report import fedavg_to_target

HEADLINE = Path(__file__).parent.parent / "headline-3seeds"


def row(here: Path, seed: int) -> dict[str, float]:
    run = json.loads((here / f"seed-{seed}" / "mezo.json").read_text())
    head = json.loads((HEADLINE / f"seed-{seed}" / "headline.json").read_text())
    target, f = head["target_accuracy"], head["figures"]
    cut = fedavg_to_target(run, target, len(run["config"]["profiles"]))
    return {
        "seed": seed,
        "target": target,
        "mezo_test": run["test"]["accuracy"],
        "mezo_best_round": run["best_round"],
        "probe_rounds": run["linear_probe_start"]["rounds"],
        "probe_validation": run["linear_probe_start"]["validation"],
        "mezo_best_validation": run["best_validation"],
        "mezo_reached": cut["reached"],
        "mezo_round": cut["round"],
        "mezo_time_s": cut["time_s"],
        "mezo_gflop": cut["flops_per_device"] / 1e9,
        "mezo_mb_all_in": (cut["bytes_per_device"] + delivery_bytes(run, cut)) / 1e6,
        "lora_test": head["test_accuracy"]["fedavg_lora"],
        "lora_best_round": f["lora_best_round"],
        "lora_time_s": f["lora_time_to_target_s"],
        "lora_gflop": f["lora_flops_per_device"] / 1e9,
        "lora_mb_all_in": (
            f["lora_training_bytes_per_device"] + f["lora_delivery_bytes_per_device"]
        )
        / 1e6,
    }


def main() -> None:
    here = Path(sys.argv[1])
    rows = [row(here, s) for s in (0, 1, 2)]
    keys = [k for k in rows[0] if k not in ("seed",)]
    summary = {
        k: {
            "mean": float(np.mean([r[k] for r in rows])),
            "std": float(np.std([r[k] for r in rows], ddof=1)),
        }
        for k in keys
    }
    (here / "summary.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    print(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
