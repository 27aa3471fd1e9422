"""Fixtures for the server tests (helpers live in server_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_helpers import ServerProc


@pytest.fixture
def server_factory(tmp_path):
    started: list[ServerProc] = []

    def make(settings: dict | None = None, data_dir: Path | None = None) -> ServerProc:
        s = ServerProc(data_dir or tmp_path / "data", settings or {"train": False})
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.stop()
