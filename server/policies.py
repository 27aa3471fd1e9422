"""The trainer's policies as plain functions: when it idles, and how it draws a balanced
mini-batch. The trainer thread (``server/trainer.py``) and the benchmarks' simulated clock
(``benchmarks/_fedmobillm.py``) both call them, so the two cannot drift apart. Torch-free."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from fedmobillm.errors import FedMobiLLMError

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


# How ``balanced_sample`` draws within one architecture (its share of the batch):
#   "device": a device uniformly for every sample, then a sample of that device uniformly
#             (a fast device does not dominate a slow one; the default);
#   "sample": a sample uniformly among all the architecture's samples;
#   "label":  a label uniformly among the labels the architecture holds, then a sample
#             uniformly among the architecture's samples of that label (label skew: a label
#             rare on this architecture's devices is drawn as often as a common one).
BALANCES = ("device", "sample", "label")


def balanced_sample(
    rng: np.random.Generator,
    batch_size: int,
    devices: Mapping[str, Sequence[Any]],
    arrays: Callable[[str, Any], tuple[np.ndarray, np.ndarray]],
    balance: str = "device",
    shares: Mapping[str, int] | None = None,
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Balanced mini-batch: an equal share of ``batch_size`` per architecture (``shares``:
    that many samples instead for the architectures it names, ``server.lm_batch``), drawn
    within one as ``balance`` says (``BALANCES``).

    ``devices``: architecture -> its devices that hold training samples (in a fixed order);
    ``arrays(arch, device)``: that device's (x (n, K, d), y (n,)). Returns
    [(arch, x (share, K, d), y (share,))], architectures in sorted order."""
    if balance not in BALANCES:
        raise FedMobiLLMError(
            f"unknown sampler balance {balance!r}", hint=f"use one of {', '.join(BALANCES)}"
        )
    if not devices:
        return []
    from fedmobillm.server.lm_batch import step_batches

    per = step_batches(devices, batch_size, shares)
    groups = []
    for name in sorted(devices):
        names, share = devices[name], per[name]
        if balance == "device":
            picks = _by_device(rng, share, len(names))
        else:
            ys = [arrays(name, d)[1] for d in names]  # [(n_i,)]
            picks = _by_sample(rng, share, ys, by_label=balance == "label")
        xs, yy = [], []
        for di in np.unique(picks[0]):
            x, y = arrays(name, names[di])  # (n, K, d), (n,)
            idx = picks[1][picks[0] == di]
            if balance == "device":
                idx = rng.integers(len(y), size=len(idx))
            xs.append(x[idx])
            yy.append(y[idx])
        groups.append((name, np.concatenate(xs), np.concatenate(yy)))  # (share, K, d)
    return groups


def _by_device(rng: np.random.Generator, share: int, n_devices: int) -> tuple[np.ndarray, ...]:
    """(device (share,), placeholder (share,)): a device uniformly per sample; the sample
    within the device is drawn by the caller."""
    return rng.integers(n_devices, size=share), np.zeros(share, np.int64)


def _by_sample(
    rng: np.random.Generator, share: int, ys: list[np.ndarray], by_label: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(device (share,), row (share,)): samples uniformly over all of ``ys`` (the devices'
    labels), or with ``by_label`` a label uniformly among those present, then a sample of
    that label uniformly."""
    dev = np.concatenate([np.full(len(y), i, np.int64) for i, y in enumerate(ys)])  # (n,)
    row = np.concatenate([np.arange(len(y), dtype=np.int64) for y in ys])  # (n,)
    if not by_label:
        pick = rng.integers(len(dev), size=share)
        return dev[pick], row[pick]
    y_all = np.concatenate(ys)  # (n,)
    labels = np.unique(y_all)
    want = labels[rng.integers(len(labels), size=share)]  # (share,)
    pick = np.empty(share, np.int64)
    for lab in np.unique(want):
        pool = np.flatnonzero(y_all == lab)
        at = np.flatnonzero(want == lab)
        pick[at] = pool[rng.integers(len(pool), size=len(at))]
    return dev[pick], row[pick]


def label_distribution(
    labels_by_device: Mapping[str, Sequence[int]], label_names: Sequence[str] | None
) -> dict[str, int]:
    """Counts per label name of one architecture's training samples (``labels_by_device``:
    device -> its labels). Without label names (no task yet) the keys are the label ids.
    Labels outside the names (never accepted by the server's checks) count under their id."""
    counts: dict[int, int] = {}
    for ys in list(labels_by_device.values()):  # copy: the trainer thread appends
        for v, n in zip(*np.unique(np.asarray(ys, np.int64), return_counts=True), strict=True):
            counts[int(v)] = counts.get(int(v), 0) + int(n)
    names = list(label_names or [])
    out = {name: counts.pop(i, 0) for i, name in enumerate(names)}
    out.update({str(i): n for i, n in sorted(counts.items())})
    return out
