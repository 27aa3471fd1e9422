"""The trainer's policies as plain functions: when it idles, and how it draws a balanced
mini-batch. The trainer thread (``server/trainer.py``) and the benchmarks' simulated clock
(``benchmarks/_fedmobillm.py``) both call them, so the two cannot drift apart. Torch-free."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

# The epoch rule never idles the trainer before this many steps since the last new data
MIN_STEPS_BEFORE_IDLE = 50


class IdleSettings(Protocol):
    """The fields of ``ServerSettings`` the idle rule reads."""

    idle_after_steps: int
    idle_after_epochs: float
    batch_size: int


def should_idle(settings: IdleSettings, steps_since_data: int, num_train: int) -> bool:
    """Whether the trainer pauses: ``idle_after_steps`` steps without new data (0 = no cap),
    or (after at least MIN_STEPS_BEFORE_IDLE steps) ``idle_after_epochs`` epochs of the
    ``num_train`` training samples drawn since the last new upload (0 = never)."""
    s, since = settings, steps_since_data
    if s.idle_after_steps and since >= s.idle_after_steps:
        return True
    if not s.idle_after_epochs or since < MIN_STEPS_BEFORE_IDLE:
        return False
    return since * s.batch_size >= s.idle_after_epochs * num_train


def balanced_sample(
    rng: np.random.Generator,
    batch_size: int,
    devices: Mapping[str, Sequence[Any]],
    arrays: Callable[[str, Any], tuple[np.ndarray, np.ndarray]],
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Balanced mini-batch: an equal share of ``batch_size`` per architecture; within one, a
    device is drawn uniformly for every sample, then a sample of that device uniformly.

    ``devices``: architecture -> its devices that hold training samples (in a fixed order);
    ``arrays(arch, device)``: that device's (x (n, K, d), y (n,)). Returns
    [(arch, x (share, K, d), y (share,))], architectures in sorted order."""
    if not devices:
        return []
    share = max(1, batch_size // len(devices))
    groups = []
    for name in sorted(devices):
        names = devices[name]
        picks = rng.integers(len(names), size=share)  # (share,)
        xs, ys = [], []
        for di in np.unique(picks):
            x, y = arrays(name, names[di])  # (n, K, d), (n,)
            idx = rng.integers(len(y), size=int((picks == di).sum()))
            xs.append(x[idx])
            ys.append(y[idx])
        groups.append((name, np.concatenate(xs), np.concatenate(ys)))  # (share, K, d)
    return groups
