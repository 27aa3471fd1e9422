"""Seeded, stratified train / validation / test splits of a data set."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmobillm.device_runtime.records import Record

DATASET_SPLITS = ("train", "validation", "test")


def stratified_split(
    labels: Sequence[int], fractions: Sequence[float], seed: int
) -> list[list[int]]:
    """Indices into ``labels`` for each part, stratified by label.

    Each label's indices are shuffled and given evenly spaced keys in (0, 1); all indices
    are ordered by key (random tie-break) and cut at the cumulative fractions. Part sizes
    are exact (rounded) and every part has nearly each label's share. Parts are sorted."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels, dtype=np.int64)  # (N,)
    keys = np.zeros(len(labels_arr))  # (N,)
    for label in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == label))  # (n_label,)
        keys[idx] = (np.arange(len(idx)) + 0.5) / len(idx)
    order = np.lexsort((rng.random(len(labels_arr)), keys))  # (N,)
    cuts = [int(round(len(order) * c)) for c in np.cumsum(fractions)[:-1]]
    return [sorted(part.tolist()) for part in np.split(order, cuts)]


def split_parts(parts: dict[str, list[Record]], seed: int) -> dict[str, list[Record]]:
    if "all" in parts:
        recs = parts["all"]
        idx = stratified_split([r.label for r in recs], (0.8, 0.1, 0.1), seed)
        return {s: [recs[i] for i in ix] for s, ix in zip(DATASET_SPLITS, idx, strict=True)}
    train = parts["train"]
    tr, va = stratified_split([r.label for r in train], (0.9, 0.1), seed)
    return {
        "train": [train[i] for i in tr],
        "validation": [train[i] for i in va],
        "test": parts["test"],
    }


SPLIT_RULE_A = "stratified 80/10/10 train/validation/test, numpy default_rng(seed)"
SPLIT_RULE_B = "official test; official train stratified 90/10 train/validation, default_rng(seed)"
