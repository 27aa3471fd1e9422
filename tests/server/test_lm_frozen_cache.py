"""The frozen model's validation perplexity is cached per architecture on the validation
rows' version, not their count: a replaced row (same n) recomputes it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from fedmobillm.server import lm_trainer
from fedmobillm.server.trainer import ArchData


def test_frozen_perplexity_recomputed_when_a_validation_row_is_replaced(monkeypatch):
    frozen_calls = []

    def fake_scored(stats, personal, head, x, ids, mask, lmask) -> None:
        if personal is None:
            frozen_calls.append(1)
        stats.nll += 1.0
        stats.tokens += 1

    z = np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 1), np.int64)
    monkeypatch.setattr(lm_trainer, "scored_logits", fake_scored)
    monkeypatch.setattr(lm_trainer, "collate_lm", lambda xs: (z[0], z[1], z[1], z[1]))
    model = SimpleNamespace(eval=lambda: "personal")
    inner = SimpleNamespace(model=lambda name, averaged: model, heads={"a": None})
    t = object.__new__(lm_trainer.LMTrainer)
    t.side, t.frozen = SimpleNamespace(inner=inner), {}
    a = ArchData([1], 2, 4, tokens=True)
    a.val_x, a.val_y, a.val_from = [SimpleNamespace(tokens=3)], [-1], ["d"]
    t._evaluate_arch("a", a)
    t._evaluate_arch("a", a)
    assert len(frozen_calls) == 1  # cached while the rows stay
    a.val_x[0] = SimpleNamespace(tokens=4)  # replaced: n stays 1
    a.val_version += 1
    t._evaluate_arch("a", a)
    assert len(frozen_calls) == 2
