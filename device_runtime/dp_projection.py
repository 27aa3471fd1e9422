"""Project before noise: a fixed, public, per-tap orthonormal basis for the privacy
mechanism (``privacy.clip_and_noise``).

A bundle exported with ``--dp-projection R`` carries ``dp_projection.safetensors``: for every
tap k a basis ``P_k`` (R, d) with orthonormal rows and a centre ``mu_k`` (d,), the PCA of the
tap's activations on *public* calibration text (with ``--dp-projection-supervised S``, its
first S rows the discriminant directions of that text's public labels: ``fit_projection``;
computed at export, hashed in the manifest like every bundle file, named by its
``dp_projection`` entry). With a privacy mechanism on,
the device releases, per tap vector x (pivot: K per sample; token bundle: K per real token)

    u = S_k P_k (x - mu_k)                   (R,)   coordinates in the public subspace
    u <- u * min(1, clip / ||u||)                    clipped: ||u|| <= clip
    y = P_k^T (u + N(0, (sigma clip)^2 I_R))  (d,)  uploaded, as wide as before

S_k (R,) is 1 (plain PCA) or, for a *whitened* basis, 1 / sqrt(the public variance of each
component), so that the clip does not hand the whole norm to the first few components. The
release is the clipped, noised R-dim coordinates; lifting them with the public P_k^T is
post-processing, so the (epsilon, delta) guarantee and its accounting are the same as the
unprojected mechanism's (the sensitivity is still 2 clip per vector), while the noise lives in
R dimensions instead of d: its energy per vector falls from d (sigma clip)^2 to R (sigma
clip)^2. The wire format and the server are unchanged (an upload is still (N, K, d)).

The personal model on the phone then sees the same projection without noise
(``clean``: P^T clip(P (x - mu))), the mean of what it was trained on.

Torch-free: numpy and safetensors only (no pickle).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

PROJECTION_FILE = "dp_projection.safetensors"
MANIFEST_KEY = "dp_projection"  # manifest entry: {"file", "rank", "centered", ...}
FORMAT = "fedmobillm-dp-projection-1"
MIN_VARIANCE_SHARE = 1e-6  # components under this x the top public variance are refused
ORTHONORMAL_TOL = 1e-4
SHRINKAGE = 0.1  # discriminants: covariance + SHRINKAGE * its mean eigenvalue


@dataclass(frozen=True)
class DpProjection:
    """basis: (K, R, d) float32, each tap's rows orthonormal; mean: (K, d) float32; scale:
    (K, R) float32 per-component scale applied before the clip (ones: plain PCA; None is
    read as ones)."""

    basis: np.ndarray
    mean: np.ndarray
    scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        b, m = self.basis, self.mean
        if b.ndim != 3 or m.ndim != 2 or m.shape != (b.shape[0], b.shape[2]):
            raise FedMobiLLMError(
                f"a dp projection is a basis (K, R, d) and a mean (K, d), got "
                f"{list(b.shape)} and {list(m.shape)}"
            )
        if not 1 <= b.shape[1] <= b.shape[2]:
            raise FedMobiLLMError(f"projection rank {b.shape[1]} must be in 1..{b.shape[2]}")
        if self.scale is None:
            object.__setattr__(self, "scale", np.ones(b.shape[:2], np.float32))
        sc = np.asarray(self.scale)
        if sc.shape != b.shape[:2] or not (np.isfinite(sc).all() and (sc > 0).all()):
            raise FedMobiLLMError(
                f"the dp projection's scale must be positive (K, R) = {list(b.shape[:2])}"
            )
        if not (np.isfinite(b).all() and np.isfinite(m).all()):
            raise FedMobiLLMError("the dp projection has non-finite values")
        err = orthonormality_error(b)
        if err > ORTHONORMAL_TOL:
            raise FedMobiLLMError(
                f"the dp projection's basis is not orthonormal (max |P P^T - I| = {err:.2e})",
                hint="re-export the bundle with --dp-projection",
            )

    @property
    def num_taps(self) -> int:
        return int(self.basis.shape[0])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @property
    def hidden(self) -> int:
        return int(self.basis.shape[2])

    @property
    def whitened(self) -> bool:
        return not bool(np.all(np.asarray(self.scale) == 1.0))

    @property
    def spread(self) -> float:
        """max over taps and coordinates j of ||P_k[:, j]|| (<= 1): the largest noise std of
        one uploaded coordinate, in units of the noise std in the subspace."""
        return float(np.sqrt((self.basis.astype(np.float64) ** 2).sum(axis=1).max()))

    def _tap_axes(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """basis and mean broadcast against x (N, K, d) or (N, K, T, d)."""
        if x.ndim not in (3, 4) or x.shape[1] != self.num_taps or x.shape[-1] != self.hidden:
            raise FedMobiLLMError(
                f"the dp projection takes taps (N, {self.num_taps}, [T,] {self.hidden}), got "
                f"{list(x.shape)}"
            )
        extra = (None,) * (x.ndim - 3)
        b = self.basis.astype(np.float64)[(None, slice(None)) + extra]  # (1, K, [1,] R, d)
        m = self.mean.astype(np.float64)[(None, slice(None)) + extra]  # (1, K, [1,] d)
        return b, m

    def coords(self, x: np.ndarray) -> np.ndarray:
        """x (N, K, [T,] d) -> S_k P_k (x - mu_k): (N, K, [T,] R) float64."""
        b, m = self._tap_axes(x)
        extra = (None,) * (x.ndim - 3)
        sc = np.asarray(self.scale, np.float64)[(None, slice(None)) + extra]  # (1, K, [1,] R)
        return sc * np.einsum("...rd,...d->...r", b, np.asarray(x, np.float64) - m)

    def lift(self, u: np.ndarray, like: np.ndarray) -> np.ndarray:
        """u (N, K, [T,] R) -> P_k^T u: (N, K, [T,] d) float64 (``like``: the taps' shape)."""
        b, _ = self._tap_axes(like)
        return np.einsum("...rd,...r->...d", b, u)

    def clean(self, x: np.ndarray, clip: float) -> np.ndarray:
        """What the personal model sees on the phone: the release without noise,
        P^T clip(P (x - mu)), float32 of x's shape."""
        u = self.coords(x)
        norms = np.linalg.norm(u, axis=-1, keepdims=True)
        u = u * np.minimum(1.0, clip / np.maximum(norms, 1e-12))
        return self.lift(u, x).astype(np.float32)

    def view(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """The bundle's feature map without noise or clip, P^T S P (x - mu), float32 of x's
        shape: what the personal model reads on the phone, and what a device without a
        privacy mechanism uploads from a bundle with a projection (so every upload of the
        bundle lies in the same subspace). The side network's alignment starts with a
        LayerNorm, so the clip's scale does not matter there, and unclipped values keep
        their int8 resolution. mask (N, T) for token taps: padding stays zero."""
        out = self.clean(x, math.inf)
        if x.ndim == 4 and mask is not None:
            out = np.where(np.asarray(mask, bool)[:, None, :, None], out, 0.0).astype(np.float32)
        return out

    def save(self, path: Path, info: dict[str, str] | None = None) -> None:
        from safetensors.numpy import save_file

        meta = {"format": FORMAT, "rank": str(self.rank), **(info or {})}
        save_file(
            {  # safetensors writes the buffer as it lies: C order
                "basis": np.ascontiguousarray(self.basis, np.float32),
                "mean": np.ascontiguousarray(self.mean, np.float32),
                "scale": np.ascontiguousarray(self.scale, np.float32),
            },
            str(path),
            metadata=meta,
        )


def orthonormality_error(basis: np.ndarray) -> float:
    """max over taps of max |P_k P_k^T - I| (basis (K, R, d))."""
    b = np.asarray(basis, np.float64)
    gram = np.einsum("krd,ksd->krs", b, b)
    return float(np.abs(gram - np.eye(b.shape[1])[None]).max())


def fit_projection(
    vectors: np.ndarray,
    rank: int,
    whiten: bool = False,
    labels: np.ndarray | None = None,
    supervised: int = 0,
    shrinkage: float = SHRINKAGE,
) -> tuple[DpProjection, list[float]]:
    """The per-tap basis of public activations ``vectors`` (M, K, d) (pivot vectors, or every
    real token's vectors stacked): centre = the mean; basis = first ``supervised``
    discriminant directions of the public ``labels`` (M,) (-1: unlabelled, counted in the
    covariance only), then the top eigenvectors of the covariance of what they leave
    (plain PCA when ``supervised`` is 0), ``rank`` rows in all, orthonormal; ``whiten``:
    scale = 1 / sqrt(each component's public variance). Returns the projection and, per
    tap, the share of variance it keeps.

    The discriminant directions (``discriminants``: Fisher's LDA with a shrunk covariance)
    are where the public labels differ most per unit of public spread: for a task like the
    public labels' (sentiment of other corpora) a few such coordinates carry more of the
    label than many of the largest-variance ones, and each coordinate costs the same noise.
    The labels must be public too: they shape what every upload keeps."""
    v = np.asarray(vectors, np.float64)
    if v.ndim != 3 or v.shape[0] < 2:
        raise FedMobiLLMError(f"fit_projection takes public vectors (M >= 2, K, d), got {v.shape}")
    if not 1 <= rank <= v.shape[2]:
        raise FedMobiLLMError(
            f"--dp-projection {rank} must be in 1..{v.shape[2]} (the hidden size)",
            hint="a rank of a few dozen keeps most of the variance of a tap",
        )
    if rank > v.shape[0] - 1:  # M centred vectors span at most M - 1 directions
        raise FedMobiLLMError(
            f"--dp-projection {rank} needs more public vectors: {v.shape[0]} centred vectors "
            f"span at most {v.shape[0] - 1} directions, the rest would have zero variance",
            hint="pass more public calibration text (--calibration) or a smaller rank",
        )
    y = _check_labels(labels, supervised, rank, v.shape[0])
    bases, means, kept, scales = [], [], [], []
    for k in range(v.shape[1]):
        x = v[:, k, :]
        mu = x.mean(axis=0)
        cov = np.cov(x - mu, rowvar=False)  # (d, d)
        lead = discriminants(x, y, supervised, shrinkage) if supervised else np.zeros((0, len(mu)))
        # the covariance of what the discriminant directions leave: P = I - L^T L
        rest = np.eye(len(mu)) - lead.T @ lead  # (d, d)
        vals, vecs = np.linalg.eigh(rest @ cov @ rest)  # ascending
        top = np.vstack([lead, vecs[:, ::-1][:, : rank - len(lead)].T])  # (R, d)
        q, _ = np.linalg.qr(top.T)  # re-orthonormalise (fp error), keeps the order
        basis = q.T  # (R, d)
        bases.append(np.ascontiguousarray(basis, np.float32))
        means.append(mu.astype(np.float32))
        var = np.einsum("rd,de,re->r", basis, cov, basis)  # (R,) public variance
        _check_variance(var, k, rank)
        scales.append(1.0 / np.sqrt(np.maximum(var, 1e-12)) if whiten else np.ones(rank))
        kept.append(float(var.sum() / max(np.trace(cov), 1e-30)))
    scale = np.stack(scales).astype(np.float32)
    return DpProjection(np.stack(bases), np.stack(means), scale), kept


def discriminants(
    x: np.ndarray, labels: np.ndarray, count: int, shrinkage: float = SHRINKAGE
) -> np.ndarray:
    """(count, d) orthonormal rows spanning the top ``count`` Fisher discriminant directions
    of ``x`` (M, d) with ``labels`` (M,) (-1: unlabelled): the leading generalized
    eigenvectors of S_b w = lambda C w, S_b the between-class scatter of the labelled
    vectors, C the covariance of all of them shrunk towards its mean eigenvalue
    (C + shrinkage * tr(C) / d * I, so that directions of tiny public variance cannot
    dominate). At most (number of classes - 1) directions exist."""
    x = np.asarray(x, np.float64)
    mu = x.mean(axis=0)
    cov = np.cov(x - mu, rowvar=False)
    reg = cov + shrinkage * np.trace(cov) / len(mu) * np.eye(len(mu))
    lab = labels >= 0
    classes = np.unique(labels[lab])
    if len(classes) - 1 < count:
        raise FedMobiLLMError(
            f"{count} discriminant directions need {count + 1} public classes, the labels "
            f"have {len(classes)}",
            hint="ask for fewer supervised directions or use labelled public text",
        )
    centre = x[lab].mean(axis=0)
    diffs = np.stack(
        [np.sqrt(np.sum(labels == c)) * (x[labels == c].mean(axis=0) - centre) for c in classes]
    )  # (C, d): S_b = diffs^T diffs
    # C^-1/2 S_b C^-1/2 is symmetric: its top eigenvectors e give w = C^-1/2 e
    vals, vecs = np.linalg.eigh(reg)
    inv_root = (vecs / np.sqrt(vals)) @ vecs.T  # (d, d)
    m = inv_root @ diffs.T  # (d, C)
    u, _, _ = np.linalg.svd(m, full_matrices=False)  # top left singular vectors of m m^T
    w = inv_root @ u[:, :count]  # (d, count)
    q, _ = np.linalg.qr(w)
    return q.T  # (count, d)


def _check_labels(
    labels: np.ndarray | None, supervised: int, rank: int, m: int
) -> np.ndarray | None:
    """The public labels as (M,) int64 when ``supervised`` directions are asked for."""
    if supervised < 0 or supervised > rank:
        raise FedMobiLLMError(
            f"{supervised} supervised directions must be in 0..{rank} (the rank)",
            hint="e.g. 1 for a two-class task",
        )
    if not supervised:
        return None
    if labels is None:
        raise FedMobiLLMError(
            "a supervised dp projection needs the public text's labels",
            hint="pass labelled public calibration data (a data set or .jsonl/.csv with labels)",
        )
    y = np.asarray(labels).astype(np.int64)
    if y.shape != (m,):
        raise FedMobiLLMError(f"{len(y)} labels for {m} public vectors")
    return y


def _check_variance(var: np.ndarray, tap: int, rank: int) -> None:
    """Refuse a basis whose components (var (R,), public variance) include one with under
    MIN_VARIANCE_SHARE of the largest: whitening would scale it by ~1/sqrt(0) (fp16 uploads
    non-finite, int8 saturated) and the clip budget would go to directions the public text
    never uses."""
    low = np.flatnonzero(var < MIN_VARIANCE_SHARE * max(float(var.max()), 1e-30))
    if low.size:
        raise FedMobiLLMError(
            f"--dp-projection {rank}: tap {tap} has {low.size} of {rank} components with "
            f"public variance under {MIN_VARIANCE_SHARE:g} of the largest (a degenerate "
            "basis: its coordinates would be noise and rounding)",
            hint=f"use a rank of at most {int(low[0])} or more varied public calibration text",
        )


def manifest_entry(manifest: Any) -> dict[str, Any] | None:
    """The manifest's ``dp_projection`` entry (protocol.Manifest, its extra), or None."""
    extra = getattr(manifest, "extra", None) or {}
    entry = extra.get(MANIFEST_KEY)
    return entry if isinstance(entry, dict) else None


@functools.lru_cache(maxsize=8)
def _cached(bundle_dir: str, sha256: str) -> DpProjection | None:
    from fedmobillm.device_runtime.protocol import read_manifest

    return load_projection(Path(bundle_dir), read_manifest(Path(bundle_dir)))


def bundle_projection(bundle_dir: Path, manifest: Any) -> DpProjection | None:
    """``load_projection``, read once per bundle (keyed by the projection file's sha256)."""
    entry = manifest_entry(manifest)
    if entry is None:
        return None
    name = str(entry.get("file", PROJECTION_FILE))
    return _cached(str(Path(bundle_dir).resolve()), str(manifest.files.get(name, {})))


def load_projection(bundle_dir: Path, manifest: Any) -> DpProjection | None:
    """The bundle's projection, or None when its manifest names none. The file is one of the
    bundle's hashed files (``load_verified_bundle`` checked it); its shapes must match the
    manifest's taps and hidden size."""
    entry = manifest_entry(manifest)
    if entry is None:
        return None
    name = str(entry.get("file", PROJECTION_FILE))
    if name not in manifest.files:
        raise FedMobiLLMError(
            f"the manifest names dp projection {name!r}, but it is not among the bundle's "
            "hashed files",
            hint="re-export the bundle with --dp-projection",
        )
    from safetensors.numpy import load_file

    path = Path(bundle_dir) / name
    if not path.is_file():
        raise FedMobiLLMError(f"{path} is missing", hint="copy the whole bundle folder")
    t = load_file(str(path))
    if not {"basis", "mean"} <= set(t) <= {"basis", "mean", "scale"}:
        raise FedMobiLLMError(f"{path} holds {sorted(t)}, not basis, mean (and scale)")
    proj = DpProjection(t["basis"], t["mean"], t.get("scale"))
    want = (len(manifest.taps), int(entry.get("rank", proj.rank)), int(manifest.hidden_size))
    if (proj.num_taps, proj.rank, proj.hidden) != want:
        raise FedMobiLLMError(
            f"{path} has shape {list(proj.basis.shape)}, the manifest says (K, R, d) = "
            f"{list(want)}",
            hint="re-export the bundle with --dp-projection",
        )
    return proj
