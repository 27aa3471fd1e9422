"""`fedmobillm demo`: the whole system on one machine (see fedmobillm.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

NAME = "demo"
DEFAULT_BACKBONES = "minilm-l3,minilm-l6,smollm2-135m"
HELP = (
    "run a heterogeneous federation end to end on this machine: export, server, device "
    "processes, asynchronous training, on-device evaluation (--task lm: personal language "
    "models on the friends transcripts, completions before and after)"
)
# options of one task, passed to its config under the same names when given
CLASSIFY_ONLY = ("alpha", "target_accuracy", "train_limit", "eval_limit", "anchors")
LM_ONLY = ("lines", "heldout_lines", "samples", "max_new_tokens")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        choices=("classify", "lm"),
        default="classify",
        help="classify (default): text classification over --backbones; lm: personal "
        "language models, one device per speaker of the friends transcripts, a fleet of "
        "SmolLM2-135M truncations (--fleet)",
    )
    parser.add_argument(
        "--devices", type=int, help="simulated devices (default 6; --task lm: 4 quick, 6 full)"
    )
    parser.add_argument(
        "--backbones",
        default=DEFAULT_BACKBONES,
        help="comma-separated models, assigned to devices round-robin",
    )
    parser.add_argument(
        "--data",
        help="dataset name or local file (default movie-snippets; --task lm: friends, or an "
        "lm corpus name or .jsonl of text or prompt/response records)",
    )
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
        help="run folder (default runs/demo; --task lm: runs/demo-lm). Running the demo again in the same folder, also "
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
    add_lm_arguments(parser)
    parser.add_argument("--port", type=int, help="server port (another is picked if in use)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,  # not to hide `fedmobillm --debug demo`
        help="as `fedmobillm --debug`: also show the libraries' warnings and log lines, "
        "in the demo and in the processes it starts",
    )


def add_lm_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("--task lm")
    g.add_argument(
        "--fleet",
        help="device classes as SmolLM2-135M truncations: each class's tapped blocks, "
        "classes separated by / (the deepest tap ends the graph); devices take the classes "
        "in turn (default quick 4,8/4,8,12; full 4,8,12/10,20,30)",
    )
    g.add_argument(
        "--lines", type=int, help="train lines per device (default 300 quick, 2000 full)"
    )
    g.add_argument(
        "--heldout-lines",
        type=int,
        help="held-out lines per device, from whole episodes: half uploaded as validation, "
        "half kept on the device for the perplexity shown (default 80 quick, 400 full)",
    )
    g.add_argument(
        "--samples", type=int, default=3, help="devices whose completions are shown (default 3)"
    )
    g.add_argument("--max-new-tokens", type=int, default=20, help="tokens per completion")


def run(args: argparse.Namespace) -> int:
    if args.task == "lm":
        return run_lm(args)
    from fedmobillm.demo import DemoConfig, run_demo

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    cfg = DemoConfig(
        backbones=backbones,
        **_options(args, CLASSIFY_ONLY),
        **_shared(args, 6, "movie-snippets", "runs/demo", 3600.0 if args.full else 300.0),
    )
    run_demo(cfg)
    return 0


def run_lm(args: argparse.Namespace) -> int:
    """`fedmobillm demo --task lm` (fedmobillm.demo_lm); the classify-only options refused."""
    from fedmobillm.demo_lm import FULL_FLEET, QUICK_FLEET, LmDemoConfig, parse_fleet, run_lm_demo
    from fedmobillm.errors import FedMobiLLMError

    classify_only = {"--backbones": args.backbones != DEFAULT_BACKBONES, "--iid": args.iid}
    classify_only.update(
        {f"--{name.replace('_', '-')}": v for name, v in _options(args, CLASSIFY_ONLY).items()}
    )
    given = [k for k, v in classify_only.items() if v not in (None, False)]
    if given:
        raise FedMobiLLMError(
            f"{', '.join(given)}: classify options, not for --task lm",
            hint="--task lm takes --fleet, --devices, --lines, --heldout-lines, --samples",
        )
    fleet = (
        parse_fleet(args.fleet) if args.fleet else list(FULL_FLEET if args.full else QUICK_FLEET)
    )
    lm_limit = 7200.0 if args.full else 900.0
    cfg = LmDemoConfig(
        fleet=fleet,
        **_options(args, LM_ONLY),
        **_shared(args, 6 if args.full else 4, "friends", "runs/demo-lm", lm_limit),
    )
    run_lm_demo(cfg)
    return 0


def _options(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """``{name: args.name}`` for a task's own options (the config's fields of those names)."""
    return {name: getattr(args, name) for name in names}


def _shared(
    args: argparse.Namespace, devices: int, data: str, out: str, time_limit_s: float
) -> dict[str, Any]:
    """The options both demos take, with the task's defaults where they are not given."""
    return {
        "devices": args.devices or devices,
        "data": args.data or data,
        "quick": not args.full,
        "out": args.out or Path(out),
        "seed": args.seed,
        "time_limit_s": args.time_limit or time_limit_s,
        "settle_steps": args.settle_steps,
        "port": args.port,
        "debug": bool(getattr(args, "debug", False)),
    }
