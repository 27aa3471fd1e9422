"""Bytes against accuracy for the per-token upload (issue 15).

    python -m benchmarks.bench_compression [--quick] --out DIR [--options tokens,taps-1,...]

writes DIR/compression.json, DIR/compression.md and DIR/compression.png (accuracy against
upload bytes per sample, log x). Every option (``benchmarks._compress``: fewer taps, a
fixed PCA projection, int4, segment pooling, and ``+`` combinations) is applied to the
token taps every device uploads (train, anchors, validation, test alike: a device uses one
setting), then the same token side network is trained on the same fleet (IID, the
``fedmobillm-tokens`` sampler and step budget of ``benchmarks.bench_accuracy``) and its
best-validation snapshot is evaluated. Accuracy here is the trainer's (torch) model: the
PCA and pooling steps live on the device before the upload, not in the personal model.

The reference line: one FedAvg-LoRA round of ``benchmarks.run`` (MiniLM-L6, rank 8 on the
attention projections, head trained), its upload per device (the trainable tensors, fp32),
divided by the samples a device holds here, i.e. the per-sample size at which one device's
whole token upload equals one LoRA round's upload.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import merge_command, run_command, split_csv, write_report
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks.compression")

OPTIONS = (
    "tokens",
    "taps-2",
    "taps-1",
    "pca-128",
    "pca-64",
    "int4",
    "seg-16",
    "seg-8",
    "seg-4",
    "seg-1",
    "pca-64+seg-8+int4",
)


def lora_round_bytes(model: str = "minilm-l6", rank: int = 8, num_labels: int = 2) -> int:
    """Upload bytes of one FedAvg-LoRA round per device as ``benchmarks.run`` counts them:
    the trainable tensors (LoRA A/B + classifier head), fp32 (the download is the same)."""
    from benchmarks import _models as M

    spec = M.ClassifierSpec(M.model_dir_of(model), num_labels, "lora", lora_rank=rank)
    return int(M.trainable_bytes(M.build_classifier(spec)))


def run_option(
    cfg: Any, name: str, label_names: list[str], data: dict, devices: dict, work: Path
) -> list[dict]:
    """Train the token side network on the fleet with option ``name``; one row per backbone."""
    from benchmarks._compress import compress
    from benchmarks._tokens import TokenSplit, evaluate, train_tokens
    from fedmobillm.server.side import SideTrainer

    t0 = time.perf_counter()
    squeezed = {}
    for b, s in data.items():
        tr, va, te, an = compress(name, s.train, [s.val, s.test, s.anchors])
        squeezed[b] = TokenSplit(tr, va, te, an)
    fit_s = time.perf_counter() - t0
    snap = work / f"snap-{name}"
    trainer, curve = train_tokens(cfg, label_names, squeezed, devices, snap, cfg.anchors > 0)
    rows = []
    for b, s in squeezed.items():
        chosen = SideTrainer.load(snap / b)
        rows.append(
            {
                "option": name,
                "backbone": b,
                "bytes_per_sample": s.train.bytes_per_sample(),
                "mean_tokens": float(np.mean(s.train.lengths)),
                "taps": len(s.train.taps),
                "dims": int(s.train.q.shape[2]),
                "bits": s.train.bits,
                "val_accuracy": max(p[b] for p in curve),
                "selected_step": chosen.step,
                "test_accuracy": evaluate(chosen, s.test),
                "test_samples": len(s.test),
                "seconds": time.perf_counter() - t0,
                "fit_seconds": fit_s,
            }
        )
        log.info(
            "%-18s %-13s %8.0f B/sample  val %.4f  test %.4f",
            name,
            b,
            rows[-1]["bytes_per_sample"],
            rows[-1]["val_accuracy"],
            rows[-1]["test_accuracy"],
        )
    del trainer
    return rows


def run(cfg: Any, options: tuple[str, ...], out: Path, lora: bool = True) -> dict:
    import torch

    from benchmarks import bench_accuracy as A
    from benchmarks._tokens import side_config
    from fedmobillm.data import load_dataset

    torch.set_num_threads(cfg.threads)
    try:  # BLAS threads spin on a shared 2-core machine: one, as torch
        from threadpoolctl import threadpool_limits

        threadpool_limits(cfg.threads)
    except ImportError:
        log.info("threadpoolctl is not installed: numpy keeps its BLAS threads")
    t_start = time.perf_counter()
    dataset = cfg.datasets[0]
    ds = load_dataset(dataset, seed=cfg.seed)
    label_names = list(ds.label_names)
    data = A._token_data(cfg, A._token_bundles(cfg), dataset, len(ds.splits["train"]))
    devices = A.fleets(cfg, data[cfg.backbones[0]].train.y)["iid"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as work:
        for name in options:
            rows += run_option(cfg, name, label_names, data, devices, Path(work))
            write_outputs(_result(cfg, rows, None, t_start, dataset, devices), out)
    ref = None
    if lora:
        per_device = float(np.mean([len(r) for d in devices.values() for r in d.values()]))
        ref = {"model": "minilm-l6", "rank": 8, "round_upload_bytes": lora_round_bytes()}
        ref["samples_per_device"] = per_device
        ref["per_sample_equivalent"] = ref["round_upload_bytes"] / per_device
    result = _result(cfg, rows, ref, t_start, dataset, devices)
    result["token_side_config"] = dataclasses.asdict(side_config(cfg))
    write_outputs(result, out)
    return result


def _result(
    cfg: Any, rows: list[dict], ref: dict | None, t_start: float, dataset: str, devices: dict
) -> dict:
    return {
        "dataset": dataset,
        "rows": rows,
        "lora_reference": ref,
        "config": dataclasses.asdict(cfg),
        "devices": {b: len(d) for b, d in devices.items()},
        "wall_s": time.perf_counter() - t_start,
        "command": "python -m benchmarks.bench_compression " + " ".join(sys.argv[1:]),
    }


def markdown(result: dict) -> str:
    rows = result["rows"]
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    lines = [
        f"### {result['dataset']}: upload bytes per sample and accuracy (%, val / test)",
        "",
        "| option | " + " | ".join(f"{b} bytes | {b} val / test" for b in backbones) + " |",
        "|---|" + "---|---|" * len(backbones),
    ]
    for opt in dict.fromkeys(r["option"] for r in rows):
        cells = [opt]
        for b in backbones:
            hit = [r for r in rows if (r["option"], r["backbone"]) == (opt, b)]
            if not hit:
                cells += ["", ""]
                continue
            r = hit[0]
            cells += [
                f"{r['bytes_per_sample']:,.0f}",
                f"{100 * r['val_accuracy']:.2f} / {100 * r['test_accuracy']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    ref = result.get("lora_reference")
    if ref:
        lines += [
            "",
            f"One FedAvg-LoRA round ({ref['model']}, rank {ref['rank']}) uploads "
            f"{ref['round_upload_bytes']:,} bytes per device (and downloads as much); a device "
            f"here holds {ref['samples_per_device']:.0f} samples, so its whole token upload "
            f"equals one LoRA round at {ref['per_sample_equivalent']:,.0f} bytes per sample.",
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for b in dict.fromkeys(r["backbone"] for r in rows):
        mine = sorted((r for r in rows if r["backbone"] == b), key=lambda r: r["bytes_per_sample"])
        xs = [r["bytes_per_sample"] for r in mine]
        ys = [100 * r["test_accuracy"] for r in mine]
        ax.plot(xs, ys, "o", label=b)
        for r, x, y in zip(mine, xs, ys, strict=True):
            ax.annotate(r["option"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ref = result.get("lora_reference")
    if ref:
        ax.axvline(ref["per_sample_equivalent"], color="grey", ls="--", lw=1)
        ax.text(
            ref["per_sample_equivalent"],
            ax.get_ylim()[0],
            " 1 FedAvg-LoRA round\n (upload / samples per device)",
            fontsize=7,
            color="grey",
            va="bottom",
        )
    ax.set_xscale("log")
    ax.set_xlabel("upload bytes per sample (log)")
    ax.set_ylabel("test accuracy (%), best-validation snapshot")
    ax.set_title(f"per-token uploads: bytes vs accuracy ({result['dataset']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    write_report(out, "compression", result, markdown, plot if result["rows"] else None)


def merge(folders: list[Path], out: Path) -> dict:
    """One result from runs of the same configuration over disjoint option lists (run side
    by side on a shared machine): their rows, in the order given."""
    parts = [json.loads((Path(f) / "compression.json").read_text()) for f in folders]
    shared = set.intersection(*(set(p["config"]) for p in parts))  # older runs lack new keys
    configs = {json.dumps({k: p["config"][k] for k in shared}, sort_keys=True) for p in parts}
    if len(configs) != 1:
        raise FedMobiLLMError("--merge: the runs have different configurations")
    result = {**parts[0], "rows": [r for p in parts for r in p["rows"]]}
    result["lora_reference"] = next(
        (p["lora_reference"] for p in parts if p["lora_reference"]), None
    )
    result["merged_from"] = [str(f) for f in folders]
    result["wall_s"] = max(p["wall_s"] for p in parts)
    write_outputs(result, out)
    return result


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--merge"]:
        return merge_command(argv, merge, markdown)

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_compression", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--options", default=",".join(OPTIONS), help="comma-separated options")
    p.add_argument("--backbones")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--train-limit", type=int)
    p.add_argument("--anchors", type=int)
    p.add_argument("--val-limit", type=int)
    p.add_argument("--test-limit", type=int)
    p.add_argument("--devices-per-backbone", type=int)
    p.add_argument("--batch-per-arch", type=int)
    p.add_argument("--token-bundle", action="append", default=[], metavar="BACKBONE=DIR")
    p.add_argument("--token-side", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-lora", action="store_true", help="skip the FedAvg-LoRA reference")
    a = p.parse_args(argv)
    return run_command(lambda: _run_command(a), markdown)


def _run_command(a: argparse.Namespace) -> dict:
    """The run the options ask for, its options checked before any extraction."""
    from benchmarks import bench_accuracy as A

    cfg = A.AccuracyConfig.for_mode(
        a.quick,
        backbones=split_csv(a.backbones),
        steps=a.steps,
        seed=a.seed,
        train_limit=a.train_limit,
        anchors=a.anchors,
        val_limit=a.val_limit,
        test_limit=a.test_limit,
        devices_per_backbone=a.devices_per_backbone,
        batch_per_arch=a.batch_per_arch,
        token_bundles=dict(A.parse_pairs(a.token_bundle, "--token-bundle")) or None,
        token_side=A.token_side_for(
            split_csv(a.backbones) or A.AccuracyConfig().backbones,
            A.parse_side(a.token_side, "--token-side"),
        ),
        partitions=("iid",),
        datasets=("movie-snippets",) if not a.quick else None,
    )
    options = split_csv(a.options) or OPTIONS
    from benchmarks._compress import Option

    for name in options:  # an unknown option fails before any extraction
        for part in name.split("+"):
            Option(part).value  # noqa: B018
            if Option(part).kind not in ("tokens", "taps", "pca", "int4", "seg"):
                raise FedMobiLLMError(f"unknown compression option {part!r}")
    return run(cfg, options, a.out, lora=not a.no_lora)


if __name__ == "__main__":
    sys.exit(main())
