"""`fedmobillm device ...`: the phone's role, run on this machine (torch-free with ONNX)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

NAME = "device"
HELP = (
    "act as a device: register with a server, forward local data through a bundle and "
    "upload activations, fetch and run the personal model"
)

log = logging.getLogger("fedmobillm.device")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    _add_register(sub.add_parser("register", help="register this device and its bundle"))
    _add_run(
        sub.add_parser(
            "run",
            help="forward local data and upload activations",
            description="Forward local data through the bundle and upload the tapped "
            "activations: one vector per tap and text, or, with a token bundle (exported "
            "with --pivot none), every real token's taps; the summary reports the bytes per "
            "sample (against the T x K x d bound for tokens). --task lm: the device's own "
            'text ({"text"} or {"prompt", "response"} jsonl records) through a '
            "decoder token bundle, with its token ids and next-token loss mask "
            "(docs/device.md).",
        )
    )
    _add_predict(sub.add_parser("predict", help="on-device inference: backbone + personal model"))
    _add_fetch(sub.add_parser("fetch-model", help="download this device's personal model"))
    _add_generate(sub.add_parser("generate", help="on-device text generation (decoder bundles)"))


def _privacy_args(p: argparse.ArgumentParser, run: bool) -> None:
    g = p.add_argument_group(
        "local differential privacy (docs/privacy.md)",
        "clip every tap vector, add Gaussian noise for (epsilon, delta) per text, account the "
        "spending in the journal"
        + ("; default: as registered" if run else "; declared to the server and kept"),
    )
    g.add_argument("--epsilon", type=float, help="per-text epsilon of the activations")
    g.add_argument("--delta", type=float, default=1e-5, help="per-text delta (default 1e-5)")
    g.add_argument(
        "--clip",
        type=float,
        help="L2 bound of each tap vector (default: the largest whose noise fits the bundle's "
        "int8 range; the signal-to-noise ratio does not depend on it, see docs/privacy.md)",
    )
    g.add_argument(
        "--label-epsilon",
        type=float,
        help="also randomise labels (randomised response at this epsilon); default: labels "
        "are uploaded as they are",
    )
    if run:
        g.add_argument(
            "--budget",
            type=float,
            help="the most any one text may spend over all its uploads (default: --epsilon, "
            "i.e. each text is uploaded once)",
        )
        g.add_argument(
            "--device-budget",
            type=float,
            help="cap on the device-level epsilon (all its uploads composed); default: none",
        )


def _tls_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ca-bundle", type=Path, help="verify the https server against this CA (PEM)")
    g.add_argument(
        "--pin-sha256",
        help="accept only the server certificate with this SHA-256 fingerprint (hex)",
    )


def _privacy_config(args: argparse.Namespace, state_dir: Path | None = None):
    """The run's PrivacyConfig from the flags (None: as registered). ``device run --budget``
    / ``--device-budget`` alone apply to the mechanism the device registered with."""
    from fedmobillm.errors import FedMobiLLMError

    budgets = {f: getattr(args, f, None) for f in ("budget", "device_budget")}
    if args.epsilon is None and state_dir is not None and any(budgets.values()):
        import dataclasses

        from fedmobillm.device_runtime.client import DeviceState
        from fedmobillm.device_runtime.privacy import declared_config

        registered = declared_config(DeviceState.load(state_dir).privacy)
        if registered is not None:
            ignored = [f for f in ("clip", "label_epsilon") if getattr(args, f, None) is not None]
            if ignored:  # never dropped silently: the registered mechanism is what runs
                raise FedMobiLLMError(
                    f"--{ignored[0].replace('_', '-')} with --budget but no --epsilon: the "
                    "mechanism the device registered with is used as it is",
                    hint="pass --epsilon too to run with other settings, or drop "
                    f"--{ignored[0].replace('_', '-')}",
                )
            return dataclasses.replace(registered, **budgets)
    if args.epsilon is None:
        extra = [f for f in ("clip", "label_epsilon", "budget", "device_budget")
                 if getattr(args, f, None) is not None]  # fmt: skip
        if extra:
            raise FedMobiLLMError(
                f"--{extra[0].replace('_', '-')} needs --epsilon (this device registered "
                "without a privacy mechanism)" if state_dir else
                f"--{extra[0].replace('_', '-')} needs --epsilon",
                hint="pass --epsilon E to add noise before uploading",
            )  # fmt: skip
        return None
    from fedmobillm.device_runtime.privacy import PrivacyConfig

    return PrivacyConfig(
        epsilon=args.epsilon,
        delta=args.delta,
        clip=args.clip,
        label_epsilon=args.label_epsilon,
        budget=getattr(args, "budget", None),
        device_budget=getattr(args, "device_budget", None),
    )


def _tls_config(args: argparse.Namespace):  # -> TlsConfig | None
    if args.ca_bundle is None and args.pin_sha256 is None:
        return None
    from fedmobillm.device_runtime.uploader import TlsConfig

    ca = str(args.ca_bundle) if args.ca_bundle is not None else None
    return TlsConfig(ca_bundle=ca, pin_sha256=args.pin_sha256)


def _state_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", type=Path, help="device state folder (default: cache/devices/NAME)")
    p.add_argument("--name", help="device name (picks the default state folder)")


def _add_register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--admin-token", required=True, help="the server's admin token")
    p.add_argument("--name", required=True, help="a name for this device, unique on the server")
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder from `export`")
    p.add_argument("--state", type=Path, help="where to keep the device token")
    _task_arg(p, "the task this device joins; it must be the server's (lm: a decoder token "
              "bundle, no labels)")  # fmt: skip
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--labels", help="classify: the task's label names, comma-separated, in index order"
    )
    g.add_argument("--data", help="classify: a dataset name or local file to read the labels from")
    _privacy_args(p, run=False)
    _tls_args(p)


def _task_arg(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument(
        "--task",
        default="classify",
        choices=["classify", "lm"],  # device_runtime.protocol.TASKS (not imported: a light CLI)
        help=f"{text} (default classify)",
    )


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder")
    p.add_argument(
        "--data",
        help="local .jsonl/.csv file or a dataset name (not with --split anchor: the anchor "
        'texts come from the server); --task lm: a .jsonl of {"text": ...} or '
        '{"prompt": ..., "response": ...} lines, or an lm corpus name',
    )
    _task_arg(p, "the task the device registered for: lm uploads its text's token ids and "
              "next-token targets beside the taps")  # fmt: skip
    _state_args(p)
    p.add_argument("--server", help="server URL (default: the one registered)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "pte"])
    p.add_argument("--threads", type=int, help="CPU threads for the forward pass")
    p.add_argument("--batch-size", type=int, default=32, help="samples per upload (default 32)")
    p.add_argument(
        "--forward-batch",
        type=int,
        default=8,  # device_runtime.backbone.FORWARD_BATCH (not imported: a light CLI)
        help="samples per forward pass, taken in order of token length within each upload "
        "batch (default 8): lower = less peak memory",
    )
    p.add_argument(
        "--encoding",
        "--upload",
        dest="encoding",
        choices=["int8", "fp16"],
        help="upload encoding of the taps (default: int8 for classify, fp16 for lm)",
    )
    p.add_argument(
        "--split",
        default="train",
        choices=["train", "validation", "anchor"],
        help="anchor: forward and upload this device's share of the server's public anchor "
        "texts (servers started with --anchors)",
    )
    p.add_argument("--bandwidth-mbps", type=float, help="simulate an uplink of X Mbit/s")
    p.add_argument("--limit", type=int, help="use only the first N records")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows, say which")
    p.add_argument("--retries", type=int, default=6, help="attempts per request (default 6)")
    p.add_argument(
        "--slowdown",
        type=float,
        default=1.0,
        help="simulate a slower phone: each forward takes X times as long (default 1)",
    )
    p.add_argument("--summary-json", type=Path, help="also write the summary to this JSON file")
    _privacy_args(p, run=True)
    _tls_args(p)


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder")
    p.add_argument("--side", required=True, type=Path, help="personal model: .zip or folder")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", action="append", help="a text to classify (repeatable)")
    g.add_argument("--data", help="local file or dataset name: predict all, report accuracy")
    p.add_argument("--split", default="test", help="split of a named dataset (default test)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "pte"])
    p.add_argument(
        "--activations",
        default="auto",
        choices=["auto", "int8", "fp32"],
        help="round-trip taps through int8 as uploads do (auto: as personal.json says, else int8)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="use only the first N records")
    p.add_argument("--skip-bad-rows", action="store_true")
    p.add_argument("--json", type=Path, help="with --data: also write the result as JSON here")


def _add_fetch(p: argparse.ArgumentParser) -> None:
    _state_args(p)
    p.add_argument("--out", required=True, type=Path, help="folder to unpack the model into")
    p.add_argument("--server", help="server URL (default: the one registered)")
    p.add_argument(
        "--graph",
        default="onnx",
        choices=["onnx", "pte", "all"],
        help="which graph to download: onnx (what `device predict` runs), pte (ExecuTorch "
        "on a phone) or all",
    )
    _tls_args(p)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    handlers = {
        "register": _register,
        "run": _run,
        "predict": _predict,
        "fetch-model": _fetch,
        "generate": _generate,
    }
    return handlers[args.device_command](args)


def _register(args: argparse.Namespace) -> int:
    from fedmobillm.device_runtime.client import register, registration_labels
    from fedmobillm.errors import FedMobiLLMError

    tls, privacy = _tls_config(args), _privacy_config(args)
    if args.task == "lm":
        if args.labels is not None or args.data is not None:
            raise FedMobiLLMError(
                "--labels/--data name a classify task's labels: task lm has none",
                hint="drop them when registering with --task lm",
            )
        labels: list[str] = []
    elif args.labels is None and args.data is None:
        raise FedMobiLLMError(
            "device register needs the task's labels",
            hint="pass --labels a,b,... or --data FILE_OR_NAME (or --task lm for text)",
        )
    else:
        labels = registration_labels(args.server, args.admin_token, args.labels, args.data, tls=tls)
    state, path = register(
        args.server,
        args.admin_token,
        args.name,
        args.bundle,
        labels,
        args.state,
        privacy=privacy,
        tls=tls,
        task=args.task,
    )
    print(f"registered device {state.name!r} as {state.device_id} on {state.server}")
    print(f"architecture {state.architecture}, bundle {state.bundle_sha256[:16]}")
    print(f"task {state.task}" + (f", labels: {', '.join(state.label_names)}"
                                  if state.label_names else ""))  # fmt: skip
    p = state.privacy  # as declared: the clip resolved against the bundle
    if p is not None:
        label = p["label_epsilon"]
        print(
            f"privacy: clip {p['clip']:g} + Gaussian noise, epsilon {p['epsilon']:g} per "
            f"text at delta {p['delta']:g} (noise multiplier {p['noise_multiplier']:.4g})"
            + (f", labels at epsilon {label:g}" if label is not None else "")
        )
    print(f"state (keeps the device token; mode 600): {path}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from fedmobillm.device_runtime.client import DeviceClient, RunConfig
    from fedmobillm.device_runtime.records import (
        device_records,
        lm_device_records,
        resolve_state_dir,
    )
    from fedmobillm.device_runtime.uploader import RetryPolicy
    from fedmobillm.errors import FedMobiLLMError

    state_dir = resolve_state_dir(args.state, args.name)
    config = RunConfig(
        backend=args.backend,
        threads=args.threads,
        batch_size=args.batch_size,
        forward_batch=args.forward_batch,
        encoding=args.encoding,
        split=args.split,
        bandwidth_mbps=args.bandwidth_mbps,
        server=args.server,
        retry=RetryPolicy(attempts=args.retries),
        slowdown=args.slowdown,
        privacy=_privacy_config(args, state_dir),
        tls=_tls_config(args),
        task=args.task,
    )
    if args.split == "anchor" and args.data is not None:
        raise FedMobiLLMError(
            "--data is not allowed with --split anchor",
            hint="anchor texts come from the server (GET /v1/anchors); drop --data",
        )
    if args.split != "anchor" and args.data is None:
        raise FedMobiLLMError(
            f"--split {args.split} needs --data",
            hint="pass a local .jsonl/.csv file or a data set name, e.g. --data movie-snippets",
        )
    client = DeviceClient(state_dir, args.bundle, config)
    if args.split == "anchor":
        records = client.anchor_records()
    elif args.task == "lm":
        records = lm_device_records(args.data, args.skip_bad_rows, args.limit, args.split)
    else:
        records = device_records(
            args.data, args.split, client.state.label_names, args.skip_bad_rows, args.limit
        )
    summary = client.run(records)
    print("\n".join(summary.lines()))
    if args.summary_json:
        _write_json(args.summary_json, summary.to_json())
    return 0


def _write_json(path: Path, text: str) -> None:
    from fedmobillm.device_runtime.files import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


def _predict(args: argparse.Namespace) -> int:
    from fedmobillm.device_runtime.backbone import Backbone
    from fedmobillm.device_runtime.personal import PersonalModel, predict_records
    from fedmobillm.device_runtime.records import device_records

    backbone = Backbone(args.bundle, args.backend)
    personal = PersonalModel(args.side, args.activations)
    personal.check_compatible(backbone.manifest)
    if args.text:
        labels = personal.predict_texts(backbone, list(args.text))
        for text, label in zip(args.text, labels, strict=True):
            print(f"{label}\t{text}")
        return 0
    records = device_records(
        args.data, args.split, personal.label_names, args.skip_bad_rows, args.limit
    )
    result = predict_records(backbone, personal, records, args.batch_size)
    print("\n".join(result.lines()))
    if args.json:
        import json

        _write_json(args.json, json.dumps(result.to_dict(), indent=2))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from fedmobillm.device_runtime.personal import fetch_personal_model
    from fedmobillm.device_runtime.records import resolve_state_dir

    folder = fetch_personal_model(
        resolve_state_dir(args.state, args.name),
        args.out,
        args.server,
        args.graph,
        tls=_tls_config(args),
    )
    print(f"personal model unpacked into {folder}")
    return 0


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, type=Path, help="bundle exported with --generate")
    p.add_argument("--prompt", required=True, help="the text to complete")
    p.add_argument(
        "--personal",
        type=Path,
        help="personal lm model (folder or zip): its residual is added before the frozen head",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the whole context for every new token instead of using the KV cache",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, help="CPU threads for onnxruntime")
    p.add_argument(
        "--backend",
        choices=["onnx", "pte"],
        default="onnx",
        help="onnx (torch-free, default) or pte: the bundle's ExecuTorch generation graphs "
        "(exported with --format onnx,pte --generate; needs the ExecuTorch runtime)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _generate(args: argparse.Namespace) -> int:
    import json

    from fedmobillm.device_runtime.generate import Generator, Sampling

    generator = Generator(args.bundle, threads=args.threads, backend=args.backend)
    delta, context = None, "new"
    if args.personal is not None:
        from fedmobillm.device_runtime.lm_personal import DELTA_CONTEXT, PersonalLM

        personal = PersonalLM(args.personal, threads=args.threads)
        personal.check_compatible(generator.manifest)
        delta, context = personal.delta, DELTA_CONTEXT
    result = generator.generate(
        args.prompt,
        args.max_new_tokens,
        use_cache=not args.no_cache,
        sampling=Sampling(args.temperature, args.top_k, args.seed),
        delta=delta,
        delta_context=context,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(f"{result.prompt}{result.text}")
    print(
        f"-- {len(result.token_ids)} new tokens ({result.stopped}) in {result.seconds:.2f} s: "
        f"{result.tokens_per_s:.1f} tokens/s, first token {result.first_token_s:.2f} s, "
        f"KV cache {'on' if result.use_cache else 'off'}, {args.backend}, "
        f"peak RSS {result.peak_rss_mib:.0f} MiB"
    )
    return 0
