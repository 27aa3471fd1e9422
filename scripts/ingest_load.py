"""Ingest throughput of a real server on SQLite and on PostgreSQL with 1..N ingest workers.

    python scripts/ingest_load.py --workers 1,2,4 --devices 32 --seconds 20 [--sqlite]
    python scripts/ingest_load.py --workers "" --direct 1,16 --seconds 10
    python scripts/ingest_load.py --workers "" --direct-sqlite 1,16 --seconds 8

Starts its own PostgreSQL cluster (Debian's binaries, in a temporary directory, as
tests/server/pg_helpers.py does), then for each worker count a `fedmobillm serve --database
... --workers N --no-train` on loopback (and with --sqlite one on the embedded SQLite store).
``--devices`` simulated devices (threads spread over ``--clients`` processes) upload real int8
batches (``--batch`` samples of K=3 taps x d=384, 1,152 B per sample, as a MiniLM-L6 int8
bundle sends) as fast as the server acknowledges them, for ``--seconds``. Reports acknowledged
uploads/s and samples/s, p50/p99 latency, and for PostgreSQL the WAL fsyncs per
acknowledged batch (pg_stat_wal.wal_sync / committed ingests): below 1 means group commit.
``--direct-sqlite``: the SQLite store alone (no HTTP, no PostgreSQL started), each thread
count with group commit off (``ingest_group_max`` 1) and on (64): uploads/s and uploads per
commit. Writes a JSON line per run to stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))

from pg_helpers import Postgres, pg_bin  # noqa: E402
from server_helpers import ADMIN, make_manifest, make_payload, register  # noqa: E402

from fedmobillm.server.local import LocalServer  # noqa: E402

K, D = 3, 384


def _device_loop(url: str, reg: dict, manifest: dict, batch: int, until: float, out) -> None:
    """Upload batches of new sample ids until ``until``; append (latency_s, samples) per ack."""
    payloads = [make_payload(reg, manifest, range(i * batch, (i + 1) * batch)) for i in range(4)]
    headers = {
        "Authorization": f"Bearer {reg['token']}",
        "Content-Type": "application/octet-stream",
    }
    n = 0
    with httpx.Client(timeout=60) as client:
        while time.time() < until:
            if n >= len(payloads):  # fresh ids: build the next one outside the timing
                payloads.append(make_payload(reg, manifest, range(n * batch, (n + 1) * batch)))
            t0 = time.perf_counter()
            r = client.post(f"{url}/v1/batches", content=payloads[n], headers=headers)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                out.append((dt, -r.status_code))
                continue
            out.append((dt, r.json()["samples"]))
            n += 1


def _client(url: str, regs: list[dict], manifest: dict, batch: int, until: float, q) -> None:
    results: list[tuple[float, int]] = []
    threads = [
        threading.Thread(target=_device_loop, args=(url, r, manifest, batch, until, results))
        for r in regs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put(results)


def wal_counters(database: str | None) -> tuple[int, int]:
    """(WAL fsyncs, committed transactions) of the cluster / database so far."""
    if database is None:
        return 0, 0
    import psycopg

    with psycopg.connect(database, autocommit=True) as conn:
        syncs = conn.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()[0]
        commits = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0]
    return int(syncs), int(commits)


def run(args: argparse.Namespace, database: str | None, workers: int, tmp: Path) -> dict:
    name = f"{'pg' if database else 'sqlite'}-w{workers}"
    extra = ["--no-train"] + (
        ["--database", database, "--workers", str(workers)] if database else []
    )
    srv = LocalServer(tmp / name, admin_token=ADMIN, args=extra, env={"OMP_NUM_THREADS": "1"})
    srv.start()
    time.sleep(args.warmup)  # the other workers finish importing
    try:
        manifest = make_manifest("load", depth=6, hidden=D, taps=[2, 4, 6])
        regs = [register(srv.url, f"d{i}", manifest) for i in range(args.devices)]
        before = wal_counters(database)
        until = time.time() + args.seconds
        q: mp.Queue = mp.Queue()
        groups = [regs[i :: args.clients] for i in range(args.clients)]
        procs = [
            mp.Process(target=_client, args=(srv.url, g, manifest, args.batch, until, q))
            for g in groups
        ]
        t0 = time.time()
        for p in procs:
            p.start()
        results = [r for _ in procs for r in q.get()]
        for p in procs:
            p.join()
        wall = time.time() - t0
        after = wal_counters(database)
    finally:
        srv.stop()
    ok = [(dt, n) for dt, n in results if n >= 0]
    lat = np.array([dt for dt, _ in ok]) if ok else np.zeros(1)
    syncs, commits = after[0] - before[0], after[1] - before[1]
    return {
        "store": "postgresql" if database else "sqlite",
        "workers": workers,
        "devices": args.devices,
        "batch": args.batch,
        "seconds": round(wall, 1),
        "uploads_per_s": round(len(ok) / wall, 1),
        "samples_per_s": round(sum(n for _, n in ok) / wall, 1),
        "errors": len(results) - len(ok),
        "p50_s": round(float(np.percentile(lat, 50)), 3),
        "p99_s": round(float(np.percentile(lat, 99)), 3),
        "wal_fsyncs": syncs if database else None,
        "fsyncs_per_upload": round(syncs / max(len(ok), 1), 3) if database else None,
        "commits": commits if database else None,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _int8_payload(reg: dict, i: int, batch: int) -> bytes:
    """Batch ``i`` of a device: ``batch`` new sample ids, random int8 (N, K, d), scales 0.05."""
    from fedmobillm.device_runtime.serde import Batch, encode_batch

    rng = np.random.default_rng(i)
    return encode_batch(
        Batch(
            device_id=reg["device_id"],
            bundle_sha256=reg["bundle_sha256"],
            idempotency_key=f"k{i}",
            split="train",
            encoding="int8",
            activations=rng.integers(-127, 128, size=(batch, K, D), dtype=np.int8),
            labels=rng.integers(0, 2, size=batch),
            sample_ids=np.arange(i * batch, (i + 1) * batch, dtype=np.int64),
            scales=np.full(K, 0.05, np.float32),
        )
    )


DIRECT_BATCHES = 1000  # payloads built per device before a direct run (outside the timing)


def _payloads(regs: list[dict], batch: int) -> dict[str, list[bytes]]:
    """device id -> DIRECT_BATCHES int8 upload bodies of new sample ids, built up front."""
    return {
        r["device_id"]: [_int8_payload(r, i, batch) for i in range(DIRECT_BATCHES)] for r in regs
    }


def _ingest_threads(store, service, bodies: dict[str, list[bytes]], seconds: float):
    """One thread per device ingesting its bodies through Service.ingest, as fast as the
    store takes them, for ``seconds`` (or until its bodies run out): (uploads, wall s)."""
    done: list[int] = []
    until = time.time() + seconds

    def loop(device_id: str) -> None:
        device = store.device(device_id)
        n = 0
        while time.time() < until and n < len(bodies[device_id]):
            service.ingest(device, bodies[device_id][n])
            n += 1
        done.append(n)

    pool = [threading.Thread(target=loop, args=(d,)) for d in bodies]
    t0 = time.time()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(done), time.time() - t0


def direct(args: argparse.Namespace, database: str, threads: int) -> dict:
    """The store alone, no HTTP: ``threads`` threads each ingest batches of their own device
    through Service.ingest on one PostgresStore (pool of ``threads`` connections) for
    ``--seconds``: how many commits one WAL fsync carries when commits are concurrent."""
    from fedmobillm.server.service import Service
    from fedmobillm.server.store_pg import PostgresStore

    store = PostgresStore(database, pool_size=threads)
    service = Service(store)
    manifest = make_manifest("load", depth=6, hidden=D, taps=[2, 4, 6])
    regs = [service.register(f"d{i}", manifest, ["negative", "positive"]) for i in range(threads)]
    bodies = _payloads(regs, args.batch)
    before = wal_counters(database)
    uploads, wall = _ingest_threads(store, service, bodies, args.seconds)
    syncs = wal_counters(database)[0] - before[0]
    store.close()
    return {
        "store": "postgresql (direct, no HTTP)",
        "threads": threads,
        "batch": args.batch,
        "seconds": round(wall, 1),
        "uploads_per_s": round(uploads / wall, 1),
        "samples_per_s": round(uploads * args.batch / wall, 1),
        "wal_fsyncs": syncs,
        "fsyncs_per_upload": round(syncs / max(uploads, 1), 3),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def direct_sqlite(args: argparse.Namespace, threads: int, group_max: int, tmp: Path) -> dict:
    """The SQLite store alone, no HTTP: ``threads`` threads each ingest batches of their own
    device through Service.ingest on one Store with ``group_max`` (1: a commit per upload)
    for ``--seconds``; uploads/s and uploads per commit (the store's write counter)."""
    from fedmobillm.server.service import Service
    from fedmobillm.server.store import Store

    store = Store(tmp / f"direct-{threads}-{group_max}.sqlite3", group_max=group_max)
    service = Service(store)
    manifest = make_manifest("load", depth=6, hidden=D, taps=[2, 4, 6])
    regs = [service.register(f"d{i}", manifest, ["negative", "positive"]) for i in range(threads)]
    bodies = _payloads(regs, args.batch)
    uploads, wall = _ingest_threads(store, service, bodies, args.seconds)
    stats = store.write_stats.snapshot()
    store.close()
    return {
        "store": "sqlite (direct, no HTTP)",
        "threads": threads,
        "ingest_group_max": group_max,
        "batch": args.batch,
        "seconds": round(wall, 1),
        "uploads_per_s": round(uploads / wall, 1),
        "samples_per_s": round(uploads * args.batch / wall, 1),
        "commits": stats["commits"],
        "uploads_per_commit": round(stats["writes"] / max(stats["commits"], 1), 2),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--devices", type=int, default=32)
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--batch", type=int, default=32, help="samples per upload")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--warmup", type=float, default=5, help="seconds after start")
    ap.add_argument("--sqlite", action="store_true", help="also the SQLite baseline")
    ap.add_argument(
        "--direct", default="", help="comma-separated thread counts: the store alone, no HTTP"
    )
    ap.add_argument(
        "--direct-sqlite", default="",
        help="comma-separated thread counts: the SQLite store alone, group commit off and on",
    )  # fmt: skip
    ap.add_argument("--pg-option", action="append", default=[], help="-c NAME=VALUE for postgres")
    args = ap.parse_args()
    for t in (int(x) for x in args.direct_sqlite.split(",") if x):
        for group_max in (1, 64):
            with tempfile.TemporaryDirectory(prefix="ingest-load-") as tmp:
                print(json.dumps(direct_sqlite(args, t, group_max, Path(tmp))), flush=True)
    if not (args.workers or args.direct or args.sqlite):
        return
    bindir = pg_bin()
    if bindir is None:
        sys.exit("Debian's postgresql is not installed (/usr/lib/postgresql/*/bin/initdb)")
    pg = Postgres(bindir, options=args.pg_option).start()
    try:
        with tempfile.TemporaryDirectory(prefix="ingest-load-") as tmp:
            if args.sqlite:
                print(json.dumps(run(args, None, 1, Path(tmp))), flush=True)
            for t in (int(x) for x in args.direct.split(",") if x):
                print(json.dumps(direct(args, pg.database(), t)), flush=True)
            for w in (int(x) for x in args.workers.split(",") if x):
                print(json.dumps(run(args, pg.database(), w, Path(tmp))), flush=True)
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
