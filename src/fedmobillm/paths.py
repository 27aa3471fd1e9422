"""Where fedmobillm keeps what it caches (models, data, device state)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$FEDMOBILLM_CACHE`` or ``~/.cache/fedmobillm``; created on first use."""
    root = os.environ.get("FEDMOBILLM_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "fedmobillm"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_dir(path: Path, what: str, hint: str) -> Path:
    """Create folder ``path`` (and its parents) for ``what``; a FedMobiLLMError with
    ``hint`` when it cannot be one (a file is in the way, no permission)."""
    from fedmobillm.errors import FedMobiLLMError

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise FedMobiLLMError(f"{what} {path} is a file, not a folder", hint=hint)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent is a file, permission denied, read-only file system
        reason = exc.strerror or str(exc)
        raise FedMobiLLMError(f"cannot create {what} {path}: {reason}", hint=hint) from exc
    return path
