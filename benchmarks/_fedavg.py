"""FedAvg baselines (LoRA and full fine-tuning): the client's local work, the server's
evaluation, and the simulated clock of synchronous rounds.

The same `FedAvgJob` drives both engines:
- Flower (`benchmarks._flower`): ClientApp / ServerApp with Flower's own FedAvg strategy in
  Flower's simulation engine (Ray);
- in-process (`run_inprocess`): when flwr is not importable. Aggregation is FedAvg as
  Flower defines it: the mean of the clients' arrays weighted by their num-examples.

Simulated clock of a round: every selected device downloads the global arrays, trains
`local_epochs` over its records, uploads its arrays; the round ends when the slowest
selected device is done (synchronous). Device time = bytes / link + FLOPs / device speed,
with the FLOPs per sample counted by `_models.flops_per_sample`.

Straggler-tolerant variant (``deadline_quantile``, in-process only): deadline-based partial
participation. The server fixes one round deadline D for the run, the ``q``-quantile of the
fleet's expected round times (what a server learns from its devices' past rounds; here from
their profiles); a selected device expected past D is cut at D: what it downloaded,
computed and uploaded until D is spent and counted, its update never arrives and it is not
aggregated. A round lasts D at most.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import DeviceProfile

log = logging.getLogger("benchmarks")


@dataclass
class FedAvgJob:
    method: str  # "lora" | "full"
    model_dir: str
    num_labels: int
    data_dir: str  # device-<i>.jsonl, validation.jsonl, test.jsonl
    num_devices: int
    profiles: list[dict[str, Any]]  # DeviceProfile dicts, one per device
    train_flops_per_sample: float
    rounds: int
    fraction_train: float
    local_epochs: int
    local_batch: int
    lr: float
    lora_rank: int
    max_seq_len: int
    seed: int
    target: float | None = None  # stop early once validation accuracy reaches it
    deadline_quantile: float | None = None  # straggler-tolerant rounds (module docstring)
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path | str) -> FedAvgJob:
        return cls(**json.loads(Path(path).read_text()))


def write_records(path: Path, records: list[Any]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({"text": r.text, "label": int(r.label)}) + "\n")


def read_records(path: Path) -> list[Any]:
    from fedmobillm.data import Record

    with open(path) as f:
        return [Record(d["text"], int(d["label"])) for d in map(json.loads, f)]


class ClientWork:
    """A device's local round; keeps its model between calls (one per process)."""

    _cache: dict[tuple, Any] = {}

    def __init__(self, job: FedAvgJob) -> None:
        import torch

        from benchmarks import _models as M

        torch.set_num_threads(1)
        # one model per process and configuration, seed included; its initial trainable
        # arrays are kept apart: the model itself holds whatever a run last set in it, so a
        # second run in the process (another seed, the deadline variant) must not start there
        key = (job.model_dir, job.method, job.num_labels, job.lora_rank, job.seed)
        if key not in self._cache:
            spec = M.ClassifierSpec(
                job.model_dir, job.num_labels, job.method, job.lora_rank, job.max_seq_len, job.seed
            )
            model = M.build_classifier(spec)
            init = [a.copy() for a in M.get_trainable(model)]
            self._cache[key] = (model, M.load_tokenizer(job.model_dir), init)
        self.model, self.tok, self.init = self._cache[key]
        self.job = job

    def fit(
        self, arrays: list[np.ndarray], device: int, server_round: int
    ) -> tuple[list[np.ndarray], dict]:
        from benchmarks import _models as M

        job = self.job
        M.set_trainable(self.model, arrays)
        records = read_records(Path(job.data_dir) / f"device-{device}.jsonl")
        t0 = time.perf_counter()
        n, loss = M.train_local(
            self.model,
            self.tok,
            records,
            epochs=job.local_epochs,
            batch=job.local_batch,
            lr=job.lr,
            max_seq_len=job.max_seq_len,
            seed=job.seed * 7919 + server_round * 131 + device,
        )
        wall = time.perf_counter() - t0
        out = M.get_trainable(self.model)
        prof = DeviceProfile(**job.profiles[device])
        down = sum(a.nbytes for a in arrays)
        up = sum(a.nbytes for a in out)
        flops = job.train_flops_per_sample * n
        sim = prof.down_s(down) + prof.compute_s(flops) + prof.up_s(up)
        metrics = {
            "num-examples": n,
            "loss": loss,
            "device": device,
            "sim_s": sim,
            "bytes_down": down,
            "bytes_up": up,
            "flops": flops,
            "host_train_s": wall,
        }
        return out, metrics


def initial_arrays(job: FedAvgJob) -> list[np.ndarray]:
    """The model's trainable arrays as built for ``job`` (its seed), whatever ran before."""
    return [a.copy() for a in ClientWork(job).init]


class ServerEval:
    def __init__(self, job: FedAvgJob) -> None:
        self.job = job
        self.work = ClientWork(job)
        self.val = read_records(Path(job.data_dir) / "validation.jsonl")
        self.test = read_records(Path(job.data_dir) / "test.jsonl")

    def __call__(self, arrays: list[np.ndarray], split: str = "validation") -> dict:
        from benchmarks import _models as M

        M.set_trainable(self.work.model, arrays)
        recs = self.val if split == "validation" else self.test
        return M.evaluate(self.work.model, self.work.tok, recs, self.job.max_seq_len)


class RoundLog:
    """Per-round records and the simulated clock; the result both engines write."""

    def __init__(self, job: FedAvgJob, engine: str) -> None:
        self.job = job
        self.engine = engine
        self.clock = 0.0
        self.rounds: list[dict[str, Any]] = []
        self.curve: list[dict[str, float]] = []
        self.per_device = {
            i: {"bytes_up": 0, "bytes_down": 0, "flops": 0.0, "rounds": 0}
            for i in range(job.num_devices)
        }
        self.t0 = time.perf_counter()
        # equal model selection (issue 22): the arrays of the first round (>= 1) with the best
        # validation accuracy are the ones tested, as fedmobillm's trainer keeps its best
        self.best_round = 0
        self.best_accuracy = -1.0
        self.best_arrays: list[np.ndarray] | None = None

    def keep_best(self, server_round: int, accuracy: float, arrays: list[np.ndarray]) -> None:
        """Keep a copy of ``arrays`` when round ``server_round`` (>= 1) beats the best so far."""
        if server_round >= 1 and accuracy > self.best_accuracy:
            self.best_round, self.best_accuracy = server_round, accuracy
            self.best_arrays = [a.copy() for a in arrays]

    def add_round(self, server_round: int, client_metrics: list[dict]) -> None:
        sims = [m["sim_s"] for m in client_metrics]
        losses = [m["loss"] for m in client_metrics if not m.get("dropped")]
        self.clock += max(sims) if sims else 0.0
        for m in client_metrics:
            d = self.per_device[int(m["device"])]
            d["bytes_up"] += int(m["bytes_up"])
            d["bytes_down"] += int(m["bytes_down"])
            d["flops"] += float(m["flops"])
            d["rounds"] += 1
        self.rounds.append(
            {
                "round": server_round,
                "devices": [int(m["device"]) for m in client_metrics],
                "round_sim_s": max(sims) if sims else 0.0,
                "clock_s": self.clock,
                "slowest_device": int(client_metrics[int(np.argmax(sims))]["device"])
                if sims
                else None,
                "mean_loss": float(np.mean(losses)) if losses else None,
                "dropped": [int(m["device"]) for m in client_metrics if m.get("dropped")],
                "host_train_s": float(sum(m["host_train_s"] for m in client_metrics)),
                "clients": [
                    {k: m[k] for k in ("device", "sim_s", "bytes_up", "bytes_down", "flops")}
                    for m in client_metrics
                ],
            }
        )

    def add_eval(self, server_round: int, res: dict) -> None:
        self.curve.append(
            {
                "round": server_round,
                "time_s": self.clock,
                "accuracy": res["accuracy"],
                "loss": res["loss"],
            }
        )
        log.info(
            "%s round %d: sim clock %.0f s, validation accuracy %.4f",
            self.job.method,
            server_round,
            self.clock,
            res["accuracy"],
        )

    def snapshot(self) -> list[dict]:
        """Cumulative per-device totals after each round (to cut at the target round)."""
        return [dict(v, device=k) for k, v in self.per_device.items()]

    def result(self, evaluate: Any, final: list[np.ndarray]) -> dict[str, Any]:
        """The run's record; ``test`` is the best-validation snapshot's test accuracy
        (``test_last`` the final arrays'); ``evaluate(arrays, "test")`` tests a snapshot."""
        last = evaluate(final, "test")
        last_round = self.rounds[-1]["round"] if self.rounds else 0
        if self.best_arrays is None or self.best_round == last_round:
            best = last
        else:
            best = evaluate(self.best_arrays, "test")
        return {
            "method": f"fedavg-{self.job.method}",
            "engine": self.engine,
            "curve": self.curve,
            "rounds": self.rounds,
            "per_device": self.snapshot(),
            "test": best,
            "test_last": last,
            "selection": f"best validation snapshot (round {self.best_round})",
            "best_round": self.best_round,
            "trainable_bytes": int(sum(a.nbytes for a in final)),
            "host_wall_s": time.perf_counter() - self.t0,
        }


def fedavg_aggregate(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """FedAvg: mean of the clients' arrays weighted by num-examples (Flower's rule)."""
    total = sum(n for _, n in results)
    return [
        sum(arrs[i].astype(np.float64) * (n / total) for arrs, n in results).astype(arrs0.dtype)
        for i, arrs0 in enumerate(results[0][0])
    ]


def expected_round_s(job: FedAvgJob, device: int, trainable_bytes: int, records: int) -> float:
    """A device's simulated round time before it trains: download, ``local_epochs`` over its
    ``records``, upload (``ClientWork.fit`` measures the same quantities)."""
    prof = DeviceProfile(**job.profiles[device])
    flops = job.train_flops_per_sample * records * job.local_epochs
    return prof.down_s(trainable_bytes) + prof.compute_s(flops) + prof.up_s(trainable_bytes)


def dropped_at_deadline(
    job: FedAvgJob, device: int, trainable_bytes: int, records: int, deadline: float
) -> dict[str, Any]:
    """The record of a device cut at ``deadline``: what it downloaded, computed and uploaded
    until then is spent and counted; its update never arrives and is not aggregated."""
    prof = DeviceProfile(**job.profiles[device])
    down_s = prof.down_s(trainable_bytes)
    flops = job.train_flops_per_sample * records * job.local_epochs
    computing = min(max(0.0, deadline - down_s), prof.compute_s(flops))
    uploading = max(0.0, deadline - down_s - prof.compute_s(flops))
    return {
        "num-examples": 0,
        "loss": None,
        "device": device,
        "sim_s": deadline,
        "bytes_down": int(min(trainable_bytes, deadline * prof.downlink_mbps * 1e6 / 8)),
        "bytes_up": int(min(trainable_bytes, uploading * prof.uplink_mbps * 1e6 / 8)),
        "flops": computing * prof.effective_gflops * 1e9,
        "host_train_s": 0.0,
        "dropped": True,
    }


def run_inprocess(job: FedAvgJob) -> dict[str, Any]:
    """FedAvg without Flower's engine: same client work, same weighted aggregation; with
    ``job.deadline_quantile`` the straggler-tolerant rounds of the module docstring."""
    rng = np.random.default_rng(job.seed)
    work = ClientWork(job)
    evaluator = ServerEval(job)
    arrays = initial_arrays(job)
    deadline = None
    engine = "in-process FedAvg (weighted by num-examples)"
    if job.deadline_quantile is not None:
        size = int(sum(a.nbytes for a in arrays))
        sizes = [
            len(read_records(Path(job.data_dir) / f"device-{i}.jsonl"))
            for i in range(job.num_devices)
        ]
        expected = [expected_round_s(job, i, size, n) for i, n in enumerate(sizes)]
        deadline = float(np.quantile(expected, job.deadline_quantile))
        engine += f", round deadline {deadline:.1f} s (q = {job.deadline_quantile})"
        log.info(
            "FedAvg-%s deadline %.1f s: the %.2f-quantile of the expected round times "
            "(%.1f-%.1f s); slower selected devices are cut",
            job.method, deadline, job.deadline_quantile, min(expected), max(expected),
        )  # fmt: skip
    rl = RoundLog(job, engine)
    rl.add_eval(0, evaluator(arrays))
    per_round = max(1, int(round(job.fraction_train * job.num_devices)))
    for r in range(1, job.rounds + 1):
        chosen = sorted(rng.choice(job.num_devices, per_round, replace=False).tolist())
        results, metrics = [], []
        for dev in chosen:
            if deadline is not None and expected[dev] > deadline:
                metrics.append(dropped_at_deadline(job, dev, size, sizes[dev], deadline))
                continue
            out, m = work.fit(arrays, dev, r)
            results.append((out, int(m["num-examples"])))
            metrics.append(m)
        if results:  # every selected device cut: the round changes nothing
            arrays = fedavg_aggregate(results)
        rl.add_round(r, metrics)
        res = evaluator(arrays)
        rl.add_eval(r, res)
        rl.keep_best(r, res["accuracy"], arrays)
        if job.target is not None and res["accuracy"] >= job.target:
            break
    out = rl.result(evaluator, arrays)
    if deadline is not None:
        out["method"] = f"fedavg-{job.method}-deadline"
        out["deadline_s"], out["deadline_quantile"] = deadline, job.deadline_quantile
        out["dropped_updates"] = sum(len(r["dropped"]) for r in rl.rounds)
        out["selected_updates"] = sum(len(r["devices"]) for r in rl.rounds)
    return out
