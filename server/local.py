"""`fedmobillm serve` as a child process on loopback, for tests, benchmarks and the demo.

    with LocalServer(tmp / "data", admin_token=token, config={"train": False}) as srv:
        httpx.get(f"{srv.url}/v1/status", headers={"Authorization": f"Bearer {token}"})

Import-light: the standard library only (the server runs in the child).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedmobillm.errors import FedMobiLLMError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
HEALTH_PATH = "/healthz"  # server.app: 200 once the app is serving


def free_port(preferred: int | None = None) -> int:
    """``preferred`` if it is free on loopback, else any free loopback port."""
    if preferred:
        with socket.socket() as s:
            try:
                s.bind((HOST, preferred))
                return preferred
            except OSError:
                log.warning("port %d is in use; picking another", preferred)
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def stop_process_group(proc: subprocess.Popen[Any], grace: float = 30.0) -> int:
    """SIGTERM to ``proc``'s process group (``proc`` started with ``start_new_session=True``),
    SIGKILL if it is still running after ``grace`` seconds; its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return int(proc.returncode)


class LocalServer:
    """`python -m fedmobillm.cli serve --host 127.0.0.1 --port PORT --data-dir DATA_DIR ...`
    in its own process group, stdout and stderr appended to ``log_path``.

    ``port``: None or 0 picks a free loopback port at the first ``start()``. ``admin_token``:
    set as FEDMOBILLM_ADMIN_TOKEN. ``config``: a settings file, or a mapping written as JSON
    beside the data dir. ``args``: more `serve` arguments (``--no-train``, ``--dev``). ``env``:
    added to this process's environment. ``log_path``: default ``<data_dir>-server.log``.

    ``start()`` returns once GET ``url + HEALTH_PATH`` answers 200; if the process exits first,
    or nothing answers within ``startup_timeout`` seconds (the process is then stopped), it
    raises FedMobiLLMError with the tail of the log. ``stop()`` sends SIGTERM (uvicorn runs the
    lifespan shutdown: final checkpoint), then SIGKILL after ``grace`` seconds; ``kill()`` sends
    SIGKILL at once (a crash). ``start()`` may follow either: same port, data dir, config, log.
    As a context manager it starts on entry (unless running) and stops on exit.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        admin_token: str | None = None,
        config: Path | str | Mapping[str, Any] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        log_path: Path | str | None = None,
        startup_timeout: float = 90.0,
        grace: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.admin_token = admin_token
        self.config = config
        self.args = [str(a) for a in args]
        self.env = dict(env or {})
        self.port = port or 0
        self.log_path = (
            Path(log_path)
            if log_path
            else self.data_dir.with_name(f"{self.data_dir.name}-server.log")
        )
        self.startup_timeout = startup_timeout
        self.grace = grace
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "fedmobillm.cli", "serve", "--host", HOST]
        cmd += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        if isinstance(self.config, Mapping):
            cmd += ["--config", str(self._config_file())]
        elif self.config is not None:
            cmd += ["--config", str(self.config)]
        return cmd + self.args

    def _config_file(self) -> Path:
        return self.data_dir.with_name(f"{self.data_dir.name}-config.json")

    def start(self) -> LocalServer:
        if self.running:
            raise FedMobiLLMError(f"the fedmobillm server at {self.url} is already running")
        self.port = self.port or free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(self.config, Mapping):
            self._config_file().write_text(json.dumps(dict(self.config)))
        env = {**os.environ, **self.env}
        if self.admin_token:
            env["FEDMOBILLM_ADMIN_TOKEN"] = self.admin_token
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._wait_healthy()
        return self

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` (default ``self.grace``) s; the exit code."""
        if self.proc is None:
            return None
        return stop_process_group(self.proc, self.grace if grace is None else grace)

    def kill(self) -> None:
        """SIGKILL now: no shutdown hooks, no final checkpoint."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> LocalServer:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        health = self.url + HEALTH_PATH
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
        deadline = time.monotonic() + self.startup_timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise self._failed(
                    f"the fedmobillm server exited with code {rc} before answering {health}"
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                with opener.open(health, timeout=2) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                self.stop(grace=5)
                raise self._failed(
                    f"the fedmobillm server did not answer {health} "
                    f"within {self.startup_timeout:.0f} s"
                )
            time.sleep(0.1)

    def _failed(self, what: str) -> FedMobiLLMError:
        try:
            tail = self.log_path.read_text(errors="replace")[-3000:].rstrip()
        except OSError:
            tail = ""
        body = f"{what}; log {self.log_path}" + (f", last lines:\n{tail}" if tail else " (empty)")
        cmd = " ".join(self.command())
        return FedMobiLLMError(body, hint=f"the whole log is {self.log_path}; the command: {cmd}")


class LocalTrainer:
    """`python -m fedmobillm.cli train --data-dir DATA_DIR [--config F] [--database URL]`
    in its own process group (the trainer beside `serve --no-train`), stdout and stderr
    appended to ``log_path`` (default ``<data_dir>-trainer.log``). ``start()`` again after
    ``kill()`` (SIGKILL: no final checkpoint) or ``stop()`` (SIGTERM: final checkpoint)."""

    def __init__(
        self,
        data_dir: Path | str,
        config: Path | str | None = None,
        database: str | None = None,
        env: Mapping[str, str] | None = None,
        log_path: Path | str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.config, self.database = config, database
        self.env = dict(env or {"OMP_NUM_THREADS": "1"})
        self.log_path = (
            Path(log_path)
            if log_path
            else self.data_dir.with_name(f"{self.data_dir.name}-trainer.log")
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "fedmobillm.cli", "train", "--data-dir", str(self.data_dir)]
        cmd += ["--config", str(self.config)] if self.config is not None else []
        return cmd + (["--database", self.database] if self.database else [])

    def start(self) -> LocalTrainer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=logf,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL now: no final checkpoint."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, grace: float = 60.0) -> int | None:
        """SIGTERM (final checkpoint and export), SIGKILL after ``grace`` s; the exit code."""
        return None if self.proc is None else stop_process_group(self.proc, grace)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
