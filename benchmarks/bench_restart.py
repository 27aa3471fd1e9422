"""How long the trainer's cache takes to read a store back after a restart, and what it holds.

    python -m benchmarks.bench_restart --rows 100000 [--devices 64] [--memory-mb 64] [--out DIR]

Fills a fresh SQLite store through the service layer (``Service.ingest``: the same checks and
commits as the API, no HTTP) with ``--rows`` int8 pivot samples (K=3 taps x d=384, as a
MiniLM-L6 int8 bundle uploads, 1,152 B of values a sample) from ``--devices`` devices of two
architectures, then times ``TrainingCache.refresh`` reading everything back (vectorised range
screen, reservoir within ``--memory-mb``), and reports rows/s, samples held vs read, held
bytes and the process RSS growth. Writes DIR/bench_restart.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil

from fedmobillm.device_runtime.serde import Batch, encode_batch, quantize_int8
from fedmobillm.server.service import Service
from fedmobillm.server.store import Store
from fedmobillm.server.trainer import TrainingCache

from .bench_server import LABELS, manifest

K, D, BATCH = 3, 384, 500


def fill(service: Service, rows: int, devices: int) -> float:
    """``rows`` samples spread over ``devices`` devices; returns seconds taken."""
    rng = np.random.default_rng(0)
    scales = np.full(K, 0.05, np.float32)
    q = quantize_int8(rng.normal(size=(BATCH, K, D)).astype(np.float32), scales)  # (B, K, d)
    y = rng.integers(0, 2, BATCH)
    regs = []
    for i in range(devices):
        name = ("minilm-l6-like", 6, D, [2, 4, 6]) if i % 2 else ("other-like", 12, D, [4, 8, 12])
        m = manifest(*name)
        reg = service.register(f"d{i}", m, LABELS)
        regs.append(service.store.device(reg["device_id"]))
    t0, done, i = time.perf_counter(), 0, 0
    while done < rows:
        dev = regs[i % devices]
        n = min(BATCH, rows - done)
        ids = np.arange(done, done + n, dtype=np.int64)
        body = Batch(
            dev.device_id, dev.bundle_sha256, uuid.uuid4().hex, "train", "int8",
            q[:n], y[:n], ids, scales,
        )  # fmt: skip
        service.ingest(dev, encode_batch(body))
        done, i = done + n, i + 1
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_restart", description=__doc__)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--devices", type=int, default=64)
    p.add_argument("--memory-mb", type=float, default=64.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        store = Store(Path(tmp) / "store.sqlite3")
        try:
            fill_s = fill(Service(store), args.rows, args.devices)
            proc = psutil.Process()
            rss0 = proc.memory_info().rss
            cache = TrainingCache(memory_mb=args.memory_mb)
            t0 = time.perf_counter()
            cache.refresh(store, budget_s=float("inf"))
            read_s = time.perf_counter() - t0
            rss1 = proc.memory_info().rss
        finally:
            store.close()
    report = {
        "rows": args.rows,
        "devices": args.devices,
        "memory_mb": args.memory_mb,
        "fill_s": round(fill_s, 1),
        "restart_read_s": round(read_s, 2),
        "rows_per_s": round(args.rows / read_s),
        "samples_held": cache.held_samples(),
        "samples_read": cache.samples_read(),
        "held_mb": round(cache.held_bytes / 2**20, 1),
        "rss_growth_mb": round((rss1 - rss0) / 2**20, 1),
        "load_avg": [round(x, 1) for x in os.getloadavg()],
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_restart.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
