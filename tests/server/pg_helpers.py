"""A real PostgreSQL for the tests (imported as `pg_helpers`): Debian's server binaries
(``/usr/lib/postgresql/<version>/bin``: initdb, pg_ctl) run on a new cluster in a temporary
directory, listening on a free loopback port (and a unix socket in that directory). PostgreSQL
refuses to run as root: under root the cluster belongs to the ``postgres`` system user (or
``nobody``) and the binaries run through ``runuser -u USER --``."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from fedmobillm.server.local import free_port

SUPERUSER = "fed"  # the cluster's superuser role (trust authentication on loopback)


def pg_bin() -> Path | None:
    """The newest Debian PostgreSQL bin directory, or None if none is installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return Path(found[-1]).parent if found else None


def _version(path: str) -> float:
    try:
        return float(Path(path).parts[-3])
    except ValueError:
        return 0.0


class Postgres:
    """``start()``: initdb + pg_ctl start (fsync on: the durability the tests check is real;
    ``options``: more server settings, e.g. ``commit_delay=100``);
    ``database()``: a new empty database's URL; ``stop()``: immediate shutdown, files
    removed."""

    def __init__(self, bindir: Path, options: list[str] | tuple[str, ...] = ()) -> None:
        self.bindir = bindir
        self.options = list(options)  # NAME=VALUE server settings (postgres -c)
        self.user = _run_as() if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="fedmobillm-pg-"))
        if self.user is not None:
            os.chown(self.root, pwd.getpwnam(self.user).pw_uid, -1)
        self.data = self.root / "data"
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        done = subprocess.run(prefix + list(args), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}{log[-2000:]}")

    def start(self) -> Postgres:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", SUPERUSER,
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        options = f"-k {self.root} -c listen_addresses=127.0.0.1 -p {self.port}"
        options += "".join(f" -c {o}" for o in self.options)
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.root / "log"), "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    def database(self) -> str:
        """A new database: its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _run_as() -> str:
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists")
