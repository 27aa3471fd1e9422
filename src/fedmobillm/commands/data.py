"""`fedmobillm data list | fetch NAME | partition NAME --devices N [--alpha A | --iid]`."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "data"
HELP = "list and fetch labelled text sets, and partition one across simulated devices"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="named data sets and where they come from")
    fetch = sub.add_parser("fetch", help="download, normalise, split and cache a data set")
    fetch.add_argument("name", metavar="NAME", help="a named set or a local .jsonl/.csv file")
    fetch.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    part = sub.add_parser(
        "partition", help="split a data set's train split into one jsonl file per device"
    )
    part.add_argument("name", metavar="NAME", help="a named set or a local .jsonl/.csv file")
    part.add_argument("--devices", type=int, required=True, help="number of devices")
    mix = part.add_mutually_exclusive_group()
    mix.add_argument("--alpha", type=float, help="Dirichlet(alpha) over labels (non-IID)")
    mix.add_argument("--iid", action="store_true", help="IID split (the default)")
    part.add_argument("--seed", type=int, default=0, help="partition seed (default 0)")
    part.add_argument(
        "--split-seed", type=int, default=0, help="train/validation/test split seed (default 0)"
    )
    part.add_argument(
        "--split", default="train", choices=["train", "validation", "test"], help="which split"
    )
    part.add_argument("--out", type=Path, required=True, help="output folder")
    for p in (fetch, part):
        p.add_argument(
            "--skip-bad-rows", action="store_true", help="local files: skip bad rows (logged)"
        )


def run(args: argparse.Namespace) -> int:
    from fedmobillm import data
    from fedmobillm.data.partition import OUT_HINT
    from fedmobillm.paths import ensure_dir

    if args.action == "list":
        print(f"{'name':<16} {'source':<22} what")
        for spec in data.DATASETS.values():
            print(f"{spec.name:<16} {spec.source:<22} {spec.summary}")
        return 0
    split_seed = args.seed if args.action == "fetch" else args.split_seed
    ds = data.load_dataset(args.name, seed=split_seed, skip_bad_rows=args.skip_bad_rows)
    if args.action == "fetch":
        print(_counts_table(ds))
        return 0
    parts = data.partition(ds.splits[args.split], args.devices, args.alpha, args.seed)
    ensure_dir(args.out, "output folder", hint=OUT_HINT)
    summary = data.write_partition(parts, ds.label_names, args.out)
    rule = f"Dirichlet(alpha={args.alpha})" if args.alpha is not None else "IID"
    print(f"{ds.name} {args.split} split -> {args.devices} devices, {rule}, seed {args.seed}")
    print(summary.table(ds.label_names))
    print(f"wrote {args.out}/device_00.jsonl ... labels.json, summary.json")
    return 0


def _counts_table(ds) -> str:
    names = ds.label_names
    wide = len(names) > 8
    head = ["split", "records", *([] if wide else names)]
    rows = [head]
    counts = ds.counts()
    for split, recs in ds.splits.items():
        rows.append([split, str(len(recs)), *([] if wide else map(str, counts[split].values()))])
    rows.append(["total", str(ds.total()), *([] if wide else [""] * len(names))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"{ds.name}: {ds.total()} labelled records, {len(names)} labels"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if wide:
        lines.append("per label (all splits):")
        totals = {n: sum(counts[s][n] for s in counts) for n in names}
        lines += [f"  {n:<32} {c}" for n, c in totals.items()]
    return "\n".join(lines)
