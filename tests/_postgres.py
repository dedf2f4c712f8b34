"""A private PostgreSQL server for the tests: a temporary data folder and a free loopback port.

The server binaries come from the ``postgresql`` Debian package (``scripts/setup.sh`` installs it
when missing). PostgreSQL refuses to run as root, so as root the server runs as the package's
``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vsteer.server.process import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    path = found[-1] if found else shutil.which(name)
    if path is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: run `make setup` (it installs the postgresql package)")
    return path


class PostgresServer:
    """Start with :meth:`start`, stop with :meth:`stop`; ``url`` is a ``postgresql://`` URL."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vsteer-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://vsteer@127.0.0.1:{self.port}/postgres"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *argv: str) -> None:
        subprocess.run([*self._as, *argv], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> "PostgresServer":
        if self._as:
            shutil.chown(self.dir, "postgres")
        self._run(_bin("initdb"), "-D", str(self.data), "-U", "vsteer", "-A", "trust", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -h 127.0.0.1 -k {self.dir} -c fsync=off -c max_connections=200"
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        try:
            self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def new_database(self) -> str:
        """A fresh, empty database on this server; returns its URL."""
        import uuid

        import psycopg

        name = "t" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + "/" + name
