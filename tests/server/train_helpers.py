"""A real `fedmobillm train` process (imported by the tests as `train_helpers`): the trainer
on its own beside `fedmobillm serve --no-train`, and what the tests of that pair share:
the ingest-only server plus its trainer, the trainer's published status, and polling."""

from __future__ import annotations

import io
import json
import subprocess
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
from server_helpers import ServerProc, admin_headers, make_manifest, make_payload, upload

from fedmobillm.server.local import LocalTrainer

T = TypeVar("T")


class TrainerProc(LocalTrainer):
    """`fedmobillm train --data-dir DATA --config CONFIG [--database URL]`, OMP_NUM_THREADS=1."""

    def __init__(self, data_dir: Path, config: Path, database: str | None = None) -> None:
        super().__init__(data_dir, config, database)


def tiny_manifest() -> dict:
    """The device manifest these tests register: a 4-layer, width-16 backbone tapped at 2 and 4."""
    return make_manifest("tiny-a", depth=4, hidden=16, taps=[2, 4])


def start_ingest_only(srv: ServerProc, database: str | None = None) -> TrainerProc:
    """Start ``srv`` as `serve --no-train` and return (not started) the trainer process on
    the same data dir, config and database."""
    srv.args.append("--no-train")
    srv.start()
    return TrainerProc(srv.data_dir, srv._config_file(), database=database)


def trainer_status(url: str) -> dict:
    """The ``trainer`` section of the server's `/v1/status` (the trainer's published status)."""
    return httpx.get(f"{url}/v1/status", headers=admin_headers(), timeout=30).json()["trainer"]


def upload_train_and_validation(url: str, reg: dict, m: dict) -> None:
    """300 train and 100 validation records of the registered device ``reg`` (manifest
    ``m``), each upload acked."""
    for split, n, seed in (("train", 300, 1), ("validation", 100, 11)):
        r = upload(url, reg, make_payload(reg, m, range(n), split=split, seed=seed))
        assert r.status_code == 200, r.text


def wait_trained_and_exported(url: str, timeout: float) -> dict:
    """The trainer's published status once it has taken 40 steps and exported a personal
    model."""
    return wait_for(
        lambda: (s := trainer_status(url)).get("step", 0) >= 40 and s["personal_models"] and s,
        timeout,
        "the trainer process to train and export",
    )


def assert_served_model_is_the_trainers(url: str, reg: dict) -> None:
    """The personal model the server hands ``reg``'s device is the trainer process's export:
    its trainer_step is at most the step of the trainer's last published export."""
    auth = {"Authorization": f"Bearer {reg['token']}"}
    r = httpx.get(f"{url}/v1/personal-model", headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    meta = json.loads(zipfile.ZipFile(io.BytesIO(r.content)).read("personal.json"))
    exported = trainer_status(url)["personal_models"][reg["architecture"]]
    assert 0 < meta["trainer_step"] <= exported


def assert_refused_publishing_nothing(
    cmd: list[str], published: Callable[[], dict | None], live_pid: int
) -> None:
    """Run a second trainer ``cmd``: it is refused ("another trainer is running"), and the
    published status row (``published()``, None before any) names ``live_pid`` all along,
    read every 50 ms while it runs."""
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = set()
    while second.poll() is None:
        st = published()
        if st is not None:
            pids.add(st["process"]["pid"])
        time.sleep(0.05)
    out = second.stdout.read()
    assert second.returncode != 0 and "another trainer is running" in out, out[-2000:]
    assert pids == {live_pid}, (pids, out[-2000:])


def wait_for(
    pred: Callable[[], T],
    timeout: float,
    what: str,
    transient: tuple[type[Exception], ...] = (),
) -> T:
    """Poll ``pred`` every 0.3 s until it returns something truthy, and return that; an
    exception in ``transient`` counts as "not yet". AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = pred()
        except transient:
            got = None
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")
