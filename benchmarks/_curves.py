"""Cost to target as curves, not one point (issue 22): for each of several validation
targets, up to the best any method reached, each method's device FLOPs, bytes and simulated
time per device to reach it, or that it never did.

    python -m benchmarks._curves DIR     # DIR/results.json or DIR/seed-*/results.json

``benchmarks.run`` writes the same files itself (cost_to_target.json / .md / .png).
Bytes are all-in: training traffic to the target plus what does not depend on it
(fedmobillm: the validator's share and the personal-model delivery; FedAvg and the probe:
the final model's delivery to every device; MeZO: the seed-and-scalar log a device replays).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _report as R

STEPS = 8  # targets between the floor and the best any method reached


def targets(results: dict[str, Any], steps: int = STEPS) -> list[float]:
    """From 0.02 above the majority rate and above every untrained model (a FedAvg-like
    method's round 0: an untrained head can score above the majority rate by chance, and a
    method that learns nothing would "reach" a target below it) to the best validation
    accuracy any method reached."""
    untrained = [
        p["accuracy"]
        for run in _fedavg_like(results).values()
        for p in run["curve"]
        if p["round"] == 0 and not math.isnan(p["accuracy"])
    ]
    lo = max([results["validation_majority_rate"], *untrained]) + 0.02
    bests = [v for v in _bests(results).values() if not math.isnan(v)]
    hi = max(bests, default=lo)
    return [float(x) for x in np.linspace(lo, hi, steps)] if hi > lo else [lo]


def _bests(results: dict[str, Any]) -> dict[str, float]:
    out = {
        "fedmobillm": max(
            (p["accuracy"] for p in R.smoothed(results["fedmobillm"]["replay"]["curve"])),
            default=math.nan,
        )
    }
    for name, run in _fedavg_like(results).items():
        out[name] = max((p["accuracy"] for p in run["curve"] if p["round"] > 0), default=math.nan)
    return out


def _fedavg_like(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {f"fedavg_{k}": v for k, v in results["fedavg"].items()}
    if "linear_probe" in results:
        out["linear_probe"] = results["linear_probe"]["run"]
    if "mezo" in results:
        out["mezo"] = results["mezo"]["run"]
    return out


def delivery_bytes(run: dict[str, Any], cut: dict[str, Any]) -> float:
    """The model delivered to a device at the end: FedAvg and the probe send the final
    trainable arrays; MeZO sends the (seed, scalar) log of the rounds up to the cut, which a
    device replays (``log_bytes`` of that round: a device that never took part replays all)."""
    logged = [
        r["log_bytes"] for r in run["rounds"] if "log_bytes" in r and r["round"] <= cut["round"]
    ]
    if logged or run.get("method") == "mezo":
        return float(logged[-1]) if logged else 0.0
    return float(run["trainable_bytes"])


def cost_curves(results: dict[str, Any]) -> dict[str, Any]:
    """{targets, methods: {name: [{target, reached, flops, bytes, time_s}]}} per device."""
    fair = results.get("fair", {}).get("comm", {})
    fixed_fm = fair.get("fedmobillm", {})
    fm_fixed = fixed_fm.get("validator_share", 0.0) + fixed_fm.get("delivery", 0.0)
    real = type("Real", (), {"per_device": results["fedmobillm"]["real"]["per_device"]})()
    rep = results["fedmobillm"]["replay"]
    fwd = results["flops_per_sample"]["fedmobillm_forward"]
    n = results["data"]["devices"]
    ts = targets(results)
    methods: dict[str, list[dict[str, Any]]] = {"fedmobillm": []}
    for t in ts:
        c = R.fedmobillm_to_target(rep, real, fwd, t)
        methods["fedmobillm"].append(_point(t, c, c["bytes_per_device"] + fm_fixed))
    for name, run in _fedavg_like(results).items():
        methods[name] = []
        for t in ts:
            c = R.fedavg_to_target(run, t, n)
            methods[name].append(_point(t, c, c["bytes_per_device"] + delivery_bytes(run, c)))
    return {"targets": ts, "bests": _bests(results), "methods": methods}


def _point(t: float, c: dict[str, Any], bytes_all: float) -> dict[str, Any]:
    ok = bool(c["reached"])
    nan = math.nan
    return {
        "target": t,
        "reached": ok,
        "flops_per_device": c["flops_per_device"] if ok else nan,
        "bytes_per_device": bytes_all if ok else nan,
        "time_s": c["time_s"] if ok else nan,
    }


def markdown(curves: dict[str, Any]) -> list[str]:
    """One table per cost: rows are targets, columns methods; '—' = never reached."""
    names = list(curves["methods"])
    lines = [
        "# Cost to target (per device)",
        "",
        "Best validation accuracy reached: "
        + ", ".join(f"{k} {v:.4f}" for k, v in curves["bests"].items())
        + ". '—' = the method never reached that target in its run.",
        "",
    ]
    for key, title, scale in (
        ("flops_per_device", "device GFLOP", 1e-9),
        ("bytes_per_device", "MB, all in", 1e-6),
        ("time_s", "simulated seconds", 1.0),
    ):
        lines += [f"## {title}", "", "| target | " + " | ".join(names) + " |"]
        lines.append("|---" * (len(names) + 1) + "|")
        for i, t in enumerate(curves["targets"]):
            cells = []
            for m in names:
                p = curves["methods"][m][i]
                cells.append(f"{p[key] * scale:.4g}" if p["reached"] else "—")
            lines.append(f"| {t:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def plot(out: Path, curves: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, label, scale) in zip(
        axes,
        (
            ("flops_per_device", "device GFLOP", 1e-9),
            ("bytes_per_device", "MB (all in)", 1e-6),
            ("time_s", "simulated s", 1.0),
        ),
        strict=True,
    ):
        for m, pts in curves["methods"].items():
            xs = [p["target"] for p in pts if p["reached"]]
            ax.plot(xs, [p[key] * scale for p in pts if p["reached"]], marker="o", label=m)
        ax.set_yscale("log")
        ax.set_xlabel("validation accuracy target")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("Cost per device to reach each target (missing = never reached)")
    fig.tight_layout()
    fig.savefig(out / "cost_to_target.png", dpi=110)
    plt.close(fig)
    return "cost_to_target.png"


def write(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """cost_to_target.json, .md and .png in ``out``; the curves."""
    curves = cost_curves(results)
    (out / "cost_to_target.json").write_text(json.dumps(curves, indent=1))
    (out / "cost_to_target.md").write_text("\n".join(markdown(curves)) + "\n")
    plot(out, curves)
    return curves


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m benchmarks._curves DIR", file=sys.stderr)
        return 2
    root = Path(argv[0])
    dirs = [root] if (root / "results.json").is_file() else sorted(root.glob("seed-*"))
    if not dirs:
        print(f"error: no results.json in {root} or {root}/seed-*", file=sys.stderr)
        return 2
    for d in dirs:
        write(d, json.loads((d / "results.json").read_text()))
        print(f"wrote {d / 'cost_to_target.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
