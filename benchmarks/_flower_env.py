"""Where Flower comes from for the FedAvg baselines.

`pip install "flwr[simulation]"` (1.42) into this environment would downgrade fastapi
(0.165 -> 0.138), uvicorn (0.54 -> 0.49), starlette and protobuf (7 -> 6), which the server
and onnx/executorch use. So, unless flwr is already importable, it lives in a private
folder, ``cache_dir()/bench-flwr-site`` (``pip install --target``, done on request with
``--install-flower``), and a Flower subprocess sees only the packages this environment
lacks (flwr, ray, grpc, ...) through a folder of links, ``cache_dir()/bench-flwr-shim``,
put on its PYTHONPATH: the environment's own fastapi / protobuf / numpy stay in charge.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from fedmobillm.paths import cache_dir

log = logging.getLogger("benchmarks")

FLWR_REQ = "flwr[simulation]==1.42.0"
DIST_PREFIXES = (
    "flwr",
    "ray",
    "grpcio",
    "msgpack",
    "iterators",
    "pycryptodome",
    "sqlalchemy",
    "alembic",
    "mako",
    "greenlet",
    "tomli",
    "uv",
)


def site_dir() -> Path:
    return cache_dir() / "bench-flwr-site"


def shim_dir() -> Path:
    return cache_dir() / "bench-flwr-shim"


def install_private(quiet: bool = True) -> Path:
    """pip install --target the private site (a registry download of ~500 MB)."""
    cmd = [sys.executable, "-m", "pip", "install", "--target", str(site_dir()), FLWR_REQ]
    if quiet:
        cmd.append("--quiet")
    log.info("installing %s into %s", FLWR_REQ, site_dir())
    subprocess.run(cmd, check=True)
    return site_dir()


def _build_shim() -> Path:
    site, shim = site_dir(), shim_dir()
    shim.mkdir(parents=True, exist_ok=True)
    for p in site.iterdir():
        name = p.name
        if name in ("bin", "include", "__pycache__") or name.endswith(".dist-info"):
            continue
        link = shim / name
        if link.exists() or link.is_symlink():
            continue
        if importlib.util.find_spec(name.split(".")[0]) is None:
            link.symlink_to(p)
    for p in site.glob("*.dist-info"):
        dist = p.name.split("-")[0].lower()
        link = shim / p.name
        if dist.startswith(DIST_PREFIXES) and not (link.exists() or link.is_symlink()):
            link.symlink_to(p)
    return shim


def flower_pythonpath(install: bool = False) -> str | None:
    """The PYTHONPATH entry that makes flwr importable here, "" when it already is, or
    None when Flower is unavailable (then FedAvg runs in-process)."""
    if importlib.util.find_spec("flwr") is not None and importlib.util.find_spec("ray"):
        return ""
    if not (site_dir() / "flwr").is_dir():
        if not install:
            return None
        install_private()
    return str(_build_shim())


def subprocess_env(extra_path: str, repo_root: Path) -> dict[str, str]:
    parts = [p for p in (extra_path, str(repo_root), os.environ.get("PYTHONPATH", "")) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(parts))
