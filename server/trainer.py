"""The trainer thread: runs beside ingest, samples balanced mini-batches from everything
acknowledged so far, steps the ``SideTrainer``, evaluates, checkpoints, exports personal
models.

Checkpoints: ``<data>/checkpoints/step-000000123/`` (side.safetensors + side.json +
trainer.json), built in a temporary folder, fsynced and renamed into place; ``LATEST``
(a JSON pointer, replaced atomically) names the newest. The last two are kept. After a
crash the trainer resumes from ``LATEST`` (or the newest complete folder).

Every cached sample stays as uploaded (``server/compact.py``): a pivot device's training
samples in a ``PivotStream`` (int8 (n, K, d) + per-tap scales, or fp16), validation and
anchor rows as ``PivotSample``; a token sample as a ``TokenSample`` (int8 or float16 (K, L_i,
d), plus the per-tap scales of int8). They are dequantized only when drawn: a mini-batch,
an anchor batch, each validation chunk (a token chunk padded to its own longest sample with
``side.pad_tokens``, and the mask goes with it).

Memory (``trainer_memory_mb``): past the cap the cache keeps a uniform random subset of each
(architecture, device) stream and of each architecture's validation rows (reservoir sampling,
``compact.Reservoir``); every stream gets an equal share of the bytes (validation
VALIDATION_SHARE of them; anchors, bounded by the anchor set, are all kept), so the sampler
still draws every device, architecture and anchor. The rest stays in the store. Status and the
log say how many samples the cache holds against the store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmobillm.device_runtime.files import fsync_dir, write_atomic
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.checks import FP16_RANGE
from fedmobillm.server.compact import (
    SAMPLE_OVERHEAD,
    TOKEN_OBJECT_BYTES,
    FillStream,
    PivotSample,
    PivotStream,
    Reservoir,
    dense,
    screen_pivot,
)
from fedmobillm.server.personal import publish_folder
from fedmobillm.server.policies import balanced_sample, label_distribution, should_idle
from fedmobillm.server.service import QUARANTINE_AFTER
from fedmobillm.server.settings import ServerSettings
from fedmobillm.server.side import NonFiniteStep, SideConfig, SideTrainer, pad_tokens
from fedmobillm.server.store import (
    SampleRows,
    Store,
    TrainerSlotTaken,
    dequantize_sample,
    is_transient,
    open_store,
)

log = logging.getLogger(__name__)

LATEST = "LATEST"
TRAINER_STATE = "trainer.json"
KEEP_CHECKPOINTS = 2
HISTORY_LIMIT = 1000
# The best-validation snapshot is re-baselined once the training set has grown by this
# fraction since it was taken (see Trainer._keep_best)
REBASE_GROWTH = 0.1
QUARANTINE_POLL_S = 1.0
# backoff of the trainer's retries on a transient database error (seconds)
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0
RETRY_GIVE_UP_S = 600.0  # continuous database failure after which the trainer stops
# Token samples per forward when evaluating (each chunk padded to its own longest sample)
EVAL_CHUNK = 128
# Pivot samples dequantized per forward when evaluating or blaming
PIVOT_CHUNK = 1024
# Store rows per read; a refresh reads pages until caught up or REFRESH_BUDGET_S is spent
PAGE_ROWS = 10_000
REFRESH_BUDGET_S = 2.0
# The share of trainer_memory_mb for validation rows (split equally across architectures)
VALIDATION_SHARE = 0.2
# Seconds between two log lines about the cache's subset
CACHE_LOG_EVERY_S = 30.0
# The sampled read-back of a restart on a store larger than the cap (TrainingCache._plan_fill):
# rows of its first round (training can start once they are in), of each later round; a fill
# of more than FILL_EAGER_ROWS rows returns after its first round and then tops up for at most
# FILL_SLICE_S per refresh, between training steps (a smaller one completes within a refresh)
FIRST_ROWS = 2_048
ROUND_ROWS = 8_192
FILL_EAGER_ROWS = 20_000
FILL_SLICE_S = 0.25


@dataclass(slots=True)
class TokenSample:
    """One cached token sample, as uploaded: q (K, L, d) int8 or float16; scales (K,)
    float32 for int8 (None for fp16). Dequantized only when drawn."""

    q: np.ndarray
    scales: np.ndarray | None
    ids: np.ndarray | None = None  # lm: (L,) int64 token ids
    loss_mask: np.ndarray | None = None  # lm: (L,) uint8, 1 = a next-token target

    @property
    def tokens(self) -> int:
        return int(self.q.shape[1])

    def dequantized(self) -> np.ndarray:
        """float32 (K, L, d)."""
        return dequantize_sample(self.q, self.scales)


def collate_tokens(samples: Any) -> tuple[np.ndarray, np.ndarray]:
    """TokenSamples -> x float32 (N, K, T, d) zero-padded to the longest, mask (N, T) int64."""
    return pad_tokens([s.dequantized() for s in samples])


def collate_lm(samples: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """lm TokenSamples -> x float32 (N, K, T, d) and mask (N, T) as ``collate_tokens``, token
    ids (N, T) int64 and loss mask (N, T) int64, 0 at padding."""
    x, mask = collate_tokens(samples)
    ids, lmask = np.zeros(mask.shape, np.int64), np.zeros(mask.shape, np.int64)
    for i, s in enumerate(samples):
        ids[i, : len(s.ids)] = s.ids
        lmask[i, : len(s.loss_mask)] = s.loss_mask
    return x, mask, ids, lmask


@dataclass
class ArchData:
    """Cached samples of one architecture: train per device, validation pooled."""

    taps: list[int]
    depth: int
    hidden: int
    tokens: bool = False  # token samples (TokenSample) instead of pivot samples
    manifest: dict[str, Any] = field(default_factory=dict)  # of its first device's bundle
    vocab: int = 0  # lm: the vocabulary size registration recorded (0: none / classify)
    bundle_sha256s: set[str] = field(default_factory=set)
    encodings: set[str] = field(default_factory=set)  # of the uploads: int8 / fp16
    byte_hint: float = 0.0  # stored bytes of a sample as the store says, before any is read
    # device -> its samples: a PivotStream (pivot), a list of TokenSamples (tokens), or a list
    # of float32 (K, d) arrays (what the benchmarks' simulated clock puts here)
    train_x: dict[str, Any] = field(default_factory=dict)
    train_y: dict[str, list[int]] = field(default_factory=dict)
    val_x: list[Any] = field(default_factory=list)  # PivotSample / TokenSample / (K, d)
    val_y: list[int] = field(default_factory=list)
    val_from: list[str] = field(default_factory=list)  # the device of each validation row
    val_version: int = 0  # bumped on every change of the validation rows (caches key on it)
    # anchor id -> PivotSample (K, d) (or TokenSample): the public anchor texts through it
    anchor_x: dict[int, Any] = field(default_factory=dict)
    anchor_from: dict[int, str] = field(default_factory=dict)  # anchor id -> device
    # what was cached: samples, their real tokens and their stored (= uploaded) bytes
    rows: int = 0
    token_sum: int = 0
    byte_sum: int = 0
    _stacked: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def device_arrays(self, device: str) -> tuple[Any, np.ndarray]:
        """(x, y (n,)): x a PivotStream (``x[idx]`` dequantizes to float32 (len(idx), K, d)),
        float32 (n, K, d) for a list of arrays, or for token samples an object array (n,) of
        TokenSamples (indexable like x; ``collate_tokens`` turns a draw into arrays)."""
        xs = self.train_x[device]
        if isinstance(xs, PivotStream):
            return xs, xs.labels_array()
        cached = self._stacked.get(device)
        if cached is None or len(cached[1]) != len(xs):
            if self.tokens:
                x = np.empty(len(xs), dtype=object)
                x[:] = xs
            else:
                x = np.stack(xs)  # (n, K, d)
            cached = (x, np.asarray(self.train_y[device], np.int64))
            self._stacked[device] = cached
        return cached

    def sample_bytes(self) -> float:
        """Mean bytes one held sample of this architecture costs (values, scales, label)."""
        values = self.byte_sum / self.rows if self.rows else self.byte_hint
        extra = 4 * len(self.taps) + SAMPLE_OVERHEAD + (TOKEN_OBJECT_BYTES if self.tokens else 0)
        return values + extra

    def count(self, q: np.ndarray, tokens: int | None) -> None:
        self.rows += 1
        self.token_sum += tokens or 0
        self.byte_sum += int(q.nbytes)

    def upload_stats(self) -> dict[str, float | None]:
        """Mean real tokens (None for pivot samples) and stored bytes per cached sample."""
        n = max(self.rows, 1)
        return {
            "tokens_per_sample": self.token_sum / n if self.tokens and self.rows else None,
            "bytes_per_sample": self.byte_sum / n if self.rows else None,
        }

    @property
    def num_train(self) -> int:
        return sum(len(v) for v in list(self.train_y.values()))


# (arch, device, split, sample id, label, x): one cached sample; x float32 (K, d), or a
# TokenSample in a token federation
Row = tuple[str, str, str, int, int, Any]


class TrainingCache:
    """What was acknowledged, read incrementally from the store (row id watermark), held
    as uploaded; with ``memory_mb`` > 0 a uniform random subset per stream within that many
    MB (see the module docstring).

    Never trusts the store: a row whose values its device's bundle cannot produce (non-finite,
    or beyond ``checks.FP16_RANGE`` x the tap's int8 clip, e.g. stored before uploads were
    checked) is dropped and counted in ``dropped`` / ``offences``; the samples of quarantined
    devices are held out of training until released; those of devices whose data was
    deleted (revocation with deletion) are dropped for good. ``inputs``: the federation's
    kind ("pivot" | "tokens"); a stored row of the other kind is skipped with a warning.
    ``task`` "lm": token samples carry their ids and loss mask (TokenSample), are training
    data without a label, and a row whose ids reach past its architecture's vocabulary is
    dropped as impossible.

    Restart over the cap (``sampled_restart``, on by default): the first refresh of a capped
    cache on a store larger than the cap does not read the store back; it takes each stream's
    share from the store's fixed pseudo-random order (``store_sql.SAMPLE_ORDER``, an index:
    O(cap) rows and index entries, whatever the store holds), fetched by row id, screened as
    every row is, and tops it up round by round (``_plan_fill``); rows stored later are read
    from the horizon on as before, once the fill is done. ``rows_fetched`` counts the store
    rows fetched with their activations, either way."""

    def __init__(
        self, inputs: str = "pivot", memory_mb: float = 0.0, seed: int = 0, task: str = "classify"
    ) -> None:
        self.tokens = inputs == "tokens"
        self.lm = task == "lm"
        self.cap_bytes = int(memory_mb * 2**20) if memory_mb > 0 else None
        self.reservoir = Reservoir(seed)
        self._quotas: dict[tuple[str, str], int] | None = None  # (arch, split) -> samples
        self._val_archs: set[str] = set()
        self.held_bytes = 0  # bytes the cached samples take (as of the last refresh)
        self._capped = False  # the cache has reached cap_bytes once: per-stream shares apply
        self._logged = 0.0
        self.archs: dict[str, ArchData] = {}
        self.watermark = 0
        self._known_devices: set[str] = set()
        self._bounds: dict[str, np.ndarray] = {}  # device -> (K, 1) largest |value| per tap
        # (key, ids): the shared anchor ids, recomputed only when the key changes
        self._common: tuple[tuple, list[int]] = ((), [])
        self.quarantined: set[str] = set()
        self.held: dict[str, list[Row]] = {}  # quarantined device -> its rows
        self.deleted: set[str] = set()  # devices whose data was deleted: never cached again
        self.dropped: dict[str, int] = {}  # device -> rows dropped as impossible
        self.offences: dict[str, str] = {}  # device -> reason, for the trainer to record
        self.mismatched = 0  # rows of the other input kind, skipped
        self.rows_read = 0  # store rows read so far (cached, held, dropped or skipped)
        # (a sampled read-back counts every row at or before its horizon as read)
        self.rows_fetched = 0  # store rows fetched with their activations
        self.sampled_restart = True  # False: the first refresh reads everything (as before)
        self.horizon: int | None = None  # the sampled read-back's cursor (None: none)
        self.fill_seconds: float | None = None  # how long the sampled read-back took
        self._planned = False
        self._fill: list[FillStream] | None = None  # the read-back's streams while it lasts
        self._fill_rounds = 0
        self._fill_eager = False
        self._fill_t0 = 0.0
        self._skipped: set[str] = set()  # quarantined at the plan: sampled once released
        self._paused: dict[str, list[FillStream]] = {}  # quarantined during the fill
        self._replan: set[str] = set()  # released, to be sampled at the next refresh

    def refresh(self, store: Store, budget_s: float = REFRESH_BUDGET_S) -> int:
        """Pull new rows, a page of PAGE_ROWS at a time until caught up or ``budget_s`` is
        spent; returns how many labelled training and anchor samples arrived. The first
        refresh may sample the store instead (``_plan_fill``); while that fill lasts, a
        refresh tops it up (``_fill_step``) and returns."""
        new, t0 = 0, time.monotonic()
        if not self._planned:
            self._plan_fill(store)
            self._planned = True
        if self._replan:
            self._plan_released(store)
        if self._fill is not None:
            new = self._fill_step(store, t0, budget_s)
            if self._fill is not None:
                return new
        while True:
            rows = store.read_samples(self.watermark, PAGE_ROWS)
            if len(rows.ids) == 0:
                break
            got = self._take(store, rows)
            if got:
                self._enforce()  # per page: a refresh never holds more than a page too many
            new += got
            if len(rows.ids) < PAGE_ROWS or time.monotonic() - t0 > budget_s:
                break
        return new

    # -- sampled read-back (a restart on a store larger than the cap) -----------------------

    @property
    def filling(self) -> bool:
        """Whether a sampled read-back is still topping the cache up."""
        return self._fill is not None

    def _plan_fill(self, store: Store) -> None:
        """How the first refresh reads the store: all of it (no cap, ``sampled_restart``
        off, or a store whose samples fit in the cap: as before), else a sample of it
        (``_start_fill``). The store's rows up to now count as read (``rows_read``)."""
        if self.cap_bytes is None or not self.sampled_restart or self.watermark:
            return
        horizon = store.sample_horizon()
        counts = store.sample_counts()  # (device, arch, split, n); read after the horizon
        deleted, quarantined = store.data_deleted(), store.quarantined()
        self._ensure_archs(store)
        live = sorted(c for c in counts if c[0] not in deleted and c[1] in self.archs and c[3])
        estimate = self._estimate_bytes(store, [c for c in live if c[0] not in quarantined])
        if estimate <= self.cap_bytes:
            return
        self.set_deleted(deleted)
        self.set_quarantined(quarantined)
        self._start_fill(store, horizon, live)
        self.rows_read += sum(int(c[3]) for c in counts)
        self.watermark = horizon
        log.info(
            "trainer cache: the store's %d samples (~%.0f MB held) exceed the cap of %.0f MB: "
            "sampling each stream's share of them instead of reading them all",
            sum(int(c[3]) for c in live),
            estimate / 2**20,
            self.cap_bytes / 2**20,
        )

    def _estimate_bytes(self, store: Store, live: list[tuple]) -> float:
        """Bytes the cache would hold for all of ``live`` (device, arch, split, n): each
        architecture's stored bytes per sample from a few rows of one of its devices
        (``ArchData.byte_hint``), plus what holding one costs."""
        for device, arch, _, _ in live:
            a = self.archs[arch]
            if not a.byte_hint and not a.rows:
                a.byte_hint = store.stored_bytes(device) or 0.0
        return sum(int(n) * self.archs[arch].sample_bytes() for _, arch, _, n in live)

    def _stream(self, arch: str, device: str) -> None:
        """Make the (empty) training stream of (arch, device) if it is not there."""
        a = self.archs[arch]
        if device not in a.train_x:
            xs = [] if self.tokens else PivotStream(len(a.taps), a.hidden)
            a.train_x[device] = xs
            a.train_y[device] = xs.labels if isinstance(xs, PivotStream) else []
            self._quotas = None

    def _start_fill(self, store: Store, horizon: int, live: list[tuple]) -> None:
        """Sample the store's rows at or before ``horizon``: every training stream made at
        once (so the shares are known from the start), then each stream's first ids in the
        store's order read off the index; validation in proportion to each device's rows;
        anchors all taken (one row per anchor id and architecture). Quarantined devices wait
        for their release (``_plan_released``)."""
        self.horizon = horizon
        rows = [c for c in live if c[0] not in self.quarantined]
        self._skipped |= {c[0] for c in live} - {c[0] for c in rows}
        val_n: dict[str, int] = {}  # arch -> its validation rows
        for device, arch, split, n in rows:
            if split == "train":
                self._stream(arch, device)
                self.reservoir.seen[(arch, device)] = int(n)  # the population it samples
            elif split == "validation":
                self._val_archs.add(arch)
                val_n[arch] = val_n.get(arch, 0) + int(n)
        for arch, n in val_n.items():
            self.reservoir.seen[(arch, "validation")] = n
        self._capped, self._quotas = True, None
        quotas = self._quotas = self._compute_quotas()
        streams: list[FillStream] = []
        anchors: dict[str, dict[int, int]] = {}  # arch -> anchor id -> its newest row id
        for device, arch, split, n in rows:
            if split == "anchor":
                ids, sids = store.stream_ids(device, "anchor", horizon)
                by_sid = anchors.setdefault(arch, {})
                for i, sid in zip(ids.tolist(), sids.tolist(), strict=True):
                    by_sid[sid] = max(i, by_sid.get(sid, -1))
            elif split in ("train", "validation"):
                streams.append(self._fill_stream(store, arch, device, split, int(n), quotas))
        for arch, by_sid in sorted(anchors.items()):
            ids = np.sort(np.fromiter(by_sid.values(), np.int64, len(by_sid)))
            streams.append(FillStream(arch, "", "anchor", ids, more=False))
        for name, a in self.archs.items():
            for xs in a.train_x.values():
                if isinstance(xs, PivotStream):
                    xs.limit = quotas.get((name, "train"))
        self._fill, self._fill_rounds, self._fill_t0 = streams, 0, time.monotonic()
        want = sum(min(s.limit or quotas.get((s.arch, "train"), 1), len(s.ids)) for s in streams)
        self._fill_eager = want > FILL_EAGER_ROWS

    def _fill_stream(
        self,
        store: Store,
        arch: str,
        device: str,
        split: str,
        n: int,
        quotas: dict[tuple[str, str], int],
    ) -> FillStream:
        """The fill stream of one device's ``split`` rows (n of them): training up to the
        stream's quota, validation its part (n / the architecture's validation rows) of the
        validation quota; its first ids (the share and a margin) read off the index."""
        assert self.horizon is not None
        limit = None
        want = quotas.get((arch, "train"), 1)
        if split == "validation":
            total = self.reservoir.seen.get((arch, "validation"), n)
            want = limit = max(1, -(-quotas.get((arch, "validation"), 1) * n // max(total, 1)))
        k = min(n, want + want // 8 + 16)
        ids = store.stream_sample(device, split, self.horizon, k)
        return FillStream(arch, device, split, ids, more=len(ids) >= k, limit=limit)

    def _plan_released(self, store: Store) -> None:
        """Devices released since the plan: one quarantined during the fill gets its streams
        back (``_paused``); one quarantined at the plan (``_skipped``) has its rows sampled
        now (``_released_streams``; the fill starts again if it was done)."""
        devices, self._replan = sorted(self._replan), set()
        quotas = self._compute_quotas()
        streams: list[FillStream] = []
        for device in devices:
            d = store.device(device)
            if d is None or device in self.deleted or d.architecture not in self.archs:
                continue
            counts = store.device_samples(device)
            if device in self._paused:
                streams += self._paused.pop(device)
            elif device in self._skipped:
                self._skipped.discard(device)
                streams += self._released_streams(store, d.architecture, device, counts, quotas)
            # its rows at or before the horizon are the population its stream samples
            self.reservoir.seen[(d.architecture, device)] = int(counts.get("train", 0))
        if streams:
            self._fill = (self._fill or []) + streams
            self._fill_rounds = max(self._fill_rounds, 1)
            log.info("trainer cache: sampling the stored rows of released %s", devices)

    def _released_streams(
        self,
        store: Store,
        arch: str,
        device: str,
        counts: dict[str, int],
        quotas: dict[tuple[str, str], int],
    ) -> list[FillStream]:
        """The fill streams of a device quarantined at the plan: training (its own stream),
        validation (its part of the architecture's validation rows), the anchor ids the
        architecture does not hold yet."""
        assert self.horizon is not None
        out = []
        n = int(counts.get("train", 0))
        if n:
            self._stream(arch, device)
            out.append(self._fill_stream(store, arch, device, "train", n, quotas))
        n = int(counts.get("validation", 0))
        if n:
            key = (arch, "validation")
            self._val_archs.add(arch)
            self.reservoir.seen[key] = self.reservoir.seen.get(key, 0) + n
            out.append(self._fill_stream(store, arch, device, "validation", n, quotas))
        if counts.get("anchor"):
            ids, sids = store.stream_ids(device, "anchor", self.horizon)
            new = np.asarray([i not in self.archs[arch].anchor_x for i in sids.tolist()], bool)
            out.append(FillStream(arch, device, "anchor", ids[new], more=False))
        return out

    def _fill_step(self, store: Store, t0: float, budget_s: float) -> int:
        """Rounds of the fill until it is done or the budget is spent (an eager fill: after
        its first round, then FILL_SLICE_S at most); training and anchor samples cached."""
        slice_s = min(budget_s, FILL_SLICE_S) if self._fill_eager else budget_s
        new = 0
        while self._fill is not None:
            got, more = self._fill_round(store)
            new += got
            self._fill_rounds += 1
            if not more:
                self._finish_fill()
            elif (self._fill_eager and self._fill_rounds == 1) or time.monotonic() - t0 > slice_s:
                break
        return new

    def _fill_round(self, store: Store) -> tuple[int, bool]:
        """One round: every stream short of its share takes its next ids (anchors all of
        theirs; the others FIRST_ROWS, then ROUND_ROWS, in all, in proportion to what each
        lacks), fetched by row id, screened and cached. (samples cached, whether any stream
        lacked rows)."""
        assert self._fill is not None and self.horizon is not None
        quotas = self._quotas = self._compute_quotas()
        needs = [(f, n) for f in self._fill if not f.exhausted and (n := self._need(f, quotas)) > 0]
        if not needs:
            return 0, False
        budget = ROUND_ROWS if self._fill_rounds else FIRST_ROWS
        scale = min(1.0, budget / max(1, sum(n for f, n in needs if f.split != "anchor")))
        picked = [
            f.take(store, n if f.split == "anchor" else max(1, int(n * scale)), self.horizon)
            for f, n in needs
        ]
        ids = np.concatenate(picked)
        got = self._take(store, store.read_samples_by_id(ids), direct=True) if len(ids) else 0
        self._enforce()
        return got, True

    def _need(self, f: FillStream, quotas: dict[tuple[str, str], int]) -> int:
        """Rows fill stream ``f`` still lacks."""
        a = self.archs.get(f.arch)
        if a is None or f.device in self.deleted or f.device in self.quarantined:
            return 0
        if f.split == "anchor":
            return len(f.ids)
        if f.limit is not None:
            return f.limit - f.taken
        return quotas.get((f.arch, "train"), 1) - len(a.train_y.get(f.device, ()))

    def _finish_fill(self) -> None:
        self._fill = None
        self.fill_seconds = time.monotonic() - self._fill_t0
        log.info(
            "trainer cache: sampled read-back done in %.1f s: %d samples held (%.1f MB, cap "
            "%.0f MB) of the %d read, %d rows fetched; new samples are read from here on",
            self.fill_seconds,
            self.held_samples(),
            self.held_bytes / 2**20,
            (self.cap_bytes or 0) / 2**20,
            self.samples_read(),
            self.rows_fetched,
        )

    def _take(self, store: Store, rows: SampleRows, direct: bool = False) -> int:
        """Screen and cache one page of store rows (the range check for the page at once).
        A database error raises before anything is counted: the page is read again.
        ``direct``: rows of a sampled read-back, appended to their streams as they come (the
        sample is already uniform: no reservoir offer) and not moving the cursor."""
        if set(rows.device_ids) - self._known_devices:
            self._ensure_archs(store)
        ok = self._screen(rows)
        new, bad = 0, dict[str, int]()  # bad: device -> rows dropped
        labels = rows.labels.tolist()
        bulk: dict[tuple[str, str, Any], list[int]] = {}  # (arch, device, dtype) -> rows
        for i in range(len(rows.ids)):
            device = rows.device_ids[i]
            if ok[i] is None:
                continue
            if not ok[i]:
                bad[device] = bad.get(device, 0) + 1
                continue
            if self._bulk_row(rows, i, labels[i]):  # a pivot training row: cached per group
                key = (rows.architectures[i], device, rows.raw[i].dtype)
                bulk.setdefault(key, []).append(i)
                continue
            a = self.archs[rows.architectures[i]]
            a.encodings.add(rows.encodings[i])
            a.count(rows.raw[i], rows.tokens[i])
            if self.lm:
                x = TokenSample(rows.raw[i], rows.scales[i], *_lm_fields(rows, i))
            else:
                x = (TokenSample if self.tokens else PivotSample)(rows.raw[i], rows.scales[i])
            row = (rows.architectures[i], device, rows.splits[i], int(rows.sample_ids[i]))
            new += self._add((*row, int(rows.labels[i]), x), direct)
        for (arch, device, _), idx in bulk.items():
            new += self._keep_train_rows(arch, device, rows, idx, direct)
        for device, n in bad.items():
            self.dropped[device] = self.dropped.get(device, 0) + n
            self.offences[device] = f"{n} stored samples outside the bundle's range dropped"
            log.warning(
                "dropped %d stored samples of %s: values outside its bundle's range", n, device
            )
        self.rows_fetched += len(rows.ids)
        if not direct:
            self.watermark = rows.cursor  # SQLite: the last row id; PostgreSQL: see store_pg
            self.rows_read += len(rows.ids)
        return new

    def _screen(self, rows: SampleRows) -> list[bool | None]:
        """Per row: True (cache it), False (values outside its bundle's range) or None (not
        of this federation's kind: skipped, with a warning). Pivot rows are checked per
        (device, dtype) group in one vectorised pass (``compact.screen_pivot``)."""
        ok: list[bool | None] = [None] * len(rows.ids)
        groups: dict[tuple[str, Any], list[int]] = {}
        for i, tokens in enumerate(rows.tokens):
            if (tokens is not None) != self.tokens or (self.lm and _lm_fields(rows, i)[0] is None):
                self._mismatch(tokens is not None)
            elif tokens is None:
                groups.setdefault((rows.device_ids[i], rows.raw[i].dtype), []).append(i)
            else:
                x = dequantize_sample(rows.raw[i], rows.scales[i])  # (K, L, d)
                ok[i] = _within(x, self._bounds[rows.device_ids[i]]) and self._ids_ok(rows, i)
        for (device, _), idx in groups.items():
            good = screen_pivot(
                [rows.raw[i] for i in idx], [rows.scales[i] for i in idx], self._bounds[device]
            )
            for i, g in zip(idx, good.tolist(), strict=True):
                ok[i] = g
        return ok

    def _ids_ok(self, rows: SampleRows, i: int) -> bool | None:
        """lm: the row's token ids lie below its architecture's vocabulary (True otherwise);
        None (skipped with a warning, not an offence) when no vocabulary is on record."""
        if not self.lm:
            return True
        ids = _lm_fields(rows, i)[0]
        vocab = self.archs[rows.architectures[i]].vocab
        if not vocab:
            log.warning(
                "lm sample of %s skipped: architecture %s has no vocabulary size on record",
                rows.device_ids[i],
                rows.architectures[i],
            )
            return None
        return ids is not None and len(ids) > 0 and 0 <= int(ids.min()) and int(ids.max()) < vocab

    def _bulk_row(self, rows: SampleRows, i: int, label: int) -> bool:
        """Whether row i is a labelled pivot training row of a device neither quarantined
        nor deleted (cached with the others of its device by ``_keep_train_rows``)."""
        device = rows.device_ids[i]
        return (
            not self.tokens
            and label >= 0
            and rows.splits[i] == "train"
            and device not in self.quarantined
            and device not in self.deleted
        )

    def _keep_train_rows(
        self, arch: str, device: str, rows: SampleRows, idx: list[int], direct: bool = False
    ) -> int:
        """Offer m screened pivot training rows of one device and dtype to its stream at
        once (appends while under the quota, Algorithm R replacements past it; ``direct``:
        appends them all, a sampled read-back's rows); m."""
        a, m = self.archs[arch], len(idx)
        a.rows += m
        a.byte_sum += m * int(rows.raw[idx[0]].nbytes)
        a.encodings.update(rows.encodings[i] for i in idx)
        xs = a.train_x.get(device)
        if xs is None:
            xs = PivotStream(len(a.taps), a.hidden)
            a.train_x[device], a.train_y[device] = xs, xs.labels
            self._quotas = None  # one stream more: every share changes
            xs.limit = self._quota(arch, "train")
        ones = np.ones(len(a.taps), np.float32)
        q = np.stack([rows.raw[i] for i in idx])  # (m, K, d) int8 or float16
        sc = np.stack([ones if rows.scales[i] is None else rows.scales[i] for i in idx])  # (m, K)
        y = rows.labels[idx]  # (m,)
        take, at, slots = (
            (m, np.zeros(0, np.int64), np.zeros(0, np.int64))
            if direct
            else self.reservoir.offer_many((arch, device), len(xs), self._quota(arch, "train"), m)
        )
        xs.extend(q[:take], sc[:take], y[:take])
        if len(at):
            xs.put_many(slots, q[at], sc[at], y[at])
        a._stacked.pop(device, None)
        return m

    def _mismatch(self, token_row: bool) -> None:
        self.mismatched += 1
        if self.mismatched == 1:
            log.warning(
                "skipping stored %s samples: this server trains a %s federation",
                "token" if token_row else "pivot",
                "lm" if self.lm else "token" if self.tokens else "pivot",
            )

    def _add(self, row: Row, direct: bool = False) -> int:
        """Cache one row (held if its device is quarantined); 1 if it is new training data.
        ``direct``: a sampled read-back's row, appended without a reservoir offer."""
        arch, device, split, sid, y, x = row
        if device in self.deleted:
            return 0
        if device in self.quarantined:
            self.held.setdefault(device, []).append(row)
            return 0
        a = self.archs[arch]
        if split == "validation":
            self._keep_validation(a, arch, device, x, y, direct)
        elif split == "anchor":
            a.anchor_x[sid] = x
            a.anchor_from[sid] = device
            return 1  # wakes an idle trainer: the alignment has more to learn from
        elif y >= 0 or self.lm:  # an lm sample's targets are its own tokens (label -1)
            self._keep_train(a, arch, device, x, y, direct)
            return 1
        return 0

    def _keep_train(
        self, a: ArchData, arch: str, device: str, x: Any, y: int, direct: bool = False
    ) -> None:
        """Offer one training sample to its (arch, device) stream's reservoir (``direct``:
        append it)."""
        xs = a.train_x.get(device)
        if xs is None:
            xs = [] if self.tokens else PivotStream(len(a.taps), a.hidden)
            a.train_x[device] = xs
            a.train_y[device] = xs.labels if isinstance(xs, PivotStream) else []
            self._quotas = None  # one stream more: every share changes
            if isinstance(xs, PivotStream):
                xs.limit = self._quota(arch, "train")
        ys = a.train_y[device]
        quota = self._quota(arch, "train")
        slot = -1 if direct else self.reservoir.offer((arch, device), len(ys), quota)
        if slot is None:
            return
        a._stacked.pop(device, None)
        if isinstance(xs, PivotStream):
            if slot < 0:
                xs.append(x, y)
            else:
                xs.put(slot, x, y)
        elif slot < 0:
            xs.append(x)
            ys.append(y)
        else:
            xs[slot], ys[slot] = x, y

    def _keep_validation(
        self, a: ArchData, arch: str, device: str, x: Any, y: int, direct: bool = False
    ) -> None:
        """Offer one validation sample to its architecture's reservoir (``direct``: append
        it)."""
        if arch not in self._val_archs:
            self._val_archs.add(arch)
            self._quotas = None
        quota = self._quota(arch, "validation")
        slot = -1 if direct else self.reservoir.offer((arch, "validation"), len(a.val_y), quota)
        if slot is None:
            return
        if slot < 0:
            a.val_x.append(x)
            a.val_y.append(y)
            a.val_from.append(device)
        else:
            a.val_x[slot], a.val_y[slot], a.val_from[slot] = x, y, device
        a.val_version += 1

    def _quota(self, arch: str, split: str) -> int | None:
        """Samples one stream of ``arch`` may hold (None: no cap). Until the cache first
        reaches ``cap_bytes`` every sample is held (as without a cap); from then on, the
        shares (a uniform subset of everything seen per stream, kept so by the reservoir)."""
        if self.cap_bytes is None or not self._capped:
            return None
        if self._quotas is None:
            self._quotas = self._compute_quotas()
        return self._quotas.get((arch, split), 1)

    def _compute_quotas(self) -> dict[tuple[str, str], int]:
        """(arch, split) -> samples per stream: the cap less the anchors' bytes, validation
        VALIDATION_SHARE of it split across the architectures with validation rows, the rest
        split equally (in bytes) across the (architecture, device) training streams."""
        assert self.cap_bytes is not None
        anchors = sum(len(a.anchor_x) * a.sample_bytes() for a in self.archs.values())
        budget = max(self.cap_bytes - anchors, 0.0)
        val = VALIDATION_SHARE * budget if self._val_archs else 0.0
        streams = max(1, sum(len(a.train_x) for a in self.archs.values()))
        quotas = {}
        for arch, a in self.archs.items():
            per = a.sample_bytes()
            quotas[(arch, "train")] = max(1, int((budget - val) / streams / per))
            if arch in self._val_archs:
                quotas[(arch, "validation")] = max(1, int(val / len(self._val_archs) / per))
        return quotas

    def _enforce(self) -> None:
        """Recompute the shares and shrink every stream over its quota to a uniform random
        subset; update ``held_bytes``; say (log) how much of what was read is held."""
        if self.cap_bytes is not None and not self._capped:
            self._capped = self._held_bytes() > self.cap_bytes  # first reached: shares from now
        if self.cap_bytes is not None and self._capped:
            self._quotas = self._compute_quotas()
            for arch, a in self.archs.items():
                quota = self._quotas[(arch, "train")]
                for device, xs in list(a.train_x.items()):
                    if len(xs) > quota:
                        self._shrink(a, device, quota)
                    if isinstance(xs, PivotStream):
                        xs.limit = quota
                        xs.trim()
                vq = self._quotas.get((arch, "validation"))
                if vq is not None and len(a.val_y) > vq:
                    keep = self.reservoir.subset(len(a.val_y), vq).tolist()
                    a.val_x = [a.val_x[i] for i in keep]
                    a.val_y = [a.val_y[i] for i in keep]
                    a.val_from = [a.val_from[i] for i in keep]
                    a.val_version += 1
        self.held_bytes = self._held_bytes()
        held, read = self.held_samples(), self.samples_read()
        now = time.monotonic()
        if held < read and now - self._logged >= CACHE_LOG_EVERY_S:
            self._logged = now
            log.info(
                "trainer cache holds %d of the %d samples read (%.1f MB, cap %.0f MB); the "
                "rest stays in the store",
                held,
                read,
                self.held_bytes / 2**20,
                (self.cap_bytes or 0) / 2**20,
            )

    def _shrink(self, a: ArchData, device: str, quota: int) -> None:
        xs, ys = a.train_x[device], a.train_y[device]
        keep = self.reservoir.subset(len(ys), quota)
        a._stacked.pop(device, None)
        if isinstance(xs, PivotStream):
            xs.keep(keep)  # its labels list (= ys) follows
        else:
            xs[:] = [xs[i] for i in keep]
            ys[:] = [ys[i] for i in keep]

    def _held_bytes(self) -> int:
        total = 0.0
        for a in self.archs.values():
            for xs in a.train_x.values():
                total += xs.nbytes if isinstance(xs, PivotStream) else len(xs) * a.sample_bytes()
            total += (len(a.val_y) + len(a.anchor_x)) * a.sample_bytes()
        return int(total)

    def held_samples(self) -> int:
        """Training, validation and anchor samples the cache holds now."""
        archs = list(self.archs.values())  # status reads this while the trainer adds archs
        return sum(a.num_train + len(a.val_y) + len(a.anchor_x) for a in archs)

    def samples_read(self) -> int:
        """Samples of this federation's kind read and screened (held or not; dropped rows,
        rows of deleted devices and unlabelled training rows not counted)."""
        seen = sum(list(self.reservoir.seen.values()))
        return seen + sum(len(a.anchor_x) for a in list(self.archs.values()))

    def set_quarantined(self, devices: set[str]) -> None:
        """Hold the training and anchor samples of newly quarantined devices out of
        training; give released devices' samples back."""
        for device in sorted(devices - self.quarantined):
            self.quarantined.add(device)
            held = self.held.setdefault(device, [])
            for arch, a in self.archs.items():
                xs, ys = a.train_x.pop(device, []), a.train_y.pop(device, [])
                a._stacked.pop(device, None)
                self.reservoir.forget((arch, device))  # released rows are offered anew
                held += [(arch, device, "train", -1, y, x) for x, y in zip(xs, ys, strict=True)]
                for sid in [i for i, d in a.anchor_from.items() if d == device]:
                    held.append((arch, device, "anchor", sid, -1, a.anchor_x.pop(sid)))
                    del a.anchor_from[sid]
            self._quotas = None
            if self._fill is not None and any(f.device == device for f in self._fill):
                self._paused[device] = [f for f in self._fill if f.device == device]
                self._fill = [f for f in self._fill if f.device != device]
            log.warning("device %s quarantined: %d samples held out of training", device, len(held))
        for device in sorted(self.quarantined - devices):
            self.quarantined.discard(device)
            if device in self._paused or device in self._skipped:
                self._replan.add(device)  # its stored rows are sampled at the next refresh
            for row in self.held.pop(device, []):
                self._add(row)
            log.info("device %s released: its samples are back in training", device)

    def set_deleted(self, devices: set[str]) -> None:
        """Drop every cached sample (train, validation, anchor, held) of devices whose data
        was deleted from the store; rows of theirs read later are never cached."""
        for device in sorted(devices - self.deleted):
            self.deleted.add(device)
            n = len(self.held.pop(device, []))
            self._paused.pop(device, None)
            self._skipped.discard(device)
            self._replan.discard(device)
            if self._fill is not None:
                self._fill = [f for f in self._fill if f.device != device]
            self._quotas = None
            for arch, a in self.archs.items():
                n += len(a.train_y.pop(device, []))
                a.train_x.pop(device, None)
                a._stacked.pop(device, None)
                self.reservoir.forget((arch, device))
                keep = [i for i, d in enumerate(a.val_from) if d != device]
                n += len(a.val_from) - len(keep)
                a.val_x = [a.val_x[i] for i in keep]
                a.val_y = [a.val_y[i] for i in keep]
                a.val_from = [a.val_from[i] for i in keep]
                a.val_version += 1
                for sid in [i for i, d in a.anchor_from.items() if d == device]:
                    del a.anchor_x[sid], a.anchor_from[sid]
                    n += 1
            self._common = ((), [])  # anchors were removed: recompute the shared ids
            log.warning("device %s data deleted: %d cached samples dropped", device, n)

    def _ensure_archs(self, store: Store) -> None:
        """Learn the devices (and architectures) the store holds. A device becomes known
        only once its architecture is complete: an lm architecture's vocabulary is read
        first, so a database error in between leaves the device unknown (read again with
        the next page), and a vocabulary not on record (0) is read again, never used."""
        for d in store.devices():
            self._bounds[d.device_id] = value_bound(d.manifest)
            if d.architecture not in self.archs:
                m = d.manifest
                self.archs[d.architecture] = ArchData(
                    m["taps"], m["depth"], m["hidden_size"], tokens=self.tokens, manifest=m
                )
            a = self.archs[d.architecture]
            if self.lm and not a.vocab:
                from fedmobillm.server.service import VOCAB_KEY

                a.vocab = int(store.meta(VOCAB_KEY + d.architecture) or 0)
            a.bundle_sha256s.add(d.bundle_sha256)
            if a.vocab or not self.lm:
                self._known_devices.add(d.device_id)

    def _anchor_archs(self) -> list[tuple[str, ArchData]]:
        return sorted((k, a) for k, a in list(self.archs.items()) if a.anchor_x and a.num_train)

    def _common_anchor_ids(self, archs: list[tuple[str, ArchData]]) -> list[int]:
        """Sorted anchor ids every one of ``archs`` holds. Anchors are only ever added, so
        the architectures and their anchor counts identify the result: it is rebuilt when
        they change, not on every training step."""
        if len(archs) < 2:
            return []
        key = tuple((k, len(a.anchor_x)) for k, a in archs)
        if self._common[0] != key:
            first, *rest = (set(a.anchor_x) for _, a in archs)
            self._common = (key, sorted(first.intersection(*rest)))
        return self._common[1]

    def shared_anchors(self) -> int:
        return len(self._common_anchor_ids(self._anchor_archs()))

    def sample_anchors(self, rng: np.random.Generator, batch_size: int) -> list[tuple] | None:
        """Up to ``batch_size`` anchor ids that every architecture with anchors holds, drawn
        without replacement: [(arch, x (M, K, d))], or in a token federation [(arch, x (M, K,
        T_a, d), mask (M, T_a))] padded per architecture; rows in one id order. None when
        fewer than two architectures share an anchor."""
        archs = self._anchor_archs()
        ids = self._common_anchor_ids(archs)
        if not ids:
            return None
        pick = [ids[i] for i in rng.choice(len(ids), min(batch_size, len(ids)), replace=False)]
        if self.tokens:
            return [(k, *collate_tokens([a.anchor_x[i] for i in pick])) for k, a in archs]
        return [(k, np.stack([dense(a.anchor_x[i]) for i in pick])) for k, a in archs]  # (M,K,d)

    def sample(
        self, rng: np.random.Generator, batch_size: int, balance: str = "device",
        shares: dict[str, int] | None = None,
    ) -> list[tuple]:  # fmt: skip
        """Balanced mini-batch over everything cached (``policies.balanced_sample`` with
        ``balance`` and ``shares``): [(arch, x (B, K, d), y (B,))], or in a token federation
        [(arch, x (B, K, T, d), y (B,), mask (B, T))], T the longest drawn sample of that
        architecture."""
        devices = {
            k: sorted(d for d, ys in a.train_y.items() if ys)
            for k, a in self.archs.items()
            if a.num_train > 0
        }
        groups = balanced_sample(
            rng, batch_size, devices, lambda k, d: self.archs[k].device_arrays(d), balance, shares
        )
        if not self.tokens:
            return groups
        out: list[tuple] = []
        for arch, samples, y in groups:
            if self.lm:  # (arch, x, y, mask, ids (B, T), loss_mask (B, T))
                x, mask, ids, lmask = collate_lm(samples)
                out.append((arch, x, y, mask, ids, lmask))
                continue
            x, mask = collate_tokens(samples)
            out.append((arch, x, y, mask))
        return out


def _lm_fields(rows: SampleRows, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Row i's token ids (L,) and loss mask (L,), (None, None) when it has none."""
    if not rows.token_ids or rows.token_ids[i] is None:
        return None, None
    return rows.token_ids[i], rows.loss_mask[i]


def value_bound(manifest: dict) -> np.ndarray:
    """(K,) the largest |value| per tap an upload of this bundle may carry."""
    scales = np.asarray(manifest["activation_scales"], np.float32)  # (K,)
    return FP16_RANGE * 127.0 * scales


def _within(x: np.ndarray, bound: np.ndarray) -> bool:
    """x (K, d) or (K, L, d) finite and within bound (K,) per tap."""
    b = bound.reshape((-1,) + (1,) * (x.ndim - 1))
    return bool(np.isfinite(x).all()) and bool((np.abs(x) <= b).all())


def create_trainer(settings: ServerSettings) -> Trainer:
    """The trainer of ``settings.task``: ``Trainer`` (classify) or ``lm_trainer.LMTrainer``."""
    if settings.task == "lm":
        from fedmobillm.server.lm_trainer import LMTrainer

        return LMTrainer(settings)
    return Trainer(settings)


class Trainer:
    """Owns the trainer thread. ``start()`` / ``stop()`` (final checkpoint + export).

    The classify task's trainer; what differs for another task (the side network, its
    validation metrics, which one ranks the best snapshot) is in the hooks ``_create``,
    ``_sync_archs``, ``_evaluate_arch``, ``_after_evaluate``, ``_load_side`` and
    ``BEST_METRIC``, overridden by ``lm_trainer.LMTrainer``."""

    # the validation metric that ranks personal-model snapshots, and its sign (+1: higher
    # is better)
    BEST_METRIC: tuple[str, float] = ("accuracy", 1.0)

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.ckpt_dir = settings.checkpoint_dir
        self.cache = TrainingCache(
            settings.side.inputs, settings.trainer_memory_mb, settings.seed, settings.task
        )
        self.side: SideTrainer | None = None
        self.history: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        self.checkpoint_step: int | None = None
        self.exported: dict[str, int] = {}
        # arch -> {"accuracy", "step", "n"}: the personal model is the snapshot with the best
        # validation accuracy on the current validation set (it overfits past its peak)
        self.best: dict[str, dict[str, Any]] = {}
        self.loss: float | None = None
        self.idle = True
        self.error: str | None = None
        self._steps_since_data = 0
        self._rate: deque[tuple[float, int]] = deque(maxlen=50)
        self._lock = threading.Lock()
        self._evaluated_on = 0  # validation records present at the last evaluation
        self._stop = threading.Event()
        self._export_wanted = threading.Event()
        self._wanted_archs: set[str] = set()
        self._export_done = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="trainer", daemon=True)
        # Non-finite steps skipped (never applied), the last one, and the quarantine as read
        # from the store (polled every QUARANTINE_POLL_S)
        self.skipped_steps = 0
        # checked on the trainer thread (which owns the weights), read by status()
        self.weights_finite = True
        self.last_nonfinite: dict[str, Any] | None = None
        self._quarantine_polled = 0.0
        # stored samples not read yet (ingest's back-pressure reads it; limits.IngestGate)
        self.backlog = 0
        self.stored = 0  # samples the store counts (as of the last poll)
        # a transient database error being retried ({"error", "attempts", "retry_in_s",
        # "since"}), None while the database answers
        self.database_retry: dict[str, Any] | None = None
        self._resume_wait = RETRY_FIRST_S
        self._resumed = False
        # which process trains: `serve` (the embedded thread) or `train` (its own process)
        self.process = "serve"
        self._backlog_polled = 0.0
        # the store's one trainer slot: this trainer's id (kept across reconnects, so a
        # PostgreSQL session of its own left behind by a dropped connection is taken back),
        # set once the slot is held (the status is published only then), and whether a
        # (re)claim was refused or failed (another trainer's slot: publish nothing more)
        self.slot_owner = uuid.uuid4().hex
        self.slot_claimed = threading.Event()  # cleared while a database error is retried
        self.slot_refused = False
        self._slot_held_once = False  # a refusal after it: the slot was lost, not "not started"

    # -- lifecycle --

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.settings.trainer_threads)
        try:
            while not self._stop.is_set():
                store = self._claim()
                if store is not None:
                    self._train_on(store)
            self._finish()
        except Exception as exc:  # keep ingest alive; report in status
            if self.slot_refused:  # another trainer's slot: its message says it all
                what = "lost the trainer slot" if self._slot_held_once else "trainer not started"
                log.error("%s: %s", what, exc)
            else:
                log.exception("trainer stopped on an error")
            self.error = f"{type(exc).__name__}: {exc}"
            self.backlog = 0  # a stopped trainer must not hold back-pressure on ingest forever

    def _claim(self) -> Store | None:
        """The store with the trainer slot held (``slot_claimed`` set), or None after a
        transient database error (said and waited for). The one trainer of a store: a second
        is refused (TrainerSlotTaken; ``slot_refused`` set, raised); any other error that is
        not transient is raised as it is (a bug or a permanent fault: its traceback logged)."""
        try:
            store = open_store(self.settings, trainer=True, owner=self.slot_owner)
        except TrainerSlotTaken:
            self.slot_refused = True
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._database_down(exc)
            return None
        self._slot_held_once = True
        self.slot_claimed.set()
        return store

    def _train_on(self, store: Store) -> None:
        """Train on ``store`` until stop (then return) or a database error (raised; the
        caller retries a transient one on a fresh store). Closes ``store``."""
        try:
            if not self._resumed:  # once: checkpoints are files, not the database
                self._resumed = True
                self._resume()
            while not self._stop.is_set():
                if not self._tick(store):
                    self._stop.wait(0.2)
                elif self.settings.step_sleep_s:
                    self._stop.wait(self.settings.step_sleep_s)
                if self.database_retry is not None:
                    log.info("trainer: the database is back; training again")
                    self.database_retry, self._resume_wait = None, RETRY_FIRST_S
        except Exception as exc:
            if not is_transient(exc):
                raise
            # the store (and with it the slot) is given up: publish nothing until it is held
            # again (another trainer may claim it meanwhile; its status row is then its own)
            self.slot_claimed.clear()
            self._database_down(exc)
        finally:
            try:
                store.close()
            except Exception:  # noqa: BLE001 - a broken connection may not close cleanly
                log.debug("closing the store after a database error", exc_info=True)

    def _database_down(self, exc: BaseException) -> None:
        """A transient database error: say so (log, status ``database_retry``) and wait with
        exponential backoff (RETRY_FIRST_S doubling to RETRY_MAX_S) before the caller opens
        the store again; what the cache holds and the weights stay as they are. After
        RETRY_GIVE_UP_S of continuous failure it gives up: raises (the trainer's error)."""
        wait = self._resume_wait
        attempts = (self.database_retry or {}).get("attempts", 0) + 1
        since = (self.database_retry or {}).get("since", time.time())
        if time.time() - since > RETRY_GIVE_UP_S:
            raise FedMobiLLMError(
                f"the database has failed for {time.time() - since:.0f} s "
                f"({attempts - 1} retries); last error: {type(exc).__name__}: "
                f"{str(exc).strip()[:300]}",
                hint="fix the database (see the error), then restart the trainer",
            ) from None  # no cause: the give-up itself is not transient
        self.database_retry = {
            "error": f"{type(exc).__name__}: {str(exc).strip()[:300]}",
            "attempts": attempts,
            "retry_in_s": wait,
            "since": since,
        }
        log.warning(
            "trainer: database error (%s); retry %d in %.1f s",
            self.database_retry["error"],
            attempts,
            wait,
        )
        self._resume_wait = min(wait * 2, RETRY_MAX_S)
        self._stop.wait(wait)

    def export_fresh(self, architecture: str, timeout: float = 120.0) -> None:
        """Block until ``architecture``'s personal model reflects the current step.

        The export runs on the trainer thread (it owns the weights); a device asking for its
        model gets the side network as trained so far, not the last periodic export."""
        if not self._thread.is_alive() or self.side is None:
            return
        deadline = time.monotonic() + timeout
        target = self.side.step
        if architecture in self.best:  # the best-validation snapshot is already exported
            return
        with self._lock:
            while self.exported.get(architecture, -1) < target:
                if architecture not in self.cache.archs or not self._thread.is_alive():
                    return
                self._wanted_archs.add(architecture)
                self._export_wanted.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._export_done.wait(min(left, 1.0))

    def _tick(self, store: Store) -> bool:
        """One loop turn. Returns True if a training step ran."""
        if self._export_wanted.is_set() and self.side is not None:
            self._export_wanted.clear()
            with self._lock:
                wanted, self._wanted_archs = self._wanted_archs, set()
            self._export(wanted)
        self._sync_quarantine(store)
        if self.cache.refresh(store):
            self._steps_since_data = 0
        self._poll_backlog(store)
        self._record_offences(store)
        if self.side is None and not self._create(store):
            return False
        self._sync_archs()
        if self._should_idle():
            if not self.idle:
                log.info(
                    "trainer idle at step %d: %d steps since new data",
                    self.side.step,
                    self._steps_since_data,
                )
                self._evaluate()
                self._checkpoint()
                self._export()
            elif self._validation_size() != self._evaluated_on:
                # validation records that arrive while idle (no new training data) are
                # evaluated at once: status, history and the best snapshot reflect them
                self._evaluate()
            self.idle = True
            return False
        rng = self._rng()
        groups = self.cache.sample(
            rng, self.settings.batch_size, self.settings.sampler_balance, self._arch_batch()
        )
        if not groups:
            return False
        self.idle = False
        self._step(groups, self.cache.sample_anchors(rng, self.side.config.anchor_batch))
        return True

    def _arch_batch(self) -> dict[str, int] | None:
        """Samples a step for the architectures that do not take an equal share of
        ``batch_size`` (None: every one does; ``LMTrainer``: ``lm_arch_batch``)."""
        return None

    def _should_idle(self) -> bool:
        total = sum(a.num_train for a in self.cache.archs.values())
        return should_idle(self.settings, self._steps_since_data, total)

    def _step(self, groups: list[tuple], anchors: list[tuple] | None = None) -> None:
        assert self.side is not None
        try:
            loss = self.side.train_step(groups, anchors)
        except NonFiniteStep as exc:
            self._skip(exc, groups)
            return
        self._steps_since_data += 1
        step = self.side.step
        with self._lock:
            self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss
            self._rate.append((time.monotonic(), self.side.samples_seen))
        s = self.settings
        if step % s.eval_every == 0:
            self._evaluate()
        if step % s.checkpoint_every == 0:
            self._checkpoint()
        if step % s.export_every == 0 or not self.exported:
            self._export()

    # -- untrusted data --

    def _sync_quarantine(self, store: Store) -> None:
        now = time.monotonic()
        if now - self._quarantine_polled >= QUARANTINE_POLL_S:
            self._quarantine_polled = now
            self.cache.set_quarantined(store.quarantined())
            self.cache.set_deleted(store.data_deleted())

    def _poll_backlog(self, store: Store) -> None:
        """``backlog`` = samples the store counts minus rows read (at most every
        QUARANTINE_POLL_S; 0 once caught up; rows of deleted devices make it an
        underestimate, never a refusal too many)."""
        now = time.monotonic()
        if now - self._backlog_polled >= QUARANTINE_POLL_S:
            self._backlog_polled = now
            store.check_trainer()  # raises if the trainer slot's connection was dropped
            self.stored = sum(int(n) for *_, n in store.sample_counts())
            self.backlog = max(0, self.stored - self.cache.rows_read)

    def _record_offences(self, store: Store) -> None:
        """Offences the cache found (impossible stored rows, blamed steps) go to the store,
        which quarantines a repeated offender; the next poll holds its samples out."""
        offences, self.cache.offences = self.cache.offences, {}
        for device, reason in sorted(offences.items()):
            if store.add_offence(device, reason, QUARANTINE_AFTER):
                self._quarantine_polled = 0.0

    def _skip(self, exc: NonFiniteStep, groups: list[tuple]) -> None:
        """A non-finite step was not applied: count it and blame the devices whose cached
        samples give non-finite outputs on their own."""
        assert self.side is not None
        self._steps_since_data += 1  # an endless run of skips still ends in idle
        blamed = []
        for arch, *_ in groups:
            a = self.cache.archs[arch]
            for device in sorted(a.train_x):
                x, _ = a.device_arrays(device)  # (n, K, d) or (n,) TokenSamples
                if not np.isfinite(self._predict(arch, x)).all():
                    blamed.append(device)
                    self.cache.offences[device] = f"samples give a non-finite {exc.where}"
        with self._lock:
            self.skipped_steps += 1
            self.last_nonfinite = {
                "step": self.side.step,
                "time": time.time(),
                "where": exc.where,
                "devices": blamed,
            }
        log.warning(
            "skipped a non-finite training step at step %d (%s); blamed: %s",
            self.side.step,
            exc.where,
            blamed or "no device (every sample is finite on its own)",
        )

    def _check_finite(self) -> bool:
        """Whether the weights are finite; only on the trainer thread (status reads the
        result: the weights may not be iterated while the thread adds an architecture)."""
        assert self.side is not None
        self.weights_finite = self.side.is_finite()
        return self.weights_finite

    def _rng(self) -> np.random.Generator:
        step = self.side.step if self.side else 0
        return np.random.default_rng([self.settings.seed, step])

    def _finish(self) -> None:
        """The final checkpoint and personal models (those behind the last step)."""
        if self.side is None:
            return
        if self.side.step != self.checkpoint_step:
            self._checkpoint()
        if self._stale_exports():
            self._export()

    def _stale_exports(self) -> dict[str, int]:
        """architecture -> the step its personal model was exported at (-1: never), for those
        behind the current step (an architecture with a best-validation snapshot keeps it)."""
        if self.side is None:
            return {}
        step = self.side.step
        with self._lock:
            exported = dict(self.exported)
        return {
            name: exported.get(name, -1)
            for name, a in list(self.cache.archs.items())
            if a.num_train
            and name in self.side.archs
            and name not in self.best
            and exported.get(name, -1) < step
        }

    def unwritten(self) -> list[str]:
        """What the final stop has not written (yet): the checkpoint of the last step and the
        personal models behind it; [] once everything is on disk."""
        if self.side is None:
            return []
        step = self.side.step
        missing = [] if self.checkpoint_step == step else [f"the checkpoint of step {step}"]
        for name, at in sorted(self._stale_exports().items()):
            was = "never exported" if at < 0 else f"last exported at step {at}"
            missing.append(f"the personal model of {name} at step {step} ({was})")
        return missing

    # -- model --

    def _side_config(self) -> SideConfig:
        return self.settings.side

    def _create(self, store: Store) -> bool:
        labels = store.label_names()
        if labels is None or not any(a.num_train for a in self.cache.archs.values()):
            return False
        self.side = SideTrainer(self._side_config(), labels, seed=self.settings.seed)
        log.info("side network created: %d parameters", self.side.num_parameters())
        return True

    def _sync_archs(self) -> None:
        assert self.side is not None
        for name, a in self.cache.archs.items():
            self.side.add_architecture(name, a.taps, a.depth, a.hidden, a.manifest.get("kind", ""))
            spec = self.side.archs[name]
            spec.bundle_sha256s = sorted(set(spec.bundle_sha256s) | a.bundle_sha256s)
            spec.encoding = "int8" if "int8" in a.encodings or not a.encodings else "fp16"

    def _validation_size(self) -> int:
        return sum(len(a.val_y) for a in self.cache.archs.values())

    def _predict(self, arch: str, x: Any) -> np.ndarray:
        """Logits (n, C) of x float32 (n, K, d) or a PivotStream (dequantized PIVOT_CHUNK rows
        at a time), or of TokenSamples in chunks of EVAL_CHUNK (each padded to its own
        longest sample), in the order given."""
        assert self.side is not None
        if isinstance(x, np.ndarray) and not self.cache.tokens:
            return self.side.predict(arch, x)
        if not self.cache.tokens:
            out = [
                self.side.predict(arch, x[i : i + PIVOT_CHUNK])  # (c, K, d) float32
                for i in range(0, len(x), PIVOT_CHUNK)
            ]
            return np.concatenate(out) if out else np.zeros((0, len(self.side.label_names)))
        out = [
            self.side.predict(arch, *collate_tokens(x[i : i + EVAL_CHUNK]))
            for i in range(0, len(x), EVAL_CHUNK)
        ]
        return np.concatenate(out) if out else np.zeros((0, len(self.side.label_names)))

    def _evaluate_arch(self, name: str, a: ArchData) -> dict[str, float]:
        """Accuracy, loss, n on the architecture's validation rows. Token samples are
        evaluated in chunks of similar length (sorted by tokens), each padded to its longest."""
        assert self.side is not None
        y = np.asarray(a.val_y, np.int64)
        if self.cache.tokens:
            order = sorted(range(len(y)), key=lambda i: a.val_x[i].tokens)
            chunk = EVAL_CHUNK
        else:
            order, chunk = list(range(len(y))), PIVOT_CHUNK
        total = {"accuracy": 0.0, "loss": 0.0, "n": 0}
        for start in range(0, len(order), chunk):
            idx = order[start : start + chunk]
            if self.cache.tokens:
                x, mask = collate_tokens([a.val_x[i] for i in idx])
                r = self.side.evaluate(name, x, y[idx], mask)
            else:  # dequantized per chunk: x (c, K, d)
                r = self.side.evaluate(name, np.stack([dense(a.val_x[i]) for i in idx]), y[idx])
            if r["n"]:
                total["accuracy"] += r["accuracy"] * r["n"]
                total["loss"] += r["loss"] * r["n"]
                total["n"] += r["n"]
        n = total["n"]
        nan = float("nan")
        return {
            "accuracy": total["accuracy"] / n if n else nan,
            "loss": total["loss"] / n if n else nan,
            "n": n,
        }

    def _evaluate(self) -> None:
        assert self.side is not None
        self._check_finite()
        self._evaluated_on = self._validation_size()
        val = {}
        for name, a in sorted(self.cache.archs.items()):
            if a.val_y and name in self.side.archs:
                val[name] = self._evaluate_arch(name, a)
        entry = {
            "step": self.side.step,
            "time": time.time(),
            "train_loss": self.loss,
            "samples_seen": self.side.samples_seen,
            "validation": val,
        }
        with self._lock:
            self.history.append(entry)
            del self.history[:-HISTORY_LIMIT]
        self._keep_best(val)  # after the history: status never shows a best ahead of it
        self._after_evaluate(val)
        metric = self.BEST_METRIC[0]
        log.info(
            "step %d loss %s validation %s %s",
            self.side.step,
            f"{self.loss:.4f}" if self.loss is not None else "-",
            metric,
            {k: round(v[metric], 4) for k, v in val.items()},
        )

    def _after_evaluate(self, val: dict[str, dict[str, float]]) -> None:
        """The anchor terms' ranking (SideConfig.anchor_protect_best, anchor_target): only an
        architecture whose validation samples hold every label is ranked (issue 23)."""
        assert self.side is not None
        n_labels = len(self.side.label_names)
        self.side.arch_quality.update(
            {n: v["accuracy"] for n, v in val.items()
             if len(set(self.cache.archs[n].val_y)) == n_labels}
        )  # fmt: skip

    def _keep_best(self, val: dict[str, dict[str, float]]) -> None:
        """Export an architecture's personal model when its validation ``BEST_METRIC``
        (accuracy; lm: perplexity, lower is better) beats its best so far. The comparison starts afresh when the validation set changed, or when
        the architecture's training set grew by more than ``REBASE_GROWTH`` since the best
        snapshot: a model that has not seen a good part of the data its devices uploaded
        should not keep its place on a lucky evaluation."""
        assert self.side is not None
        improved = set()
        metric, sign = self.BEST_METRIC
        for name, v in val.items():
            a = self.cache.archs[name]
            n, n_train = len(a.val_y), a.num_train
            best = self.best.get(name)
            if (
                best is None
                or best["n"] != n
                or n_train > (1.0 + REBASE_GROWTH) * best.get("train", 0)
                or sign * v[metric] > sign * best[metric]
            ):
                self.best[name] = {
                    metric: v[metric],
                    "step": self.side.step,
                    "n": n,
                    "train": n_train,
                }
                improved.add(name)
        if improved:
            self._export(improved, force=True)

    # -- checkpoints --

    def _checkpoint(self) -> None:
        assert self.side is not None
        if not self._check_finite():  # never written, so never the one resumed from
            log.error("weights are not finite at step %d: not checkpointed", self.side.step)
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        step = self.side.step
        final = self.ckpt_dir / f"step-{step:09d}"
        tmp = self.ckpt_dir / f".tmp-{uuid.uuid4().hex[:8]}"
        self.side.save(tmp)
        with self._lock:
            history = list(self.history)
        write_atomic(
            tmp / TRAINER_STATE,
            json.dumps(
                {"step": step, "history": history, "exported": self.exported, "best": self.best}
            ).encode(),
        )
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.ckpt_dir)
        write_atomic(self.ckpt_dir / LATEST, json.dumps({"dir": final.name, "step": step}).encode())
        self.checkpoint_step = step
        self._prune()
        log.info("checkpoint at step %d", step)

    def _prune(self) -> None:
        dirs = sorted(self.ckpt_dir.glob("step-*"))
        for d in dirs[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(d, ignore_errors=True)
        for d in self.ckpt_dir.glob(".tmp-*"):
            shutil.rmtree(d, ignore_errors=True)

    def _resume(self) -> None:
        for d in self._checkpoint_candidates():
            try:
                side = self._load_side(d)
                state = json.loads((d / TRAINER_STATE).read_text())
            except (FedMobiLLMError, OSError, ValueError, KeyError) as exc:
                log.warning("checkpoint %s unusable (%s); trying an older one", d.name, exc)
                continue
            if not side.is_finite():
                log.warning("checkpoint %s holds non-finite weights; trying an older one", d.name)
                continue
            if side.config.inputs != self.settings.side.inputs:
                log.warning(
                    "checkpoint %s holds a %s side network; this server trains %s inputs: "
                    "not resumed",
                    d.name,
                    side.config.inputs,
                    self.settings.side.inputs,
                )
                continue
            self.side = side
            self.history = state.get("history", [])
            self.exported = state.get("exported", {})
            self.best = state.get("best", {})
            self.resumed_from = self.checkpoint_step = side.step
            self._steps_since_data = 0
            log.info("resumed from checkpoint step %d (%s)", side.step, d.name)
            return

    def _load_side(self, directory: Path) -> Any:
        """The side network saved in a checkpoint folder (FedMobiLLMError if unusable)."""
        return SideTrainer.load(directory)

    def _checkpoint_candidates(self) -> list[Path]:
        if not self.ckpt_dir.is_dir():
            return []
        dirs = sorted(self.ckpt_dir.glob("step-*"), reverse=True)
        try:
            latest = self.ckpt_dir / json.loads((self.ckpt_dir / LATEST).read_text())["dir"]
            dirs = [latest] + [d for d in dirs if d != latest]
        except (OSError, ValueError, KeyError):
            pass
        return dirs

    # -- personal models --

    def _export(self, only: set[str] | None = None, force: bool = False) -> None:
        """Export every architecture's personal model (or only those in ``only``). Without
        ``force``, an architecture with a best-validation snapshot keeps that snapshot."""
        assert self.side is not None
        if not self._check_finite():
            log.error(
                "weights are not finite at step %d: no personal model exported", self.side.step
            )
            return
        root = self.settings.personal_dir
        for name, a in sorted(self.cache.archs.items()):
            if a.num_train == 0 or name not in self.side.archs or (only and name not in only):
                continue
            if name in self.best and not force:
                continue
            tmp = root / f".tmp-{uuid.uuid4().hex[:8]}"
            try:
                source = self._personal_source(name, a)
                source.export_personal(
                    name,
                    tmp,
                    sorted(a.bundle_sha256s),
                    pte=self.settings.export_pte,
                    quant=self.settings.personal_quant,
                )
                publish_folder(tmp, root, name)
            except Exception as exc:  # export problems must not stop training
                log.warning("personal model export for %s failed: %s", name, exc)
                shutil.rmtree(tmp, ignore_errors=True)
                continue
            with self._lock:
                self.exported[name] = self.side.step
                self._export_done.notify_all()

    def _personal_source(self, name: str, a: ArchData) -> Any:
        """What ``name``'s personal model is exported from: the side trainer, or with
        ``side.adapt_steps`` (classification) a copy adapted on that architecture's own
        samples, its steps chosen on its validation samples (``server.adapt``, issue 23)."""
        side = self.side
        if not isinstance(side, SideTrainer) or not side.config.adapt_steps or not a.val_y:
            return side
        from fedmobillm.server.adapt import adapt, cache_draw

        c = side.config
        y = np.asarray(a.val_y, np.int64)

        def val() -> Any:  # chunks (x, y) | (x, y, mask), dequantized / collated per chunk
            chunk = EVAL_CHUNK if self.cache.tokens else PIVOT_CHUNK
            for i in range(0, len(y), chunk):
                rows, yc = a.val_x[i : i + chunk], y[i : i + chunk]
                if self.cache.tokens:
                    x, mask = collate_tokens(rows)
                    yield x, yc, mask
                else:
                    yield np.stack([dense(v) for v in rows]), yc

        draw = cache_draw(self.cache, name, c.adapt_batch, self.settings.sampler_balance)
        got = adapt(side, name, draw, val, seed=self.settings.seed + side.step)
        if name in self.best:
            self.best[name]["adapt"] = got.summary()
        return got.trainer

    # -- status --

    def status(self) -> dict[str, Any]:
        with self._lock:
            rate = None
            if len(self._rate) >= 2:
                (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
                rate = (n1 - n0) / (t1 - t0) if t1 > t0 else None
            side = self.side
            return {
                "running": self._thread.is_alive(),
                "idle": self.idle,
                "error": self.error,
                # who trains: {"command": "serve" | "train", "pid", "host"}
                "process": {
                    "command": self.process,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                },
                "database_retry": self.database_retry,
                "step": side.step if side else 0,
                "samples_seen": side.samples_seen if side else 0,
                "loss": self.loss,
                "samples_per_s": rate,
                "checkpoint_step": self.checkpoint_step,
                "resumed_from": self.resumed_from,
                "parameters": side.num_parameters() if side else None,
                # what the devices upload: "pivot" (one vector per tap) or "tokens"
                "inputs": self.settings.side.inputs,
                "task": self.settings.task,
                # the validation metric that picks each architecture's personal model
                "best_metric": self.BEST_METRIC[0],
                "architectures": {
                    n: {
                        "train": a.num_train,
                        "validation": len(a.val_y),
                        "anchors": len(a.anchor_x),
                        "devices": len(a.train_y),
                        # training samples per label name: an architecture's label skew
                        # (classify; an lm sample has no label)
                        "labels": None
                        if self.cache.lm
                        else label_distribution(a.train_y, side.label_names if side else None),
                        **a.upload_stats(),
                    }
                    for n, a in list(self.cache.archs.items())  # copy: the thread adds archs
                },
                # anchors every architecture with anchors holds: what alignment trains on
                "shared_anchors": self.cache.shared_anchors(),
                "personal_models": dict(self.exported),
                # what was kept out of training: never a silent NaN
                "weights_finite": self.weights_finite,
                "skipped_steps": self.skipped_steps,
                "last_nonfinite": self.last_nonfinite,
                "quarantined": sorted(self.cache.quarantined),
                "data_deleted": sorted(self.cache.deleted),
                "dropped_samples": dict(self.cache.dropped),
                "best_validation": {n: dict(b) for n, b in self.best.items()},
                "history": self.history[-50:],
                # what the cache holds against the store (trainer_memory_mb), and the
                # stored samples not read yet (ingest answers 429 past max_backlog_samples)
                "cache": {
                    "samples": self.cache.held_samples(),
                    "samples_read": self.cache.samples_read(),
                    "store_samples": self.stored,
                    "bytes": self.cache.held_bytes,
                    "cap_bytes": self.cache.cap_bytes,
                },
                "backlog": self.backlog,
            }
