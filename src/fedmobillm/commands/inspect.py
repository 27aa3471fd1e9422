"""`fedmobillm inspect BUNDLE`: print a bundle's manifest and files, verify every sha256."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "inspect"
HELP = "show a bundle's manifest and files and verify every file's sha256"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle folder")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from fedmobillm.device_runtime.protocol import bundle_digest, verify_bundle

    manifest, problems = verify_bundle(args.bundle)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
    else:
        _print_table(manifest, bundle_digest(manifest), args.bundle)
    if problems:
        for p in problems:
            print(f"TAMPERED {p}", file=sys.stderr)
        print(
            f"error: bundle {args.bundle} failed verification ({len(problems)} problem(s)); "
            "re-export it or copy it again",
            file=sys.stderr,
        )
        return 1
    # with --json, stdout holds the JSON alone
    print(
        f"ok: all {len(manifest.files)} files match their sha256",
        file=sys.stderr if args.json else sys.stdout,
    )
    return 0


def _rows(manifest, digest: str) -> list[tuple[str, str]]:
    m = manifest
    return [
        ("source model", m.source_model),
        ("source sha256", m.source_sha256[:16] + "..." if m.source_sha256 else "-"),
        ("family / kind", f"{m.family} / {m.kind}"),
        ("depth / hidden", f"{m.depth} / {m.hidden_size}"),
        ("taps", ",".join(str(t) for t in m.taps)),
        ("pivot", m.pivot),
        ("quant", m.quant),
        ("max seq len", str(m.max_seq_len)),
        ("max batch", str(m.extra.get("max_batch", "-"))),
        ("graph params", f"{m.graph_params:,}"),
        ("activation scales", ", ".join(f"{s:.4g}" for s in m.activation_scales)),
        ("inputs", "; ".join(f"{i['name']} {i['dtype']} {i['shape']}" for i in m.inputs)),
        ("outputs", "; ".join(f"{o['name']} {o['dtype']} {o['shape']}" for o in m.outputs)),
        ("tokenizer", f"{m.tokenizer.get('file')} (pad {m.tokenizer.get('pad_token_id')})"),
        ("architecture", m.architecture),
        ("bundle digest", digest),
        ("format version", str(m.format_version)),
        ("created by", m.created_by),
    ]


def _print_table(manifest, digest: str, bundle: Path) -> None:
    rows = _rows(manifest, digest)
    width = max(len(k) for k, _ in rows)
    print(f"bundle {bundle}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"  {'file':<24} {'bytes':>14}  {'MB':>8}  sha256")
    for name, info in sorted(manifest.files.items()):
        size = info.get("bytes", 0)
        print(f"  {name:<24} {size:>14,}  {size / 1e6:>8.2f}  {info.get('sha256', '')[:16]}...")
