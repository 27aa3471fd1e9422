"""Grow a store through the HTTP API of a real ``fedmobillm serve`` for ``bench_restart --http``.

``grow(data_dir, rows, args)`` starts the server (trainer on, ``trainer_memory_mb`` =
``args.memory_mb``) on ``data_dir``, registers ``args.devices`` devices once (their tokens and
next sample ids kept in ``<data_dir>-devices.json``, so a later call grows the same fleet), and
uploads int8 training batches of 500 samples (K=3 x d=384) from every device at once until the
store holds ``rows`` samples (a 429 is waited out as its Retry-After says). It samples the
server process's RSS every 0.5 s while uploading and waits until the trainer has read every
stored sample; returns the running server and what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from fedmobillm.device_runtime.messages import ROUTE_BATCHES, ROUTE_DEVICES, RegisterRequest
from fedmobillm.device_runtime.serde import Batch, encode_batch, quantize_int8

from .bench_server import LABELS, Server, manifest

K, D, BATCH = 3, 384, 500


def _fleet(srv: Server, path: Path, devices: int) -> list[dict[str, Any]]:
    """The registered devices ({device_id, token, bundle_sha256, next}), registered now if
    ``path`` does not list them yet."""
    fleet = json.loads(path.read_text()) if path.exists() else []
    for i in range(len(fleet), devices):
        arch = ("minilm-l6-like", 6, D, [2, 4, 6]) if i % 2 else ("other-like", 12, D, [4, 8, 12])
        body = RegisterRequest(f"http-d{i}", manifest(*arch), LABELS).to_dict()
        r = httpx.post(f"{srv.url}{ROUTE_DEVICES}", headers=srv.admin, json=body, timeout=60)
        r.raise_for_status()
        reg = r.json()
        fleet.append({k: reg[k] for k in ("device_id", "token", "bundle_sha256")} | {"next": 0})
    path.write_text(json.dumps(fleet))
    return fleet


def _payload(dev: dict[str, Any], q: np.ndarray, y: np.ndarray, scales: np.ndarray) -> bytes:
    ids = np.arange(dev["next"], dev["next"] + len(y), dtype=np.int64)
    batch = Batch(
        dev["device_id"], dev["bundle_sha256"], uuid.uuid4().hex, "train", "int8", q, y, ids,
        scales,
    )  # fmt: skip
    return encode_batch(batch)


async def _upload(url: str, fleet: list[dict[str, Any]], todo: int) -> dict[str, int]:
    """Upload ``todo`` samples from every device at once; counts of 200s and 429s."""
    rng = np.random.default_rng(0)
    scales = np.full(K, 0.05, np.float32)
    q = quantize_int8(rng.normal(size=(BATCH, K, D)).astype(np.float32), scales)  # (B, K, d)
    y = rng.integers(0, 2, BATCH)
    left = {"samples": todo, "ok": 0, "429": 0}

    async def device(client: httpx.AsyncClient, dev: dict[str, Any]) -> None:
        headers = {"Authorization": f"Bearer {dev['token']}"}
        while left["samples"] > 0:
            n = min(BATCH, left["samples"])
            left["samples"] -= n
            body = _payload(dev, q[:n], y[:n], scales)
            while True:
                r = await client.post(f"{url}{ROUTE_BATCHES}", content=body, headers=headers)
                if r.status_code != 429:
                    break
                left["429"] += 1
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
            if r.status_code != 200:
                raise RuntimeError(f"upload refused: {r.status_code} {r.text[:300]}")
            dev["next"] += n
            left["ok"] += 1

    limits = httpx.Limits(max_connections=len(fleet) + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(device(client, dev) for dev in fleet))
    return left


def grow(data_dir: Path, rows: int, args: argparse.Namespace) -> tuple[Server, dict[str, Any]]:
    settings: dict[str, Any] = {
        "train": True, "trainer_memory_mb": args.memory_mb, "batch_size": 32,
        "eval_every": 10**6, "checkpoint_every": 2000, "export_every": 10**6,
    }  # fmt: skip
    if args.database:
        settings["database"] = args.database
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    srv = Server(data_dir, settings)
    try:
        fleet_path = data_dir.with_name(data_dir.name + "-devices.json")
        fleet = _fleet(srv, fleet_path, args.devices)
        have = sum(dev["next"] for dev in fleet)  # samples acknowledged so far
        proc, peak, stop = psutil.Process(srv.proc.pid), [0], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                stop.wait(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        counts = asyncio.run(_upload(srv.url, fleet, max(0, rows - have)))
        secs = time.perf_counter() - t0
        fleet_path.write_text(json.dumps(fleet))
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            c = srv.trainer()["cache"]
            if c["samples_read"] >= c["store_samples"] >= rows:
                break
            time.sleep(1.0)
        stop.set()
        watcher.join()
    except BaseException:
        srv.stop()
        raise
    return srv, {
        "ingest_s": round(secs, 1),
        "ingest_samples_per_s": round(max(0, rows - have) / secs) if secs else None,
        "ingest_429s": counts["429"],
        "server_rss_peak_mb": round(peak[0] / 2**20),
    }
