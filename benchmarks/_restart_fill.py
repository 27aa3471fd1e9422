"""Fill (or grow) a store for ``bench_restart``: int8 pivot samples through the service layer.

    python -m benchmarks._restart_fill --data-dir DIR --rows 1000000 [--devices 64]
        [--database postgresql://...]

``Service.ingest`` runs the same checks and commits as the API (no HTTP). Each sample is K=3
taps x d=384 int8 (a MiniLM-L6 int8 bundle's upload, 1,152 B of values), from ``--devices``
devices of two architectures; every tenth batch of a device is a validation batch. Growing is
resumable: the devices are registered once (names d0, d1, ...) and each continues from the
count the store holds, so 10k -> 100k -> 1M adds only the difference.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from fedmobillm.device_runtime.serde import Batch, encode_batch, quantize_int8
from fedmobillm.server.service import Service
from fedmobillm.server.store_sql import Device, SqlStore

from .bench_server import LABELS, manifest

K, D, BATCH = 3, 384, 500
VALIDATION_EVERY = 10  # one batch in ten of a device is validation


def devices(service: Service, n: int) -> list[Device]:
    """The store's devices d0..d{n-1}, registered now if absent (two architectures)."""
    have = {d.name: d for d in service.store.devices()}
    out = []
    for i in range(n):
        name = f"d{i}"
        if name not in have:
            arch = (
                ("minilm-l6-like", 6, D, [2, 4, 6]) if i % 2 else ("other-like", 12, D, [4, 8, 12])
            )
            reg = service.register(name, manifest(*arch), LABELS)
            have[name] = service.store.device(reg["device_id"])
        out.append(have[name])
    return out


def stored(store: SqlStore) -> int:
    return store.totals()["samples"]


def fill_to(service: Service, rows: int, n_devices: int, log_every: int = 50_000) -> float:
    """Ingest until the store holds ``rows`` samples; seconds taken."""
    rng = np.random.default_rng(0)
    scales = np.full(K, 0.05, np.float32)
    q = quantize_int8(rng.normal(size=(BATCH, K, D)).astype(np.float32), scales)  # (B, K, d)
    y = rng.integers(0, 2, BATCH)
    devs = devices(service, n_devices)
    counts = {d.device_id: service.store.device_samples(d.device_id) for d in devs}
    batches = {k: sum(c.values()) // BATCH for k, c in counts.items()}
    t0, done = time.perf_counter(), stored(service.store)
    first, next_log, i = done, done + log_every, 0
    while done < rows:
        dev = devs[i % len(devs)]
        i += 1
        split = "validation" if batches[dev.device_id] % VALIDATION_EVERY == 9 else "train"
        batches[dev.device_id] += 1
        n = min(BATCH, rows - done)
        start = counts[dev.device_id][split]
        ids = np.arange(start, start + n, dtype=np.int64)
        counts[dev.device_id][split] += n
        body = Batch(
            dev.device_id, dev.bundle_sha256, uuid.uuid4().hex, split, "int8",
            q[:n], y[:n], ids, scales,
        )  # fmt: skip
        service.ingest(dev, encode_batch(body))
        done += n
        if done >= next_log:
            rate = (done - first) / max(time.perf_counter() - t0, 1e-9)
            print(f"filled {done:,} rows ({rate:,.0f} rows/s so far)", file=sys.stderr, flush=True)
            next_log += log_every
    return time.perf_counter() - t0


def open_for_fill(data_dir: Path, database: str | None) -> SqlStore:
    from fedmobillm.server.store import Store

    if database is None:
        return Store(data_dir / "store.sqlite3")
    from fedmobillm.server.store_pg import PostgresStore

    return PostgresStore(database)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._restart_fill", description=__doc__)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--devices", type=int, default=64)
    p.add_argument("--database", default=None)
    args = p.parse_args(argv)
    store = open_for_fill(args.data_dir, args.database)
    try:
        secs = fill_to(Service(store), args.rows, args.devices)
        print(f"store holds {stored(store):,} rows; filled in {secs:.0f} s", file=sys.stderr)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
