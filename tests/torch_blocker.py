"""Python processes in which torch cannot be imported (imported by the tests as
`torch_blocker`; tests/ is on the path through tests/conftest.py). The phone role has no
torch: the device runtime, its CLI, generation and the privacy code must run where
`import torch` fails. A ``sitecustomize.py`` written into a folder put first on
PYTHONPATH installs a meta-path finder that refuses torch and what drags it in."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

BLOCKED = ("torch", "transformers", "executorch", "torchao")
MESSAGE = "is blocked in this test"

SITECUSTOMIZE = f'''
import sys

class _Blocker:
    """Make torch (and what drags it in) unimportable in this interpreter."""
    BLOCKED = {BLOCKED!r}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{{name}} {MESSAGE}")
        return None

sys.meta_path.insert(0, _Blocker())
'''


def env_without_torch(folder: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` + ``extra`` with ``folder`` (where the blocking sitecustomize.py is
    written) first on PYTHONPATH: a python started with it cannot import torch."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **(extra or {}), "PYTHONPATH": path}


def python_without_torch(
    args: Sequence[object], folder: Path, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess:
    """`python ARGS` (e.g. ``["-c", code]``) with torch blocked (``folder``: where the
    sitecustomize.py goes; ``env``: more environment); text output captured."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=env_without_torch(folder, env),
        timeout=timeout,
    )
