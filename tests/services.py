"""Real PostgreSQL and Redis servers for the tests, started from Debian's packages on loopback
in a temporary directory and stopped afterwards."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(ready: object, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(ready) and ready():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} did not start")


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        pytest.fail("PostgreSQL is not installed (Debian package postgresql; deploy/system.sh)")
    return Path(found[-1]).parent


@contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL server over a throwaway cluster: its SQLAlchemy URL."""
    bindir = postgres_bin()
    # Not under pytest's tmp_path: as root, the cluster belongs to the postgres user (the
    # server refuses to run as root), who may not enter root's directories.
    root = Path(tempfile.mkdtemp(prefix="textgen-pg-"))
    data, sockets = root / "data", root / "run"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        for path in (root, sockets):
            shutil.chown(path, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "textgen", "--auth=trust",
         "-E", "UTF8"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        [*as_user, str(bindir / "postgres"), "-D", str(data), "-p", str(port),
         "-c", "listen_addresses=127.0.0.1", "-k", str(sockets), "-c", "fsync=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def ready() -> bool:
        check = [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)]
        return subprocess.run(check, capture_output=True).returncode == 0

    try:
        wait_until(ready, "PostgreSQL")
        yield f"postgresql+psycopg://textgen@127.0.0.1:{port}/postgres"
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def redis() -> Iterator[str]:
    """A Redis server with nothing saved to disk: its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("Redis is not installed (Debian package redis-server; deploy/system.sh)")
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )

    def ready() -> bool:
        check = ["redis-cli", "-p", str(port), "ping"]
        return subprocess.run(check, capture_output=True, text=True).stdout.strip() == "PONG"

    try:
        wait_until(ready, "Redis")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=30)
