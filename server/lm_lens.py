"""A tuned-lens start for truncated decoders (the ``lm`` task).

A bundle whose graph ends before the model's last block (``smollm2-135m-l12``: blocks 1-12
of 30) read through the full model's final norm and LM head is not a language model (the
"logit lens": SmolLM2's block-12 output gives perplexity ~1e8 on friends). Its personal
model starts instead from a *tuned lens*: an affine translator ``W h + b`` from the
truncated model's deepest tap ``h`` (pre-norm, d) to the full model's last-block output
(pre final norm, d), fitted by ridge least squares on PUBLIC calibration text
(``LENS_CORPORA``: the vaderSentiment snippets, never a device's data) with the server's
own local copy of the model's weights (no hub). In the personal model the lens is a fixed
(not trained) part of the graph that writes

    delta_lens(h) = final_norm(W h + b) - final_norm(h)    (B, T, d)

so that ``head(final_norm(h) + delta_lens + delta_side) = head(final_norm(W h + b) +
delta_side)``: at step 0 (delta_side = 0) the personal model is exactly the tuned lens.
The phone needs nothing new (its ``delta`` hook already adds the graph's output to the
hidden state). Full-depth architectures get no lens: their personal model starts exactly
at the frozen model's predictions.

Fits are cached (safetensors, no pickle) under ``cache_dir()/lm-lens/`` keyed by the
weights' sha256, the depth and the calibration settings. ``FEDMOBILLM_LM_LENS=off``
turns the lens off (logged).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

LENS_VERSION = 1
LENS_CORPORA = ("nyt-snippets", "movie-snippets", "tweets")  # public, not the federation's
LENS_TEXTS = 64  # per corpus
LENS_MAX_LEN = 64  # tokens per text
RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # x mean diagonal of X^T X; chosen on held-out tokens
LENS_ENV = "FEDMOBILLM_LM_LENS"


@dataclass
class LensFit:
    """An affine map y ~= W x + b: weight (d_out, d_in), bias (d_out,), and how it was made."""

    weight: np.ndarray
    bias: np.ndarray
    meta: dict[str, Any]


def fit_affine(
    x: np.ndarray, y: np.ndarray, ridges: tuple[float, ...] = RIDGES, holdout: float = 0.1
) -> LensFit:
    """Ridge least squares ``y ~= x @ W.T + b`` for x (n, d_in), y (n, d_out). The ridge
    (relative to the mean diagonal of the centred X^T X) is the one of lowest squared error
    on the last ``holdout`` share of the rows, then refitted on all rows. meta: ridge, R^2
    on the held-out rows (of the chosen ridge) and of the identity map, rows."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise FedMobiLLMError(f"fit_affine needs x (n, d) and y (n, d'), got {x.shape}, {y.shape}")
    cut = max(1, int(len(x) * (1 - holdout))) if holdout > 0 and len(ridges) > 1 else len(x)
    scores = {}
    if cut < len(x):  # a seeded shuffle: the held-out rows are not the longest texts'
        perm = np.random.default_rng(0).permutation(len(x))
        x, y = x[perm], y[perm]
        for r in ridges:
            w, b = _ridge(x[:cut], y[:cut], r)
            scores[r] = float(((x[cut:] @ w.T + b - y[cut:]) ** 2).sum())
    ridge = min(scores, key=scores.__getitem__) if scores else ridges[0]
    w, b = _ridge(x, y, ridge)
    meta: dict[str, Any] = {"ridge": ridge, "rows": len(x)}
    if cut < len(x):
        total = float(((y[cut:] - y[cut:].mean(0)) ** 2).sum())
        meta["heldout_r2"] = 1 - scores[ridge] / total
        if x.shape[1] == y.shape[1]:
            meta["identity_r2"] = 1 - float(((x[cut:] - y[cut:]) ** 2).sum()) / total
    # contiguous: safetensors writes an array's memory as it lies (a transposed view would
    # come back transposed)
    return LensFit(np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32), meta)


def _ridge(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc  # (d_in, d_in)
    lam = ridge * max(float(np.trace(gram)) / len(gram), 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(len(gram)), xc.T @ yc).T  # (d_out, d_in)
    return w, my - w @ mx


class TunedLens(nn.Module):
    """The fixed lens of a personal model: deepest tap h (..., d) -> delta_lens (..., d) =
    final_norm(W h + b) - final_norm(h). ``norm`` is the model's frozen final norm."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, norm: nn.Module) -> None:
        super().__init__()
        d_out, d_in = weight.shape
        self.proj = nn.Linear(int(d_in), int(d_out))
        with torch.no_grad():
            self.proj.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            self.proj.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        self.norm = copy.deepcopy(norm).float()
        self.requires_grad_(False)
        self.meta: dict[str, Any] = {}

    @classmethod
    def from_fit(cls, fit: LensFit, norm: nn.Module) -> TunedLens:
        lens = cls(torch.from_numpy(fit.weight), torch.from_numpy(fit.bias), norm)
        lens.meta = dict(fit.meta)
        return lens

    def forward(self, tap: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(tap)) - self.norm(tap)

    def translated(self, tap: torch.Tensor) -> torch.Tensor:
        """The lens's hidden state final_norm(W h + b) (..., d)."""
        return self.norm(self.proj(tap))


# -- fitting on a model's weights -----------------------------------------------------------


def lens_enabled() -> bool:
    value = os.environ.get(LENS_ENV, "auto").strip().lower()
    if value not in ("auto", "on", "off", "0", "1"):
        raise FedMobiLLMError(f"{LENS_ENV}={value!r}: use auto, on or off")
    return value not in ("off", "0")


def model_depth(folder: Path) -> int:
    """num_hidden_layers of the Hugging Face config in ``folder``."""
    try:
        return int(json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError) as exc:
        raise FedMobiLLMError(f"{folder}/config.json has no num_hidden_layers: {exc}") from exc


def calibration_texts() -> list[str]:
    """LENS_TEXTS non-empty texts of each public corpus in LENS_CORPORA (never device data)."""
    from fedmobillm.data.lm import load_lm_corpus

    texts: list[str] = []
    for name in LENS_CORPORA:
        recs = [r.text for r in load_lm_corpus(name).records if r.text.strip()]
        texts += recs[:LENS_TEXTS]
    return texts


def lens_for(
    folder: Path, depth: int, norm: nn.Module, digest: str | None = None, threads: int = 0
) -> TunedLens | None:
    """The tuned lens of ``folder``'s model truncated after block ``depth`` (None at full
    depth, or when FEDMOBILLM_LM_LENS=off: said in the log). Cached on disk by the weights'
    sha256 (``digest``; computed when None), depth and calibration settings."""
    folder = Path(folder)
    full = model_depth(folder)
    if depth >= full:
        return None
    if not lens_enabled():
        log.warning("%s=off: the depth-%d architecture starts at the logit lens", LENS_ENV, depth)
        return None
    if digest is None:
        from fedmobillm.server.lm_heads import source_sha256

        digest = source_sha256(folder)
    fit = _cached_fit(folder, depth, digest, threads)
    lens = TunedLens.from_fit(fit, norm)
    log.info("tuned lens for blocks 1-%d of %d of %s: %s", depth, full, folder.name, fit.meta)
    return lens


def _cached_fit(folder: Path, depth: int, digest: str, threads: int) -> LensFit:
    from safetensors.numpy import load_file, save_file

    from fedmobillm.device_runtime.files import replacing
    from fedmobillm.paths import cache_dir

    settings = {"version": LENS_VERSION, "digest": digest, "depth": depth,
                "corpora": LENS_CORPORA, "texts": LENS_TEXTS, "max_len": LENS_MAX_LEN,
                "ridges": RIDGES}  # fmt: skip
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / "lm-lens" / f"{key}.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        z = load_file(str(path))
        return LensFit(z["weight"], z["bias"], meta)
    t = time.perf_counter()
    x, y = calibration_pairs(folder, depth, threads)
    fit = fit_affine(x, y)
    fit.meta.update(settings, seconds=round(time.perf_counter() - t, 1), cached=False)
    fit.meta["corpora"] = list(LENS_CORPORA)
    fit.meta["ridges"] = list(RIDGES)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        save_file({"weight": fit.weight, "bias": fit.bias}, str(tmp),
                  metadata={"meta": json.dumps(fit.meta)})  # fmt: skip
    return fit


@torch.no_grad()
def calibration_pairs(folder: Path, depth: int, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x (n, d): block ``depth``'s output, y (n, d): the last block's output (pre final
    norm), at every real token of the calibration texts (one eager forward of the model)."""
    from tokenizers import Tokenizer

    from fedmobillm.export.generate import load_causal_lm

    if threads:
        torch.set_num_threads(threads)
    model = load_causal_lm(folder)
    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    rows = [tok.encode(t).ids[:LENS_MAX_LEN] for t in calibration_texts()]
    rows = [r for r in rows if r]
    layers = model.model.layers
    got: dict[int, torch.Tensor] = {}

    def hook(t: int) -> Any:
        return lambda _m, _i, o: got.__setitem__(t, o[0] if isinstance(o, tuple) else o)

    hooks = [layers[depth - 1].register_forward_hook(hook(depth)),
             layers[-1].register_forward_hook(hook(len(layers)))]  # fmt: skip
    xs, ys = [], []
    try:
        order = np.argsort([len(r) for r in rows], kind="stable")
        for s in range(0, len(order), 16):
            part = [rows[i] for i in order[s : s + 16]]
            width = max(len(r) for r in part)
            ids = torch.zeros((len(part), width), dtype=torch.int64)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(part):
                ids[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), 1
            model.model(input_ids=ids, attention_mask=mask)
            real = mask.bool()
            xs.append(got[depth][real].float().numpy())
            ys.append(got[len(layers)][real].float().numpy())
    finally:
        for h in hooks:
            h.remove()
    return np.concatenate(xs), np.concatenate(ys)
