"""The device role imports with no torch: a subprocess where `import torch` fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedmobillm.device_runtime

BLOCKER = '''
import sys

class _Blocker:
    """Make torch (and what drags it in) unimportable in this interpreter."""
    BLOCKED = ("torch", "transformers", "executorch", "torchao")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, _Blocker())
'''

DEVICE_DIR = Path(fedmobillm.device_runtime.__file__).parent
REQUIRED = [
    "fedmobillm.device_runtime",
    "fedmobillm.device_runtime.records",
    "fedmobillm.data",
    "fedmobillm.device_runtime.protocol",
    "fedmobillm.device_runtime.serde",
]
OTHERS = sorted(
    f"fedmobillm.device_runtime.{p.stem}"
    for p in DEVICE_DIR.glob("*.py")
    if p.stem != "__init__" and f"fedmobillm.device_runtime.{p.stem}" not in REQUIRED
)


def run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_the_blocker_blocks_torch(tmp_path):
    result = run_blocked("import torch", tmp_path)
    assert result.returncode != 0 and "blocked in this test" in result.stderr


@pytest.mark.parametrize("module", REQUIRED + OTHERS)
def test_device_module_imports_without_torch(module, tmp_path):
    code = f"import sys, {module}; assert 'torch' not in sys.modules; print('ok')"
    result = run_blocked(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
