"""Calibration text, per-tap activation pre-scales and the exported-vs-eager check."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION = "movie-snippets"
PERCENTILE = 99.9

# Used only when the data module (or its named data set) is not available.
BUILTIN_SENTENCES = [
    "A gripping, beautifully shot film with a story that stays with you.",
    "The plot is thin and the jokes fall flat for most of its running time.",
    "An uneven but often charming comedy about friendship and second chances.",
    "I could not wait for it to end; the dialogue is painfully wooden.",
    "Its performances are terrific, especially the quietly devastating lead.",
    "A loud, overlong sequel that forgets what made the first one fun.",
    "Smart, funny and surprisingly moving, this is one of the year's best.",
    "Neither the script nor the direction rises above television fare.",
    "The soundtrack alone is worth the price of admission.",
    "A tedious exercise in style over substance.",
    "What begins as a thriller turns into a thoughtful study of grief.",
    "Predictable from the opening scene, but the cast makes it watchable.",
    "The movie is a small miracle of economy and wit.",
    "Even fans of the genre will find little here to enjoy.",
    "It is the kind of film that rewards a second viewing.",
    "The special effects cannot save a story this confused.",
]


def calibration_texts(source: str | None, limit: int = 64) -> list[str]:
    """Texts from a data name or file (via fedmobillm.data), else built-ins."""
    name = source or DEFAULT_CALIBRATION
    if source and Path(source).suffix == ".txt":
        if not Path(source).is_file():
            raise FedMobiLLMError(f"calibration file {source} does not exist")
        return texts_from_file(Path(source))[:limit]
    try:
        from fedmobillm.data import load_dataset
    except ImportError:
        if source:
            raise FedMobiLLMError(
                f"cannot read calibration data {source!r}: the data module is not installed"
            ) from None
        log.warning(
            "calibrate: data module missing; using %d built-in sentences", len(BUILTIN_SENTENCES)
        )
        return BUILTIN_SENTENCES[:limit]
    try:
        dataset = load_dataset(name)
    except FedMobiLLMError:
        if source:
            raise
        log.warning("calibrate: %s unavailable; using built-in sentences", name)
        return BUILTIN_SENTENCES[:limit]
    split = dataset.splits.get("train") or next(iter(dataset.splits.values()))
    texts = [r.text for r in split if r.text.strip()][:limit]
    if not texts:
        raise FedMobiLLMError(f"calibration data {name!r} has no text")
    return texts


def calibration_records(source: str, limit: int) -> tuple[list[str], list[int]]:
    """Texts and their labels (-1: none) from a labelled data name or .jsonl/.csv file (its
    train split, else its first): what a supervised ``--dp-projection`` is fitted on. A
    .txt file has no labels and is refused, as is data with fewer than two classes."""
    if Path(source).suffix == ".txt":
        raise FedMobiLLMError(
            f"calibration file {source} has no labels (one text a line)",
            hint="a supervised dp projection needs labelled public data: a data set name or "
            "a .jsonl/.csv file with columns text,label",
        )
    from fedmobillm.data import load_dataset

    dataset = load_dataset(source)
    split = dataset.splits.get("train") or next(iter(dataset.splits.values()))
    rows = [(r.text, int(r.label)) for r in split if r.text.strip()][:limit]
    if len({y for _, y in rows if y >= 0}) < 2:
        raise FedMobiLLMError(
            f"calibration data {source!r} has fewer than two labelled classes",
            hint="a supervised dp projection needs labelled public data",
        )
    return [t for t, _ in rows], [y for _, y in rows]


def texts_from_file(path: Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def tap_scales(
    taps: np.ndarray, attention_mask: np.ndarray, percentile: float = PERCENTILE
) -> list[float]:
    """Symmetric int8 scale per tap = percentile(|activation|) / 127.

    taps: (N, K, d) pivot activations, or (N, K, T, d) with pivot none (padding excluded)."""
    k = taps.shape[1]
    scales = []
    for i in range(k):
        values = taps[:, i]
        if values.ndim == 3:  # (N, T, d): keep real tokens only
            values = values[attention_mask.astype(bool)]
        clip = float(np.percentile(np.abs(values), percentile))
        scales.append(max(clip, 1e-6) / 127.0)
    return scales


@dataclass
class TapError:
    max_abs: list[float]
    cosine: list[float]  # min over samples, per tap

    def to_dict(self) -> dict:
        return {"max_abs": self.max_abs, "min_cosine": self.cosine}


def compare(got: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> TapError:
    """Per-tap max-abs error and min cosine over samples; arrays (N, K, d) or (N, K, T, d).
    ``mask`` (N, T), token taps only: padding positions are left out (zeroed in both), as a
    device zeroes them before upload; their values mean nothing and int8 moves them most."""
    if got.shape != ref.shape:
        raise FedMobiLLMError(f"graph output shape {got.shape} differs from eager {ref.shape}")
    if mask is not None and ref.ndim == 4:
        keep = np.asarray(mask)[:, None, : ref.shape[2], None].astype(ref.dtype)  # (N,1,T,1)
        got, ref = got * keep, ref * keep
    k = ref.shape[1]
    g = got.reshape(got.shape[0], k, -1).astype(np.float64)  # (N, K, F)
    r = ref.reshape(ref.shape[0], k, -1).astype(np.float64)  # (N, K, F)
    max_abs = np.abs(g - r).max(axis=(0, 2))
    denom = np.linalg.norm(g, axis=2) * np.linalg.norm(r, axis=2) + 1e-12
    cosine = ((g * r).sum(axis=2) / denom).min(axis=0)
    return TapError([float(x) for x in max_abs], [float(x) for x in cosine])


def tokenize(tokenizer, texts: list[str], max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_seq_len, return_tensors="np"
    )
    ids = enc["input_ids"].astype(np.int64)  # (N, T)
    mask = enc["attention_mask"].astype(np.int64)  # (N, T)
    if ids.shape[1] < 2:  # graphs accept seq >= 2
        pad = tokenizer.pad_token_id or 0
        ids = np.pad(ids, ((0, 0), (0, 2 - ids.shape[1])), constant_values=pad)
        mask = np.pad(mask, ((0, 0), (0, 2 - mask.shape[1])))
    return ids, mask


def eager_taps(
    wrapper: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, batch: int = 16
) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            out = wrapper(
                torch.from_numpy(ids[i : i + batch]), torch.from_numpy(mask[i : i + batch])
            )
            outs.append(out.numpy())
    return np.concatenate(outs)
