"""The ``fedmobillm`` console script: one subcommand per workflow."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from fedmobillm import __version__
from fedmobillm.commands import COMMAND_MODULES
from fedmobillm.errors import FedMobiLLMError


def _available_commands() -> list:
    modules = []
    for name in COMMAND_MODULES:
        try:
            modules.append(importlib.import_module(f"fedmobillm.commands.{name}"))
        except ModuleNotFoundError as exc:  # a command not built yet, or its part missing
            if exc.name and exc.name.startswith("fedmobillm.commands"):
                continue
            raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmobillm",
        description=(
            "Federated fine-tuning of language models across heterogeneous phones by "
            "server-assisted side-tuning. Phones run a frozen, pre-scaled backbone forward "
            "and upload tapped activations; the server trains one shared side network."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fedmobillm {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show full tracebacks and debug logs (accepted anywhere on the command line)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _available_commands():
        # an alias (LISTED = False) parses and runs the same but is not listed again
        listed = {"help": module.HELP} if getattr(module, "LISTED", True) else {}
        p = sub.add_parser(module.NAME, description=module.HELP, **listed)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


class _QuietThirdPartyRoot(logging.Filter):
    """Drop INFO chatter that libraries send through the root logger (onnxruntime's
    quantizer logs a line per tensor); fedmobillm logs through named loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "root" or record.levelno >= logging.WARNING


def _take_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without its ``--debug`` flags (before a ``--``), and whether there was one:
    ``--debug`` works after the subcommand too, at any depth."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    rest = [a for a in argv[:end] if a != "--debug"]
    return rest + argv[end:], len(rest) < end


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv, debug = _take_debug(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.debug = args.debug or debug
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_QuietThirdPartyRoot())
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except FedMobiLLMError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
