"""kill -9 cycles of ingest and the trainer process while devices upload (issue 17).

    python -m benchmarks.bench_crash --backend sqlite,postgresql --cycles 10 --out DIR

Per backend: `fedmobillm serve --no-train` (SQLite: one process; PostgreSQL: ``--workers``
ingest workers) and `fedmobillm train` beside it on the same data dir; ``--devices``
simulated devices upload int8 batches of BATCH samples over real HTTP without pause, each
re-sending its unacknowledged batch as is (as the device client does). Every cycle waits
for new acknowledgements and new trainer steps, then SIGKILLs the trainer process and the
ingest side: the whole `serve` process group, or on PostgreSQL every other cycle one uvicorn
worker alone (its supervisor replaces it); then restarts what died. At the end the devices
flush what is pending, and the store is counted: acknowledged samples lost (acked, not
stored) and duplicated (stored twice) must both be 0. Writes crash.json and crash.md.

PostgreSQL: ``--database URL`` (an empty database), else a throwaway PostgreSQL is started
with tests/server/pg_helpers.py (Debian's postgresql package)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fedmobillm.device_runtime.messages import (
    ROUTE_BATCHES,
    ROUTE_DEVICES,
    ROUTE_STATUS,
    RegisterRequest,
)
from fedmobillm.device_runtime.serde import Batch, encode_batch, quantize_int8
from fedmobillm.errors import FedMobiLLMError
from fedmobillm.server.local import LocalServer, LocalTrainer

from .bench_server import LABELS, manifest

BATCH = 8  # samples per upload
ARCHS = [("bench-a", 4, 16, [2, 4]), ("bench-b", 6, 24, [2, 4, 6])]
SETTINGS = {
    "train": True,  # `serve --no-train` overrides it; `fedmobillm train` reads the same file
    "batch_size": 16,
    "checkpoint_every": 5,
    "eval_every": 10_000,
    "export_every": 10_000,
    "idle_after_epochs": 0,
    "side_width": 16,
    "side_blocks": 2,
}


class Device:
    """Sequential uploads of BATCH fresh sample ids; an unacknowledged batch (connection
    refused or dropped, 429, 5xx) is re-sent as is until acknowledged."""

    def __init__(self, reg: dict, m: dict, seed: int) -> None:
        self.reg, self.m = reg, m
        self.rng = np.random.default_rng(seed)
        self.next_id = 0
        self.pending: bytes | None = None
        self.pending_ids: list[int] = []
        self.acked: set[int] = set()
        self.resent_duplicates = 0  # re-sends the server recognised (stored before the kill)
        self.refused = 0  # attempts that got no acknowledgement

    def _payload(self) -> bytes:
        k, d = len(self.m["taps"]), self.m["hidden_size"]
        y = self.rng.integers(0, 2, BATCH)
        x = self.rng.normal(size=(BATCH, k, d)).astype(np.float32) + y[:, None, None] * 0.5
        scales = np.full(k, 0.05, np.float32)
        ids = np.arange(self.next_id, self.next_id + BATCH, dtype=np.int64)
        self.pending_ids = ids.tolist()
        self.next_id += BATCH
        r = self.reg
        return encode_batch(
            Batch(r["device_id"], r["bundle_sha256"], uuid.uuid4().hex, "train", "int8",
                  quantize_int8(x, scales), y, ids, scales)
        )  # fmt: skip

    def upload_one(self, url: str) -> bool:
        if self.pending is None:
            self.pending = self._payload()
        headers = {
            "Authorization": f"Bearer {self.reg['token']}",
            "Content-Type": "application/octet-stream",
        }
        try:
            r = httpx.post(
                f"{url}{ROUTE_BATCHES}", content=self.pending, headers=headers, timeout=15
            )
        except httpx.HTTPError:
            self.refused += 1
            return False
        if r.status_code != 200:
            if r.status_code < 429:
                raise FedMobiLLMError(f"upload refused: {r.status_code} {r.text[:300]}")
            self.refused += 1
            return False
        self.resent_duplicates += int(r.json()["duplicate"] > 0)
        self.acked.update(self.pending_ids)
        self.pending = None
        return True


def _upload_forever(
    devices: list[Device], srv: LocalServer, stop: threading.Event
) -> list[threading.Thread]:
    def loop(d: Device) -> None:
        while not stop.is_set():
            if not d.upload_one(srv.url):
                stop.wait(0.1)  # down or busy: re-send the same batch shortly

    threads = [threading.Thread(target=loop, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    return threads


def _wait(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if pred():
                return time.monotonic() - t0
        except (httpx.HTTPError, KeyError, ValueError, TypeError):
            pass
        time.sleep(0.1)
    raise FedMobiLLMError(f"timed out after {timeout:.0f} s waiting for {what}")


def _trainer_status(srv: LocalServer) -> dict:
    headers = {"Authorization": f"Bearer {srv.admin_token}"}
    return httpx.get(f"{srv.url}{ROUTE_STATUS}", headers=headers, timeout=15).json()["trainer"]


def latest_checkpoint(data: Path) -> int | None:
    """The step of the data dir's last checkpoint (``checkpoints/LATEST``); None before one."""
    try:
        return int(json.loads((data / "checkpoints" / "LATEST").read_text())["step"])
    except FileNotFoundError:
        return None


def kill_worker(srv: LocalServer, expected: int | None = None, timeout: float = 180) -> None:
    """SIGKILL one uvicorn worker of `serve --workers N` (not the process group); wait until
    uvicorn's supervisor has replaced it. ``expected``: the number of workers there must be."""
    import psutil

    if srv.proc is None:
        raise FedMobiLLMError("kill_worker: the server is not running; start() it first")
    parent = psutil.Process(srv.proc.pid)
    workers = [p for p in parent.children() if "resource_tracker" not in " ".join(p.cmdline())]
    if expected is not None and len(workers) != expected:
        raise FedMobiLLMError(
            f"kill_worker: {len(workers)} workers, expected {expected}: "
            f"{[p.cmdline() for p in workers]}"
        )
    victim = workers[0]
    victim.kill()
    _wait(
        lambda: (
            victim.pid not in [p.pid for p in parent.children()]
            and len(parent.children()) >= len(workers)
        ),
        timeout,
        "uvicorn to replace the killed worker",
    )


def _stored(backend: str, data: Path, database: str | None, device_id: str) -> list[int]:
    if backend == "sqlite":
        import sqlite3

        with sqlite3.connect(data / "store.sqlite3") as db:
            rows = db.execute("SELECT sample_id FROM samples WHERE device_id = ?", (device_id,))
            return [r[0] for r in rows]
    import psycopg

    with psycopg.connect(database) as conn:
        rows = conn.execute("SELECT sample_id FROM samples WHERE device_id = %s", (device_id,))
        return [r[0] for r in rows]


def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``args.cycles`` kill -9 cycles on one backend; the counts and timings."""
    database, pg = None, None
    if backend == "postgresql":
        database, pg = args.database, None
        if database is None:
            pg = _start_postgres()
            database = pg.database()
    data = workdir / backend / "data"
    extra = ["--no-train"]
    if database:
        extra += ["--database", database, "--workers", str(args.workers)]
    srv = LocalServer(
        data, admin_token=uuid.uuid4().hex * 2, config=SETTINGS, args=extra,
        env={"OMP_NUM_THREADS": "1"}, startup_timeout=180.0, grace=60.0,
    )  # fmt: skip
    trainer = LocalTrainer(data, srv._config_file(), database)
    t_start = time.monotonic()
    srv.start()
    trainer.start()
    devices = _register(srv, args.devices)
    stop = threading.Event()
    threads = _upload_forever(devices, srv, stop)
    cycles: list[dict[str, Any]] = []
    try:
        for cycle in range(args.cycles):
            cycles.append(_cycle(cycle, backend, srv, trainer, devices, args))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    try:
        for d in devices:  # flush what was pending at the last kill
            _wait(lambda d=d: d.pending is None or d.upload_one(srv.url), 120, "the flush")
    finally:
        trainer.stop()
        srv.stop()
    out = _count(backend, data, database, devices)
    if pg is not None:
        pg.stop()
    out.update(
        backend=backend,
        workers=args.workers if database else 1,
        devices=args.devices,
        cycles=cycles,
        seconds=round(time.monotonic() - t_start, 1),
    )
    return out


def _register(srv: LocalServer, n: int) -> list[Device]:
    devices = []
    headers = {"Authorization": f"Bearer {srv.admin_token}"}
    for i in range(n):
        name, depth, hidden, taps = ARCHS[i % len(ARCHS)]
        m = manifest(name, depth, hidden, taps)
        body = RegisterRequest(f"crash-{i}", m, LABELS).to_dict()
        r = httpx.post(f"{srv.url}{ROUTE_DEVICES}", headers=headers, json=body, timeout=30)
        r.raise_for_status()
        devices.append(Device(r.json(), m, seed=i))
    return devices


def _cycle(
    cycle: int,
    backend: str,
    srv: LocalServer,
    trainer: LocalTrainer,
    devices: list[Device],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Wait for progress (acks and trainer steps of this trainer process), then SIGKILL the
    trainer and the ingest side, restart them, and time the recovery."""
    acked = sum(len(d.acked) for d in devices)
    pid = trainer.proc.pid if trainer.proc else None
    _wait(lambda: sum(len(d.acked) for d in devices) >= acked + args.min_acked, 300, "acks")
    steps = {}

    def trained() -> bool:
        st = _trainer_status(srv)
        steps.update(st)
        base = st.get("resumed_from") or 0
        return st["process"]["pid"] == pid and st["step"] >= base + 5

    _wait(trained, 300, "trainer steps")
    worker_only = backend == "postgresql" and args.workers > 1 and cycle % 2 == 1
    trainer.kill()
    t0 = time.monotonic()
    if worker_only:
        kill_worker(srv)
    else:
        srv.kill()
        srv.start()
    ingest_back = time.monotonic() - t0
    checkpoint = latest_checkpoint(srv.data_dir)
    trainer.start()
    new_pid = trainer.proc.pid if trainer.proc else None

    def back() -> bool:
        st = _trainer_status(srv)
        return st["process"]["pid"] == new_pid and (
            checkpoint is None or st["resumed_from"] is not None
        )

    trainer_back = _wait(back, 300, "the new trainer process's status")
    st = _trainer_status(srv)
    print(
        f"{backend} cycle {cycle + 1}: killed trainer + {'one worker' if worker_only else 'serve'}"
        f" at step {steps.get('step')}; ingest back in {ingest_back:.1f} s, trainer resumed "
        f"from {st.get('resumed_from')} in {ingest_back + trainer_back:.1f} s",
        flush=True,
    )
    return {
        "killed": ["trainer", "worker" if worker_only else "serve"],
        "step_at_kill": steps.get("step"),
        "resumed_from": st.get("resumed_from"),
        "checkpoint_at_kill": checkpoint,
        "resumed_ok": st.get("resumed_from") == checkpoint,
        "acked_before": sum(len(d.acked) for d in devices),
        "ingest_back_s": round(ingest_back, 2),
        "trainer_back_s": round(ingest_back + trainer_back, 2),
    }


def _count(backend: str, data: Path, database: str | None, devices: list[Device]) -> dict:
    lost = duplicated = stored_total = unsent = 0
    for d in devices:
        stored = _stored(backend, data, database, d.reg["device_id"])
        stored_total += len(stored)
        duplicated += len(stored) - len(set(stored))
        lost += len(d.acked - set(stored))
        unsent += len(set(stored) - set(range(d.next_id)))
    return {
        "acked_samples": sum(len(d.acked) for d in devices),
        "stored_samples": stored_total,
        "lost": lost,
        "duplicated": duplicated,
        "stored_never_sent": unsent,
        "resent_recognised": sum(d.resent_duplicates for d in devices),
        "unacknowledged_attempts": sum(d.refused for d in devices),
    }


def _start_postgres() -> Any:
    """A throwaway PostgreSQL (tests/server/pg_helpers.py: initdb in a temp dir)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
    try:
        from pg_helpers import Postgres, pg_bin
    except ImportError as exc:
        raise FedMobiLLMError(
            "cannot start a PostgreSQL: tests/server/pg_helpers.py is not beside this checkout",
            hint="pass --database postgresql://... (an empty database)",
        ) from exc
    bindir = pg_bin()
    if bindir is None:
        raise FedMobiLLMError(
            "Debian's postgresql is not installed (/usr/lib/postgresql/*/bin/initdb)",
            hint="apt-get install postgresql, or pass --database postgresql://...",
        )
    return Postgres(bindir).start()


def markdown(report: dict) -> str:
    lines = [
        "# kill -9 cycles (benchmarks.bench_crash)",
        "",
        f"`{report['command']}`; load average {report['load_before']} before, "
        f"{report['load_after']} after.",
        "",
        "| backend | workers | cycles | kills (trainer / serve / worker) | acked samples | "
        "lost | duplicated | resent batches recognised | ingest back (mean) | trainer back "
        "(mean) | resumed from the last checkpoint | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["backends"]:
        kinds = [k for c in r["cycles"] for k in c["killed"]]
        resumed = f"{sum(c['resumed_ok'] for c in r['cycles'])}/{len(r['cycles'])}"
        ingest = np.mean([c["ingest_back_s"] for c in r["cycles"]])
        back = np.mean([c["trainer_back_s"] for c in r["cycles"]])
        lines.append(
            f"| {r['backend']} | {r['workers']} | {len(r['cycles'])} | {kinds.count('trainer')}"
            f" / {kinds.count('serve')} / {kinds.count('worker')} | {r['acked_samples']:,} | "
            f"{r['lost']} | {r['duplicated']} | {r['resent_recognised']} | "
            f"{ingest:.1f} s | {back:.1f} s | {resumed} | {r['seconds']} s |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="sqlite,postgresql", help="sqlite, postgresql or both")
    p.add_argument("--cycles", type=int, default=10)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="ingest workers on PostgreSQL")
    p.add_argument("--min-acked", type=int, default=32, help="new acked samples per cycle")
    p.add_argument("--database", default=None, help="PostgreSQL URL (else one is started)")
    p.add_argument("--out", type=Path, default=Path("results/crash"))
    args = p.parse_args(argv)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    for b in backends:
        if b not in ("sqlite", "postgresql"):
            raise FedMobiLLMError(f"--backend {b}: sqlite or postgresql")
    report: dict[str, Any] = {
        "command": "python -m benchmarks.bench_crash " + " ".join(argv or sys.argv[1:]),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "backends": [],
    }
    with tempfile.TemporaryDirectory(prefix="fedmobillm-crash-") as tmp:
        for b in backends:
            report["backends"].append(run_backend(b, args, Path(tmp)))
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "crash.json").write_text(json.dumps(report, indent=2))
    (args.out / "crash.md").write_text(markdown(report))
    print(markdown(report))
    bad = [r["backend"] for r in report["backends"] if r["lost"] or r["duplicated"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
