"""`fedmobillm export MODEL --out DIR`: Hugging Face model -> pre-scaled, forward-only bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedmobillm.errors import FedMobiLLMError

NAME = "export"
HELP = "export a Hugging Face encoder/decoder to a tapped, pre-scaled bundle (.pte/.onnx)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export options, in the order `fedmobillm export --help` lists them."""
    _add_model_arguments(parser)
    _add_tap_arguments(parser)
    _add_quant_arguments(parser)
    _add_graph_arguments(parser)
    _add_calibration_arguments(parser)
    _add_device_arguments(parser)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL and --out."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a name from `fedmobillm models`, a Hugging Face id or a local folder",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="bundle folder to create (an existing bundle there is replaced)",
    )


def _add_tap_arguments(parser: argparse.ArgumentParser) -> None:
    """Which blocks are tapped (--taps or --layers) and what each tap emits (--pivot)."""
    taps = parser.add_mutually_exclusive_group()
    taps.add_argument(
        "--taps",
        type=int,
        metavar="K",
        help="K taps by average-interval block sampling (default: every block)",
    )
    taps.add_argument(
        "--layers", type=_int_list, metavar="2,4,6", help="explicit 1-based block indices to tap"
    )
    parser.add_argument(
        "--pivot",
        default="auto",
        choices=["auto", "first", "last", "mean", "none"],
        help="what each tap emits per sample: the first token, the last real token, the mean "
        "over real tokens, or every token (none). auto: last for decoders; mean for encoders "
        "whose folder declares mean pooling (sentence-transformers), else first",
    )


def _add_graph_arguments(parser: argparse.ArgumentParser) -> None:
    """--format and --max-seq-len of the backbone graphs."""
    parser.add_argument(
        "--format",
        default="onnx,pte",
        type=_str_list,
        metavar="pte,onnx",
        dest="formats",
        help="graph formats to write (default onnx,pte)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=128,
        metavar="N",
        help="longest sequence the graph accepts (default 128)",
    )


def _add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """--calibration text and the public --dp-projection basis fitted on it."""
    parser.add_argument(
        "--calibration",
        metavar="DATA",
        help="data name or file for activation pre-scales (default movie-snippets); required "
        "with --dp-projection, and then it must be public text (e.g. another corpus)",
    )
    parser.add_argument(
        "--dp-projection",
        type=int,
        metavar="R",
        help="ship a public per-tap PCA basis of rank R (fitted on the --calibration text: "
        "use PUBLIC text) so that devices with --epsilon clip and noise in R dims instead of "
        "the hidden size (docs/privacy.md)",
    )
    parser.add_argument(
        "--dp-projection-plain",
        action="store_true",
        help="with --dp-projection: plain PCA coordinates instead of whitened ones (whitened "
        "measured better on validation, docs/privacy.md)",
    )
    parser.add_argument(
        "--dp-projection-supervised",
        type=int,
        default=0,
        metavar="S",
        help="with --dp-projection R: the first S of the R directions are the discriminant "
        "(LDA) directions of the --calibration data's labels, which must then be labelled "
        "PUBLIC data (a data set or .jsonl/.csv with text,label); the rest PCA "
        "(docs/privacy.md)",
    )


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Fitting the bundle to a device (--budget-mb, --device-profile) and what it runs
    besides the backbone (--generate)."""
    parser.add_argument(
        "--budget-mb",
        type=float,
        metavar="MB",
        help="pick quantization, then fewer/shallower taps, to fit this peak memory",
    )
    parser.add_argument(
        "--generate",
        action="store_true",
        help="decoders: also write the generation graphs (decoder step with a KV cache, LM "
        "head; ONNX, and ExecuTorch too with pte in --format; any --quant) for `fedmobillm "
        "device generate`",
    )
    parser.add_argument(
        "--generate-context",
        type=int,
        default=512,
        metavar="N",
        help="with --generate and pte in --format: the .pte step's KV cache length, the "
        "longest prompt + completion it generates (default 512)",
    )
    parser.add_argument(
        "--device-profile",
        type=Path,
        metavar="FILE",
        help="device profile JSON (ram_mb, ...): its memory bounds the budget",
    )


def _add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    """--quant and --fallback-quant."""
    parser.add_argument(
        "--quant",
        default="fp32",
        choices=["fp32", "int8", "8da4w"],
        help="weight quantization (8da4w: 4-bit weights; int8 activations in .pte only)",
    )
    parser.add_argument(
        "--fallback-quant",
        choices=["fp32", "int8", "8da4w"],
        default=None,
        metavar="QUANT",
        help="when the --quant graph fails its check against eager fp32, export this one "
        "instead (said in the output and in the manifest's quant_fallback); default: fail",
    )


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def run(args: argparse.Namespace) -> int:
    from fedmobillm.export.budget import budget_from_profile
    from fedmobillm.export.pipeline import export_bundle

    budget = args.budget_mb
    if args.device_profile is not None:
        budget = budget_from_profile(args.device_profile, budget)
    manifest = export_bundle(
        args.model,
        args.out,
        num_taps=args.taps,
        layers=args.layers,
        pivot=args.pivot,
        quant=args.quant,
        formats=tuple(args.formats),
        max_seq_len=args.max_seq_len,
        calibration=args.calibration,
        budget_mb=budget,
        generate=args.generate,
        generate_context=args.generate_context,
        fallback_quant=args.fallback_quant,
        dp_projection=args.dp_projection,
        dp_projection_whiten=not args.dp_projection_plain,
        dp_projection_supervised=args.dp_projection_supervised,
    )
    _print_summary(manifest, args.out)
    return 0


def _print_summary(manifest, out: Path) -> None:
    extra = manifest.extra
    print(f"bundle: {out}")
    print(
        f"  {manifest.family} {manifest.kind}, taps {manifest.taps} of {manifest.depth}, "
        f"pivot {manifest.pivot}, quant {manifest.quant}, "
        f"{manifest.graph_params:,} parameters in the graph"
    )
    for fmt, err in extra.get("verification", {}).items():
        print(
            f"  verify {fmt}: max-abs {max(err['max_abs']):.2e}, "
            f"min cosine {min(err['min_cosine']):.5f} (vs eager fp32)"
        )
    gen = extra.get("generation")
    if gen:
        check = gen.get("verification", {})
        print(
            f"  generation: {gen['step']} ({gen['depth']} blocks, KV cache) + {gen['head']}, "
            f"logits min cosine {check.get('logits_min_cosine', float('nan')):.5f} (vs eager fp32)"
        )
        pte = gen.get("pte")
        if isinstance(pte, dict):
            check = pte.get("verification", {})
            print(
                f"  generation (ExecuTorch): {pte['step']} (KV cache of {pte['max_context']} "
                f"positions) + {pte['head']}, logits min cosine "
                f"{check.get('logits_min_cosine', float('nan')):.5f} (vs eager fp32)"
            )
    if extra.get("quant_fallback"):
        print(
            f"  quant: {extra.get('quant_requested')} was asked for but failed its check; "
            f"exported {manifest.quant} instead ({extra['quant_fallback']})"
        )
    proj = extra.get("dp_projection")
    if proj:
        print(
            f"  dp projection: rank {proj['rank']} of {manifest.hidden_size} per tap"
            f"{' (' + str(proj['supervised']) + ' supervised)' if proj.get('supervised') else ''} "
            f"({proj['file']}), fitted on {proj['texts']} texts of {proj['calibration']}, "
            f"variance kept {min(proj['variance_kept']):.2f}-{max(proj['variance_kept']):.2f}"
        )
    if "budget" in extra:
        print(f"  budget: {json.dumps(extra['budget'])}")
    if not manifest.files:
        raise FedMobiLLMError("export wrote no files")
