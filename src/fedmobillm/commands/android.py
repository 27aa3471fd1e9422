"""`fedmobillm android ...`: Android phones over the real adb (list, profile, benchmark,
phone-in-the-loop), and an emulated device to try all of it without a phone."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

NAME = "android"
HELP = "Android phones over adb: devices, profile, bench, run-device; emulate a phone"

log = logging.getLogger(__name__)

DEFAULT_EMULATOR_PORT = 15555  # outside adb's 5555-5585 local-emulator scan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="android_command", metavar="ACTION", required=True)
    _add_emulate(sub)
    _add_devices(sub)
    _add_profile(sub)
    _add_bench(sub)
    _add_run_device(sub)


def _adb_port(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adb-port",
        type=int,
        default=None,
        metavar="P",
        help="adb server port (adb -P); default: adb's own (5037 or "
        "$ANDROID_ADB_SERVER_PORT / $ADB_SERVER_SOCKET)",
    )


def _add_emulate(sub) -> None:
    p = sub.add_parser(
        "emulate",
        help="serve an emulated phone on loopback for `adb connect` (a wire-level test double)",
        description="An emulated Android device speaking the adb device-side transport on "
        "127.0.0.1. `adb connect 127.0.0.1:PORT` attaches to it. Its shell runs host "
        "commands in --root (device paths under /data, /sdcard map there) and answers "
        "getprop, /proc, df, dumpsys with a fake profile ('fedmobillm-emulated').",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_EMULATOR_PORT,
        help=f"TCP port on 127.0.0.1 (default {DEFAULT_EMULATOR_PORT}; 0 = any)",
    )
    p.add_argument(
        "--root", type=Path, default=None, help="sandbox folder (default: <cache>/emulator)"
    )
    p.add_argument(
        "--storage-mb",
        type=int,
        default=65536,
        help="size of the fake /data file system (small values emulate a full phone)",
    )
    p.add_argument("--abi", default=None, help="ABI to claim (default: this machine's)")
    p.add_argument(
        "--unauthorized",
        action="store_true",
        help="never accept the host's key: adb lists the device as 'unauthorized'",
    )
    p.add_argument("--connect", action="store_true", help="also run `adb connect` once it listens")
    _adb_port(p)
    p.set_defaults(_action=_emulate)


def _add_devices(sub) -> None:
    p = sub.add_parser("devices", help="list phones adb sees: serial, state, model, ABI, Android")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _adb_port(p)
    p.set_defaults(_action=_devices)


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="profile a phone (CPU, RAM, ABI, thermal, battery) as JSON")
    p.add_argument("serial")
    p.add_argument("--out", type=Path, default=None, help="write the profile JSON here")
    p.add_argument(
        "--bench",
        type=Path,
        default=None,
        metavar="BENCH_JSON",
        help="add measured compute (effective_gflops) from an `android bench "
        "--json` file, for the benchmarks' fleet",
    )
    p.add_argument(
        "--uplink-mbps",
        type=float,
        default=None,
        help="the phone's uplink, for the benchmarks' fleet (adb cannot measure it)",
    )
    p.add_argument(
        "--downlink-mbps",
        type=float,
        default=None,
        help="the phone's downlink (default: the uplink)",
    )
    _adb_port(p)
    p.set_defaults(_action=_profile)


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="benchmark a bundle's backbone on a phone with a native runner"
    )
    p.add_argument("serial")
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "--runner",
        type=Path,
        default=None,
        help="runner executable for the phone's ABI (executor_runner for pte, "
        "onnxruntime_perf_test for onnx); default: the host runner, built on "
        "demand (right only for the emulated device)",
    )
    p.add_argument(
        "--backend",
        choices=("pte", "onnx"),
        default=None,
        help="graph to bench (default: pte if the bundle has it, else onnx)",
    )
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the runner")
    p.add_argument("--batch", type=int, default=1, help="batch size of the benchmark input")
    p.add_argument("--seq", type=int, default=64, help="sequence length of the benchmark input")
    p.add_argument(
        "--json", type=Path, default=None, dest="json_out", help="write the results as JSON here"
    )
    p.add_argument(
        "--minibench-json",
        type=Path,
        default=None,
        help="also write the results in ExecuTorch minibench's JSON schema (a list of "
        "BenchmarkMetric objects) here",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed for the run")
    _adb_port(p)
    p.set_defaults(_action=_bench)


def _add_run_device(sub) -> None:
    p = sub.add_parser(
        "run-device",
        help="phone-in-the-loop: forward local data on the phone, upload from the host",
        description="Tokenizes --data on the host with the bundle's tokenizer, runs the "
        "backbone on the phone with the pte runner, pulls the tapped activations and "
        "uploads them with the device runtime's uploader: the server sees an ordinary "
        "device. Register first (fedmobillm device register) or pass --admin-token.",
    )
    p.add_argument("serial")
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "--data", required=True, help="device-local records (.jsonl/.csv) or a named dataset"
    )
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--state",
        type=Path,
        default=None,
        help="device state folder (default: <cache>/devices/<name>)",
    )
    p.add_argument("--name", default=None, help="device name (default: android-<serial>)")
    p.add_argument(
        "--admin-token",
        default=None,
        help="register the phone first with this admin token (if --state is empty)",
    )
    p.add_argument("--runner", type=Path, default=None, help="executor_runner for the phone")
    p.add_argument("--split", default="train", choices=("train", "validation"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--upload", default="int8", choices=("int8", "fp16"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N records")
    _adb_port(p)
    p.set_defaults(_action=_run_device)


def run(args: argparse.Namespace) -> int:
    return int(args._action(args) or 0)


# ---- actions (heavy imports inside) --------------------------------------------------------


def _emulate(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import threading

    from fedmobillm.android_bridge.emulator import EmulatorConfig, serve
    from fedmobillm.android_bridge.fake_device import FakeProfile
    from fedmobillm.paths import cache_dir

    profile = FakeProfile(storage_mb=args.storage_mb)
    if args.abi:
        profile.abi = args.abi
    cfg = EmulatorConfig(
        root=args.root or cache_dir() / "emulator",
        port=args.port,
        profile=profile,
        unauthorized=args.unauthorized,
    )

    async def main() -> None:
        ready = asyncio.Event()
        task = asyncio.ensure_future(serve(cfg, ready))
        await asyncio.wait(
            [task, asyncio.ensure_future(ready.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        if task.done():
            task.result()
        address = f"127.0.0.1:{cfg.port}"
        print(f"emulated device listening on {address} (sandbox {cfg.root})", flush=True)
        print(f"attach with: adb connect {address}", flush=True)
        if args.connect:
            threading.Thread(
                target=_connect_later, args=(args.adb_port, address), daemon=True
            ).start()
        await task

    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(main())
        except OSError as exc:
            from fedmobillm.errors import FedMobiLLMError

            raise FedMobiLLMError(
                f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}",
                hint="pick another --port (0 = any free port)",
            ) from exc
    return 0


def _connect_later(adb_port: int | None, address: str) -> None:
    from fedmobillm.android_bridge.adb import Adb
    from fedmobillm.errors import FedMobiLLMError

    try:
        Adb(server_port=adb_port).connect(address)
        log.info("adb connected to %s", address)
    except FedMobiLLMError as exc:
        log.warning("%s", exc)


def _devices(args: argparse.Namespace) -> int:
    from fedmobillm.android_bridge.inventory import list_devices

    rows = list_devices(args.adb_port)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no devices (plug a phone in with USB debugging on, or `adb connect HOST:PORT`)")
        return 0
    cols = ("serial", "state", "model", "abi", "android")
    widths = [max(len(c), *(len(str(r.get(c) or "-")) for r in rows)) for c in cols]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r.get(c) or "-").ljust(w) for c, w in zip(cols, widths, strict=True)))
    return 0


def _profile(args: argparse.Namespace) -> int:
    from fedmobillm.android_bridge.adb import Adb
    from fedmobillm.android_bridge.profile import (
        attach_fleet_figures,
        collect,
        summary_lines,
        write_profile,
    )
    from fedmobillm.errors import FedMobiLLMError

    bench = None
    if args.bench is not None:
        try:
            bench = json.loads(args.bench.read_text())
        except (OSError, ValueError) as exc:
            raise FedMobiLLMError(f"cannot read bench JSON {args.bench}: {exc}") from exc
    profile = collect(Adb(server_port=args.adb_port).device(args.serial))
    attach_fleet_figures(profile, bench, args.uplink_mbps, args.downlink_mbps)
    for line in summary_lines(profile):
        print(line)
    if args.out:
        write_profile(profile, args.out)
        print(f"profile written to {args.out}")
    else:
        print(json.dumps(profile, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fedmobillm.android_bridge.bench import (
        BenchConfig,
        default_backend,
        print_table,
        run_bench,
    )

    backend = args.backend
    if backend is None:
        backend, why = default_backend(args.bundle)
        print(why, flush=True)
    cfg = BenchConfig(
        backend=backend,
        iterations=args.iterations,
        warmup=args.warmup,
        threads=args.threads,
        batch=args.batch,
        seq=args.seq,
        runner=args.runner,
        timeout_s=args.timeout,
    )
    result = run_bench(args.serial, args.bundle, cfg, adb_port=args.adb_port)
    print_table(result)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {args.json_out}")
    if args.minibench_json:
        from fedmobillm.android_bridge.bench import minibench_metrics

        args.minibench_json.parent.mkdir(parents=True, exist_ok=True)
        args.minibench_json.write_text(json.dumps(minibench_metrics(result), indent=2) + "\n")
        print(f"minibench-schema results written to {args.minibench_json}")
    return 0


def _run_device(args: argparse.Namespace) -> int:
    from fedmobillm.android_bridge.phone_loop import PhoneRunConfig, run_on_phone

    cfg = PhoneRunConfig(
        data=args.data,
        server=args.server,
        state=args.state,
        name=args.name,
        admin_token=args.admin_token,
        runner=args.runner,
        split=args.split,
        batch_size=args.batch_size,
        encoding=args.upload,
        threads=args.threads,
        limit=args.limit,
    )
    summary = run_on_phone(args.serial, args.bundle, cfg, adb_port=args.adb_port)
    for line in summary.lines():
        print(line)
    return 0
