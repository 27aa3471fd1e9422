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

``--trainer-process``: the trainer is `serve --trainer-process`'s supervised child instead
(with its warm standby unless ``--no-standby``): every cycle SIGKILLs the active trainer
child (serve's supervisor must start another, or its standby take over, resuming from the
checkpoint), and every other cycle then SIGKILLs `serve` itself (its process group: its
trainer children, in sessions of their own, die of PR_SET_PDEATHSIG, the active one after
its final checkpoint) and starts it again. Timed from each kill (its first step read from
the unix time the trainer logs): the new trainer's status published, and its first step.

PostgreSQL: ``--database URL`` (an empty database), else a throwaway PostgreSQL is started
with tests/server/pg_helpers.py (Debian's postgresql package)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
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
    srv, trainer = _processes(data, database, args)
    t_start = time.monotonic()
    srv.start()
    if trainer is not None:
        trainer.start()
    devices = _register(srv, args.devices)
    stop = threading.Event()
    threads = _upload_forever(devices, srv, stop)
    cycles: list[dict[str, Any]] = []
    try:
        pid = None  # the trainer child's, in --trainer-process
        for cycle in range(args.cycles):
            if trainer is None:
                pid = _cycle_child(cycle, srv, devices, args, pid, cycles)
            else:
                cycles.append(_cycle(cycle, backend, srv, trainer, devices, args))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    try:
        for d in devices:  # flush what was pending at the last kill
            _wait(lambda d=d: d.pending is None or d.upload_one(srv.url), 120, "the flush")
    finally:
        if trainer is not None:
            trainer.stop()
        srv.stop()
    out = _count(backend, data, database, devices)
    if pg is not None:
        pg.stop()
    out.update(
        backend=backend,
        workers=args.workers if database else 1,
        devices=args.devices,
        trainer_process=args.trainer_process,
        standby=args.trainer_process and args.standby,
        cycles=cycles,
        seconds=round(time.monotonic() - t_start, 1),
    )
    return out


def _processes(
    data: Path, database: str | None, args: argparse.Namespace
) -> tuple[LocalServer, LocalTrainer | None]:
    """`serve --no-train` and `fedmobillm train` beside it, or `serve --trainer-process`."""
    config = dict(SETTINGS)
    extra = [] if args.trainer_process else ["--no-train"]
    if args.trainer_process:
        config.update(trainer_process=True, trainer_standby=args.standby)
    if database:
        extra += ["--database", database, "--workers", str(args.workers)]
    srv = LocalServer(
        data, admin_token=uuid.uuid4().hex * 2, config=config, args=extra,
        env={"OMP_NUM_THREADS": "1"}, startup_timeout=180.0, grace=60.0,
    )  # fmt: skip
    if args.trainer_process:
        return srv, None
    return srv, LocalTrainer(data, srv._config_file(), database)


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


# -- --trainer-process: the trainer as serve's supervised child --


def gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def trainer_children(srv: LocalServer) -> list[int]:
    """serve's `fedmobillm train` children (the active one and the standby)."""
    import psutil

    assert srv.proc is not None
    pids = []
    for p in psutil.Process(srv.proc.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if "train" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
    return pids


def wait_trained(srv: LocalServer, pid: int | None) -> dict:
    """The status once trainer ``pid`` (None: any child of serve) has taken 5 steps since
    its start."""
    got: dict = {}

    def trained() -> bool:
        st = _trainer_status(srv)
        own = st["process"]["pid"]
        ok = own == pid if pid is not None else own in trainer_children(srv)
        got.update(st)
        return ok and st["step"] >= (st.get("resumed_from") or 0) + 5

    _wait(trained, 300, "trainer steps")
    return got


def standby_ready(srv: LocalServer, active: int) -> int:
    """The standby's pid once its log says it has imported everything and waits."""
    found: list[int] = []

    def ready() -> bool:
        log = srv.log_path.read_text(errors="replace")
        found[:] = [
            p for p in trainer_children(srv)
            if p != active and f"standby trainer (pid {p}): ready in" in log
        ]  # fmt: skip
        return bool(found)

    _wait(ready, 600, "a warm standby trainer")
    return found[0]


def first_step_at(srv: LocalServer, pid: int, timeout: float = 300) -> tuple[int, float]:
    """(step, unix time) of trainer ``pid``'s first training step, as it logged it."""
    pattern = re.compile(rf"trainer process {pid}: first training step \((\d+)\) at unix ([\d.]+)")
    found: list[tuple[int, float]] = []

    def logged() -> bool:
        m = pattern.search(srv.log_path.read_text(errors="replace"))
        if m:
            found.append((int(m.group(1)), float(m.group(2))))
        return bool(m)

    _wait(logged, timeout, f"trainer {pid}'s first training step")
    return found[0]


def trainer_back(srv: LocalServer, old: int, t_kill: float, checkpoint: int | None) -> dict:
    """From the kill (unix ``t_kill``): the new trainer's status published (resumed), and its
    first training step."""
    seen: dict = {}

    def published() -> bool:
        st = _trainer_status(srv)
        seen.update(st)
        return st["process"]["pid"] != old and (
            checkpoint is None or st.get("resumed_from") is not None
        )

    _wait(published, 300, "the new trainer's status")
    status_s = time.time() - t_kill
    new = seen["process"]["pid"]
    step, at = first_step_at(srv, new)
    return {
        "new_pid": new,
        "resumed_from": seen.get("resumed_from"),
        "checkpoint": checkpoint,
        "resumed_ok": seen.get("resumed_from") == checkpoint,
        "status_s": round(status_s, 2),
        "first_step_s": round(at - t_kill, 2),
        "first_step": step,
    }


def _kill_child(srv: LocalServer, pid: int) -> dict[str, Any]:
    """SIGKILL the active trainer child; serve's supervisor starts another (or its standby
    takes over)."""
    standby = [p for p in trainer_children(srv) if p != pid]
    t0 = time.time()
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: gone(pid), 30, "the killed trainer to die")
    back = trainer_back(srv, pid, t0, latest_checkpoint(srv.data_dir))  # final: it is dead
    return {"killed": ["trainer child"], "took_over": back["new_pid"] in standby, **back}


def _kill_serve(srv: LocalServer) -> dict[str, Any]:
    """SIGKILL serve (its process group); its trainer children (own sessions) die of
    PDEATHSIG, the active one after writing its final checkpoint; serve is started again at
    once (its new child waits for the old one: the data dir's trainer lock)."""
    import psutil

    assert srv.proc is not None
    old = _trainer_status(srv)["process"]["pid"]
    kids = [p.pid for p in psutil.Process(srv.proc.pid).children(recursive=True)]
    t0 = time.time()
    srv.kill()
    srv.start()
    ingest_back = time.time() - t0
    _wait(lambda: all(gone(k) for k in kids), 600, "serve's children to exit (PDEATHSIG)")
    orphans = time.time() - t0
    back = trainer_back(srv, old, t0, latest_checkpoint(srv.data_dir))
    return {
        "killed": ["serve"],
        "ingest_back_s": round(ingest_back, 2),
        "children_gone_s": round(orphans, 2),
        **back,
    }


def _cycle_child(
    cycle: int,
    srv: LocalServer,
    devices: list[Device],
    args: argparse.Namespace,
    pid: int | None,
    rows: list[dict[str, Any]],
) -> int:
    """Wait for progress (acks, 5 steps of the current child), SIGKILL the trainer child,
    and every other cycle then serve; the timings appended to ``rows``. The trainer's pid."""
    acked = sum(len(d.acked) for d in devices)
    _wait(lambda: sum(len(d.acked) for d in devices) >= acked + args.min_acked, 300, "acks")
    pid = wait_trained(srv, pid)["process"]["pid"]
    if args.standby:  # kill once the standby is ready (its imports done), as it mostly is
        standby_ready(srv, pid)
    kills = [_kill_child(srv, pid)]
    if cycle % 2 == 1:  # the standby's readiness does not matter: serve's children all die
        wait_trained(srv, kills[-1]["new_pid"])
        kills.append(_kill_serve(srv))
    for r in kills:
        r.update(cycle=cycle + 1, acked_before=sum(len(d.acked) for d in devices))
        print(
            f"{srv.data_dir.parent.name} cycle {cycle + 1}: killed {r['killed'][0]}"
            f"{' (standby took over)' if r.get('took_over') else ''}; trainer status back in "
            f"{r['status_s']:.2f} s, first step in {r['first_step_s']:.2f} s, resumed from "
            f"{r['resumed_from']} (checkpoint {r['checkpoint']})",
            flush=True,
        )
    rows.extend(kills)
    return kills[-1]["new_pid"]


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
    if any(r.get("trainer_process") for r in report["backends"]):
        return markdown_child(report)
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


def _stat(xs: list[float]) -> str:
    return f"{np.mean(xs):.2f} / {max(xs):.2f} s" if xs else "-"


def markdown_child(report: dict) -> str:
    """The table of a ``--trainer-process`` run."""
    lines = [
        "# kill -9 cycles of `serve --trainer-process` (benchmarks.bench_crash)",
        "",
        f"`{report['command']}`; load average {report['load_before']} before, "
        f"{report['load_after']} after. Times from each kill, mean / max.",
        "",
        "| backend | workers | standby | kills (trainer child / serve) | standby took over | "
        "acked samples | lost | duplicated | resent batches recognised | child kill → status "
        "| child kill → 1st step | serve kill → ingest back | serve kill → old children gone "
        "| serve kill → status | serve kill → 1st step | resumed from the last checkpoint "
        "| time |",
        "|" + "---|" * 17,
    ]
    for r in report["backends"]:
        child = [c for c in r["cycles"] if c["killed"] == ["trainer child"]]
        serve = [c for c in r["cycles"] if c["killed"] == ["serve"]]
        resumed = f"{sum(c['resumed_ok'] for c in r['cycles'])}/{len(r['cycles'])}"
        lines.append(
            f"| {r['backend']} | {r['workers']} | {'on' if r['standby'] else 'off'} | "
            f"{len(child)} / {len(serve)} | {sum(c['took_over'] for c in child)} | "
            f"{r['acked_samples']:,} | {r['lost']} | {r['duplicated']} | "
            f"{r['resent_recognised']} | {_stat([c['status_s'] for c in child])} | "
            f"{_stat([c['first_step_s'] for c in child])} | "
            f"{_stat([c['ingest_back_s'] for c in serve])} | "
            f"{_stat([c['children_gone_s'] for c in serve])} | "
            f"{_stat([c['status_s'] for c in serve])} | "
            f"{_stat([c['first_step_s'] for c in serve])} | {resumed} | {r['seconds']} s |"
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
    p.add_argument(
        "--trainer-process",
        action="store_true",
        help="the trainer as `serve --trainer-process`'s supervised child",
    )
    p.add_argument(
        "--standby",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --trainer-process: serve's warm standby trainer (setting trainer_standby)",
    )
    args = p.parse_args(argv)
    if not args.standby and not args.trainer_process:
        raise FedMobiLLMError("--no-standby is for --trainer-process", hint="add --trainer-process")
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
