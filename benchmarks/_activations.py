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
from collections.abc import Callable, Iterator
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
    # "auto": the model's own pivot (one vector per tap); "none": taps at every token
    pivot: str = "auto"

    def key(self) -> str:
        raw = [self.model, self.num_taps, self.quant, self.max_seq_len, self.formats]
        if self.pivot != "auto":  # keeps the keys of the bundles cached before pivots
            raw.append(self.pivot)
        return hashlib.sha256(json.dumps(raw).encode()).hexdigest()[:16]


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
    if bundle_is_current(out, spec.model, spec.pivot):
        return out
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    log.info(
        "exporting %s (taps %d, %s, seq %d, pivot %s) ...",
        spec.model,
        spec.num_taps,
        spec.quant,
        spec.max_seq_len,
        spec.pivot,
    )
    export_bundle(
        spec.model,
        out,
        num_taps=spec.num_taps,
        quant=spec.quant,
        formats=spec.formats,
        max_seq_len=spec.max_seq_len,
        pivot=spec.pivot,
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
    from fedmobillm.device_runtime.backbone import Backbone

    backbone = Backbone(bundle_dir, backend="onnx", threads=threads)
    m = backbone.manifest
    bundle = bundle_fields(m)
    records, n = _split_records(dataset, split, seed, limit)
    folder = _cache_folder(bundle["bundle_sha256"], dataset, seed, split)
    scales = np.asarray(m.activation_scales, np.float32)  # (K,)
    qs, ys, idxs = [], [], []
    chunks = _cached_chunks(
        split_order(len(records), seed)[:n],
        read=lambda c, want: _read_chunk(folder, c, want),
        compute=lambda want: _compute_chunk(
            backbone, [records[i] for i in want], scales, batch, forward_batch
        ),
        write=lambda c, q, want: _write_chunk(folder, c, q, want),
        label=f"{m.source_model} {dataset}/{split}:",
        decimals=0,
    )
    for want, q in chunks:
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
        **bundle,
    )


def bundle_fields(manifest: Any) -> dict[str, Any]:
    """What ``Activations`` and ``TokenActivations`` keep of the bundle that made them, as
    the server knows it from the device's manifest: architecture, taps, depth, hidden and
    the bundle's digest (``bundle_sha256``)."""
    from fedmobillm.device_runtime.protocol import bundle_digest

    return {
        "architecture": manifest.architecture,
        "taps": list(manifest.taps),
        "depth": int(manifest.depth),
        "hidden": int(manifest.hidden_size),
        "bundle_sha256": bundle_digest(manifest),
    }


def _split_records(dataset: str, split: str, seed: int, limit: int | None) -> tuple[list[Any], int]:
    """The records of ``split`` of ``dataset`` (seed ``seed``) and how many of them to
    extract (``limit``, at most all); an empty split is refused."""
    from fedmobillm.data import load_dataset

    records = load_dataset(dataset, seed=seed).splits[split]
    if not records:
        raise FedMobiLLMError(f"data set {dataset} has an empty {split} split")
    return records, len(records) if limit is None else min(limit, len(records))


def _cached_chunks(
    order: np.ndarray,
    read: Callable[[int, np.ndarray], Any],
    compute: Callable[[np.ndarray], Any],
    write: Callable[[int, Any, np.ndarray], None],
    label: str,
    decimals: int,
) -> Iterator[tuple[np.ndarray, Any]]:
    """(rows, what they hold) per chunk of ``CHUNK`` rows of ``order``: ``read`` from chunk
    c of the cache, else ``compute``d, ``write``n to the cache and the rate logged (a line
    starting with ``label``, samples/s with ``decimals`` decimals)."""
    n = len(order)
    t0, done = time.perf_counter(), 0
    for c, start in enumerate(range(0, n, CHUNK)):
        want = order[start : min(start + CHUNK, n)]  # (n_c,)
        got = read(c, want)
        if got is None:
            got = compute(want)
            write(c, got, want)
            done += len(want)
            rate = done / (time.perf_counter() - t0)
            log.info("%s %d/%d samples (%.*f/s)", label, min(start + CHUNK, n), n, decimals, rate)
        yield want, got


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


def _load_chunk(
    folder: Path, c: int, want: np.ndarray, needs: tuple[str, ...] = ()
) -> dict[str, np.ndarray] | None:
    """Chunk ``c``'s tensors where its records start with ``want`` (in that order) and it
    has every tensor in ``needs``; None where the chunk must be computed (missing,
    unreadable, shorter, of another kind, or of other records)."""
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
    if index is None or any(t.get(k) is None for k in needs) or len(index) < len(want):
        return None  # a shorter (earlier, smaller) extraction: extend it
    if not np.array_equal(index[: len(want)], want):
        log.warning("cache chunk %s holds other records; recomputing", path)
        return None
    return t


def _save_chunk(folder: Path, c: int, tensors: dict[str, np.ndarray], want: np.ndarray) -> None:
    """Chunk ``c`` of ``folder``: ``tensors`` and the records' ``index`` (``want``), written
    whole or not at all."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".chunk-{c:05d}.{uuid.uuid4().hex[:8]}.tmp"
    save_file({**tensors, "index": want.astype(np.int64)}, str(tmp))
    os.replace(tmp, _chunk_path(folder, c))


def _read_chunk(folder: Path, c: int, want: np.ndarray) -> np.ndarray | None:
    t = _load_chunk(folder, c, want)
    return None if t is None else t["q"][: len(want)]


def _write_chunk(folder: Path, c: int, q: np.ndarray, want: np.ndarray) -> None:
    _save_chunk(folder, c, {"q": np.ascontiguousarray(q)}, want)


# -- token taps (pivot "none") ----------------------------------------------------------


@dataclass
class TokenActivations:
    """One split through a token bundle (``pivot="none"``), kept as devices upload it:
    int8 with per-tap scales, each sample unpadded (its ``lengths[i]`` real tokens).

    ``q`` stacks the samples' tokens: rows ``offsets[i]:offsets[i+1]`` are sample i's
    ``(L_i, K, d)``; ``batch`` pads and dequantizes a mini-batch as the server does."""

    q: np.ndarray  # (sum L, K, d) int8
    lengths: np.ndarray  # (N,) int64, real tokens per sample (1..max_seq_len)
    y: np.ndarray  # (N,) int64
    index: np.ndarray  # (N,) int64: position of each sample in the data set's split
    scales: np.ndarray  # (K,) float32
    architecture: str
    taps: list[int]
    depth: int
    hidden: int
    bundle_sha256: str
    bits: int = 8  # bits per value on the wire (int8 as uploaded; 4 for the int4 option)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)  # (N + 1,)

    def __len__(self) -> int:
        return int(len(self.lengths))

    def subset(self, rows: np.ndarray) -> TokenActivations:
        """The samples ``rows`` (any order), as a new compact split."""
        rows = np.asarray(rows, np.int64)
        off = self.offsets
        parts = [self.q[off[i] : off[i + 1]] for i in rows]
        q = np.concatenate(parts) if parts else self.q[:0]
        return dataclasses.replace(
            self, q=q, lengths=self.lengths[rows], y=self.y[rows], index=self.index[rows]
        )

    def samples(self, rows: np.ndarray) -> list[np.ndarray]:
        """int8 ``(K, L_i, d)`` of each of ``rows``, as stored."""
        off = self.offsets
        return [self.q[off[i] : off[i + 1]].transpose(1, 0, 2) for i in np.asarray(rows)]

    def batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dequantized, zero-padded ``x`` (n, K, T, d) float32 and ``mask`` (n, T) int64,
        T = the longest of ``rows``."""
        rows = np.asarray(rows, np.int64)
        lengths = self.lengths[rows]
        t = int(lengths.max()) if len(rows) else 1
        k, d = self.q.shape[1], self.q.shape[2]
        x = np.zeros((len(rows), k, t, d), np.float32)
        off = self.offsets
        s = self.scales.reshape(k, 1)  # (K, 1)
        for j, i in enumerate(rows):
            seg = self.q[off[i] : off[i + 1]].astype(np.float32)  # (L, K, d)
            x[j, :, : lengths[j]] = seg.transpose(1, 0, 2) * s[:, None]
        mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)  # (n, T)
        return x, mask

    def bytes_per_sample(self) -> float:
        """Mean upload bytes per sample: K * mean(L) * d at int8 (``bits`` / 8 per value)."""
        return float(self.q.shape[1] * self.q.shape[2] * np.mean(self.lengths) * self.bits / 8)


def token_taps(backbone: Any, texts: list[str], forward_batch: int) -> list[np.ndarray]:
    """float32 ``(K, L_i, d)`` per text: the bundle's token taps at each real token,
    forwarded ``forward_batch`` at a time in order of token length as a device does
    (``Backbone.forward_tokens`` where the device runtime has it)."""
    if hasattr(backbone, "forward_tokens"):
        x, lengths = backbone.forward_tokens(texts, forward_batch)  # (B, K, T, d), (B,)
        return [x[i, :, : int(lengths[i])] for i in range(len(texts))]
    from fedmobillm.device_runtime.backbone import MIN_SEQ, forward_passes

    ids, mask = backbone.encode(texts)  # (B, S)
    lengths = mask.sum(axis=1)  # (B,)
    out: list[np.ndarray] = [np.empty(0)] * len(texts)
    for rows in forward_passes(lengths, forward_batch):
        width = max(MIN_SEQ, int(lengths[rows].max()))
        feed = {"input_ids": ids[rows, :width], "attention_mask": mask[rows, :width]}
        (taps,) = backbone._forward_graph.run(feed)  # (b, K, width, d)
        for j, i in enumerate(rows):
            out[i] = np.asarray(taps[j, :, : int(lengths[i])], np.float32)
    return out


def extract_tokens(
    bundle_dir: Path,
    dataset: str,
    split: str,
    limit: int | None = None,
    *,
    seed: int = 0,
    batch: int = 32,
    forward_batch: int = FORWARD_BATCH,
    threads: int | None = None,
) -> TokenActivations:
    """Token taps of the first ``limit`` records (in ``split_order``) of ``split`` through a
    ``pivot="none"`` bundle, int8 per tap with the manifest's scales as devices upload them.
    Cached like ``extract`` (chunks of ``CHUNK`` records, prefix-compatible)."""
    from fedmobillm.device_runtime.backbone import Backbone

    backbone = Backbone(bundle_dir, backend="onnx", threads=threads)
    m = backbone.manifest
    if m.pivot != "none":
        raise FedMobiLLMError(
            f"bundle {bundle_dir} has pivot {m.pivot!r}: token taps need a pivot none bundle",
            hint='export it with BundleSpec(..., pivot="none")',
        )
    bundle = bundle_fields(m)
    records, n = _split_records(dataset, split, seed, limit)
    folder = _cache_folder(bundle["bundle_sha256"], dataset, seed, split)
    scales = np.asarray(m.activation_scales, np.float32)  # (K,)
    qs, ls, ys, idxs = [], [], [], []
    chunks = _cached_chunks(
        split_order(len(records), seed)[:n],
        read=lambda c, want: _read_token_chunk(folder, c, want),
        compute=lambda want: _token_chunk(
            backbone, [records[i] for i in want], scales, batch, forward_batch
        ),
        write=lambda c, got, want: _write_token_chunk(folder, c, got, want),
        label=f"{m.source_model} {dataset}/{split} tokens:",
        decimals=1,
    )
    for want, got in chunks:
        qs.append(got[0])
        ls.append(got[1])
        idxs.append(want)
        ys.append(np.asarray([records[i].label for i in want], np.int64))
    return TokenActivations(
        q=np.concatenate(qs),
        lengths=np.concatenate(ls).astype(np.int64),
        y=np.concatenate(ys),
        index=np.concatenate(idxs).astype(np.int64),
        scales=scales,
        **bundle,
    )


def _token_chunk(
    backbone: Any, records: list[Any], scales: np.ndarray, batch: int, forward_batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """(q (sum L, K, d) int8, lengths (n,)) of ``records``, upload batch by upload batch."""
    from fedmobillm.device_runtime.serde import quantize_int8

    qs, lengths = [], []
    for s in range(0, len(records), batch):
        for taps in token_taps(backbone, [r.text for r in records[s : s + batch]], forward_batch):
            q = quantize_int8(taps[None], scales)[0]  # (K, L, d) int8, as uploaded
            qs.append(q.transpose(1, 0, 2))  # (L, K, d)
            lengths.append(q.shape[1])
    return np.ascontiguousarray(np.concatenate(qs)), np.asarray(lengths, np.int64)


def _read_token_chunk(
    folder: Path, c: int, want: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    t = _load_chunk(folder, c, want, needs=("lengths",))  # a pivot chunk has no lengths
    if t is None:
        return None
    lengths = t["lengths"][: len(want)]
    return t["q"][: int(lengths.sum())], lengths


def _write_token_chunk(
    folder: Path, c: int, got: tuple[np.ndarray, np.ndarray], want: np.ndarray
) -> None:
    _save_chunk(folder, c, {"q": got[0], "lengths": got[1]}, want)


def main(argv: list[str] | None = None) -> int:
    """Build the benchmark bundles and fill the activation cache ahead of a run:
    ``python -m benchmarks._activations --models minilm-l6,smollm2-135m --pivot none``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks._activations", description=main.__doc__)
    p.add_argument("--models", default="minilm-l6,smollm2-135m,minilm-l3")
    p.add_argument("--pivot", default="none", choices=("auto", "none"))
    p.add_argument("--dataset", default="movie-snippets")
    p.add_argument("--splits", default="validation:500,test,train:6000,validation,train")
    p.add_argument("--taps", type=int, default=3)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fn = extract_tokens if a.pivot == "none" else extract
    for model in a.models.split(","):
        spec = BundleSpec(model, a.taps, "int8", a.max_seq_len, pivot=a.pivot)
        bundle = bundle_for(spec)
        for item in a.splits.split(","):
            split, _, lim = item.partition(":")
            t0 = time.perf_counter()
            got = fn(bundle, a.dataset, split, int(lim) if lim else None, threads=a.threads)
            log.info(
                "%s %s: %d samples in %.0f s", model, item, len(got.y), time.perf_counter() - t0
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
