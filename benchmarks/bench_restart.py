"""How long a trainer takes to restart on a growing store, and how much memory it holds.

    python -m benchmarks.bench_restart --rows 10000,100000,1000000 [--devices 64]
        [--memory-mb 64] [--full-max 100000] [--data-dir DIR] [--database postgresql://...]
        [--http | --supervised [--kills 3]] [--out DIR]

For each ``--rows`` (ascending) the store is grown to that many samples (int8 K=3 x d=384,
1,152 B of values a sample, ``--devices`` devices of two architectures): through the service
layer (``Service.ingest``: the API's checks and commits, no HTTP; ``_restart_fill``: one
batch in ten validation), or with ``--http`` through the HTTP API of a real ``fedmobillm
serve`` whose trainer runs at the same cap (``_restart_http``: its RSS recorded while it
ingests and once its trainer has caught up; training batches only). Then a real trainer restarts on it in a fresh process (the one
``fedmobillm train`` runs: ``create_trainer(settings).start()``; it resumes from the previous
run's checkpoint) and stops once its cache is full. Restart, measured (wall clock):

- ``process_to_first_step_s``: process start (spawn) to the trainer's first training step
  (imports and the checkpoint's load included; ``imports_s``: the imports alone, torch's
  lazily imported parts (the optimizer's ``torch._dynamo``, the export's ``torch.onnx``)
  included);
- ``start_to_first_step_s``: ``Trainer.start()`` to the first step (resume from the
  checkpoint, the cache's first rows, the side network, one step);
- ``start_to_full_s``: ``Trainer.start()`` to a full cache (the sampled read-back done, or
  every stored row read);

and the trainer process's RSS when its cache is full and its peak. With ``--full-max N``,
stores of at most N rows are also restarted with the sampled read-back switched off (the
whole store read back, as before), for comparison. Writes DIR/bench_restart.json,
DIR/bench_restart.md and DIR/bench_restart.png (restart s and RSS vs rows).

``--supervised``: the restart a user of `fedmobillm serve --trainer-process` gets. On each
store a real `serve --trainer-process` (the trainer capped at ``--memory-mb``) is started
twice, without and with its warm standby (setting ``trainer_standby``), and its active
trainer child is killed with -9 ``--kills`` times, each once it has trained 5 steps (and,
with the standby, once the standby is ready). From the kill: ``status_s``, until serve's
`/v1/status` names the new trainer, resumed; ``first_step_s``, until its first training
step (the unix time the trainer logs). Also the standby's memory (RSS, USS: its own pages,
PSS). Writes DIR/bench_restart_supervised.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

POLL_S = 0.01


def child(args: argparse.Namespace) -> int:
    """One restart in this (fresh) process: print its timings and RSS as one JSON line."""
    import psutil
    import torch._dynamo  # noqa: F401 - imported lazily by the first optimizer: an import cost
    import torch.onnx  # noqa: F401 - and by the first personal-model export

    from fedmobillm.server.settings import load_settings
    from fedmobillm.server.trainer import create_trainer

    imported = time.time()
    settings, _ = load_settings(
        None, dev=True, data_dir=args.data_dir, trainer_memory_mb=args.memory_mb,
        database=args.database, batch_size=32, eval_every=10**6, checkpoint_every=10**6,
        export_every=10**6,
    )  # fmt: skip
    proc = psutil.Process()
    trainer = create_trainer(settings)
    trainer.cache.sampled_restart = not args.full
    t0 = time.time()
    trainer.start()
    first = full = None
    peak = proc.memory_info().rss
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and trainer.error is None:
        peak = max(peak, proc.memory_info().rss)
        side = trainer.side  # its step counts on from the checkpoint it resumed from
        if first is None and side is not None and side.step > (trainer.resumed_from or 0):
            first = time.time()
        c = trainer.cache
        if full is None and not c.filling and c.rows_read >= trainer.stored > 0:
            full = time.time()
        if first is not None and full is not None:
            break
        time.sleep(POLL_S)
    time.sleep(1.0)  # the cache as it stays: RSS a second after it is full
    rss = proc.memory_info().rss
    peak = max(peak, rss)
    c = trainer.cache
    report = {
        "spawned": args.spawned,
        "imported": imported,
        "start": t0,
        "first_step": first,
        "full": full,
        "error": trainer.error,
        "sampled": c.horizon is not None,
        "rows_fetched": c.rows_fetched,
        "samples_held": c.held_samples(),
        "samples_read": c.samples_read(),
        "held_mb": round(c.held_bytes / 2**20, 1),
        "rss_mb": round(rss / 2**20),
        "rss_peak_mb": round(peak / 2**20),
        "resumed_from": trainer.resumed_from,
    }
    trainer.stop()
    print(json.dumps(report), flush=True)
    return 0


def restart(args: argparse.Namespace, data_dir: Path, full: bool) -> dict[str, Any]:
    """Run ``child`` in a fresh process; its report with the restart times derived."""
    cmd = [
        sys.executable, "-m", "benchmarks.bench_restart", "--child", "--data-dir",
        str(data_dir), "--memory-mb", str(args.memory_mb), "--spawned", repr(time.time()),
    ]  # fmt: skip
    if args.database:
        cmd += ["--database", args.database]
    if full:
        cmd.append("--full")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 300)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"restart failed (rc {done.returncode}): {done.stderr[-3000:]}")
    r = json.loads(lines[-1])

    def since(a: str, b: str) -> float | None:
        return None if r[b] is None else round(r[b] - r[a], 2)

    r["process_to_first_step_s"] = since("spawned", "first_step")
    r["start_to_first_step_s"] = since("start", "first_step")
    r["start_to_full_s"] = since("start", "full")
    r["imports_s"] = since("spawned", "imported")
    return r


def run(args: argparse.Namespace, data_dir: Path) -> list[dict[str, Any]]:
    from benchmarks._restart_fill import fill_to, open_for_fill, stored
    from fedmobillm.server.service import Service

    results = []
    for rows in sorted(args.rows):
        store = open_for_fill(data_dir, args.database)
        try:
            fill_s = fill_to(Service(store), rows, args.devices)
            total = stored(store)
        finally:
            store.close()
        if total > rows:
            print(f"the store already holds {total:,} samples (> {rows:,}): measured at that",
                  file=sys.stderr)  # fmt: skip
        modes = [False, True] if rows <= args.full_max else [False]
        for full in modes:
            r = restart(args, data_dir, full)
            r.update(
                rows=total, mode="read all (before)" if full else "default", fill_s=round(fill_s, 1)
            )
            r["load_avg"] = [round(x, 2) for x in os.getloadavg()]
            print(json.dumps(_row(r)), file=sys.stderr, flush=True)
            results.append(r)
    return results


def run_http(args: argparse.Namespace, data_dir: Path) -> list[dict[str, Any]]:
    """``--http``: grow the store through a real ``fedmobillm serve`` (trainer on, capped),
    recording its RSS while it ingests and once its trainer has caught up; then stop it and
    restart a trainer on the data dir (``restart``), and start the server again to grow on."""
    import psutil

    from ._restart_http import grow

    results = []
    for rows in sorted(args.rows):
        srv, ingest = grow(data_dir, rows, args)
        try:
            cache = srv.trainer()["cache"]
            rss = psutil.Process(srv.proc.pid).memory_info().rss
        finally:
            srv.stop()
        r = restart(args, data_dir, False)
        r.update(
            rows=cache["store_samples"], mode="default", server_rss_mb=round(rss / 2**20),
            server_cache_mb=round(cache["bytes"] / 2**20, 1), **ingest,
        )  # fmt: skip
        r["load_avg"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(_row(r)), file=sys.stderr, flush=True)
        results.append(r)
    return results


def run_supervised(args: argparse.Namespace, data_dir: Path) -> list[dict[str, Any]]:
    """``--supervised``: kill -9 of serve's trainer child, cold and with the standby."""
    from benchmarks._restart_fill import fill_to, open_for_fill, stored
    from fedmobillm.server.service import Service

    results = []
    for rows in sorted(args.rows):
        store = open_for_fill(data_dir, args.database)
        try:
            fill_to(Service(store), rows, args.devices)
            total = stored(store)
        finally:
            store.close()
        for standby in (False, True):
            results += _supervised_kills(args, data_dir, standby, total)
    return results


def _memory_mb(pid: int) -> dict[str, float]:
    import psutil

    m = psutil.Process(pid).memory_full_info()
    return {k: round(getattr(m, k) / 2**20, 1) for k in ("rss", "uss", "pss")}


def _supervised_kills(
    args: argparse.Namespace, data_dir: Path, standby: bool, rows: int
) -> list[dict[str, Any]]:
    """``args.kills`` kill -9 of the active trainer child of one `serve --trainer-process`."""
    import uuid

    from benchmarks.bench_crash import (
        gone,
        latest_checkpoint,
        standby_ready,
        trainer_back,
        wait_trained,
    )
    from fedmobillm.server.local import LocalServer

    config = {
        "trainer_process": True, "trainer_standby": standby, "trainer_memory_mb":
        args.memory_mb, "batch_size": 32, "eval_every": 10**6, "checkpoint_every": 50,
        "export_every": 10**6, "idle_after_epochs": 0,
    }  # fmt: skip
    args_db = ["--database", args.database] if args.database else []
    srv = LocalServer(
        data_dir, admin_token=uuid.uuid4().hex * 2, config=config, args=args_db,
        env={"OMP_NUM_THREADS": "1"}, startup_timeout=300.0, grace=120.0,
        log_path=data_dir.with_name(f"serve-standby-{int(standby)}.log"),
    )  # fmt: skip
    out, pid = [], None
    srv.start()
    try:
        for k in range(args.kills):
            st = wait_trained(srv, pid)
            pid = st["process"]["pid"]
            r: dict[str, Any] = {"rows": rows, "standby": standby, "kill": k + 1}
            if standby:
                r["standby_pid"] = standby_ready(srv, pid)
                r["standby_mb"] = _memory_mb(r["standby_pid"])
            r["active_mb"] = _memory_mb(pid)
            t0 = time.time()
            os.kill(pid, signal.SIGKILL)
            while not gone(pid):
                time.sleep(0.01)
            r.update(trainer_back(srv, pid, t0, latest_checkpoint(data_dir)))
            r["load_avg"] = [round(x, 2) for x in os.getloadavg()]
            print(json.dumps(r), file=sys.stderr, flush=True)
            out.append(r)
            pid = r["new_pid"]
    finally:
        srv.stop()
    return out


def markdown_supervised(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"# bench_restart --supervised: kill -9 of `serve --trainer-process`'s trainer, cap "
        f"{args.memory_mb:g} MB, {'PostgreSQL' if args.database else 'SQLite'}",
        "",
        "| stored rows | standby | kill | kill → status s | kill → 1st step s | standby took "
        "over | resumed from the last checkpoint | standby RSS / USS / PSS MB | active RSS MB "
        "| load avg |",
        "|" + "---|" * 10,
    ]
    for r in results:
        sb = r.get("standby_mb")
        mem = f"{sb['rss']:.0f} / {sb['uss']:.0f} / {sb['pss']:.0f}" if sb else "-"
        lines.append(
            f"| {r['rows']:,} | {'on' if r['standby'] else 'off'} | {r['kill']} | "
            f"{r['status_s']} | {r['first_step_s']} | {r['new_pid'] == r.get('standby_pid')} | "
            f"{r['resumed_ok']} | {mem} | {r['active_mb']['rss']:.0f} | "
            f"{'/'.join(str(x) for x in r['load_avg'])} |"
        )
    return "\n".join(lines) + "\n"


COLUMNS = [
    ("rows", "stored rows"),
    ("mode", "read-back"),
    ("sampled", "sampled"),
    ("process_to_first_step_s", "process start → 1st step s"),
    ("start_to_first_step_s", "trainer start → 1st step s"),
    ("start_to_full_s", "trainer start → cache full s"),
    ("rows_fetched", "rows fetched"),
    ("samples_held", "samples held"),
    ("held_mb", "held MB"),
    ("rss_mb", "RSS MB"),
    ("rss_peak_mb", "RSS peak MB"),
    ("load_avg", "load avg"),
]
HTTP_COLUMNS = [
    ("ingest_samples_per_s", "API ingest samples/s"),
    ("server_rss_peak_mb", "serve RSS peak while ingesting MB"),
    ("server_rss_mb", "serve RSS caught up MB"),
    ("server_cache_mb", "serve cache MB"),
]


def _columns(results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    http = any("server_rss_mb" in r for r in results)
    return COLUMNS[:1] + HTTP_COLUMNS + COLUMNS[1:] if http else COLUMNS


def _row(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r.get(k) for k, _ in _columns([r])}


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    columns = _columns(results)
    head = "| " + " | ".join(t for _, t in columns) + " |"
    lines = [
        f"# bench_restart: cap {args.memory_mb:g} MB, {args.devices} devices, "
        f"{'PostgreSQL' if args.database else 'SQLite'}, filled through "
        f"{'the HTTP API (fedmobillm serve, trainer on)' if args.http else 'Service.ingest'}",
        "",
        head,
        "|" + "---|" * len(columns),
    ]
    for r in results:
        cells = []
        for k, _ in columns:
            v = r.get(k)
            if k == "rows" or k == "rows_fetched" or k == "samples_held":
                v = f"{v:,}"
            elif k == "load_avg":
                v = "/".join(str(x) for x in v)
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path, memory_mb: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, style in (("default", "-o"), ("read all (before)", "--s")):
        rs = [r for r in results if r["mode"] == mode]
        if not rs:
            continue
        x = [r["rows"] for r in rs]
        for key, label in (
            ("process_to_first_step_s", "process start → 1st step"),
            ("start_to_first_step_s", "trainer start → 1st step"),
            ("start_to_full_s", "trainer start → cache full"),
        ):
            ax1.plot(x, [r[key] for r in rs], style, label=f"{label} ({mode})")
        ax2.plot(x, [r["rss_mb"] for r in rs], style, label=f"RSS, cache full ({mode})")
        ax2.plot(x, [r["rss_peak_mb"] for r in rs], style, alpha=0.5, label=f"RSS peak ({mode})")
        ax2.plot(x, [r["held_mb"] for r in rs], style, alpha=0.7, label=f"cache held ({mode})")
        if "server_rss_mb" in rs[0]:
            ax2.plot(x, [r["server_rss_mb"] for r in rs], "-^", label="serve RSS, caught up")
            peak = [r["server_rss_peak_mb"] for r in rs]
            ax2.plot(x, peak, ":^", label="serve RSS peak, ingesting")
    ax1.axhline(2.0, color="grey", lw=0.8, ls=":")
    ax1.set(xscale="log", xlabel="stored samples", ylabel="seconds", title="trainer restart")
    ax2.set(xscale="log", xlabel="stored samples", ylabel="MB", title="trainer RSS")
    ax2.axhline(memory_mb, color="grey", lw=0.8, ls=":", label=f"cache cap {memory_mb:g} MB")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_restart", description=__doc__)
    p.add_argument(
        "--rows", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000]
    )
    p.add_argument("--devices", type=int, default=64)
    p.add_argument("--memory-mb", type=float, default=64.0)
    p.add_argument("--full-max", type=int, default=0, help="also read all back up to N rows")
    p.add_argument("--data-dir", type=Path, default=None, help="keep (and grow) the store here")
    p.add_argument("--database", default=None, help="postgresql://... instead of SQLite")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--http", action="store_true", help="fill through a real server's API")
    p.add_argument(
        "--supervised",
        action="store_true",
        help="kill -9 the trainer child of `serve --trainer-process`, without and with its "
        "warm standby",
    )
    p.add_argument("--kills", type=int, default=3, help="with --supervised: kills per mode")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spawned", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.supervised and args.http:
        raise SystemExit("--supervised fills through the service layer: drop --http")
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        if args.supervised:
            results = run_supervised(args, args.data_dir or Path(tmp) / "data")
        else:
            results = (run_http if args.http else run)(args, args.data_dir or Path(tmp))
    report = {
        "memory_mb": args.memory_mb,
        "devices": args.devices,
        "backend": "postgresql" if args.database else "sqlite",
        "results": results,
    }
    md = markdown_supervised if args.supervised else markdown
    print(md(results, args))
    if args.out:
        from benchmarks._common import write_report

        name = "bench_restart_supervised" if args.supervised else "bench_restart"
        draw = (
            None
            if args.supervised
            # the supervised runs have no plot
            else (lambda r, path: plot(r["results"], path, args.memory_mb))
        )
        write_report(args.out, name, report, lambda r: md(r["results"], args), draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
