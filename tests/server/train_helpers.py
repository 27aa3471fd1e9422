"""A real `fedmobillm train` process (imported by the tests as `train_helpers`): the trainer
on its own beside `fedmobillm serve --no-train` (ServerProc with ``args=["--no-train"]``)."""

from __future__ import annotations

from pathlib import Path

from fedmobillm.server.local import LocalTrainer


class TrainerProc(LocalTrainer):
    """`fedmobillm train --data-dir DATA --config CONFIG [--database URL]`, OMP_NUM_THREADS=1."""

    def __init__(self, data_dir: Path, config: Path, database: str | None = None) -> None:
        super().__init__(data_dir, config, database)
