"""Personal models on disk: for each architecture, ``<personal_dir>/<slug>/`` (the folder the
trainer exported: personal.onnx [+ personal.pte], personal.safetensors, personal.json) and
``<slug>.zip`` next to it, replaced atomically, which is what devices download."""

from __future__ import annotations

import io
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path


def arch_slug(architecture: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", architecture).strip("_")


def personal_folder(root: Path, architecture: str) -> Path:
    return Path(root) / arch_slug(architecture)


def read_personal_zip(root: Path, architecture: str) -> bytes | None:
    path = Path(root) / f"{arch_slug(architecture)}.zip"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename over ``path``, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish_folder(folder: Path, root: Path, architecture: str) -> Path:
    """Move an exported folder into place and publish its zip. Returns the zip path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = personal_folder(root, architecture)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(Path(folder).iterdir()):
            if f.is_file():
                zf.write(f, f.name)
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(folder, target)
    shutil.rmtree(old, ignore_errors=True)
    zip_path = root / f"{target.name}.zip"
    write_atomic(zip_path, buf.getvalue())
    return zip_path
