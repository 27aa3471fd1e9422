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
