"""The trainer cache's compact forms: samples held as uploaded (int8 + per-tap scales, or
fp16), dequantised only when drawn, and the reservoir that bounds how many are held.

- ``PivotSample``: one pivot sample, q (K, d) int8 or float16 + scales (K,) (validation and
  anchor rows, quarantined rows); ``np.asarray(sample)`` dequantises it.
- ``PivotStream``: one device's training samples of one architecture in growable buffers,
  q (n, K, d), scales (n, K) float32, labels; ``stream[idx]`` -> float32 (len(idx), K, d).
- ``Reservoir``: Algorithm R per stream (a uniform random subset of everything offered) with
  a quota that may shrink (a uniform subset of a uniform subset is uniform).
- ``screen_pivot``: the store rows' range check for a whole page at once (vectorised).
- ``FillStream``: one stream of a restart's sampled read-back, its row ids in the store's
  fixed pseudo-random order.

Torch-free.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmobillm.server.store import dequantize_sample
from fedmobillm.server.store_sql import sample_order

# Bytes a held sample costs beyond its values: its scales' object, label, list slot
SAMPLE_OVERHEAD = 16
# A token sample is a Python object with two arrays: about this much beyond its values
TOKEN_OBJECT_BYTES = 300


@dataclass(slots=True)
class PivotSample:
    """One cached pivot sample, as uploaded: q (K, d) int8 or float16; scales (K,) float32
    for int8 (None for fp16)."""

    q: np.ndarray
    scales: np.ndarray | None

    def dequantized(self) -> np.ndarray:
        """float32 (K, d)."""
        return dequantize_sample(self.q, self.scales)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        x = self.dequantized()
        return x if dtype is None else x.astype(dtype)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes) + (0 if self.scales is None else int(self.scales.nbytes))


def dense(x: Any) -> np.ndarray:
    """float32 of a cached sample: a PivotSample / TokenSample dequantised, an array as is."""
    return x.dequantized() if hasattr(x, "dequantized") else np.asarray(x, np.float32)


class PivotStream:
    """One device's cached training samples (one architecture) as uploaded, in buffers that
    grow by doubling up to ``limit`` rows: q (n, K, d) int8 (or float16 once an fp16 row
    arrived: int8 rows are then held dequantised as fp16, scales 1), scales (n, K) float32,
    y (n,) int64. ``labels`` is the same labels as a list (``ArchData.train_y`` shares it)."""

    def __init__(self, k: int, d: int) -> None:
        self.k, self.d, self.n = k, d, 0
        self.q = np.zeros((0, k, d), np.int8)  # (cap, K, d)
        self.s = np.zeros((0, k), np.float32)  # (cap, K)
        self.y = np.zeros(0, np.int64)  # (cap,)
        self.labels: list[int] = []
        self.limit: int | None = None  # the reservoir's quota: no capacity beyond it

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, not only the rows held)."""
        return int(self.q.nbytes + self.s.nbytes + self.y.nbytes) + 8 * len(self.labels)

    def _row(self, x: PivotSample) -> tuple[np.ndarray, np.ndarray]:
        """(q (K, d), scales (K,)) of x in this stream's dtype."""
        s = np.ones(self.k, np.float32) if x.scales is None else x.scales
        q, s2 = self._coerce(x.q[None], s[None])
        return q[0], s2[0]

    def _coerce(self, q: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(q (m, K, d), scales (m, K)) in this stream's dtype (switching the stream to fp16
        first if q is fp16 and the stream int8; int8 rows into an fp16 stream are dequantised
        to fp16 with scales 1)."""
        if q.dtype != self.q.dtype:
            if self.q.dtype == np.int8 and q.dtype == np.float16:
                deq = self.q.astype(np.float32) * self.s[:, :, None]  # (cap, K, d)
                self.q = deq.astype(np.float16)
                self.s = np.ones_like(self.s)
            elif self.n == 0:
                self.q = self.q.astype(q.dtype)
        if q.dtype == self.q.dtype:
            return q, s
        deq = q.astype(np.float32) * s[:, :, None]  # (m, K, d)
        return deq.astype(np.float16), np.ones_like(s)

    def extend(self, q: np.ndarray, s: np.ndarray, y: np.ndarray) -> None:
        """Append m rows: q (m, K, d), scales (m, K), y (m,)."""
        q, s = self._coerce(q, s)
        m = len(y)
        if self.n + m > len(self.y):
            cap = max(16, 2 * len(self.y), self.n + m)
            self._resize(min(cap, self.limit) if self.limit and self.limit >= self.n + m else cap)
        self.q[self.n : self.n + m], self.s[self.n : self.n + m] = q, s
        self.y[self.n : self.n + m] = y
        self.labels.extend(int(v) for v in y)
        self.n += m

    def put_many(self, slots: np.ndarray, q: np.ndarray, s: np.ndarray, y: np.ndarray) -> None:
        """Replace rows ``slots`` (m,) in order (a later row wins a slot drawn twice)."""
        q, s = self._coerce(q, s)
        for j, qi, si, yi in zip(slots.tolist(), q, s, y.tolist(), strict=True):
            self.q[j], self.s[j], self.y[j] = qi, si, yi
            self.labels[j] = yi

    def append(self, x: PivotSample, y: int) -> None:
        q, s = self._row(x)
        if self.n == len(self.y):
            cap = max(16, 2 * self.n)
            cap = min(cap, self.limit) if self.limit and self.limit > self.n else cap
            self._resize(cap)
        self.q[self.n], self.s[self.n], self.y[self.n] = q, s, y
        self.labels.append(int(y))
        self.n += 1

    def put(self, j: int, x: PivotSample, y: int) -> None:
        """Replace row j (a reservoir's replacement)."""
        q, s = self._row(x)
        self.q[j], self.s[j], self.y[j] = q, s, y
        self.labels[j] = int(y)

    def keep(self, idx: np.ndarray) -> None:
        """Keep rows ``idx`` (sorted, unique) and release the rest's memory."""
        self.q, self.s, self.y = self.q[idx].copy(), self.s[idx].copy(), self.y[idx].copy()
        self.n = len(idx)
        self.labels[:] = self.y.tolist()

    def trim(self) -> None:
        """Release capacity beyond ``limit`` (a quota that shrank)."""
        if self.limit is not None and len(self.y) > max(self.limit, self.n):
            self._resize(max(self.limit, self.n))

    def _resize(self, cap: int) -> None:
        for name in ("q", "s", "y"):
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def __getitem__(self, idx: Any) -> np.ndarray:
        """float32 (len(idx), K, d): the rows ``idx`` (an index array or a slice) dequantised."""
        q, s = self.q[: self.n][idx], self.s[: self.n][idx]
        return q.astype(np.float32) * s[:, :, None]

    def __iter__(self) -> Any:
        """PivotSample copies, in row order."""
        for i in range(self.n):
            yield PivotSample(self.q[i].copy(), self.s[i].copy())

    def labels_array(self) -> np.ndarray:
        return self.y[: self.n]


class Reservoir:
    """Algorithm R for many streams: ``offer(key, held, quota)`` says where the ``seen``-th
    sample of ``key`` goes: appended (fewer than ``quota`` held), at slot j (replaces a held
    sample with probability quota / seen), or nowhere (None). ``quota`` None = keep all."""

    def __init__(self, seed: int = 0) -> None:
        self.seen: dict[Any, int] = {}
        self._rng = random.Random(seed)

    def offer_many(
        self, key: Any, held: int, quota: int | None, m: int
    ) -> tuple[int, np.ndarray, np.ndarray]:
        """``offer`` for m samples at once: (how many of the first are appended, positions
        (r,) among the m of those that replace a held sample, their slots (r,)), in order."""
        t0 = self.seen.get(key, 0)
        self.seen[key] = t0 + m
        if quota is None:
            return m, np.zeros(0, np.int64), np.zeros(0, np.int64)
        take = max(0, min(m, quota - held))
        t = np.arange(t0 + take + 1, t0 + m + 1, dtype=np.float64)  # (m - take,) 1-based
        u = np.asarray([self._rng.random() for _ in range(len(t))])  # (m - take,)
        j = (u * t).astype(np.int64)  # uniform in 0..t-1
        hit = np.flatnonzero(j < quota)
        return take, hit + take, j[hit]

    def offer(self, key: Any, held: int, quota: int | None) -> int | None:
        """-1 = append; j >= 0 = replace slot j; None = not kept."""
        t = self.seen.get(key, 0) + 1
        self.seen[key] = t
        if quota is None or held < quota:
            return -1
        j = self._rng.randrange(t)
        return j if j < quota else None

    def subset(self, n: int, quota: int) -> np.ndarray:
        """Sorted indices of a uniform random ``quota``-subset of range(n)."""
        return np.sort(np.asarray(self._rng.sample(range(n), quota), np.int64))

    def forget(self, key: Any) -> None:
        self.seen.pop(key, None)


@dataclass
class FillStream:
    """One stream of a restarting trainer's sampled read-back (``TrainingCache``): the rows of
    (arch, device, split) stored at or before the plan's horizon, taken in the store's fixed
    pseudo-random order (``store_sql.SAMPLE_ORDER``, bottom-k sampling), a few at a time.
    ``ids``: (m,) row ids fetched from the index and not taken yet, in that order; ``more``:
    the store may hold more after them; ``limit``: rows to take at most (None: up to the
    cache's quota for the stream)."""

    arch: str
    device: str
    split: str  # train | validation | anchor
    ids: np.ndarray  # (m,) int64
    more: bool
    limit: int | None = None
    taken: int = 0
    _last_key: int = -1  # SAMPLE_ORDER of the last id taken

    def take(self, store: Any, k: int, horizon: int) -> np.ndarray:
        """The next (<= k,) row ids, fetched from the store's index when ``ids`` runs out."""
        if len(self.ids) < k and self.more:
            after = int(sample_order(self.ids[-1:])[0]) if len(self.ids) else self._last_key
            got = store.stream_sample(self.device, self.split, horizon, max(k, 256), after)
            self.more = len(got) >= max(k, 256)
            self.ids = np.concatenate([self.ids, got])
        out, self.ids = self.ids[:k], self.ids[k:]
        if len(out):
            self._last_key = int(sample_order(out[-1:])[0])
        self.taken += len(out)
        return out

    @property
    def exhausted(self) -> bool:
        return not len(self.ids) and not self.more


def screen_pivot(
    raw: list[np.ndarray], scales: list[np.ndarray | None], bound: np.ndarray
) -> np.ndarray:
    """Which of one device's pivot rows its bundle can produce: raw M arrays (K, d) of one
    dtype (int8 or float16), scales M arrays (K,) (int8) or None; bound (K,) the largest
    |value| per tap. Returns ok (M,) bool: finite and within bound, as ``dequantize`` then
    compare would say, for the whole page at once."""
    q = np.stack(raw)  # (M, K, d)
    if q.dtype == np.int8:
        amax = np.abs(q.astype(np.int16)).max(axis=2).astype(np.float32)  # (M, K)
        nan = np.full(q.shape[1], np.nan, np.float32)  # an int8 row without scales: dropped
        s = np.abs(np.stack([nan if v is None else v for v in scales]).astype(np.float32))
        with np.errstate(over="ignore", invalid="ignore"):
            top = amax * s  # (M, K)
        ok: np.ndarray = np.isfinite(s).all(1) & (top <= bound[None, :]).all(1)
        return ok
    x = q.astype(np.float32)
    finite = np.isfinite(x).all(axis=(1, 2))  # (M,)
    with np.errstate(invalid="ignore"):
        inside = (np.abs(x) <= bound[None, :, None]).all(axis=(1, 2))
    return np.asarray(finite & inside, dtype=bool)
