"""Files written so that a crash leaves the old version or the new one, never half of
either, and their sha256. Every part imports these from here (device_runtime imports no
other part, and no torch)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file's bytes, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename in (or the creation of) the folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` for the caller to write. When the block ends
    normally it is fsynced and renamed over ``path``, and the folder fsynced; when the
    block raises it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` atomically (see ``replacing``). ``mode``:
    the new file's permission bits (e.g. 0o600 for secrets), else the usual 0o666 & umask."""
    raw = data.encode() if isinstance(data, str) else data
    with replacing(path) as tmp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(tmp, flags, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
