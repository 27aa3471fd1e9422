# Owner: H (issue 23).
"""Label skew and negative transfer (issue 23): the accuracy benchmark's side networks on
the paper's fleet (100 devices) beside the 12 of ``bench_accuracy``, IID and Dirichlet(alpha).

    python -m benchmarks.bench_skew [--quick] --out DIR [--fleets 12,100]
        [--partitions iid,dirichlet-1,dirichlet-0.5,dirichlet-0.1] [--repeats 3]
        [--methods fedmobillm,single,centralised] [--side KEY=VALUE] [--balance label]

writes DIR/skew.json (``rows``: one per method, fleet, partition, backbone, the mean over
seeds with each seed's accuracy and the collapsed seeds; ``runs``: one per seed), DIR/skew.md
and DIR/skew.png (accuracy against alpha per backbone). Reuses ``bench_accuracy``'s data
(``load_split``: the same int8 activations, labelled records, anchors, validation and test
splits) and its side-network settings. The fleet: ``devices`` simulated devices over the
backbones in contiguous equal groups (12: 4 per backbone, device i runs backbone i // 4, as
``bench_accuracy``; 100: 34 + 33 + 33), the labelled records partitioned by
``fedmobillm.data.partition`` (IID or Dirichlet(alpha) over labels).

Methods: ``fedmobillm`` (one shared side network, the server trainer's sampler, anchors),
``fedmobillm-no-anchors`` (IID only: the ablation), ``single`` (one side network per
backbone on its devices only), ``centralised`` (all labelled records of one backbone; one
per seed, fleet- and partition-free). Model selection: the snapshot with the best validation
accuracy per backbone (every ``eval_every`` steps), as ``bench_accuracy``; its test accuracy
is the trainer's torch figure (``--onnx``: through ``personal.onnx`` on onnxruntime, the
device's path; the two agree within 0.3 pt, docs/accuracy.md). A seed whose test accuracy
is within ``COLLAPSE_MARGIN`` of the majority rate is collapsed, and reported so.

``--side KEY=VALUE`` sets ``SideConfig`` fields (e.g. ``conflict_projection=anchors``,
``anchor_protect_best=true``, ``anchor_target=quality``, ``logit_adjust=1``); ``--balance``
the sampler's (``server.policies.BALANCES``). Variants are compared on ``val_accuracy``
(the validation split); test figures are for the table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import run_command, split_csv, write_report
from benchmarks.bench_accuracy import (
    BACKBONES,
    AccuracyConfig,
    Split,
    alpha_of,
    load_split,
    majority,
    parse_side,
    personal_accuracy,
    side_trainer,
    versions,
)
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks.skew")

FLEETS = (12, 100)
PARTITIONS = ("iid", "dirichlet-1", "dirichlet-0.5", "dirichlet-0.1")
METHODS = ("fedmobillm", "fedmobillm-no-anchors", "single", "centralised")
COLLAPSE_MARGIN = 0.05  # a seed within 5 points of the majority rate has collapsed
# targets (issue 23): Dirichlet(0.1) within this many points of IID, per fleet size
SKEW_GAP = {100: 0.02, 12: 0.04}


@dataclass
class SkewConfig:
    """What one run measures; the data and side network are ``bench_accuracy``'s."""

    fleets: tuple[int, ...] = FLEETS
    partitions: tuple[str, ...] = PARTITIONS
    methods: tuple[str, ...] = ("fedmobillm", "single", "centralised")
    backbones: tuple[str, ...] = BACKBONES
    dataset: str = "movie-snippets"
    seed: int = 0  # the data's (split order, cached activations) and the first run's
    repeats: int = 3
    first_repeat: int = 0  # runs use seeds seed + first_repeat ... (more seeds, same data)
    steps: int = 500
    eval_every: int = 50
    batch_per_arch: int = 32
    train_limit: int | None = 3000
    anchors: int = 3000
    val_limit: int | None = 500
    test_limit: int | None = None
    side: dict[str, Any] = field(default_factory=dict)
    balance: str = "device"  # server.policies.BALANCES
    # local adaptation variants (server/adapt.py): name -> SideConfig adapt_* fields; each
    # adds rows "fedmobillm+<name>": the fedmobillm snapshot adapted per backbone
    adapt: dict[str, dict[str, Any]] = field(default_factory=dict)
    onnx: bool = False  # test accuracy through personal.onnx (the device's path)
    threads: int = 1

    def accuracy_config(self, seed: int) -> AccuracyConfig:
        """``bench_accuracy``'s config for the data, the side network and the budget."""
        return AccuracyConfig.for_mode(
            True,
            seed=seed,
            datasets=(self.dataset,),
            backbones=self.backbones,
            train_limit=self.train_limit,
            anchors=self.anchors,
            val_limit=self.val_limit,
            test_limit=self.test_limit,
            side=dict(self.side),
            steps=self.steps,
            eval_every=self.eval_every,
            batch_per_arch=self.batch_per_arch,
            threads=self.threads,
        )


# -- fleet ----------------------------------------------------------------------------------


def skew_fleet(
    labels: np.ndarray, backbones: list[str], devices: int, partition: str, seed: int
) -> dict[str, dict[str, np.ndarray]]:
    """backbone -> device -> rows of the labelled train records: ``devices`` devices over
    the backbones in contiguous groups (``np.array_split``), the records partitioned IID or
    Dirichlet(alpha) (``fedmobillm.data.partition``, seeded)."""
    from fedmobillm.data import Record
    from fedmobillm.data import partition as split_devices

    if devices < len(backbones):
        raise FedMobiLLMError(
            f"{devices} devices cannot run {len(backbones)} backbones",
            hint="use at least one device per backbone",
        )
    records = [Record(str(i), int(y)) for i, y in enumerate(labels)]
    parts = split_devices(records, devices, alpha_of(partition), seed)
    owner = np.empty(devices, np.int64)  # device -> backbone index
    for b, group in enumerate(np.array_split(np.arange(devices), len(backbones))):
        owner[group] = b
    out: dict[str, dict[str, np.ndarray]] = {b: {} for b in backbones}
    for i, part in enumerate(parts):
        rows = np.asarray([int(r.text) for r in part], np.int64)
        out[backbones[owner[i]]][f"device-{i:03d}"] = rows
    return out


def label_counts(y: np.ndarray, devices: dict[str, np.ndarray], num_labels: int) -> list[int]:
    """(C,) labelled records per label over ``devices`` (device -> rows of ``y``)."""
    rows = [r for r in devices.values() if len(r)]
    flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return np.bincount(y[flat], minlength=num_labels).tolist()


# -- training -----------------------------------------------------------------------------


def train(
    cfg: AccuracyConfig,
    balance: str,
    label_names: list[str],
    data: dict[str, Split],
    devices: dict[str, dict[str, np.ndarray]],
    anchors: bool,
) -> tuple[dict[str, Any], list[dict]]:
    """One ``SideTrainer`` over the architectures in ``devices`` (backbone -> device ->
    train rows), batches by the server trainer's sampler (``TrainingCache.sample`` with
    ``balance``), anchors as the server's. Every ``eval_every`` steps each backbone's
    validation accuracy is measured, handed to the trainer (``arch_quality``, which the
    anchor terms may read) and the best snapshot per backbone kept (a deep copy).
    Returns (backbone -> best trainer, validation curve)."""
    trainer, cache = side_trainer(cfg, label_names, data, devices, anchors)
    batch = cfg.batch_per_arch * len(devices)
    curve: list[dict[str, Any]] = []
    best: dict[str, tuple[float, Any]] = {}
    for step in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        groups = _sample(cache, rng, batch, balance)
        loss = trainer.train_step(groups, cache.sample_anchors(rng, trainer.config.anchor_batch))
        if (step + 1) % cfg.eval_every and step + 1 != cfg.steps:
            continue
        point: dict[str, Any] = {"step": step + 1, "loss": loss}
        for b in devices:
            v = data[b].val
            point[b] = trainer.evaluate(v.architecture, v.x, v.y)["accuracy"]
            trainer.arch_quality[v.architecture] = point[b]
            if point[b] > best.get(b, (-1.0, None))[0]:
                best[b] = (point[b], copy.deepcopy(trainer))
        curve.append(point)
    return {b: t for b, (_, t) in best.items()}, curve


ADAPT_KEYS = {
    "steps": "adapt_steps",
    "every": "adapt_every",
    "batch": "adapt_batch",
    "lr_scale": "adapt_lr_scale",
    "shared_lr_scale": "adapt_shared_lr_scale",
}


def adapt_row(
    cfg: AccuracyConfig,
    balance: str,
    trainer: Any,
    split: Split,
    devices: dict[str, np.ndarray],
    fields: dict[str, Any],
) -> Any:
    """``server.adapt.adapt`` of ``split``'s backbone on ``trainer`` (its best snapshot):
    batches by the server's sampler over that backbone's devices (device -> train rows),
    steps chosen on the validation split. Returns the ``Adapted``."""
    from fedmobillm.server.adapt import adapt
    from fedmobillm.server.policies import balanced_sample

    tr, v = split.train, split.val
    config = dataclasses.replace(trainer.config, **fields)
    devs = {tr.architecture: sorted(d for d, r in devices.items() if len(r))}

    def draw(rng: np.random.Generator) -> tuple:
        ((_, x, y),) = balanced_sample(
            rng,
            config.adapt_batch,
            devs,
            lambda k, d: (tr.x[devices[d]], tr.y[devices[d]]),
            balance,
        )
        return x, y

    got = adapt(trainer, tr.architecture, draw, lambda: [(v.x, v.y)], cfg.seed, config)
    got.cv_gain = cv_gain(trainer, tr.architecture, draw, v.x, v.y, cfg.seed, config)
    return got


def cv_gain(
    trainer: Any, arch: str, draw: Any, x: np.ndarray, y: np.ndarray, seed: int, config: Any
) -> float:
    """The adaptation's gain on validation samples it did not choose on: two folds (even
    and odd rows), each choosing the steps on one half and measuring the accuracy of the
    chosen model minus the shared model's on the other; the mean of the two. (The
    ``accuracy`` of ``adapt`` is the maximum over the candidates on the samples it chose
    on, so it is biased upwards; this is not.)"""
    from fedmobillm.server.adapt import adapt

    gains = []
    for fold in (0, 1):
        pick, held = np.arange(len(y)) % 2 == fold, np.arange(len(y)) % 2 != fold
        got = adapt(trainer, arch, draw, lambda pick=pick: [(x[pick], y[pick])], seed, config)
        acc = got.trainer.evaluate(arch, x[held], y[held])["accuracy"]
        gains.append(acc - trainer.evaluate(arch, x[held], y[held])["accuracy"])
    return float(np.mean(gains))


def parse_adapt(specs: list[str]) -> dict[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,...`` (KEY of ``ADAPT_KEYS``) -> name -> SideConfig adapt_* fields."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, _, body = spec.partition(":")
        fields: dict[str, Any] = {}
        for kv in filter(None, body.split(",")):
            k, _, val = kv.partition("=")
            if k not in ADAPT_KEYS or not val:
                raise FedMobiLLMError(
                    f"bad --adapt {spec!r}: {kv!r}",
                    hint=f"use NAME:KEY=VALUE,... with KEY of {', '.join(ADAPT_KEYS)}",
                )
            key = ADAPT_KEYS[k]
            fields[key] = float(val) if "scale" in key else int(val)
        if not name or not fields.get("adapt_steps"):
            raise FedMobiLLMError(
                f"bad --adapt {spec!r}", hint="give a name and steps > 0: e.g. a100:steps=100"
            )
        out[name] = fields
    return out


def _sample(cache: Any, rng: np.random.Generator, batch: int, balance: str) -> list[tuple]:
    """The server trainer's draw (``TrainingCache.sample``) with the sampler's ``balance``."""
    if balance == "device":
        return cache.sample(rng, batch)
    return cache.sample(rng, batch, balance=balance)


def _row(
    method: str,
    fleet: int | None,
    partition: str,
    b: str,
    chosen: Any,
    curve: list[dict],
    split: Split,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """One seed's row for backbone ``b``: test accuracy of its best-validation snapshot."""
    t = split.test
    rate = majority(t.y)
    acc = extra.pop("accuracy", None)
    if acc is None:
        acc = chosen.evaluate(t.architecture, t.x, t.y)["accuracy"]
    val = extra.pop("val_accuracy", None)
    if val is None:
        val = max(p[b] for p in curve)
    row = {
        "method": method,
        "backbone": b,
        "devices": fleet,
        "partition": partition,
        "accuracy": float(acc),
        "val_accuracy": float(val),
        "selected_step": int(chosen.step),
        "majority_class_rate": rate,
        "collapsed": bool(acc <= rate + COLLAPSE_MARGIN),
        "curve": [{"step": p["step"], "val_accuracy": p[b]} for p in curve],
        **extra,
    }
    log.info(
        "%-22s %4s %-14s %-13s test %.4f val %.4f%s",
        method,
        fleet or "-",
        partition,
        b,
        acc,
        val,
        " COLLAPSED" if row["collapsed"] else "",
    )
    return row


def seed_rows(
    sc: SkewConfig, seed: int, label_names: list[str], data: dict[str, Split], bundles: dict
) -> list[dict]:
    """Every (method, fleet, partition, backbone) row of one seed."""
    cfg = sc.accuracy_config(seed)
    backbones = list(sc.backbones)
    y = data[backbones[0]].train.y
    rows: list[dict] = []
    for fleet in sc.fleets:
        for partition in sc.partitions:
            devices = skew_fleet(y, backbones, fleet, partition, seed)
            meta = {
                b: {
                    "seed": seed,
                    "train_samples": int(sum(len(r) for r in devices[b].values())),
                    "label_counts": label_counts(y, devices[b], len(label_names)),
                    "devices_of_backbone": len(devices[b]),
                }
                for b in backbones
            }
            runs = [("fedmobillm", True)]
            if partition == "iid" and "fedmobillm-no-anchors" in sc.methods:
                runs.append(("fedmobillm-no-anchors", False))
            for method, anchors in runs if "fedmobillm" in sc.methods else []:
                t0 = time.perf_counter()
                best, curve = train(cfg, sc.balance, label_names, data, devices, anchors)
                for b in backbones:
                    extra = {**meta[b], "seconds": time.perf_counter() - t0}
                    # conflict_projection: steps and projections made up to the snapshot
                    extra["conflicts"] = dict(best[b].conflicts)
                    extra.update(_onnx(sc, best[b], data[b], bundles.get(b)))
                    rows.append(_row(method, fleet, partition, b, best[b], curve, data[b], extra))
                if method != "fedmobillm":
                    continue
                for name, fields in sc.adapt.items():
                    for b in backbones:
                        t1 = time.perf_counter()
                        got = adapt_row(cfg, sc.balance, best[b], data[b], devices[b], fields)
                        extra = {
                            **meta[b],
                            "seconds": time.perf_counter() - t1,
                            "val_accuracy": got.accuracy,
                            "shared_val_accuracy": got.shared_accuracy,
                            "adapt": got.summary(),
                            "adapt_cv_gain": got.cv_gain,
                        }
                        extra.update(_onnx(sc, got.trainer, data[b], bundles.get(b)))
                        rows.append(
                            _row(f"fedmobillm+{name}", fleet, partition, b, got.trainer, curve,
                                 data[b], extra)
                        )  # fmt: skip
            for b in backbones if "single" in sc.methods else []:
                t0 = time.perf_counter()
                best, curve = train(cfg, sc.balance, label_names, data, {b: devices[b]}, False)
                extra = {**meta[b], "seconds": time.perf_counter() - t0}
                extra.update(_onnx(sc, best[b], data[b], bundles.get(b)))
                rows.append(_row("single", fleet, partition, b, best[b], curve, data[b], extra))
    for b in backbones if "centralised" in sc.methods else []:
        t0 = time.perf_counter()
        everything = {"all": np.arange(len(y))}
        best, curve = train(cfg, sc.balance, label_names, data, {b: everything}, False)
        extra = {"seed": seed, "train_samples": len(y), "seconds": time.perf_counter() - t0}
        extra.update(_onnx(sc, best[b], data[b], bundles.get(b)))
        rows.append(_row("centralised", None, "central", b, best[b], curve, data[b], extra))
    return rows


def _onnx(sc: SkewConfig, chosen: Any, split: Split, bundle: Path | None) -> dict[str, Any]:
    """With ``--onnx``: the test accuracy through personal.onnx (``accuracy``) and the
    torch figure beside it; else nothing (the torch figure is the row's)."""
    if not sc.onnx or bundle is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="bench-skew-") as work:
        got = personal_accuracy(chosen, split.test, bundle, Path(work))
    return {"accuracy": got["accuracy"], "accuracy_torch": got["accuracy_torch"]}


# -- summary --------------------------------------------------------------------------------


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (method, devices, partition, backbone): mean and sd of the seeds' test
    accuracy, the per-seed values, the collapsed seeds, the mean best validation accuracy."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["devices"], r["partition"], r["backbone"]), []).append(r)
    out = []
    for (method, fleet, partition, b), rs in groups.items():
        accs = np.asarray([r["accuracy"] for r in rs], float)
        out.append(
            {
                "method": method,
                "devices": fleet,
                "partition": partition,
                "backbone": b,
                "seeds": [r["seed"] for r in rs],
                "accuracy": float(accs.mean()),
                "accuracy_sd": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                "accuracy_per_seed": accs.tolist(),
                "collapsed_seeds": [r["seed"] for r in rs if r["collapsed"]],
                "val_accuracy": float(np.mean([r["val_accuracy"] for r in rs])),
                "majority_class_rate": rs[0]["majority_class_rate"],
                "label_counts_per_seed": [r.get("label_counts") for r in rs],
            }
        )
    return out


def targets(rows: list[dict]) -> list[dict]:
    """Per fleet, backbone and partition: fedmobillm - single (target >= 0); per fleet and
    backbone: IID - Dirichlet(0.1) of fedmobillm (target <= SKEW_GAP) and its collapsed
    seeds at Dirichlet(0.1) (target none at 12 devices)."""

    def get(method: str, fleet: int, part: str, b: str) -> dict | None:
        key = (method, fleet, part, b)
        return next(
            (r for r in rows if (r["method"], r["devices"], r["partition"], r["backbone"]) == key),
            None,
        )

    out = []
    for fleet, b in dict.fromkeys((r["devices"], r["backbone"]) for r in rows if r["devices"]):
        iid, low = get("fedmobillm", fleet, "iid", b), get("fedmobillm", fleet, "dirichlet-0.1", b)
        above = {}
        for part in dict.fromkeys(r["partition"] for r in rows if r["devices"] == fleet):
            fed, single = get("fedmobillm", fleet, part, b), get("single", fleet, part, b)
            if fed and single:
                above[part] = fed["accuracy"] - single["accuracy"]
        gap = iid["accuracy"] - low["accuracy"] if iid and low else None
        out.append(
            {
                "devices": fleet,
                "backbone": b,
                "fedmobillm_minus_single": above,
                "fedmobillm_at_least_single": all(v >= 0 for v in above.values())
                if above
                else None,
                "iid_minus_dirichlet_0.1": gap,
                "gap_target": SKEW_GAP.get(fleet),
                "within_gap": None
                if gap is None or fleet not in SKEW_GAP
                else gap <= SKEW_GAP[fleet] + 1e-9,
                "collapsed_seeds_dirichlet_0.1": None if low is None else low["collapsed_seeds"],
            }
        )
    return out


# -- outputs ---------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    rows = result["rows"]
    parts = list(dict.fromkeys(r["partition"] for r in rows if r["devices"]))
    lines = ["test accuracy, %, mean ± sd over seeds; [n collapsed]", ""]
    head = ["devices", "backbone", "method", *parts]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = dict.fromkeys((r["devices"], r["backbone"], r["method"]) for r in rows if r["devices"])
    for fleet, b, method in sorted(keys, key=lambda k: (k[0], k[1], k[2])):
        cells = [str(fleet), b, method]
        for p in parts:
            hit = [
                r
                for r in rows
                if (r["devices"], r["backbone"], r["method"], r["partition"])
                == (fleet, b, method, p)
            ]
            cells.append(_cell(hit[0]) if hit else "")
        lines.append("| " + " | ".join(cells) + " |")
    central = [r for r in rows if r["method"] == "centralised"]
    if central:
        lines += ["", "| backbone | centralised |", "|---|---|"]
        lines += [f"| {r['backbone']} | {_cell(r)} |" for r in central]
    t = result.get("targets") or []
    if t:
        lines += [
            "",
            "| devices | backbone | fedmobillm - single (pt) per partition | >= single | "
            "IID - Dirichlet(0.1) (pt) | target | met | collapsed seeds at 0.1 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for x in t:
            diffs = ", ".join(
                f"{p} {100 * v:+.2f}" for p, v in x["fedmobillm_minus_single"].items()
            )
            gap = x["iid_minus_dirichlet_0.1"]
            lines.append(
                f"| {x['devices']} | {x['backbone']} | {diffs} | "
                f"{_yn(x['fedmobillm_at_least_single'])} | "
                f"{'' if gap is None else f'{100 * gap:+.2f}'} | "
                f"{_target(x['gap_target'])} | "
                f"{_yn(x['within_gap'])} | {x['collapsed_seeds_dirichlet_0.1']} |"
            )
    return "\n".join(lines) + "\n"


def _target(gap: float | None) -> str:
    return "" if gap is None else f"<= {100 * gap:.0f}"


def _cell(r: dict) -> str:
    c = f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_sd']:.2f}"
    return c + (f" [{len(r['collapsed_seeds'])}]" if r["collapsed_seeds"] else "")


def _yn(v: bool | None) -> str:
    return "" if v is None else ("yes" if v else "no")


def plot(result: dict, path: Path) -> None:
    """Accuracy against alpha, one panel per backbone, a line per (method, fleet); IID at
    the right end (alpha = infinity), centralised as a dashed level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    bbs = list(dict.fromkeys(r["backbone"] for r in rows))
    parts = sorted(
        dict.fromkeys(r["partition"] for r in rows if r["devices"]),
        key=lambda p: float("inf") if p == "iid" else float(alpha_of(p)),
    )
    fig, axes = plt.subplots(1, len(bbs), figsize=(5 * len(bbs), 4), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], bbs, strict=True):
        lines = dict.fromkeys((r["method"], r["devices"]) for r in rows if r["devices"])
        for method, fleet in lines:
            pts = [
                next(
                    (r for r in rows if (r["method"], r["devices"], r["partition"], r["backbone"])
                     == (method, fleet, p, b)), None,
                )
                for p in parts
            ]  # fmt: skip
            xs = [i for i, r in enumerate(pts) if r]
            ys = [100 * r["accuracy"] for r in pts if r]
            es = [100 * r["accuracy_sd"] for r in pts if r]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{method} ({fleet} dev.)")
        for r in rows:
            if r["method"] == "centralised" and r["backbone"] == b:
                ax.axhline(100 * r["accuracy"], color="k", ls="--", lw=1, label="centralised")
        ax.set_xticks(range(len(parts)), ["IID" if p == "iid" else p.split("-")[1] for p in parts])
        ax.set_xlabel("Dirichlet alpha")
        ax.set_title(b)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the run --------------------------------------------------------------------------------


def run(sc: SkewConfig, out: Path) -> dict:
    import torch

    from benchmarks.bench_accuracy import _bundles
    from fedmobillm.data import load_dataset

    torch.set_num_threads(sc.threads)
    t_start = time.perf_counter()
    base = sc.accuracy_config(sc.seed)
    bundles = _bundles(base)
    ds = load_dataset(sc.dataset, seed=sc.seed)
    label_names, n_train = list(ds.label_names), len(ds.splits["train"])
    data = {b: load_split(base, bundles[b], sc.dataset, n_train) for b in sc.backbones}
    runs: list[dict] = []
    for r in range(sc.first_repeat, sc.first_repeat + sc.repeats):
        log.info("seed %d (%d/%d)", sc.seed + r, r + 1 - sc.first_repeat, sc.repeats)
        runs += seed_rows(sc, sc.seed + r, label_names, data, bundles)
    rows = summarise(runs)
    result = {
        "rows": rows,
        "runs": runs,
        "targets": targets(rows),
        "config": {**asdict(sc), "side_config": asdict(base.side_config())},
        "label_names": label_names,
        "seconds": time.perf_counter() - t_start,
        "versions": versions(),
    }
    write_report(out, "skew", result, markdown, plot)
    log.info("wrote %s/skew.{json,md,png} in %.0f s", out, result["seconds"])
    return result


def config_from(a: argparse.Namespace) -> SkewConfig:
    """The run's SkewConfig, checked (unknown methods, partitions, side options, balance)."""
    from fedmobillm.server.policies import BALANCES

    given = {
        "fleets": tuple(int(v) for v in split_csv(a.fleets) or ()) or None,
        "partitions": split_csv(a.partitions),
        "methods": split_csv(a.methods),
        "backbones": split_csv(a.backbones),
        "repeats": a.repeats,
        "first_repeat": a.first_repeat,
        "seed": a.seed,
        "steps": a.steps,
        "anchors": a.anchors,
        "train_limit": a.train_limit,
        "test_limit": a.test_limit,
        "side": parse_side(a.side) or None,
        "balance": a.balance,
        "onnx": a.onnx or None,
        "adapt": parse_adapt(a.adapt) or None,
    }
    sc = dataclasses.replace(SkewConfig(), **{k: v for k, v in given.items() if v is not None})
    bad = [m for m in sc.methods if m not in METHODS]
    if bad:
        raise FedMobiLLMError(f"unknown method(s) {bad}", hint=f"use any of {', '.join(METHODS)}")
    if sc.balance not in BALANCES:
        raise FedMobiLLMError(f"unknown --balance {sc.balance!r}", hint=f"use one of {BALANCES}")
    if sc.repeats < 1:
        raise FedMobiLLMError(f"--repeats {sc.repeats} trains nothing", hint="use 1 or more")
    for p in sc.partitions:
        alpha_of(p)
    side = sc.accuracy_config(sc.seed).side_config()  # an unknown --side option fails now
    for fields in sc.adapt.values():
        dataclasses.replace(side, **fields)  # a bad adapt value fails now
    return sc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_skew", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--fleets", help="comma-separated device counts (default 12,100)")
    p.add_argument("--partitions", help="comma-separated: iid, dirichlet-ALPHA")
    p.add_argument("--methods", help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--backbones", help="comma-separated backbone names")
    p.add_argument("--repeats", type=int)
    p.add_argument("--seed", type=int, help="the data's seed and the first run's (default 0)")
    p.add_argument(
        "--first-repeat",
        type=int,
        help="start the runs' seeds at seed + this (more seeds on the same data and cache)",
    )
    p.add_argument("--steps", type=int)
    p.add_argument("--anchors", type=int)
    p.add_argument("--train-limit", type=int, help="labelled train records (default 3000)")
    p.add_argument("--test-limit", type=int, help="test records (default: the whole split)")
    p.add_argument("--side", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--balance", help="the sampler's balance: device (default), sample, label")
    p.add_argument("--onnx", action="store_true", help="test accuracy through personal.onnx")
    p.add_argument(
        "--adapt",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="a local-adaptation variant (server/adapt.py) on the fedmobillm snapshot, rows "
        f"fedmobillm+NAME; KEY of {', '.join(ADAPT_KEYS)}",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    return run_command(lambda: run(config_from(a), a.out), markdown, a.verbose)


if __name__ == "__main__":
    sys.exit(main())
