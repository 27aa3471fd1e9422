# Owner: H7.
"""Pivot activations of real backbone bundles, extracted once and cached.

A bundle is exported with ``fedmobillm.export.pipeline.export_bundle`` (cached under
``cache_dir()/bench-bundles/<key of the options>``) and run by the device runtime's
``Backbone`` (onnxruntime), exactly as a device does: upload batches of ``batch`` records,
forwarded ``forward_batch`` at a time in order of token length. Each sample is then
quantized to int8 with the manifest's ``activation_scales`` (``serde.quantize_int8``), as
devices upload it, and the benchmark trains on ``serde.dequantize`` of that, as the server
does.

Cache: ``cache_dir()/activations/<key>/chunk-NNNNN.safetensors`` with ``key`` = sha256 of
(bundle digest, data set, seed, split). A split is read in a seeded order (a permutation
of its records) in chunks of ``CHUNK`` records, so a quick run's subset is a prefix of a
full run's and every finished chunk survives an interrupted extraction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmobillm.device_runtime.backbone import FORWARD_BATCH
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger("benchmarks.activations")

CHUNK = 500
# 2: forward passes in order of token length, as the device runtime now batches
CACHE_VERSION = 2


@dataclass(frozen=True)
class BundleSpec:
    """Export options of one benchmark bundle."""

    model: str
    num_taps: int = 3
    quant: str = "int8"
    max_seq_len: int = 64
    formats: tuple[str, ...] = ("onnx",)

    def key(self) -> str:
        raw = json.dumps([self.model, self.num_taps, self.quant, self.max_seq_len, self.formats])
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass
class Activations:
    """One split of one data set through one bundle, as the server sees it."""

    x: np.ndarray  # (N, K, d) float32, dequantized int8
    y: np.ndarray  # (N,) int64
    index: np.ndarray  # (N,) int64: position of each sample in the data set's split
    scales: np.ndarray  # (K,) float32
    architecture: str
    taps: list[int]
    depth: int
    hidden: int
    bundle_sha256: str

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.x[rows], self.y[rows]  # (n, K, d), (n,)


def bundle_for(spec: BundleSpec) -> Path:
    """The exported bundle for ``spec`` (built once per machine; rebuilt if it fails
    verification). If an int8 export fails the exporter's own accuracy check (SmolLM2's
    outlier activations at deep taps do), the fp32 graph is used instead; the failure is
    remembered (``int8-failed.json``) and the manifest's ``quant`` says what was used."""
    from fedmobillm.export.pipeline import failed_before, remember_failure
    from fedmobillm.paths import cache_dir

    failed = cache_dir() / "bench-bundles" / f"{spec.key()}-failed.json"
    before = failed_before(failed) if spec.quant != "fp32" else None
    if before is not None:
        log.warning(
            "%s: %s export failed before (%s); using fp32", spec.model, spec.quant, before[:200]
        )
        return bundle_for(dataclasses.replace(spec, quant="fp32"))
    try:
        return _export_cached(spec)
    except FedMobiLLMError as exc:
        if spec.quant == "fp32" or "verify" not in str(exc):
            raise
        log.warning(
            "%s: %s export failed its check (%s); falling back to fp32", spec.model, spec.quant, exc
        )
        remember_failure(failed, str(exc), spec=dataclasses.asdict(spec))
        return bundle_for(dataclasses.replace(spec, quant="fp32"))


def _export_cached(spec: BundleSpec) -> Path:
    from fedmobillm.export.pipeline import bundle_is_current, export_bundle
    from fedmobillm.paths import cache_dir

    out = cache_dir() / "bench-bundles" / spec.key()
    if bundle_is_current(out, spec.model):
        return out
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    log.info(
        "exporting %s (taps %d, %s, seq %d) ...",
        spec.model,
        spec.num_taps,
        spec.quant,
        spec.max_seq_len,
    )
    export_bundle(
        spec.model,
        out,
        num_taps=spec.num_taps,
        quant=spec.quant,
        formats=spec.formats,
        max_seq_len=spec.max_seq_len,
    )
    log.info("exported %s in %.0f s -> %s", spec.model, time.perf_counter() - t0, out)
    return out


def split_order(n: int, seed: int) -> np.ndarray:
    """The seeded order in which a split's records are extracted (and subsampled)."""
    return np.random.default_rng([seed, 7]).permutation(n)  # (n,)


def extract(
    bundle_dir: Path,
    dataset: str,
    split: str,
    limit: int | None = None,
    *,
    seed: int = 0,
    batch: int = 32,
    forward_batch: int = FORWARD_BATCH,
    threads: int | None = None,
) -> Activations:
    """Activations of the first ``limit`` records (in ``split_order``) of ``split``."""
    from fedmobillm.data import load_dataset
    from fedmobillm.device_runtime.backbone import Backbone
    from fedmobillm.device_runtime.protocol import bundle_digest

    backbone = Backbone(bundle_dir, backend="onnx", threads=threads)
    m = backbone.manifest
    digest = bundle_digest(m)
    records = load_dataset(dataset, seed=seed).splits[split]
    if not records:
        raise FedMobiLLMError(f"data set {dataset} has an empty {split} split")
    order = split_order(len(records), seed)
    n = len(records) if limit is None else min(limit, len(records))
    folder = _cache_folder(digest, dataset, seed, split)
    scales = np.asarray(m.activation_scales, np.float32)  # (K,)
    qs, ys, idxs = [], [], []
    t0, done = time.perf_counter(), 0
    for c, start in enumerate(range(0, n, CHUNK)):
        want = order[start : min(start + CHUNK, n)]  # (n_c,)
        q = _read_chunk(folder, c, want)
        if q is None:
            chunk = [records[i] for i in want]
            q = _compute_chunk(backbone, chunk, scales, batch, forward_batch)
            _write_chunk(folder, c, q, want)
            done += len(want)
            rate = done / (time.perf_counter() - t0)
            log.info(
                "%s %s/%s: %d/%d samples (%.0f/s)",
                m.source_model,
                dataset,
                split,
                min(start + CHUNK, n),
                n,
                rate,
            )
        qs.append(q)
        idxs.append(want)
        ys.append(np.asarray([records[i].label for i in want], np.int64))
    from fedmobillm.device_runtime.serde import dequantize

    q_all = np.concatenate(qs)  # (N, K, d) int8
    return Activations(
        x=dequantize(q_all, scales),  # (N, K, d) float32
        y=np.concatenate(ys),
        index=np.concatenate(idxs).astype(np.int64),
        scales=scales,
        architecture=m.architecture,
        taps=list(m.taps),
        depth=int(m.depth),
        hidden=int(m.hidden_size),
        bundle_sha256=digest,
    )


def _compute_chunk(
    backbone: Any, records: list[Any], scales: np.ndarray, batch: int, forward_batch: int
) -> np.ndarray:
    from fedmobillm.device_runtime.serde import quantize_int8

    out = []
    for s in range(0, len(records), batch):
        texts = [r.text for r in records[s : s + batch]]
        taps = backbone(texts, forward_batch)  # (b, K, d) float32
        out.append(quantize_int8(taps, scales))  # (b, K, d) int8, as uploaded
    return np.concatenate(out)  # (n, K, d)


def _cache_folder(digest: str, dataset: str, seed: int, split: str) -> Path:
    from fedmobillm.paths import cache_dir

    raw = json.dumps([CACHE_VERSION, digest, dataset, seed, split])
    return cache_dir() / "activations" / hashlib.sha256(raw.encode()).hexdigest()[:16]


def _chunk_path(folder: Path, c: int) -> Path:
    return folder / f"chunk-{c:05d}.safetensors"


def _read_chunk(folder: Path, c: int, want: np.ndarray) -> np.ndarray | None:
    from safetensors.numpy import load_file

    path = _chunk_path(folder, c)
    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
    except Exception as exc:  # a torn or foreign file: recompute it
        log.warning("ignoring unreadable cache chunk %s: %s", path, exc)
        return None
    index = t.get("index")
    if index is None or len(index) < len(want):
        return None  # a shorter (earlier, smaller) extraction: extend it
    if not np.array_equal(index[: len(want)], want):
        log.warning("cache chunk %s holds other records; recomputing", path)
        return None
    return t["q"][: len(want)]


def _write_chunk(folder: Path, c: int, q: np.ndarray, want: np.ndarray) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".chunk-{c:05d}.{uuid.uuid4().hex[:8]}.tmp"
    save_file({"q": np.ascontiguousarray(q), "index": want.astype(np.int64)}, str(tmp))
    os.replace(tmp, _chunk_path(folder, c))
