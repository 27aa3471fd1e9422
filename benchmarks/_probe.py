"""Federated linear probe on the same single forward (issue 22's cheapest rival).

Each device forwards its records once through the same bundle fedmobillm runs (the same
forward FLOPs, the same int8 round trip of the taps) and keeps the last tap's pivot vector,
``d`` floats per record. FedAvg then trains a softmax-regression head on those features:
every round a fraction of the devices downloads the head, runs ``local_epochs`` of SGD on its
cached features and uploads the head; the server averages the heads weighted by
num-examples (Flower's rule) and evaluates on the validation features. The features are
standardised with the validation split's mean and std (the server's own data, sent once with
the first head download and counted).

Same fleet, device selection fraction, local epochs and batch as FedAvg-LoRA, the same
synchronous clock (a round lasts as long as its slowest selected device; a device's first
round also pays its forward of every local record). The learning rate is chosen by a sweep
on validation; the tested head is the best-validation round's (equal model selection). The
result has FedAvg's shape, so ``_report.fedavg_to_target`` cuts it at the target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks._common import DeviceProfile

log = logging.getLogger("benchmarks")

LR_SWEEP = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)  # 0.01 won at the low edge of (0.01..0.3)


@dataclass
class ProbeData:
    """Last-tap pivot features (float32, as the server would dequantise them)."""

    dev_x: list[np.ndarray]  # per device (n_i, d)
    dev_y: list[np.ndarray]  # per device (n_i,)
    val_x: np.ndarray  # (V, d)
    val_y: np.ndarray  # (V,)
    test: dict[str, tuple[np.ndarray, np.ndarray]]  # quant -> ((T, d), (T,))


@dataclass
class ProbeJob:
    num_labels: int
    profiles: list[DeviceProfile]
    fwd_flops_per_sample: float  # the bundle forward (same as fedmobillm's)
    rounds: int
    fraction_train: float
    local_epochs: int
    local_batch: int
    seed: int


def from_replay(features: dict[str, Any]) -> ProbeData:
    """ProbeData from the (N, K, d) activations ``_fedmobillm.replay`` kept: the last tap."""
    return ProbeData(
        [x[:, -1] for x in features["dev_x"]],
        list(features["dev_y"]),
        features["vx"][:, -1],
        features["vy"],
        {q: (x[:, -1], y) for q, (x, y, _) in features["tx"].items()},
    )


def _softmax_sgd(
    w: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float, epochs: int, batch: int, rng: Any
) -> np.ndarray:
    """SGD on softmax cross-entropy. w (d + 1, C) with the bias in its last row; x (n, d)."""
    w = w.copy()
    xb = np.hstack([x, np.ones((len(x), 1), x.dtype)])  # (n, d + 1)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for s in range(0, len(y), batch):
            idx = order[s : s + batch]
            logits = xb[idx] @ w  # (b, C)
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(idx)), y[idx]] -= 1.0
            w -= lr * (xb[idx].T @ p) / len(idx)
    return w


def _accuracy(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    logits = x @ w[:-1] + w[-1]
    return float(np.mean(np.argmax(logits, 1) == y)) if len(y) else float("nan")


def run(job: ProbeJob, data: ProbeData, lr: float, keep_head: bool = False) -> dict[str, Any]:
    """One federated run at ``lr``: the FedAvg-shaped result (curve, rounds, test, ...);
    ``keep_head``: also the best-validation head and the standardisation it reads
    (``head``: w (d + 1, C), mean (d,), std (d,); arrays, so not for a json file)."""
    mu, sd = data.val_x.mean(0), data.val_x.std(0) + 1e-6  # (d,)
    norm = lambda x: ((x - mu) / sd).astype(np.float32)  # noqa: E731
    dev_x = [norm(x) for x in data.dev_x]
    val_x = norm(data.val_x)
    d = val_x.shape[1]
    w = np.zeros((d + 1, job.num_labels), np.float32)
    head_bytes, stats_bytes = w.nbytes, mu.nbytes + sd.nbytes
    rng = np.random.default_rng(job.seed)
    n_dev = len(dev_x)
    per_round = max(1, int(round(job.fraction_train * n_dev)))
    forwarded = [False] * n_dev
    clock, rounds = 0.0, []
    curve = [{"round": 0, "time_s": 0.0, "accuracy": _accuracy(w, val_x, data.val_y)}]
    best = (-1.0, 0, w)
    for r in range(1, job.rounds + 1):
        chosen = sorted(rng.choice(n_dev, per_round, replace=False).tolist())
        outs, clients = [], []
        for dev in chosen:
            n = len(data.dev_y[dev])
            out = _softmax_sgd(
                w, dev_x[dev], data.dev_y[dev], lr, job.local_epochs, job.local_batch, rng
            )
            flops = 6.0 * (d + 1) * job.num_labels * n * job.local_epochs
            down = head_bytes + (0 if forwarded[dev] else stats_bytes)
            if not forwarded[dev]:
                flops += job.fwd_flops_per_sample * n
                forwarded[dev] = True
            p = job.profiles[dev]
            sim = p.down_s(down) + p.compute_s(flops) + p.up_s(head_bytes)
            outs.append((out, n))
            clients.append(
                {"device": dev, "sim_s": sim, "bytes_up": head_bytes, "bytes_down": down}
                | {"flops": flops}
            )
        total = sum(n for _, n in outs)
        w = np.sum([o * (n / total) for o, n in outs], axis=0).astype(np.float32)  # (d + 1, C)
        clock += max(c["sim_s"] for c in clients)
        rounds.append({"round": r, "clock_s": clock, "clients": clients})
        acc = _accuracy(w, val_x, data.val_y)
        curve.append({"round": r, "time_s": clock, "accuracy": acc})
        if acc > best[0]:
            best = (acc, r, w)
    tests = {q: _accuracy(best[2], norm(x), y) for q, (x, y) in data.test.items()}
    return {
        "method": "federated-linear-probe",
        "engine": "in-process FedAvg of a softmax-regression head (numpy)",
        "lr": lr,
        "curve": curve,
        "rounds": rounds,
        "best_round": best[1],
        "selection": f"best validation snapshot (round {best[1]})",
        "test_by_quant": tests,
        "trainable_bytes": int(head_bytes),
    } | ({"head": {"w": best[2], "mean": mu, "std": sd}} if keep_head else {})


def federated_probe(job: ProbeJob, data: ProbeData, fleet_quants: list[str]) -> dict[str, Any]:
    """The lr of ``LR_SWEEP`` with the best validation accuracy, its run, and the sweep.
    ``test``: the best-validation head's accuracy, averaged over the fleet's devices' quants."""
    runs = {lr: run(job, data, lr) for lr in LR_SWEEP}
    best_of = {lr: max(p["accuracy"] for p in r["curve"][1:]) for lr, r in runs.items()}
    lr = max(best_of, key=lambda k: best_of[k])
    res = runs[lr]
    tests = res["test_by_quant"]
    res["test"] = {"accuracy": float(np.mean([tests[q] for q in fleet_quants]))}
    res["lr_sweep"] = {str(k): v for k, v in best_of.items()}
    log.info(
        "federated linear probe: lr %g chosen on validation (best %.4f at round %d), test %.4f",
        lr,
        best_of[lr],
        res["best_round"],
        res["test"]["accuracy"],
    )
    return res
