"""What brings a token upload's bytes down (issue 15), as a device would apply it.

Each option maps a split of token taps (``TokenActivations``: int8 as uploaded, each sample
unpadded) to what a device using that option would upload:

- ``taps-N``: only the last N of the bundle's taps (the deepest ones);
- ``pca-R``: a fixed per-architecture, per-tap projection to R dims (PCA fitted on the train
  activations), then int8 with per-tap scales calibrated as the export calibrates them
  (99.9th percentile of |value| / 127). On a device it is a matrix folded into the bundle
  after each tap; the bundle-side export of it is not built: here it is applied to the
  int8 taps (dequantized), which adds that int8 rounding before the projection;
- ``int4``: symmetric per-tap int4 (values -7..7, two per byte), scales by the export's
  rule at 4 bits (99.9th percentile of |value| / 7), applied to the dequantized int8 taps;
- ``seg-S``: mean pooling of each sample's real tokens into min(S, L) contiguous segments
  (segment j holds tokens floor(j L / S') .. floor((j + 1) L / S') - 1), re-quantized to
  int8 with the bundle's scales.

Options compose with ``+`` (e.g. ``pca-64+int4``), applied left to right.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from benchmarks._activations import TokenActivations
from fedmobillm.errors import FedMobiLLMError

PERCENTILE = 99.9  # the export's calibration rule (export.calibrate.PERCENTILE)
INT4_MAX = 7
FIT_TOKENS = 20_000  # tokens per tap the PCA and the int4 scales are fitted on
POOL_CHUNK = 256


def quantize_int4(x: np.ndarray, scales: np.ndarray, axis: int = 1) -> np.ndarray:
    """Symmetric int4 per tap: x float (..., K at ``axis``, ...), scales (K,) -> int8 array
    holding -7..7 (stored two per byte on the wire). Zero stays zero (padding)."""
    shape = [1] * x.ndim
    shape[axis] = -1
    s = np.asarray(scales, np.float32).reshape(shape)
    return np.clip(np.rint(x / s), -INT4_MAX, INT4_MAX).astype(np.int8)


def percentile_scales(x: np.ndarray, levels: int, percentile: float = PERCENTILE) -> np.ndarray:
    """(K,) scales = percentile(|x[:, k]|) / levels over real tokens x (n, K, d)."""
    clip = np.percentile(np.abs(x), percentile, axis=(0, 2))  # (K,)
    return (np.maximum(clip, 1e-6) / levels).astype(np.float32)


def fit_pca(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-tap PCA of token activations x (n, K, d): means (K, d) and projections
    (K, d, dims), the top ``dims`` principal directions of each tap."""
    n, k, d = x.shape
    if not 0 < dims <= min(n, d):
        raise FedMobiLLMError(f"PCA to {dims} dims needs 0 < dims <= min(tokens {n}, d {d})")
    means = x.mean(0, dtype=np.float64)  # (K, d)
    proj = np.empty((k, d, dims), np.float32)
    for t in range(k):
        c = x[:, t].astype(np.float64) - means[t]  # (n, d)
        _, vecs = np.linalg.eigh(c.T @ c)  # (d, d), eigenvalues ascending
        proj[t] = vecs[:, ::-1][:, :dims]
    return means.astype(np.float32), proj


def project(x: np.ndarray, means: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """x (n, K, d) -> (n, K, dims): (x - mean_k) @ W_k per tap."""
    return np.einsum("nkd,kdr->nkr", x - means[None], proj).astype(np.float32)


def segment_pool(x: np.ndarray, mask: np.ndarray, segments: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pool each sample's real tokens into min(segments, L_i) contiguous segments.

    x (N, K, T, d) zero-padded, mask (N, T) 0/1 with the real tokens first ->
    x' (N, K, S', d), mask' (N, S') with S' = the largest min(segments, L_i)."""
    if segments < 1:
        raise FedMobiLLMError(f"segments must be at least 1, not {segments}")
    lengths = np.asarray(mask).astype(bool).sum(1)  # (N,)
    s_eff = np.minimum(segments, np.maximum(lengths, 1))  # (N,)
    t = np.arange(x.shape[2])[None, :]  # (1, T)
    seg = (t * s_eff[:, None]) // np.maximum(lengths, 1)[:, None]  # (N, T)
    width = int(s_eff.max()) if len(s_eff) else 1
    real = np.asarray(mask).astype(bool)
    onehot = (seg[:, None, :] == np.arange(width)[None, :, None]) & real[:, None, :]  # (N,S',T)
    counts = onehot.sum(2, keepdims=True)  # (N, S', 1)
    weights = onehot / np.maximum(counts, 1)
    pooled = np.einsum("nst,nktd->nksd", weights.astype(np.float32), x)  # (N, K, S', d)
    return pooled.astype(np.float32), (counts[..., 0] > 0).astype(np.int64)


def _from_dense(
    acts: TokenActivations, parts: list[tuple[np.ndarray, np.ndarray]], **changes: Any
) -> TokenActivations:
    """A compact split from quantized dense chunks [(q (n, K, T, d'), mask (n, T))] in
    row order."""
    qs, lengths = [], []
    for q, mask in parts:
        for i in range(len(q)):
            n = int(mask[i].sum())
            qs.append(q[i, :, :n].transpose(1, 0, 2))  # (L, K, d')
            lengths.append(n)
    return dataclasses.replace(
        acts, q=np.ascontiguousarray(np.concatenate(qs)), lengths=np.asarray(lengths), **changes
    )


def _dense_chunks(acts: TokenActivations) -> Any:
    for s in range(0, len(acts), POOL_CHUNK):
        yield acts.batch(np.arange(s, min(s + POOL_CHUNK, len(acts))))  # (n,K,T,d), (n,T)


def dequantized_tokens(acts: TokenActivations) -> np.ndarray:
    """(sum L, K, d) float32: every real token's taps."""
    return acts.q.astype(np.float32) * acts.scales.reshape(1, -1, 1)


@dataclasses.dataclass
class Option:
    """One compression option, fitted on one architecture's train split."""

    name: str
    fitted: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.name.split("-", 1)[0]

    @property
    def value(self) -> int:
        if "-" not in self.name:
            return 0
        try:
            return int(self.name.split("-", 1)[1])
        except ValueError as exc:
            raise FedMobiLLMError(f"bad compression option {self.name!r}") from exc

    def fit(self, train: TokenActivations) -> Option:
        """Fit what the option needs (PCA directions, scales) on the train split."""
        rng = np.random.default_rng(0)
        rows = rng.choice(len(train.q), min(FIT_TOKENS, len(train.q)), replace=False)
        x = dequantized_tokens(train)[rows] if self.kind in ("pca", "int4") else None
        if self.kind == "pca":
            means, proj = fit_pca(x, self.value)
            self.fitted = {"means": means, "proj": proj}
            self.fitted["scales"] = percentile_scales(project(x, means, proj), 127)
        elif self.kind == "int4":
            self.fitted = {"scales": percentile_scales(x, INT4_MAX)}
        return self

    def apply(self, acts: TokenActivations) -> TokenActivations:
        """The split as a device using this option would upload it."""
        k = self.kind
        if k == "tokens":
            return acts
        if k == "taps":
            keep = np.arange(acts.q.shape[1])[-self.value :]
            if self.value < 1 or self.value > acts.q.shape[1]:
                raise FedMobiLLMError(f"{self.name}: the bundle has {acts.q.shape[1]} taps")
            return dataclasses.replace(
                acts,
                q=np.ascontiguousarray(acts.q[:, keep]),
                scales=acts.scales[keep],
                taps=[acts.taps[i] for i in keep],
            )
        if k == "int4":
            s4 = self.fitted["scales"]
            q = quantize_int4(dequantized_tokens(acts), s4)  # (sum L, K, d)
            return dataclasses.replace(acts, q=q, scales=s4, bits=4)
        if k == "pca":
            f = self.fitted
            z = project(dequantized_tokens(acts), f["means"], f["proj"])  # (sum L, K, r)
            q = np.clip(np.rint(z / f["scales"].reshape(1, -1, 1)), -127, 127).astype(np.int8)
            return dataclasses.replace(acts, q=q, scales=f["scales"], hidden=self.value)
        if k == "seg":
            parts = []
            for x, mask in _dense_chunks(acts):
                px, pm = segment_pool(x, mask, self.value)
                s = acts.scales.reshape(1, -1, 1, 1)
                parts.append((np.clip(np.rint(px / s), -127, 127).astype(np.int8), pm))
            return _from_dense(acts, parts)
        raise FedMobiLLMError(
            f"unknown compression option {self.name!r}",
            hint="use tokens, taps-N, pca-R, int4, seg-S, or several joined with +",
        )


def compress(
    name: str, train: TokenActivations, splits: list[TokenActivations | None]
) -> list[TokenActivations | None]:
    """Apply option ``name`` (``a+b``: a then b), each step fitted on the (already
    transformed) train split, to ``train`` and ``splits``; returns [train', *splits']."""
    out: list[TokenActivations | None] = [train, *splits]
    for part in name.split("+"):
        opt = Option(part).fit(out[0])
        out = [None if s is None else opt.apply(s) for s in out]
    return out
