"""The privacy tests' run against a real server (imported by test_privacy.py and
test_dp_projection.py as `privacy_helpers`): `fedmobillm serve --no-train` on loopback,
the `device register` command for it, six private notes to upload, and the CLI."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedmobillm.server.local import LocalServer

ADMIN = "privacy-test-admin-token-7f3a9c1e5b"
LABELS = ["negative", "positive"]


def cli(*args: object) -> subprocess.CompletedProcess:
    """`python -m fedmobillm.cli ARGS`, text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "fedmobillm.cli", *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def journal_lines(state: Path) -> list[dict]:
    """A device state's journal.jsonl, one dict a line."""
    return [json.loads(x) for x in (state / "journal.jsonl").read_text().splitlines()]


def write_notes(path: Path, n: int = 6) -> Path:
    """``n`` labelled texts as jsonl ("my private note {i} about the film", labels alternate)."""
    path.write_text("".join(
        json.dumps({"text": f"my private note {i} about the film", "label": LABELS[i % 2]}) + "\n"
        for i in range(n)))  # fmt: skip
    return path


@contextlib.contextmanager
def privacy_server(
    folder: Path, bundle: Path, config: Mapping[str, Any] | None = None
) -> Iterator[tuple[LocalServer, list[object]]]:
    """`fedmobillm serve --no-train` (data dir ``folder``, settings ``config``) on loopback;
    yields it and the `device register` argv for it and ``bundle`` (add --name, --state)."""
    with LocalServer(folder, admin_token=ADMIN, config=config, args=["--no-train"]) as srv:
        register = ["device", "register", "--server", srv.url, "--admin-token", ADMIN,
                    "--bundle", bundle, "--labels", ",".join(LABELS)]  # fmt: skip
        yield srv, register
