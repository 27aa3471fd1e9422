"""A real `fedmobillm train` process (imported by the tests as `train_helpers`): the trainer
on its own beside `fedmobillm serve --no-train` (ServerProc with ``args=["--no-train"]``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from fedmobillm.server.local import stop_process_group


class TrainerProc:
    """`python -m fedmobillm.cli train --data-dir DATA --config CONFIG [--database URL]` in
    its own process group, its output appended to ``log_path``. ``start()`` again after
    ``kill()`` (SIGKILL: no final checkpoint) or ``stop()`` (SIGTERM: final checkpoint)."""

    def __init__(self, data_dir: Path, config: Path, database: str | None = None) -> None:
        self.data_dir, self.config, self.database = Path(data_dir), Path(config), database
        self.log_path = self.data_dir.with_name(f"{self.data_dir.name}-trainer.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "fedmobillm.cli", "train", "--data-dir"]
        cmd += [str(self.data_dir), "--config", str(self.config)]
        return cmd + (["--database", self.database] if self.database else [])

    def start(self) -> TrainerProc:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=logf,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                start_new_session=True,
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, grace: float = 60.0) -> int | None:
        return None if self.proc is None else stop_process_group(self.proc, grace)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
