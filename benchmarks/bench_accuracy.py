# Owner: H7. H4: this benchmark is taken over by H7 — do not edit; see git log.
"""Accuracy benchmark of the side network (issue 6): fedmobillm vs centralised, single,
linear-probe and full-ft, on real backbone bundles.

    python -m benchmarks.bench_accuracy [--quick] --out DIR

Work in progress (first version: command line only).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_accuracy")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", required=True)
    p.parse_args(argv)
    raise SystemExit("bench_accuracy: work in progress (H7)")


if __name__ == "__main__":
    sys.exit(main())
