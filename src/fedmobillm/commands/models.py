"""`fedmobillm models list | fetch NAME... | path NAME`: the named offline models."""

from __future__ import annotations

import argparse

NAME = "models"
HELP = "list, fetch (convert + cache) and locate the named offline models"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="named models, what carries them, and whether they are cached")
    fetch = sub.add_parser("fetch", help="build the named models into the cache (once)")
    fetch.add_argument("names", nargs="+", metavar="NAME", help="model names (see `models list`)")
    fetch.add_argument("--force", action="store_true", help="rebuild even if cached and intact")
    path = sub.add_parser("path", help="print the local folder of a model (fetching it if needed)")
    path.add_argument("name", metavar="NAME", help="a named model, local folder or HF id")


def run(args: argparse.Namespace) -> int:
    from fedmobillm.export import models

    if args.action == "list":
        print(f"{'name':<14} {'cached':<7} {'architecture':<48} package")
        for spec in models.MODELS.values():
            cached = (models.model_dir(spec.name) / models.SUMS_FILE).is_file()
            print(
                f"{spec.name:<14} {'yes' if cached else 'no':<7} {spec.architecture:<48} "
                f"{spec.package}=={spec.version}"
            )
        return 0
    if args.action == "fetch":
        for name in args.names:  # validate all names before the slow part
            if name not in models.MODELS:
                raise models.unknown_model_error(name)
        for name in args.names:
            print(f"{name}: {models.fetch_model(name, force=args.force)}")
        return 0
    print(models.resolve_model(args.name))
    return 0
