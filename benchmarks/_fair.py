"""What makes the comparison fair (issue 22): equal model selection, every byte counted,
each method's own memory apart from its runtime's, and figures over several seeds.

Pure functions over the results ``benchmarks.run`` collects; tested in
``tests/benchmarks/test_fair.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# the runtime each measured step runs on (``benchmarks._device_step`` imports-only runs)
RUNTIME_OF = {"fedmobillm": "imports-onnx", "lora": "imports-torch", "full": "imports-torch"}
RUNTIME_OF |= {"fwdgrad": "imports-torch", "mezo": "imports-torch"}


def best_snapshot(curve: list[dict[str, Any]], key: str = "accuracy") -> int | None:
    """Index of the first point with the highest ``key`` (the trainer's rule: a later
    evaluation replaces the snapshot only when strictly better), or None on an empty curve."""
    best, idx = -math.inf, None
    for i, p in enumerate(curve):
        v = p.get(key)
        if v is not None and not math.isnan(v) and v > best:
            best, idx = v, i
    return idx


def memory_shares(mem: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per measured step: the whole-process peak, its runtime's imports-only peak and the
    method's own share (the difference), in MiB. Keys of ``mem`` are ``fedmobillm-<quant>``,
    ``lora``, ``full``, ``fwdgrad`` and the runtimes ``imports-onnx`` / ``imports-torch``."""
    out = {}
    for name, v in mem.items():
        if name.startswith("imports-"):
            continue
        runtime = RUNTIME_OF[name.split("-", 1)[0]]
        base = mem.get(runtime, {}).get("peak_rss_mb", math.nan)
        out[name] = {
            "peak_rss_mb": v["peak_rss_mb"],
            "runtime": runtime,
            "runtime_peak_rss_mb": base,
            "method_share_mb": v["peak_rss_mb"] - base,
        }
    return out


def memory_ratios(shares: dict[str, dict[str, float]], fleet_quants: set[str]) -> dict:
    """LoRA's step against fedmobillm's at each bundle quant, whole process and method share."""
    out = {}
    lora = shares["lora"]
    for name, s in shares.items():
        if not name.startswith("fedmobillm-"):
            continue
        quant = name.split("-", 1)[1]
        out[quant] = {
            "in_fleet": quant in fleet_quants,
            "whole_process": lora["peak_rss_mb"] / s["peak_rss_mb"],
            "method_share": _ratio(lora["method_share_mb"], s["method_share_mb"]),
        }
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def comm_all_in(
    fm: dict[str, Any], lora: dict[str, Any], rows: list[dict[str, Any]], lora_model_bytes: int
) -> dict[str, Any]:
    """Bytes per training device with everything counted, each part apart.

    fedmobillm: its training traffic to the target (``fm``), plus the validator's whole
    traffic (it uploads the validation split; spread over the training devices), plus the
    personal-model delivery each device downloads. FedAvg-LoRA: its rounds to the target
    (``lora``), plus the final adapter and head (``lora_model_bytes``) sent to every device.
    ``rows``: ``RealRun.per_device``."""
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] != "train"]
    n = max(1, len(train))
    validator = sum(r["wire_bytes_up"] + r["wire_bytes_down"] for r in val)
    delivery = float(np.mean([r["delivery_bytes_up"] + r["delivery_bytes_down"] for r in train]))
    ours = {
        "training": fm["bytes_per_device"],
        "validator_share": validator / n,
        "delivery": delivery,
    }
    theirs = {"training": lora["bytes_per_device"], "delivery": float(lora_model_bytes)}
    ours_total, theirs_total = sum(ours.values()), sum(theirs.values())
    return {
        "fedmobillm": ours | {"total": ours_total, "validator_total": float(validator)},
        "fedavg_lora": theirs | {"total": theirs_total},
        "reduction": {
            "training_only": 1.0 - ours["training"] / theirs["training"],
            "with_validator": 1.0
            - (ours["training"] + ours["validator_share"]) / theirs["training"],
            "all_in": 1.0 - ours_total / theirs_total,
        },
    }


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max of the finite values (n counts them)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.size),
        "values": [float(x) for x in values],
    }


def seeds_summary(heads: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean +- spread over seeds of every numeric figure in the per-seed headline.json files:
    headline metrics (``{"value": ...}``), test accuracies and the ``figures`` section."""
    out: dict[str, Any] = {}
    keys = [k for k, v in heads[0].items() if isinstance(v, dict) and "value" in v]
    for k in keys:
        out[k] = spread([h[k]["value"] for h in heads])
    out["test_accuracy"] = {
        m: spread([h["test_accuracy"].get(m, math.nan) for h in heads])
        for m in heads[0]["test_accuracy"]
    }
    out["figures"] = {
        k: spread([h.get("figures", {}).get(k, math.nan) for h in heads])
        for k in heads[0].get("figures", {})
    }
    out["seeds"] = [h["seed"] for h in heads]
    return out


def summary_markdown(summary: dict[str, Any], command: str, load: str) -> list[str]:
    """The seeds table of report.md: mean +- std (min..max) of each figure."""
    lines = [
        f"# benchmarks.run over seeds {', '.join(map(str, summary['seeds']))}",
        "",
        f"Command: `{command}`. Load average at the start: {load}. Each seed's own",
        "report is in `seed-<N>/report.md`.",
        "",
        "| figure | mean | std | min | max | n |",
        "|---|---|---|---|---|---|",
    ]

    def row(name: str, s: dict[str, Any]) -> None:
        lines.append(
            f"| {name} | {s['mean']:.4g} | {s['std']:.3g} | {s['min']:.4g} | {s['max']:.4g} "
            f"| {s['n']} |"
        )

    for k, s in summary.items():
        if isinstance(s, dict) and "mean" in s:
            row(k, s)
    for k, s in summary["test_accuracy"].items():
        row(f"test accuracy {k}", s)
    for k, s in summary["figures"].items():
        row(k, s)
    return lines
