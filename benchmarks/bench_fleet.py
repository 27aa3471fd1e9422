"""A fleet of simulated devices on Ray against a real server.

    python -m benchmarks.bench_fleet --devices 32,128,1024 [--duration 30] [--actors 2]
        [--batch 32] [--backend sqlite|postgresql] [--workers N] [--database URL]
        [--trainer thread|process|off] [--out DIR]

For each fleet size: a fresh `fedmobillm serve` subprocess (uvicorn on loopback, back-pressure
at its defaults) on a fresh store: SQLite in its data dir, or PostgreSQL (``--backend
postgresql``: a throwaway server started as the tests start one, or ``--database URL`` whose
database must be empty, with ``--workers N`` ingest worker processes). The trainer
(``--trainer``): ``thread``, the embedded default (`serve` trains in its own process; with
``--workers`` above 1 in the supervising process), ``process`` (`serve --trainer-process`:
the trainer in a child process of serve), ``separate`` (`serve --no-train` and `fedmobillm
train` started beside it on the same store), or ``off``.
Ray actors (``--actors``), each driving many
simulated devices from one asyncio loop, each device with its own HTTP client and keep-alive
connection. A device registers, waits a start jitter, then loops:
"computes" a batch (sleeps its profile's ms per sample x batch), "sends" it (sleeps the bytes
at its profile's bandwidth), POSTs a real int8 batch (K=3 taps x d=384 per sample, the
MiniLM-L6 int8 pivot layout: synthetic values, quantised with the bundle's scales, encoded by
the device's own serde) and, on 429, waits the server's Retry-After plus jitter and re-sends
the same batch (same idempotency key). The driver polls /v1/status (its latency too) and the
server's RSS and CPU (its worker processes and a separate trainer's included). Writes
DIR/fleet.json, DIR/fleet.md and DIR/fleet.png: acknowledged samples/s,
p50/p99 acknowledgement latency, 429 share, trainer samples/s, server RSS over time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import ssl
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from fedmobillm.device_runtime.messages import ROUTE_BATCHES, ROUTE_DEVICES, ROUTE_STATUS
from fedmobillm.server.local import LocalTrainer

from .bench_server import LABELS, Server, ingest_commits, manifest, per_commit

log = logging.getLogger("benchmarks.fleet")

K, D = 3, 384
ARCHS = [("minilm-l6-like", 6, D, [2, 4, 6]), ("minilm-l12-like", 12, D, [4, 8, 12])]
# (name, compute ms per sample, uplink Mbit/s, share of the fleet)
PROFILES = [("fast", 5.0, 100.0, 0.25), ("mid", 20.0, 30.0, 0.5), ("slow", 40.0, 10.0, 0.25)]
TIMEOUT_S = 30.0  # an upload not answered within this counts as a timeout


def profile_of(i: int) -> tuple[str, float, float]:
    """Device i's (name, ms per sample, Mbit/s), in the PROFILES shares."""
    u = random.Random(i).random()
    for name, ms, mbps, share in PROFILES:
        if u < share:
            return name, ms, mbps
        u -= share
    return PROFILES[-1][:3]


class FleetWorker:
    """One Ray actor: ``devices`` simulated devices on one asyncio loop."""

    def __init__(self, url: str, admin: str, batch: int, seed: int) -> None:
        self.url, self.admin, self.batch, self.seed = url, admin, batch, seed

    async def run(self, ids: list[int], t_start: float, duration: float, jitter_s: float):
        """Register devices ``ids``, upload until ``t_start + duration`` (wall clock). An
        async method: Ray runs the actor's event loop."""
        return await self._run(ids, t_start, duration, jitter_s)

    async def _run(self, ids: list[int], t_start: float, duration: float, jitter_s: float):
        limits = httpx.Limits(max_connections=len(ids) + 8, max_keepalive_connections=len(ids))
        records: list[tuple] = []
        self.failures: dict[str, int] = {}  # failed answers (no HTTP status) by exception
        async with httpx.AsyncClient(timeout=TIMEOUT_S, limits=limits) as client:
            regs = await asyncio.gather(*(self._register(client, i) for i in ids))
        await asyncio.sleep(max(0.0, t_start - time.time()))
        t_end = t_start + duration
        # each device its own client and connection, as a phone has: one pool shared by all
        # the actor's devices cost the client O(devices) per request (httpcore scans every
        # pooled connection), most of the actor's CPU on the cores the server shares; one TLS
        # context for all (unused on http://, made once instead of per client)
        tls = ssl.create_default_context()
        await asyncio.gather(
            *(
                self._device(tls, i, r, t_end, jitter_s, records)
                for i, r in zip(ids, regs, strict=True)
            )
        )
        return {"records": records, "failures": self.failures}

    async def _register(self, client: httpx.AsyncClient, i: int) -> dict:
        m = manifest(*ARCHS[i % len(ARCHS)])
        body = {"name": f"fleet-{i}", "manifest": m, "label_names": LABELS}
        headers = {"Authorization": f"Bearer {self.admin}"}
        for attempt in range(20):
            r = await client.post(f"{self.url}{ROUTE_DEVICES}", json=body, headers=headers)
            if r.status_code == 201:
                return r.json()
            await asyncio.sleep(0.5 * (attempt + 1))
        raise RuntimeError(f"registration of device {i} failed: {r.status_code} {r.text[:200]}")

    async def _device(
        self, tls: ssl.SSLContext, i: int, reg: dict, t_end: float, jitter_s: float, out
    ) -> None:
        """Upload batches until t_end; append (t_ack, latency_s, status, samples, tries)."""
        async with httpx.AsyncClient(timeout=TIMEOUT_S, verify=tls) as client:
            await self._uploads(client, i, reg, t_end, jitter_s, out)

    async def _uploads(
        self, client: httpx.AsyncClient, i: int, reg: dict, t_end: float, jitter_s: float, out
    ) -> None:
        from fedmobillm.device_runtime.serde import Batch, encode_batch, quantize_int8

        rng = np.random.default_rng(self.seed * 100_003 + i)
        _, ms, mbps = profile_of(i)
        scales = np.full(K, 0.05, np.float32)
        y = rng.integers(0, 2, self.batch)
        x = rng.normal(size=(self.batch, K, D)).astype(np.float32) + y[:, None, None] * 0.5
        q = quantize_int8(x, scales)  # (B, K, d) int8
        headers = {
            "Authorization": f"Bearer {reg['token']}",
            "Content-Type": "application/octet-stream",
        }
        await asyncio.sleep(random.uniform(0.0, jitter_s))  # the fleet's start jitter
        next_id = 0
        while time.time() < t_end:
            await asyncio.sleep(ms * self.batch / 1000.0)  # the forward passes
            ids = np.arange(next_id, next_id + self.batch, dtype=np.int64)
            next_id += self.batch
            body = encode_batch(
                Batch(reg["device_id"], reg["bundle_sha256"], uuid.uuid4().hex, "train",
                      "int8", q, y, ids, scales)
            )  # fmt: skip
            await asyncio.sleep(len(body) * 8 / (mbps * 1e6))  # the uplink
            tries = 0
            while time.time() < t_end + TIMEOUT_S:
                tries += 1
                t0 = time.time()
                try:
                    r = await client.post(
                        f"{self.url}{ROUTE_BATCHES}", content=body, headers=headers
                    )
                    status = r.status_code
                except httpx.TimeoutException as exc:
                    status = -1
                    self._failed(exc)
                except httpx.TransportError as exc:
                    status = -2
                    self._failed(exc)
                t1 = time.time()
                n = self.batch if status == 200 else 0
                out.append((t1, t1 - t0, status, n, tries))
                if status != 429:
                    break
                wait = float(r.headers.get("Retry-After", "1"))
                await asyncio.sleep(wait + random.uniform(0.0, wait))

    def _failed(self, exc: Exception) -> None:
        name = f"{type(exc).__name__}: {str(exc)[:80]}"
        self.failures[name] = self.failures.get(name, 0) + 1


def _poll(srv: Server, t_end: float, every: float, trainer: Any = None) -> list[dict]:
    """Status, RSS and CPU of the server (and of ``trainer``'s process, when the trainer runs
    apart) every ``every`` s until t_end."""
    roots = [psutil.Process(srv.proc.pid)]
    if trainer is not None:
        roots.append(psutil.Process(trainer.proc.pid))
    out = []
    while time.time() < t_end:
        t0 = time.time()
        try:
            r = httpx.get(f"{srv.url}{ROUTE_STATUS}", headers=srv.admin, timeout=60)
            tr = r.json()["trainer"]
        except httpx.HTTPError:
            tr = {}
        procs = [q for p in roots for q in (p, *p.children(recursive=True))]
        rss = cpu = 0.0
        for q in procs:
            with contextlib.suppress(psutil.NoSuchProcess):  # e.g. Ray's or uvicorn's helpers
                rss += q.memory_info().rss
                cpu += sum(q.cpu_times()[:2])  # user + system, s
        out.append(
            {
                "t": t0,
                "status_s": time.time() - t0,
                "samples_seen": tr.get("samples_seen", 0),
                "cache": tr.get("cache"),
                "backlog": tr.get("backlog"),
                "rss_mb": rss / 2**20,
                "cpu_s": cpu,
            }
        )
        time.sleep(max(0.0, every - (time.time() - t0)))
    return out


def run_size(ray: Any, workdir: Path, n: int, args: argparse.Namespace) -> dict:
    data_dir = workdir / f"fleet-{n}" / "data"
    data_dir.parent.mkdir(parents=True)
    settings = {"train": True, "idle_after_epochs": 0, "export_every": 100_000, **args.settings}
    extra: list[str] = {"process": ["--trainer-process"], "thread": []}.get(
        args.trainer, ["--no-train"]
    )
    database = None
    if args.backend == "postgresql":
        database = args.database or args.pg.database()  # a fresh database per fleet size
        extra += ["--database", database, "--workers", str(args.workers)]
    srv = Server(data_dir, settings, args=extra, env={"OMP_NUM_THREADS": "1"})
    trainer = None
    if args.trainer == "separate":
        trainer = LocalTrainer(data_dir, srv._config_file(), database).start()
    try:
        worker = ray.remote(num_cpus=0)(FleetWorker)
        actors = [
            worker.remote(srv.url, srv.admin_token, args.batch, a) for a in range(args.actors)
        ]
        t_start = time.time() + args.register_s + n * 0.01
        futures = [
            act.run.remote(list(range(a, n, args.actors)), t_start, args.duration, args.jitter)
            for a, act in enumerate(actors)
        ]
        time.sleep(max(0.0, t_start - time.time()))
        commits = ingest_commits(srv.url)
        polled = _poll(srv, t_start + args.duration, args.poll, trainer)
        parts = ray.get(futures)
        stored = srv.trainer().get("cache", {}) or {}
        grouped = per_commit(commits, ingest_commits(srv.url))
    finally:
        if trainer is not None:
            trainer.stop()
        srv.stop()
    records = [r for p in parts for r in p["records"]]
    load = [round(x, 1) for x in os.getloadavg()]
    row = summarise(n, records, polled, t_start, args.duration, load, stored)
    failures: dict[str, int] = {}
    for p in parts:
        for name, k in p["failures"].items():
            failures[name] = failures.get(name, 0) + k
    return {**row, "uploads_per_commit": grouped, "failures": failures}


def summarise(
    n: int, records: list, polled: list, t0: float, duration: float, load: list, stored: dict
) -> dict:
    """Per fleet size: totals and a per-second timeline."""
    rec = np.array(records, dtype=np.float64).reshape(-1, 5)  # (t, latency, status, n, tries)
    ok = rec[rec[:, 2] == 200]
    acked = int(ok[:, 3].sum())
    lat = ok[:, 1] * 1000
    seen = [p["samples_seen"] for p in polled]
    t_poll = [p["t"] for p in polled]
    trainer_rate = (seen[-1] - seen[0]) / (t_poll[-1] - t_poll[0]) if len(seen) > 1 else None
    # the server's CPU (its trainer thread included) per upload acknowledged between the
    # first and the last poll, and its share of one core
    cpu_ms = cores = None
    if len(polled) > 1:
        span = ok[(ok[:, 0] >= t_poll[0]) & (ok[:, 0] < t_poll[-1])]
        cpu = polled[-1]["cpu_s"] - polled[0]["cpu_s"]
        cpu_ms = 1000 * cpu / len(span) if len(span) else None
        cores = cpu / (t_poll[-1] - t_poll[0])
    timeline = []
    for s in range(int(duration)):
        w = rec[(rec[:, 0] >= t0 + s) & (rec[:, 0] < t0 + s + 1)]
        wok = w[w[:, 2] == 200]
        timeline.append(
            {
                "t": s,
                "acked_samples": int(wok[:, 3].sum()),
                "p50_ms": float(np.percentile(wok[:, 1], 50) * 1000) if len(wok) else None,
                "p99_ms": float(np.percentile(wok[:, 1], 99) * 1000) if len(wok) else None,
                "share_429": float((w[:, 2] == 429).mean()) if len(w) else 0.0,
            }
        )
    return {
        "devices": n,
        "responses": len(rec),
        "acked_batches": len(ok),
        "acked_samples": acked,
        "acked_samples_per_s": round(acked / duration, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "share_429": round(float((rec[:, 2] == 429).mean()), 4) if len(rec) else 0.0,
        "timeouts": int((rec[:, 2] == -1).sum()),
        "errors": int(((rec[:, 2] != 200) & (rec[:, 2] != 429) & (rec[:, 2] != -1)).sum()),
        # every answer by HTTP status; -1 = timeout, -2 = connection error
        "statuses": {
            str(int(k)): int(v)
            for k, v in zip(*np.unique(rec[:, 2], return_counts=True), strict=True)
        },
        "trainer_samples_per_s": round(trainer_rate, 1) if trainer_rate is not None else None,
        "server_cpu_ms_per_ack": round(cpu_ms, 2) if cpu_ms is not None else None,
        "server_cpu_cores": round(cores, 3) if cores is not None else None,
        "server_rss_mb_max": round(max(p["rss_mb"] for p in polled), 1) if polled else None,
        "status_s_max": round(max(p["status_s"] for p in polled), 2) if polled else None,
        "trainer_cache_end": stored,
        "load_avg_end": load,
        "timeline": timeline,
        "polled": [{**p, "t": p["t"] - t0} for p in polled],
    }


def markdown(report: dict) -> str:
    lines = [
        f"{report['duration_s']:.0f} s per fleet, {report['batch']} samples per upload "
        f"(int8, K={K}, d={D}), {report['actors']} Ray actors, {report['cpu_cores']} cores; "
        f"store {report.get('backend', 'sqlite')}, {report.get('workers', 1)} ingest "
        f"worker(s), trainer {report.get('trainer', 'thread')}; "
        f"uptime before: {report['uptime_before']}",
        "",
        "| devices | acked samples/s | p50 ms | p99 ms | 429 share | timeouts | errors | "
        "trainer samples/s | server RSS MB (max) | status s (max) | uploads/commit | "
        "load avg (end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['devices']} | {r['acked_samples_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['share_429']:.1%} | {r['timeouts']} | {r['errors']} | "
            f"{r['trainer_samples_per_s']} | {r['server_rss_mb_max']} | {r['status_s_max']} | "
            f"{r.get('uploads_per_commit')} | {' / '.join(str(x) for x in r['load_avg_end'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(5, 1, figsize=(8, 13), sharex=True)
    for k, r in enumerate(report["rows"]):
        c = f"C{k}"  # one colour per fleet size in every panel
        t = [p["t"] for p in r["timeline"]]
        label = f"{r['devices']} devices"
        axes[0].plot(t, [p["acked_samples"] for p in r["timeline"]], c, label=label)
        axes[1].plot(t, [p["p50_ms"] for p in r["timeline"]], c, ls="--", label=f"{label} p50")
        axes[1].plot(t, [p["p99_ms"] for p in r["timeline"]], c, label=f"{label} p99")
        axes[2].plot(t, [100 * p["share_429"] for p in r["timeline"]], c, label=label)
        pt = [p["t"] for p in r["polled"]]
        seen = [p["samples_seen"] for p in r["polled"]]
        rate = [
            (b - a) / max(tb - ta, 1e-9)
            for a, b, ta, tb in zip(seen, seen[1:], pt, pt[1:], strict=False)
        ]
        axes[3].plot(pt[1:], rate, c, label=label)
        axes[4].plot(pt, [p["rss_mb"] for p in r["polled"]], c, label=label)
    titles = [
        "acknowledged samples/s",
        "ack latency ms (p50 dashed, p99)",
        "429 share of responses %",
        "trainer samples/s",
        "server RSS MB",
    ]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("seconds since the fleet started")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_fleet", description=__doc__)
    p.add_argument("--devices", default="32,128,1024", help="fleet sizes, comma-separated")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of uploads per fleet")
    p.add_argument("--batch", type=int, default=32, help="samples per upload")
    p.add_argument("--actors", type=int, default=2, help="Ray actors driving the devices")
    p.add_argument("--jitter", type=float, default=5.0, help="start jitter, seconds")
    p.add_argument("--register-s", type=float, default=10.0, help="time to register first")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between status polls")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=JSON",
        help="a server setting, e.g. --set max_inflight_uploads=32",
    )  # fmt: skip
    p.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument(
        "--workers", type=int, default=None,
        help="ingest worker processes (PostgreSQL only; default 2 there)",
    )  # fmt: skip
    p.add_argument(
        "--database", default=None,
        help="postgresql://... of an empty database, for one fleet size (default: a "
        "throwaway PostgreSQL started here, a fresh database per fleet size)",
    )  # fmt: skip
    p.add_argument(
        "--trainer", choices=("thread", "process", "separate", "off"), default="thread",
        help="thread: serve trains (the embedded default); process: serve --trainer-process "
        "(a child process trains); separate: serve --no-train and `fedmobillm train` beside "
        "it; off: ingest only",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("fleet-out"))
    args = p.parse_args(argv)
    args.sizes = [int(x) for x in args.devices.split(",") if x.strip()]
    args.settings = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.backend == "sqlite" and args.database is not None:
        p.error("--database takes a PostgreSQL URL: add --backend postgresql")
    if args.backend == "sqlite" and args.workers not in (None, 1):
        p.error("--workers needs --backend postgresql: the SQLite store has one writer")
    if args.database is not None and len(args.sizes) > 1:
        p.error("--database is used for one fleet size (each size needs an empty database)")
    if args.workers is None:
        args.workers = 2 if args.backend == "postgresql" else 1
    if args.workers < 1:
        p.error("--workers must be at least 1")
    args.pg = None  # the throwaway PostgreSQL, started by main
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    import ray

    ray.init(
        num_cpus=max(2, args.actors),
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
    )
    uptime = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = []
    if args.backend == "postgresql" and args.database is None:
        from .bench_crash import _start_postgres

        args.pg = _start_postgres()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            for n in args.sizes:
                log.info("fleet of %d devices for %.0f s", n, args.duration)
                rows.append(run_size(ray, Path(tmp), n, args))
                log.info(
                    "%d devices: %s",
                    n,
                    {k: v for k, v in rows[-1].items() if k not in ("timeline", "polled")},
                )
    finally:
        ray.shutdown()
        if args.pg is not None:
            args.pg.stop()
    report = {
        "duration_s": args.duration,
        "batch": args.batch,
        "actors": args.actors,
        "cpu_cores": os.cpu_count(),
        "settings": args.settings,
        "backend": args.backend,
        "workers": args.workers,
        "trainer": args.trainer,
        "uptime_before": uptime,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(report, indent=1))
    (args.out / "fleet.md").write_text(markdown(report))
    plot(report, args.out / "fleet.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
