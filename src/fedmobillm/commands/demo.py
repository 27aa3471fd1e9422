"""`fedmobillm demo`: the whole system on one machine (see fedmobillm.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "demo"
HELP = (
    "run a heterogeneous federation end to end on this machine: export, server, device "
    "processes, asynchronous training, on-device evaluation"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=6, help="simulated devices (default 6)")
    parser.add_argument(
        "--backbones",
        default="minilm-l3,minilm-l6,smollm2-135m",
        help="comma-separated models, assigned to devices round-robin",
    )
    parser.add_argument("--data", default="movie-snippets", help="dataset name or local file")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--alpha", type=float, help="non-IID: Dirichlet(alpha) over labels, e.g. 0.5")
    g.add_argument("--iid", action="store_true", help="IID partition (the default)")
    m = parser.add_mutually_exclusive_group()
    m.add_argument(
        "--quick",
        action="store_true",
        default=True,
        help="a slice of the data, done in under 10 minutes (default)",
    )
    m.add_argument("--full", action="store_true", help="all the data")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/demo"),
        help="run folder (default runs/demo). Running the demo again in the same folder, also "
        "after Ctrl-C, starts a new run: the previous run's server data, device states, logs "
        "and results there are removed first (bundles stay cached elsewhere); pass another "
        "folder to keep them",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds of training before it stops (default 300 quick, 3600 full)",
    )
    parser.add_argument("--target-accuracy", type=float, help="stop at this validation accuracy")
    parser.add_argument("--train-limit", type=int, help="train records used in all")
    parser.add_argument("--eval-limit", type=int, help="test records evaluated")
    parser.add_argument(
        "--settle-steps",
        type=int,
        default=400,
        help="trainer steps after the last upload before stopping",
    )
    parser.add_argument(
        "--anchors",
        type=int,
        help="public unlabelled anchor texts (train records held out of the devices' data) "
        "every backbone forwards, for anchor alignment (default 400 quick, 1000 full; 0 = none)",
    )
    parser.add_argument("--port", type=int, help="server port (another is picked if in use)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,  # not to hide `fedmobillm --debug demo`
        help="as `fedmobillm --debug`: also show the libraries' warnings and log lines, "
        "in the demo and in the processes it starts",
    )


def run(args: argparse.Namespace) -> int:
    from fedmobillm.demo import DemoConfig, run_demo

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    cfg = DemoConfig(
        backbones=backbones,
        devices=args.devices,
        data=args.data,
        alpha=args.alpha,
        quick=not args.full,
        out=args.out,
        seed=args.seed,
        train_limit=args.train_limit,
        eval_limit=args.eval_limit,
        time_limit_s=args.time_limit or (3600.0 if args.full else 300.0),
        target_accuracy=args.target_accuracy,
        settle_steps=args.settle_steps,
        anchors=args.anchors,
        port=args.port,
        debug=bool(getattr(args, "debug", False)),
    )
    run_demo(cfg)
    return 0
