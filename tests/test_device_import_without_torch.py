"""The device role imports with no torch: a subprocess where `import torch` fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from torch_blocker import MESSAGE, python_without_torch

import fedmobillm.device_runtime

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
    return python_without_torch(["-c", code], tmp_path)


def test_the_blocker_blocks_torch(tmp_path):
    result = run_blocked("import torch", tmp_path)
    assert result.returncode != 0 and MESSAGE in result.stderr


@pytest.mark.parametrize("module", REQUIRED + OTHERS)
def test_device_module_imports_without_torch(module, tmp_path):
    code = f"import sys, {module}; assert 'torch' not in sys.modules; print('ok')"
    result = run_blocked(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
