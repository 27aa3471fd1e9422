"""FedAvg baselines on Flower: ClientApp + ServerApp with Flower's FedAvg strategy, run in
Flower's simulation engine (Ray), one supernode per simulated device.

    python -m benchmarks._flower JOB.json OUT.json

Run by `benchmarks.run` in a subprocess whose PYTHONPATH holds flwr (see `_flower_env`).
The client's local work, evaluation and the simulated clock are those of `_fedavg`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np

from benchmarks._fedavg import ClientWork, FedAvgJob, RoundLog, ServerEval, initial_arrays

JOB_ENV = "FEDMOBILLM_BENCH_FLOWER_JOB"
log = logging.getLogger("benchmarks")


def _job() -> FedAvgJob:
    return FedAvgJob.load(os.environ[JOB_ENV])


def build_client_app():  # noqa: ANN201 (flwr types imported lazily)
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        job = _job()
        device = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"].get("server-round", 0))
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        out, metrics = ClientWork(job).fit(arrays, device, server_round)
        return Message(
            RecordDict({"arrays": ArrayRecord(out), "metrics": MetricRecord(metrics)}),
            reply_to=msg,
        )

    return app


def build_server_app(result_path: Path):  # noqa: ANN201
    from flwr.app import ArrayRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    app = ServerApp()

    class RecordingFedAvg(FedAvg):
        """Flower's FedAvg, plus a record of each round's client metrics (simulated clock)."""

        def __init__(self, rl: RoundLog, **kw) -> None:  # noqa: ANN003
            super().__init__(**kw)
            self.rl = rl

        def aggregate_train(self, server_round, replies):  # noqa: ANN001, ANN201
            replies = list(replies)
            ok = [m for m in replies if not m.has_error()]
            metrics = [dict(m.content["metrics"]) for m in ok]
            self.rl.add_round(server_round, metrics)
            return super().aggregate_train(server_round, replies)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        job = _job()
        # FedAvg samples its nodes with Python's `random` (flwr strategy_utils.sample_nodes):
        # seed it so a run's selection repeats (as far as Flower's node ids do)
        random.seed(job.seed)
        rl = RoundLog(job, "flower-simulation (Ray), flwr.serverapp.strategy.FedAvg")
        evaluator = ServerEval(job)

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            nd = arrays.to_numpy_ndarrays()
            res = evaluator(nd)
            rl.add_eval(server_round, res)
            rl.keep_best(server_round, res["accuracy"], nd)
            return MetricRecord({"accuracy": res["accuracy"], "loss": res["loss"]})

        strategy = RecordingFedAvg(
            rl,
            fraction_train=job.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=1,
            min_available_nodes=job.num_devices,
        )
        init = initial_arrays(job)
        res = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(init),
            num_rounds=job.rounds,
            evaluate_fn=evaluate_fn,
        )
        out = rl.result(evaluator, res.arrays.to_numpy_ndarrays())
        result_path.write_text(json.dumps(out, default=float))

    return app


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    job_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    os.environ[JOB_ENV] = str(job_path.resolve())
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    job = FedAvgJob.load(job_path)
    run_simulation(
        server_app=build_server_app(out_path.resolve()),
        client_app=build_client_app(),
        num_supernodes=job.num_devices,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    if not out_path.is_file():
        print("flower simulation ended without a result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
