"""The frozen LM heads of an lm federation, read from the server's own copy of each bundle's
source model (``manifest.source_model``), never from a device.

``head_for(manifest)`` checks, in this order, and raises ``Conflict`` (409) with how to fix:
the server has a local copy of the source model (a named model already fetched into the
cache, or an existing folder); its weights hash to ``manifest.source_sha256`` (the export's
own ``export.pipeline.source_digest``); its hidden size is the bundle's. Heads are cached per
process by (folder, digest), so every architecture of one model shares one head object, and
the service and the trainer thread of one process share it too. Digests are cached by the
weight files' (path, size, mtime).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmobillm.server.errors import Conflict

if TYPE_CHECKING:
    from fedmobillm.server.lm import FrozenLMHead

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_HEADS: dict[tuple[str, str], FrozenLMHead] = {}
_DIGESTS: dict[tuple, str] = {}


def local_source(source_model: str) -> Path | None:
    """The server's local folder of ``source_model`` (a named model fetched into the cache,
    intact; or an existing folder with config.json), None when it has none. Never builds,
    installs or downloads anything."""
    from fedmobillm.export.models import MODELS, model_dir, verify_model_dir

    if source_model in MODELS:
        folder = model_dir(source_model)
        if folder.is_dir() and not verify_model_dir(folder):
            return folder
        return None
    path = Path(source_model).expanduser()
    return path if (path / "config.json").is_file() else None


def source_sha256(folder: Path) -> str:
    """``export.pipeline.source_digest(folder)``, cached by the weight files' stat."""
    from fedmobillm.export.pipeline import source_digest

    patterns = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.onnx")
    files = sorted({f for p in patterns for f in folder.glob(p)})
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _DIGESTS:
        _DIGESTS[key] = source_digest(folder)
    return _DIGESTS[key]


def head_for(manifest: dict[str, Any]) -> FrozenLMHead:
    """The frozen head (final norm + LM head) of the bundle ``manifest`` (a dict) names,
    checked against the server's local copy; ``Conflict`` (409) with a hint otherwise."""
    from fedmobillm.server.lm import FrozenLMHead

    name = str(manifest.get("source_model", ""))
    with _LOCK:
        folder = local_source(name)
        if folder is None:
            raise Conflict(
                f"this server has no local copy of the bundle's source model {name!r}: the lm "
                "task reads the frozen LM head from the server's own weights",
                hint=f"on the server, run `fedmobillm models fetch {name}` (a named model) or "
                "put the model folder at that path, then register again",
            )
        digest = source_sha256(folder)
        want = str(manifest.get("source_sha256") or "")
        if digest != want:
            raise Conflict(
                f"the server's copy of {name!r} ({folder}) has weights sha256 {digest[:12]}...,"
                f" the bundle was exported from {want[:12] or 'unknown'}...: the frozen head "
                "would not be the device's",
                hint="export the bundle from the model the server holds, or give the server "
                "the exact weights the bundle was exported from",
            )
        key = (str(folder.resolve()), digest)
        head = _HEADS.get(key)
        if head is None:
            log.info("loading the frozen LM head of %s from %s", name, folder)
            head = FrozenLMHead.from_model(folder)
            _HEADS[key] = head
    hidden = int(manifest.get("hidden_size", -1))
    if head.hidden_size != hidden:
        raise Conflict(
            f"the bundle's hidden size is {hidden}, the LM head of the server's {name!r} reads "
            f"{head.hidden_size}",
            hint="export the bundle from the model the server holds",
        )
    return head
