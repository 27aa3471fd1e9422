"""`android bench`: push a bundle's backbone and a native runner to a phone, run it, parse the
runner's timings (ExecuTorch executor_runner or onnxruntime_perf_test), clean up.

Flags the bridge passes (the same on a phone and on the emulated device):

- pte:  ``executor_runner --model_path=backbone.pte --inputs=input_ids.bin,attention_mask.bin
  --input_shapes=BxS,BxS --num_executions=WARMUP+N --print_output=none [--cpu_threads=T]``;
  the first WARMUP "Iteration i of N" lines are dropped. On Android executor_runner logs to
  logcat (tag ExecuTorch): when its stdout has no timings, the bridge reads ``logcat -d``.
- onnx: ``onnxruntime_perf_test -m times -r N -I -s -f DIM0:B -f DIM1:S [-x T] backbone.onnx``
  where DIM0/DIM1 are the graph's names of input_ids' free dimensions (read on the host);
  it warms up once by itself (--warmup is not passed through).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmobillm.android_bridge.adb import Adb, Device
from fedmobillm.android_bridge.session import (
    WorkDir,
    check_free_space,
    check_runner_abi,
    device_abis,
)
from fedmobillm.device_runtime.backbone import GRAPH_DATA, GRAPH_FILES
from fedmobillm.device_runtime.protocol import TOKENIZER_NAME, Manifest, load_verified_bundle
from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

SCHEMA = "fedmobillm.android-bench/1"
GRAPHS = GRAPH_FILES  # backend -> graph file in a bundle
RUNNER_NAMES = {"pte": "executor_runner", "onnx": "onnxruntime_perf_test"}
SAMPLE_TEXT = (
    "Phones run a frozen, pre-scaled backbone forward and upload tapped activations; the "
    "server trains one shared side network from the activations of every phone."
)


@dataclass
class BenchConfig:
    backend: str = "pte"
    iterations: int = 10
    warmup: int = 2
    threads: int | None = None
    batch: int = 1
    seq: int = 64
    runner: Path | None = None
    timeout_s: float = 600

    def check(self, manifest: Manifest) -> None:
        problems = []
        if self.backend not in GRAPHS:
            problems.append(f"--backend must be pte or onnx, not {self.backend!r}")
        if self.iterations < 1:
            problems.append("--iterations must be at least 1")
        if self.warmup < 0:
            problems.append("--warmup must be 0 or more")
        if self.threads is not None and self.threads < 1:
            problems.append("--threads must be at least 1")
        max_batch = manifest.extra.get("max_batch") or 64
        if not 1 <= self.batch <= max_batch:
            problems.append(f"--batch must be within 1..{max_batch} (the bundle's bound)")
        if not 1 <= self.seq <= manifest.max_seq_len:
            problems.append(f"--seq must be within 1..{manifest.max_seq_len} (max_seq_len)")
        if problems:
            raise FedMobiLLMError("bad benchmark options: " + "; ".join(problems))


# ---- inputs and argv ---------------------------------------------------------------------


def sample_inputs(bundle: Path, manifest: Manifest, batch: int, seq: int) -> np.ndarray:
    """Token ids and mask for a fixed sample sentence, right-padded to ``seq``: (2, B, S)."""
    from tokenizers import Tokenizer

    spec = manifest.tokenizer
    tok = Tokenizer.from_file(str(bundle / str(spec.get("file", TOKENIZER_NAME))))
    enc = tok.encode(SAMPLE_TEXT, add_special_tokens=bool(spec.get("add_special_tokens", True)))
    ids = np.full(seq, int(spec.get("pad_token_id", 0)), dtype=np.int64)  # (S,)
    mask = np.zeros(seq, dtype=np.int64)  # (S,)
    n = min(seq, len(enc.ids))
    ids[:n], mask[:n] = enc.ids[:n], 1
    return np.stack([np.tile(ids, (batch, 1)), np.tile(mask, (batch, 1))])  # (2, B, S)


def write_input_files(arrays: np.ndarray, folder: Path) -> list[Path]:
    """Raw little-endian int64 files, one per graph input, as executor_runner reads them."""
    paths = []
    for name, arr in zip(("input_ids", "attention_mask"), arrays, strict=True):
        p = folder / f"{name}.bin"
        np.ascontiguousarray(arr, dtype="<i8").tofile(p)
        paths.append(p)
    return paths


def onnx_free_dims(graph: Path) -> tuple[str, str]:
    """Names of the (batch, seq) dimensions of the graph's input_ids, e.g. ("s43", "s53"):
    onnxruntime_perf_test's -f overrides free dimensions by name."""
    try:
        import onnx

        model = onnx.load(str(graph), load_external_data=False)
        inp = next(i for i in model.graph.input if i.name == "input_ids")
        names = [d.dim_param for d in inp.type.tensor_type.shape.dim]
    except ImportError:
        from fedmobillm.device_runtime.graph import onnx_session

        sess = onnx_session(graph)
        names = [str(d) for d in next(i for i in sess.get_inputs() if i.name == "input_ids").shape]
    except StopIteration as exc:
        raise FedMobiLLMError(f"{graph} has no input named input_ids") from exc
    return names[0] or "batch", names[1] or "seq"


def runner_argv(
    cfg: BenchConfig,
    runner: str,
    graph: str,
    inputs: list[str],
    free_dims: tuple[str, str] = ("batch", "seq"),
) -> list[str]:
    """The runner's command line (paths relative to the work folder)."""
    if cfg.backend == "pte":
        shape = f"{cfg.batch}x{cfg.seq}"
        argv = [runner, f"--model_path={graph}", f"--inputs={','.join(inputs)}",
                f"--input_shapes={shape},{shape}",
                f"--num_executions={cfg.warmup + cfg.iterations}", "--print_output=none"]  # fmt: skip
        if cfg.threads:
            argv.append(f"--cpu_threads={cfg.threads}")
        return argv
    argv = [runner, "-m", "times", "-r", str(cfg.iterations), "-I", "-s",
            "-f", f"{free_dims[0]}:{cfg.batch}", "-f", f"{free_dims[1]}:{cfg.seq}"]  # fmt: skip
    if cfg.threads:
        argv += ["-x", str(cfg.threads)]
    return argv + [graph]


# ---- parsing -----------------------------------------------------------------------------


def _floats(pattern: str, text: str) -> list[float]:
    return [float(m) for m in re.findall(pattern, text)]


def summarize(latencies: list[float]) -> dict[str, float]:
    s = sorted(latencies)
    return {
        "mean": statistics.fmean(s),
        "p50": float(np.percentile(s, 50)),
        "p90": float(np.percentile(s, 90)),
        "min": s[0],
        "max": s[-1],
    }


def parse_executor_runner(text: str, warmup: int) -> dict[str, Any]:
    """Timings from executor_runner's log lines (stdout/stderr or logcat)."""
    iters = _floats(r"Iteration \d+ of \d+: ([\d.]+) ms", text)
    m = re.search(r"Model executed successfully (\d+) time\(s\) in ([\d.]+) ms", text)
    if not iters and not m:
        raise FedMobiLLMError(
            "the runner's output has no executor_runner timings ('Model executed "
            "successfully ...')",
            hint="is --runner an ExecuTorch executor_runner?",
        )
    load = _floats(r"Model loaded in ([\d.]+) ms", text)
    peak = _floats(r"Peak memory: (\d+) kB", text)
    out: dict[str, Any] = {
        "load_ms": load[0] if load else None,
        "peak_memory_mb": peak[0] / 1024 if peak else None,
    }
    if iters:
        timed = iters[warmup:] or iters
        out["per_iteration_ms"] = timed
        out["latency_ms"] = summarize(timed)
    elif m is not None:  # an older runner: only the total
        mean = float(m.group(2)) / max(1, int(m.group(1)))
        out["per_iteration_ms"] = []
        out["latency_ms"] = {k: mean for k in ("mean", "p50", "p90", "min", "max")}
        out["note"] = "runner printed only a total time: all statistics are the mean"
    return out


def parse_perf_test(text: str) -> dict[str, Any]:
    """Timings from onnxruntime_perf_test's summary."""
    avg = _floats(r"Average inference time cost: ([\d.]+) ms", text)
    if not avg:
        raise FedMobiLLMError(
            "the runner's output has no onnxruntime_perf_test summary ('Average inference "
            "time cost')",
            hint="is --runner onnxruntime_perf_test (run with -s)?",
        )

    def sec(label: str) -> float | None:
        v = _floats(rf"{label} Latency: ([\d.eE+-]+) s", text)
        return v[0] * 1000 if v else None

    created = _floats(r"Session creation time cost: ([\d.]+) s", text)
    peak = _floats(r"Peak working set size: (\d+) bytes", text)
    lat = {
        "mean": avg[0],
        "p50": sec("P50"),
        "p90": sec("P90"),
        "min": sec("Min"),
        "max": sec("Max"),
    }
    return {
        "load_ms": created[0] * 1000 if created else None,
        "peak_memory_mb": peak[0] / 2**20 if peak else None,
        "per_iteration_ms": [],
        "latency_ms": lat,
    }


# ---- the benchmark -------------------------------------------------------------------------


def approx_flops(bundle: Path, manifest: Manifest, batch: int, seq: int) -> float:
    """Forward FLOPs of the graph: 2 per non-embedding parameter per token (the matmuls)
    plus attention's 4*S^2*d per layer and sample. Feeds the fleet's effective_gflops.
    (MiniLM-L6, 8 x 64 tokens: 10.9 GFLOP, as counted by torch in MEASURED.md.)"""
    from tokenizers import Tokenizer

    spec = manifest.tokenizer
    vocab = Tokenizer.from_file(str(bundle / str(spec.get("file", TOKENIZER_NAME))))
    d, layers = manifest.hidden_size, max(manifest.taps)
    embedding = (vocab.get_vocab_size() + manifest.max_seq_len) * d
    body = max(manifest.graph_params - embedding, 0)
    return float(2 * body * batch * seq + 4 * layers * batch * seq * seq * d)


def default_backend(bundle: Path) -> tuple[str, str]:
    """The backend to bench when none is asked for: pte if the bundle has its graph, else
    onnx; and a line saying so (the user did not choose it)."""
    from fedmobillm.device_runtime.protocol import read_manifest

    files = read_manifest(Path(bundle)).files
    if GRAPHS["pte"] in files:
        return "pte", f"backend: pte (the bundle has {GRAPHS['pte']}; --backend onnx for ONNX)"
    if GRAPHS["onnx"] in files:
        return "onnx", (
            f"backend: onnx (the bundle has no {GRAPHS['pte']}, only {GRAPHS['onnx']}; "
            "re-export with --format pte to bench ExecuTorch)"
        )
    raise FedMobiLLMError(
        f"bundle {bundle} has neither {GRAPHS['pte']} nor {GRAPHS['onnx']}",
        hint="re-export it with `fedmobillm export MODEL --format onnx,pte`",
    )


def resolve_runner(cfg: BenchConfig) -> Path:
    if cfg.runner:
        return Path(cfg.runner)
    from fedmobillm.android_bridge.runners import host_runner

    return host_runner(cfg.backend)


def run_bench(
    serial: str, bundle: Path, cfg: BenchConfig, adb_port: int | None = None
) -> dict[str, Any]:
    start = time.perf_counter()
    bundle = Path(bundle)
    manifest = load_verified_bundle(bundle)
    cfg.check(manifest)
    graph = bundle / GRAPHS[cfg.backend]
    if GRAPHS[cfg.backend] not in manifest.files:
        raise FedMobiLLMError(
            f"bundle {bundle} has no {GRAPHS[cfg.backend]}",
            hint=f"re-export with --format {cfg.backend}, or pick the other --backend",
        )
    device = Adb(server_port=adb_port).device(serial)
    abis = device_abis(device)
    info = device_info(device)
    runner = resolve_runner(cfg)
    check_runner_abi(runner, abis)  # before anything is pushed
    with tempfile.TemporaryDirectory(prefix="fedmobillm-bench-") as tmp:
        inputs = []
        if cfg.backend == "pte":
            arrays = sample_inputs(bundle, manifest, cfg.batch, cfg.seq)  # (2, B, S)
            inputs = write_input_files(arrays, Path(tmp))
        data = GRAPH_DATA.get(cfg.backend)
        extras = [bundle / data] if data and data in manifest.files else []  # ONNX weights
        files = [graph, *extras, runner, *inputs]
        check_free_space(device, sum(p.stat().st_size for p in files))
        with WorkDir(device) as work:
            for extra in extras:  # beside the graph, where the runtime looks for it
                work.push(extra)
            output = _push_and_run(device, work, cfg, graph, runner, inputs)
            pushed = work.pushed_bytes
    parsed = (
        parse_executor_runner(output, cfg.warmup)
        if cfg.backend == "pte"
        else parse_perf_test(output)
    )
    flops = approx_flops(bundle, manifest, cfg.batch, cfg.seq)
    return {
        "schema": SCHEMA,
        "serial": serial,
        "abi": abis[0] if abis else None,
        "bundle": str(bundle),
        "architecture": manifest.architecture,
        "quant": manifest.quant,
        "backend": cfg.backend,
        "runner": str(runner),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("runner",)},
        **parsed,
        "flops_per_iteration": flops,
        "effective_gflops": flops / (parsed["latency_ms"]["p50"] / 1000) / 1e9
        if parsed["latency_ms"].get("p50")
        else None,
        "pushed_bytes": pushed,
        "device_info": info,
        "wall_s": time.perf_counter() - start,
    }


# ---- ExecuTorch minibench's JSON schema ----------------------------------------------------

MINIBENCH_PROPS = {"device": "ro.product.brand", "arch": "ro.product.model"}


def device_info(device: Device) -> dict[str, Any]:
    """What ExecuTorch's minibench app reports as ``deviceInfo``: brand, model, Android
    release, total and available memory in bytes (None where the phone does not say)."""
    from fedmobillm.android_bridge.profile import parse_meminfo

    props = {k: device.getprop(v) or None for k, v in MINIBENCH_PROPS.items()}
    release = device.getprop("ro.build.version.release")
    mem = parse_meminfo(device.shell("cat /proc/meminfo", check=False).output)
    return {
        **props,
        "os": f"Android {release}" if release else None,
        "totalMem": mem["MemTotal"] * 1024 if "MemTotal" in mem else None,
        "availMem": mem["MemAvailable"] * 1024 if "MemAvailable" in mem else None,
    }


def trimmed_mean(values: list[float]) -> float | None:
    """Mean of the middle 80 % of the sorted values (minibench's trimmean 0.2)."""
    s = sorted(values)
    mid = s[len(s) // 10 : len(s) * 9 // 10]
    return statistics.fmean(mid or s) if s else None


def minibench_metrics(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The result as ExecuTorch minibench's list of BenchmarkMetric objects
    (``benchmarkModel {name, backend, quantization}``, ``metric``, ``actualValue``,
    ``targetValue``, ``deviceInfo {device, arch, os, totalMem, availMem}``), so these numbers
    line up with ExecuTorch's own benchmark results. Backend: ``xnnpack`` for a .pte (this
    project lowers to XNNPACK), ``onnxruntime-cpu`` for the ONNX graph."""
    model = {
        "name": result["architecture"],
        "backend": "xnnpack" if result["backend"] == "pte" else "onnxruntime-cpu",
        "quantization": result["quant"],
    }
    lat = result["latency_ms"]
    per_iter = result.get("per_iteration_ms") or []
    values = [
        ("avg_inference_latency(ms)", lat.get("mean")),
        ("trimmean_inference_latency(ms)", trimmed_mean(per_iter) if per_iter else None),
        ("model_load_time(ms)", result.get("load_ms")),
        ("load_status", 0),
        ("peak_memory(mb)", result.get("peak_memory_mb")),
    ]
    info = result.get("device_info") or {}
    return [
        {
            "benchmarkModel": model,
            "metric": name,
            "actualValue": float(value),
            "targetValue": 0.0,
            "deviceInfo": info,
        }
        for name, value in values
        if value is not None
    ]


def _push_and_run(
    device: Device, work: WorkDir, cfg: BenchConfig, graph: Path, runner: Path, inputs: list[Path]
) -> str:
    name = RUNNER_NAMES[cfg.backend]
    work.push(runner, name)
    device.shell(f"chmod 755 {work.path}/{name}")
    remote_graph = Path(work.push(graph)).name
    remote_inputs = [Path(work.push(p)).name for p in inputs]
    dims = onnx_free_dims(graph) if cfg.backend == "onnx" else ("batch", "seq")
    argv = runner_argv(cfg, f"./{name}", remote_graph, remote_inputs, dims)
    device.shell("logcat -c 2>/dev/null; true", check=False)
    log.info(
        "running %s on %s: %d warm-up + %d timed iterations",
        name,
        device.serial,
        cfg.warmup if cfg.backend == "pte" else 1,
        cfg.iterations,
    )
    output = work.run(argv, timeout=cfg.timeout_s)
    if cfg.backend == "pte" and "Model executed successfully" not in output:
        output += device.shell(
            "logcat -d -s ExecuTorch 2>/dev/null; true", check=False
        ).output  # Android: ET_LOG goes to logcat
    return output


def print_table(result: dict[str, Any]) -> None:
    lat = result["latency_ms"]

    def fmt(v: float | None, unit: str = "ms") -> str:
        return "-" if v is None else f"{v:,.2f} {unit}"

    rows = [
        ("device", f"{result['serial']} ({result['abi']})"),
        ("bundle", f"{result['architecture']} [{result['quant']}, {result['backend']}]"),
        (
            "input",
            f"batch {result['config']['batch']} x seq {result['config']['seq']}, "
            f"{result['config']['iterations']} iterations",
        ),
        ("model load", fmt(result["load_ms"])),
        ("latency mean", fmt(lat["mean"])),
        ("latency p50", fmt(lat["p50"])),
        ("latency p90", fmt(lat["p90"])),
        ("latency min", fmt(lat["min"])),
        ("peak memory", fmt(result["peak_memory_mb"], "MB")),
        ("pushed", fmt(result["pushed_bytes"] / 1e6, "MB")),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    if result.get("note"):
        print(f"note: {result['note']}")


def dumps(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)
