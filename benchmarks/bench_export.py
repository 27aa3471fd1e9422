"""Export benchmark: per model x format x quant, file size, parameters in the graph, latency
per sample (batch 8, seq 64, 2 threads, median after warm-up), peak RSS of a fresh process
that loads and runs the graph, and error vs eager PyTorch fp32; plus the eager full-model
fp32 reference row.

    python -m benchmarks.bench_export [--quick] --out DIR

Writes DIR/bench_export.json and DIR/bench_export.md. Bundles are cached under the
fedmobillm cache (same keys as the tests' make_bundle), so a re-run only measures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedmobillm.export.calibrate import BUILTIN_SENTENCES

log = logging.getLogger("bench_export")

BATCH, SEQ, THREADS = 8, 64, 2
WARMUP, REPEATS = 2, 7
VARIANTS = [("onnx", "fp32"), ("onnx", "int8"), ("pte", "fp32"), ("pte", "int8"), ("pte", "8da4w")]
QUICK_MODELS = {"minilm-l6": {"num_taps": 3}, "minilm-l3": {"num_taps": 3}}
FULL_MODELS = {**QUICK_MODELS, "smollm2-135m": {"layers": [6, 12, 18, 24]}}
QUICK_VARIANTS = {"minilm-l6": VARIANTS, "minilm-l3": [("onnx", "fp32"), ("onnx", "int8")]}
TEXTS = BUILTIN_SENTENCES[:8]  # the exporter's own fallback calibration sentences

EAGER_SCRIPT = r"""
import json, resource, statistics, sys, time
import torch
from transformers import AutoModel
folder, batch, seq, threads, warmup, repeats = sys.argv[1], *map(int, sys.argv[2:7])
torch.set_num_threads(threads)
model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
vocab = model.config.get_text_config().vocab_size
ids = torch.randint(5, min(vocab, 1000), (batch, seq))
mask = torch.ones(batch, seq, dtype=torch.int64)
times = []
with torch.no_grad():
    for i in range(warmup + repeats):
        t = time.perf_counter(); model(input_ids=ids, attention_mask=mask); dt = time.perf_counter() - t
        if i >= warmup: times.append(dt)
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": times, "params": sum(p.numel() for p in model.parameters())}))
"""


@dataclass
class Row:
    model: str
    format: str
    quant: str
    taps: str
    file_mb: float
    graph_params: int
    ms_per_sample: float
    ms_per_sample_min: float
    peak_rss_mib: float
    min_cosine: float | None
    max_abs: float | None
    export_s: float | None


def bundle_for(model: str, opts: dict) -> Path:
    """Same cache keys as tests/conftest.py make_bundle."""
    from fedmobillm.device_runtime.protocol import MANIFEST_NAME, verify_bundle
    from fedmobillm.export.pipeline import export_bundle
    from fedmobillm.paths import cache_dir

    opts = dict(opts)
    opts["formats"] = tuple(opts["formats"])
    key = hashlib.sha256(json.dumps([model, opts], sort_keys=True, default=str).encode())
    out = cache_dir() / "test-bundles" / key.hexdigest()[:16]
    if (out / MANIFEST_NAME).is_file() and not verify_bundle(out)[1]:
        return out
    shutil.rmtree(out, ignore_errors=True)
    export_bundle(model, out, **opts)
    return out


def encode(bundle: Path):
    import numpy as np
    from tokenizers import Tokenizer

    from fedmobillm.device_runtime.protocol import TOKENIZER_NAME

    tok = Tokenizer.from_file(str(bundle / TOKENIZER_NAME))
    enc = tok.encode_batch(TEXTS)
    ids = np.array([e.ids for e in enc], dtype=np.int64)  # (8, T)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)  # (8, T)
    return ids, mask


def eager_reference(model: str, manifest: dict, ids, mask):
    import torch

    from fedmobillm.export.pipeline import resolve_model_folder
    from fedmobillm.export.wrapper import eager_reference as ref

    folder = resolve_model_folder(model)
    out = ref(
        folder, manifest["taps"], manifest["pivot"], torch.from_numpy(ids), torch.from_numpy(mask)
    )
    return out.numpy()  # (B, K, d)


def measure_variant(model: str, opts: dict, fmt: str, quant: str) -> Row:
    from fedmobillm.device_runtime.graph import run_taps
    from fedmobillm.device_runtime.protocol import MANIFEST_NAME
    from fedmobillm.export.budget import measure_process
    from fedmobillm.export.calibrate import compare
    from fedmobillm.export.graphs import FILE_NAMES

    bundle = bundle_for(model, {**opts, "quant": quant, "formats": (fmt,)})
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    graph = bundle / FILE_NAMES[fmt]
    run = measure_process(graph, fmt, BATCH, SEQ, THREADS, repeats=WARMUP + REPEATS)
    timed = run["seconds"][WARMUP:]
    ids, mask = encode(bundle)
    err = compare(run_taps(graph, ids, mask, fmt), eager_reference(model, manifest, ids, mask))
    return Row(
        model,
        fmt,
        quant,
        ",".join(map(str, manifest["taps"])),
        graph.stat().st_size / 1e6,
        manifest["graph_params"],
        statistics.median(timed) / BATCH * 1e3,
        min(timed) / BATCH * 1e3,
        run["peak_rss_mib"],
        min(err.cosine),
        max(err.max_abs),
        round(sum(manifest.get("export_seconds", {}).values()), 1),
    )


def eager_row(model: str) -> Row:
    from fedmobillm.export.pipeline import resolve_model_folder

    folder = resolve_model_folder(model)
    cmd = [
        sys.executable,
        "-c",
        EAGER_SCRIPT,
        str(folder),
        str(BATCH),
        str(SEQ),
        str(THREADS),
        str(WARMUP),
        str(REPEATS),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    weights = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    return Row(
        model,
        "eager (full)",
        "fp32",
        "all",
        weights / 1e6,
        run["params"],
        statistics.median(run["seconds"]) / BATCH * 1e3,
        min(run["seconds"]) / BATCH * 1e3,
        run["peak_rss_mib"],
        None,
        None,
        None,
    )


def markdown(rows: list[Row]) -> str:
    head = (
        "| model | format | quant | taps | file MB | graph params | ms/sample median (min) "
        "| peak RSS MiB | min cosine | max abs | export s |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        cos = "ref" if r.min_cosine is None else f"{r.min_cosine:.4f}"
        err = "ref" if r.max_abs is None else f"{r.max_abs:.2e}"
        exp = "-" if r.export_s is None else f"{r.export_s:.0f}"
        lines.append(
            f"| {r.model} | {r.format} | {r.quant} | {r.taps} | {r.file_mb:.1f} | "
            f"{r.graph_params / 1e6:.1f}M | {r.ms_per_sample:.2f} ({r.ms_per_sample_min:.2f}) | "
            f"{r.peak_rss_mib:.0f} | {cos} | {err} | {exp} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="MiniLM-L6 (all variants) and MiniLM-L3 (ONNX) only"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for JSON + Markdown")
    parser.add_argument("--models", help="comma-separated subset of the models")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    models = QUICK_MODELS if args.quick else FULL_MODELS
    if args.models:
        models = {m: FULL_MODELS[m] for m in args.models.split(",")}
    rows: list[Row] = []
    start = time.time()
    for model, opts in models.items():
        rows.append(eager_row(model))
        log.info("%s eager: %.2f ms/sample", model, rows[-1].ms_per_sample)
        variants = QUICK_VARIANTS.get(model, VARIANTS) if args.quick else VARIANTS
        for fmt, quant in variants:
            rows.append(measure_variant(model, opts, fmt, quant))
            log.info("%s", asdict(rows[-1]))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "batch": BATCH,
        "seq": SEQ,
        "threads": THREADS,
        "warmup": WARMUP,
        "repeats": REPEATS,
        "quick": args.quick,
        "seconds": round(time.time() - start),
        "load_average_1_5_15": [round(x, 1) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }
    (args.out / "bench_export.json").write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    (args.out / "bench_export.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
