# Owner: H4.
"""Ingest throughput of the real server with many concurrent simulated devices.

    python -m benchmarks.bench_server [--devices 32] [--duration 20] [--batch 32]
        [--set KEY=JSON ...] --out DIR

Starts `fedmobillm serve` (uvicorn on loopback, real SQLite in a temporary data dir) twice:
once ingest-only, once with the trainer stepping on pre-loaded data. In each, D devices
(three architectures: d=384/K=3 like MiniLM, d=576/K=3 like SmolLM2) upload int8 batches
of pivot activations as fast as acknowledgements come back, from one asyncio client
process. Activations are drawn before the clock starts; each
batch is encoded (new key and sample ids) just before it is sent. Reports acknowledged batches/s,
MB/s, p50/p99 acknowledgement latency, the trainer's samples/s, and the uploads per store
commit during the run (``/metrics``: SQLite group commit joins concurrent uploads; ``--set
ingest_group_max=1`` commits each alone). Writes DIR/bench_server.json and prints a Markdown
table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import numpy as np

from fedmobillm.device_runtime.messages import (
    ROUTE_BATCHES,
    ROUTE_DEVICES,
    ROUTE_METRICS,
    ROUTE_STATUS,
    RegisterRequest,
    RegisterResponse,
)
from fedmobillm.device_runtime.protocol import BUNDLE_FORMAT_VERSION
from fedmobillm.device_runtime.serde import Batch, encode_batch, quantize_int8
from fedmobillm.server.local import LocalServer

log = logging.getLogger("benchmarks.server")

ARCHS = [
    ("minilm-l3-like", 3, 384, [1, 2, 3]),
    ("minilm-l6-like", 6, 384, [2, 4, 6]),
    ("smollm2-like", 30, 576, [10, 20, 30]),
]
LABELS = ["negative", "positive"]


def manifest(name: str, depth: int, hidden: int, taps: list[int]) -> dict:
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "source_model": name,
        "family": "bench",
        "kind": "encoder",
        "depth": depth,
        "hidden_size": hidden,
        "taps": taps,
        "pivot": "first",
        "quant": "int8",
        "max_seq_len": 64,
        "activation_scales": [0.05] * len(taps),
        "graph_params": 1,
        "files": {
            "backbone.onnx": {"sha256": uuid.uuid5(uuid.NAMESPACE_DNS, name).hex, "bytes": 1}
        },
        "tokenizer": {"file": "tokenizer.json", "pad_token_id": 0, "add_special_tokens": True},
    }


class SimDevice:
    """One simulated device: fixed int8 activations, a fresh key and sample ids per batch
    (encoding a 37 KB payload takes ~50 us, so it is done on the fly)."""

    def __init__(self, reg: RegisterResponse, m: dict, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        k, d = len(m["taps"]), m["hidden_size"]
        self.reg, self.n, self.next_id = reg, n, 0
        self.scales = np.full(k, 0.05, np.float32)
        self.y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, k, d)).astype(np.float32) + self.y[:, None, None] * 0.5
        self.q = quantize_int8(x, self.scales)  # (n, K, d) int8

    def payload(self) -> bytes:
        ids = np.arange(self.next_id, self.next_id + self.n, dtype=np.int64)
        self.next_id += self.n
        return encode_batch(
            Batch(
                self.reg.device_id,
                self.reg.bundle_sha256,
                uuid.uuid4().hex,
                "train",
                "int8",
                self.q,
                self.y,
                ids,
                self.scales,
            )
        )


class Server(LocalServer):
    """`fedmobillm serve` with a fresh admin token and ``settings``, started on creation."""

    def __init__(
        self,
        data_dir: Path,
        settings: dict,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            data_dir,
            admin_token=uuid.uuid4().hex + uuid.uuid4().hex,
            config=settings,
            args=args,  # e.g. --no-train, --database URL --workers N
            env=env,
            log_path=data_dir.parent / "bench-server.log",
            startup_timeout=240.0,  # `serve --workers 2` imports for ~30 s under load
            grace=120.0,
        )
        self.start()

    @property
    def admin(self) -> dict:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def trainer(self) -> dict:
        r = httpx.get(f"{self.url}{ROUTE_STATUS}", headers=self.admin, timeout=30)
        return r.json()["trainer"]

    def commits(self) -> tuple[int, int]:
        """(store commits holding uploads, uploads they held) since the server started."""
        return ingest_commits(self.url)


def ingest_commits(url: str) -> tuple[int, int]:
    """(fedmobillm_ingest_commits_total, fedmobillm_ingest_committed_uploads_total) of the
    server at ``url`` (its /metrics)."""
    text = httpx.get(f"{url}{ROUTE_METRICS}", timeout=30).text
    values = dict(ln.split(" ", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))
    return (
        int(float(values["fedmobillm_ingest_commits_total"])),
        int(float(values["fedmobillm_ingest_committed_uploads_total"])),
    )


def per_commit(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Uploads per commit between two ``ingest_commits`` readings (None: no commit)."""
    commits = after[0] - before[0]
    return round((after[1] - before[1]) / commits, 2) if commits else None


async def device_loop(
    client: httpx.AsyncClient,
    url: str,
    dev: SimDevice,
    t_end: float,
    lat: list[float],
    sizes: list[int],
    max_batches: int,
) -> None:
    headers = {
        "Authorization": f"Bearer {dev.reg.token}",
        "Content-Type": "application/octet-stream",
    }
    for _ in range(max_batches):
        if time.perf_counter() >= t_end:
            return
        body = dev.payload()
        t0 = time.perf_counter()
        r = await client.post(f"{url}{ROUTE_BATCHES}", content=body, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"upload refused: {r.status_code} {r.text[:200]}")
        lat.append(time.perf_counter() - t0)
        sizes.append(len(body))


async def load(
    url: str, fleet: list[SimDevice], duration: float, max_batches: int = 1_000_000
) -> dict:
    lat: list[float] = []
    sizes: list[int] = []
    limits = httpx.Limits(max_connections=len(fleet) + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                device_loop(client, url, dev, t0 + duration, lat, sizes, max_batches)
                for dev in fleet
            )
        )
        elapsed = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {
        "acked_batches": len(lat),
        "seconds": round(elapsed, 2),
        "batches_per_s": round(len(lat) / elapsed, 1),
        "mb_per_s": round(sum(sizes) / elapsed / 1e6, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


def register_fleet(srv: Server, devices: int, n: int, id0: int) -> list[SimDevice]:
    fleet = []
    for i in range(devices):
        name, depth, hidden, taps = ARCHS[i % len(ARCHS)]
        m = manifest(name, depth, hidden, taps)
        body = RegisterRequest(f"dev-{id0}-{i}", m, LABELS).to_dict()
        r = httpx.post(f"{srv.url}{ROUTE_DEVICES}", headers=srv.admin, timeout=30, json=body)
        r.raise_for_status()
        reg = RegisterResponse.from_dict(r.json())
        fleet.append(SimDevice(reg, m, n, seed=id0 + i))
    return fleet


def run_mode(workdir: Path, args: argparse.Namespace, training: bool) -> dict:
    data_dir = workdir / ("train" if training else "ingest") / "data"
    data_dir.parent.mkdir(parents=True)
    settings = {
        "train": training,
        "idle_after_epochs": 0,
        "checkpoint_every": 500,
        "eval_every": 1000,
        "export_every": 100_000,
        "batch_size": 64,
        **args.settings,
    }
    srv = Server(data_dir, settings)
    try:
        if training:  # pre-load data so the trainer steps during the measurement
            warm = register_fleet(srv, 3, args.batch, 10_000)
            asyncio.run(load(srv.url, warm, 60.0, max_batches=10))
            t_wait = time.monotonic() + 120
            while srv.trainer()["step"] < 20 and time.monotonic() < t_wait:
                time.sleep(0.5)
        fleet = register_fleet(srv, args.devices, args.batch, 0)
        before = srv.trainer() if training else None
        commits = srv.commits()
        log.info(
            "%s: %d devices uploading for %.0f s",
            "with training" if training else "ingest only",
            args.devices,
            args.duration,
        )
        t0 = time.monotonic()
        result = asyncio.run(load(srv.url, fleet, args.duration))
        result["uploads_per_commit"] = per_commit(commits, srv.commits())
        if training:
            after = srv.trainer()
            dt = time.monotonic() - t0
            result["trainer_steps"] = after["step"] - before["step"]
            result["trainer_samples_per_s"] = round(
                (after["samples_seen"] - before["samples_seen"]) / dt, 1
            )
    finally:
        srv.stop()
    result["mode"] = "with training" if training else "ingest only"
    return result


def trainer_only(workdir: Path, args: argparse.Namespace) -> float:
    """Trainer samples/s with no ingest load (same settings)."""
    data_dir = workdir / "trainer" / "data"
    data_dir.parent.mkdir(parents=True)
    srv = Server(
        data_dir,
        {
            "train": True,
            "idle_after_epochs": 0,
            "checkpoint_every": 500,
            "eval_every": 1000,
            "export_every": 100_000,
            "batch_size": 64,
            **args.settings,
        },
    )
    try:
        warm = register_fleet(srv, 3, args.batch, 20_000)
        asyncio.run(load(srv.url, warm, 60.0, max_batches=10))
        while srv.trainer()["step"] < 20:
            time.sleep(0.5)
        a, t0 = srv.trainer(), time.monotonic()
        time.sleep(min(10.0, args.duration))
        b = srv.trainer()
        return round((b["samples_seen"] - a["samples_seen"]) / (time.monotonic() - t0), 1)
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_server", description=__doc__)
    p.add_argument("--devices", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per mode")
    p.add_argument("--batch", type=int, default=32, help="samples per upload")
    p.add_argument("--quick", action="store_true", help="5 s per mode")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=JSON",
        help="a server setting, e.g. --set ingest_group_max=1",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.settings = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.quick:
        args.duration = 5.0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        rows = [run_mode(Path(tmp), args, training=False), run_mode(Path(tmp), args, True)]
        idle_rate = trainer_only(Path(tmp), args)
    report = {
        "devices": args.devices,
        "batch_samples": args.batch,
        "duration_s": args.duration,
        "cpu_cores": os.cpu_count(),
        "settings": args.settings,
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
        "trainer_samples_per_s_no_ingest": idle_rate,
    }
    (args.out / "bench_server.json").write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        f"{report['devices']} devices, {report['batch_samples']} samples/upload (int8), "
        f"{report['duration_s']:.0f} s per mode, {report['cpu_cores']} cores, settings "
        f"{json.dumps(report['settings'])}, load average at the end "
        f"{' / '.join(str(x) for x in report['load_avg_end'])}",
        "",
        "| mode | acked batches/s | MB/s | p50 ack ms | p99 ack ms | uploads/commit | "
        "trainer samples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['mode']} | {r['batches_per_s']} | {r['mb_per_s']} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['uploads_per_commit']} | {r.get('trainer_samples_per_s', '-')} |"
        )
    lines.append(
        f"| trainer alone | - | - | - | - | - | {report['trainer_samples_per_s_no_ingest']} |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
