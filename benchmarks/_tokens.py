"""The per-token path (issue 15) in the accuracy benchmark: ``fedmobillm-tokens``.

The same fleet, partitions, sampler and step budget as ``fedmobillm`` (see
``benchmarks.bench_accuracy``), but every device uploads the taps of every real token
(``pivot="none"`` bundles, int8 per tap, each sample unpadded: ``K * L_i * d`` bytes) and the
server trains A's token side network (``SideConfig(inputs="tokens")``) on zero-padded
mini-batches with their masks. The batches are drawn by the server trainer's own sampler
(``TrainingCache.sample`` / ``sample_anchors``) over row ids of the compact token store, then
padded and dequantized per mini-batch, as the server's cache does. Accuracy per backbone is
the exported personal model (activations + attention_mask -> logits) on onnxruntime.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._activations import (
    BundleSpec,
    TokenActivations,
    bundle_for,
    extract_tokens,
)
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks.accuracy.tokens")

METHOD = "fedmobillm-tokens"
EVAL_BATCH = 128  # rows per forward when evaluating (sorted by length: little padding)
UPLOAD_BATCH = 32  # samples per upload batch of a device (benchmarks._activations.extract)


@dataclass
class TokenSplit:
    """One backbone's token taps of one data set: labelled train, validation, test, and the
    anchor pool (unlabelled; rows in anchor-id order)."""

    train: TokenActivations
    val: TokenActivations
    test: TokenActivations | None
    anchors: TokenActivations | None = None
    kind: str = ""  # the backbone's kind, "encoder" | "decoder" (its manifest's)


def token_bundles(cfg: Any) -> dict[str, Path]:
    """backbone -> its ``pivot="none"`` bundle (same taps, quant and length as the pivot's)."""
    return {
        b: bundle_for(BundleSpec(b, cfg.taps, cfg.quant, cfg.max_seq_len, pivot="none"))
        for b in cfg.backbones
    }


def load_token_split(
    cfg: Any, bundle: Path, dataset: str, layout: tuple[int, int], with_test: bool = True
) -> TokenSplit:
    """The records the pivot split holds (same ``split_order`` prefixes), as token taps.
    ``layout``: (labelled, anchors) of the train split (``bench_accuracy.train_layout``)."""
    from fedmobillm.device_runtime.protocol import read_manifest

    kw = {"seed": cfg.seed, "threads": cfg.threads}
    labelled, anchors = layout
    train = extract_tokens(bundle, dataset, "train", labelled + anchors, **kw)
    pool = train.subset(np.arange(labelled, labelled + anchors)) if anchors else None
    return TokenSplit(
        train.subset(np.arange(labelled)),
        extract_tokens(bundle, dataset, "validation", cfg.val_limit, **kw),
        extract_tokens(bundle, dataset, "test", cfg.test_limit, **kw) if with_test else None,
        pool,
        read_manifest(bundle).kind,
    )


def side_config(cfg: Any, archs: dict[str, str] | None = None) -> Any:
    """The token side network's SideConfig: the run's pivot overrides' lr, plus
    ``cfg.token_side`` (chosen on validation, docs/accuracy.md). ``archs``: backbone ->
    its architecture name, for ``per_arch`` entries given by backbone name."""
    from benchmarks.bench_accuracy import SIDE_LR
    from fedmobillm.server.side import SideConfig

    # per_arch: the bench's own per-backbone table (TOKEN_SIDE_BACKBONE) replaces the
    # server's default by kind, so a --token-side pool/skip applies to every backbone
    opts = {"lr": SIDE_LR, "per_arch": {}, **cfg.token_side, "inputs": "tokens"}
    if archs and isinstance(opts.get("per_arch"), dict):
        opts["per_arch"] = {archs.get(k, k): v for k, v in opts["per_arch"].items()}
    try:
        return SideConfig(**opts)
    except TypeError as exc:
        raise FedMobiLLMError(f"unknown token side-network option: {exc}") from exc


def _id_cache(
    data: dict[str, TokenSplit], devices: dict[str, dict[str, np.ndarray]], anchors: bool
) -> Any:
    """The server trainer's ``TrainingCache`` holding row ids in place of activations: its
    samplers then draw exactly what they draw for the pivot path, and ``TokenActivations``
    turns the ids into padded mini-batches."""
    from fedmobillm.server.trainer import ArchData, TrainingCache

    cache = TrainingCache()
    for b, devs in devices.items():
        tr = data[b].train
        a = ArchData(tr.taps, tr.depth, tr.hidden, bundle_sha256s={tr.bundle_sha256})
        for dev, rows in devs.items():
            if len(rows):
                a.train_x[dev] = [np.int64(r) for r in rows]  # row ids, not (K, L, d)
                a.train_y[dev] = tr.y[rows].tolist()
        if anchors and data[b].anchors is not None:
            a.anchor_x = {i: np.int64(i) for i in range(len(data[b].anchors))}
        cache.archs[tr.architecture] = a
    return cache


def train_tokens(
    cfg: Any,
    label_names: list[str],
    data: dict[str, TokenSplit],
    devices: dict[str, dict[str, np.ndarray]],
    snapshots: Path | None = None,
    anchors: bool = True,
) -> tuple[Any, list[dict]]:
    """One token-mode SideTrainer over the fleet ``devices`` (backbone -> device -> train
    rows); ``cfg.steps`` steps of ``cfg.batch_per_arch`` samples per architecture, anchors as
    the server draws them; best-validation snapshots to ``snapshots/<backbone>``."""
    from fedmobillm.server.side import SideTrainer

    archs = {b: data[b].train.architecture for b in devices}
    trainer = SideTrainer(side_config(cfg, archs), label_names, seed=cfg.seed)
    by_arch = {}
    for b in devices:
        tr = data[b].train
        trainer.add_architecture(tr.architecture, tr.taps, tr.depth, tr.hidden, data[b].kind)
        by_arch[tr.architecture] = b
    cache = _id_cache(data, devices, anchors)
    batch = cfg.batch_per_arch * len(devices)
    curve: list[dict[str, Any]] = []
    best: dict[str, float] = {}
    for step in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        groups = []
        for arch, ids, y in cache.sample(rng, batch):  # ids (n,) rows of that train split
            x, mask = data[by_arch[arch]].train.batch(ids)  # (n, K, T, d), (n, T)
            groups.append((arch, x, y, mask))
        picked = cache.sample_anchors(rng, trainer.config.anchor_batch)
        anchor_groups = None
        if picked is not None:
            anchor_groups = [(a, *data[by_arch[a]].anchors.batch(ids)) for a, ids in picked]
        loss = trainer.train_step(groups, anchor_groups)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            point: dict[str, Any] = {"step": step + 1, "loss": loss}
            for b in devices:
                point[b] = evaluate(trainer, data[b].val)
                if snapshots is not None and point[b] > best.get(b, -1.0):
                    best[b] = point[b]
                    trainer.save(snapshots / b)
            curve.append(point)
            log.debug("tokens step %d: %s", step + 1, point)
    return trainer, curve


def _length_batches(acts: TokenActivations, size: int = EVAL_BATCH) -> list[np.ndarray]:
    order = np.argsort(acts.lengths, kind="stable")  # (N,)
    return [order[s : s + size] for s in range(0, len(order), size)]


def evaluate(trainer: Any, acts: TokenActivations) -> float:
    """Accuracy of the trainer's (averaged) model on ``acts``, in length-sorted batches."""
    correct = 0
    for rows in _length_batches(acts):
        x, mask = acts.batch(rows)  # (n, K, T, d), (n, T)
        logits = trainer.predict(acts.architecture, x, mask)  # (n, C)
        correct += int((logits.argmax(1) == acts.y[rows]).sum())
    return correct / max(1, len(acts))


def personal_accuracy(
    trainer: Any, acts: TokenActivations, bundle_dir: Path, work: Path
) -> dict[str, Any]:
    """The exported token personal model run as a device runs it: personal.onnx on
    onnxruntime over the (int8 round-tripped) token taps and their attention mask."""
    from fedmobillm.device_runtime.backbone import load_verified_bundle
    from fedmobillm.device_runtime.personal import PersonalModel

    out = trainer.export_personal(acts.architecture, work, [acts.bundle_sha256])
    model = PersonalModel(out)
    model.check_compatible(load_verified_bundle(bundle_dir))
    correct = 0
    for rows in _length_batches(acts):
        x, mask = acts.batch(rows)
        logits = model.logits(x, mask)  # (n, C)
        correct += int((np.asarray(logits).argmax(1) == acts.y[rows]).sum())
    from benchmarks.bench_accuracy import majority

    return {
        "accuracy": correct / max(1, len(acts)),
        "accuracy_torch": evaluate(trainer, acts),
        "majority_class_rate": majority(acts.y),
        "side_params": int(trainer.num_parameters()),
        "personal_params": int(trainer.num_parameters(acts.architecture)),
        "personal_onnx_bytes": int((Path(out) / "personal.onnx").stat().st_size),
    }


def token_rows(
    cfg: Any,
    dataset: str,
    label_names: list[str],
    data: dict[str, TokenSplit],
    devices_of: dict[str, dict[str, dict[str, np.ndarray]]],
    bundles: dict[str, Path],
    work: Path,
) -> list[dict]:
    """``fedmobillm-tokens`` rows (one per backbone and partition) of one seed.
    ``devices_of``: partition -> the fleet (the pivot rows' own, same rows per device)."""
    rows = []
    for partition, devices in devices_of.items():
        snap = work / f"snap-{METHOD}-{partition}" if cfg.select == "best-val" else None
        t0 = time.perf_counter()
        trainer, curve = train_tokens(
            cfg, label_names, data, devices, snap, anchors=cfg.anchors > 0
        )
        dt = time.perf_counter() - t0
        for b in devices:
            rows.append(_row(cfg, dataset, partition, trainer, curve, b, data, bundles, work, dt))
            rows[-1]["train_samples"] = int(sum(len(r) for r in devices[b].values()))
            rows[-1]["wire_bytes_per_sample"] = padded_bytes_per_sample(
                data[b].train, devices[b], UPLOAD_BATCH
            )
    return rows


def padded_bytes_per_sample(
    acts: TokenActivations, devices: dict[str, np.ndarray], batch: int
) -> float:
    """Activation bytes per sample on the wire when each device uploads its rows in batches
    of ``batch`` (in order), each padded to its longest sample: sum n * K * max(L) * d / N
    (int8). The store keeps K * L_i * d per sample (``bytes_per_sample``)."""
    k, d = acts.q.shape[1], acts.q.shape[2]
    total, n = 0.0, 0
    for rows in devices.values():
        for s in range(0, len(rows), batch):
            part = acts.lengths[rows[s : s + batch]]
            total += len(part) * k * int(part.max()) * d * acts.bits / 8
            n += len(part)
    return total / max(1, n)


def _row(
    cfg: Any,
    dataset: str,
    partition: str,
    trainer: Any,
    curve: list[dict],
    b: str,
    data: dict[str, TokenSplit],
    bundles: dict[str, Path],
    work: Path,
    seconds: float,
) -> dict:
    """Backbone ``b``'s row: validation only (``cfg.validation_only``), else test accuracy
    of the best-validation snapshot's personal model."""
    from fedmobillm.server.side import SideTrainer

    chosen, selected = trainer, cfg.steps
    if cfg.select == "best-val":
        chosen = SideTrainer.load(work / f"snap-{METHOD}-{partition}" / b)
        selected = chosen.step
    split = data[b]
    row: dict[str, Any] = {
        "method": METHOD,
        "backbone": b,
        "partition": partition,
        "dataset": dataset,
        "seed": cfg.seed,
        "selection": cfg.select,
        "selected_step": selected,
        "val_accuracy": next(p[b] for p in curve if p["step"] == selected),
        "curve": [{"step": p["step"], "loss": p["loss"], "val_accuracy": p[b]} for p in curve],
        "anchor_samples": 0 if split.anchors is None or cfg.anchors <= 0 else len(split.anchors),
        "steps": cfg.steps,
        "batch_per_arch": cfg.batch_per_arch,
        "seconds": seconds,
        "bytes_per_sample": split.train.bytes_per_sample(),
        "mean_tokens": float(np.mean(split.train.lengths)),
        "token_side": dict(cfg.token_side),
    }
    if split.test is not None:
        row.update(personal_accuracy(chosen, split.test, bundles[b], work / f"tok-{partition}-{b}"))
        row["accuracy_final_step_torch"] = evaluate(trainer, split.test)
        row["test_samples"] = len(split.test)
    log.info(
        "%-17s %-13s %-14s %s acc %s (val %.4f at step %d)",
        METHOD,
        partition,
        b,
        dataset,
        f"{row['accuracy']:.4f}" if "accuracy" in row else "-",
        row["val_accuracy"],
        selected,
    )
    return row


def with_layout(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
