"""A private PostgreSQL server from Debian's binaries, for the tests, ``make cluster-demo`` and bench/cluster.py.

``initdb`` into a folder, listen on 127.0.0.1 and a free port (and a Unix socket in the folder), trust
authentication for local connections only. PostgreSQL refuses to run as root: when we are root, the folder
is given to the ``postgres`` user and every server command runs through ``runuser -u postgres``.
Measured (docs/scale-out.md): initdb 0.6 s, start 0.11 s, restart 0.21 s.

Usage::

    with PgServer(folder) as pg:     # initdb (first time) + start; stop at exit
        dsn = pg.create_database("jobs")
        pg.restart()                 # or pg.stop(); pg.start()
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


class PgServerError(RuntimeError):
    """PostgreSQL could not be set up or started (the message has the server's own words)."""


def pg_bin(name: str) -> str:
    """A PostgreSQL server program: Debian keeps them in /usr/lib/postgresql/<major>/bin (not on PATH)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise PgServerError(f"{name} not found: install Debian's postgresql package (scripts/bootstrap does)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, folder: str | os.PathLike[str], port: int | None = None, user: str = "landmarks"):
        self.folder = Path(folder).resolve()
        self.data = self.folder / "data"
        self.port = port or free_port()
        self.user = user
        self._as_postgres = os.geteuid() == 0

    # -- helpers --------------------------------------------------------------------------------------------
    def _run(self, *cmd: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        if self._as_postgres:
            cmd = ("runuser", "-u", "postgres", "--", *cmd)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
        if check and proc.returncode != 0:
            raise PgServerError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    @property
    def dsn_base(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}"

    def dsn(self, database: str = "postgres") -> str:
        return f"{self.dsn_base}/{database}"

    # -- life cycle -----------------------------------------------------------------------------------------
    def init(self) -> None:
        """initdb (once): a superuser ``user``, trust auth on loopback and the socket only."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
            # The server must reach its folder: every parent needs search permission for it.
            for parent in self.folder.parents:
                if parent == Path("/"):
                    break
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
        if (self.data / "PG_VERSION").exists():
            return
        self._run(pg_bin("initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--locale=C.UTF-8")
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.write(
                "\n# pacs-landmarks: private server\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.folder}'\n"
                "max_connections = 200\n"
                # A throwaway server: durability is not what the tests measure (the results files are fsynced).
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )

    def start(self, timeout: float = 30.0) -> "PgServer":
        self.init()
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-o", f"-p {self.port}", "-l",
                  str(self.folder / "server.log"), "-w", "-t", str(int(timeout)), "start", timeout=timeout + 5)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop; ``mode`` "immediate" is a crash (no checkpoint), as after a power cut."""
        if not (self.data / "postmaster.pid").exists():
            return
        try:
            proc = self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop",
                             timeout=40, check=False)
            stopped = proc.returncode == 0
        except subprocess.TimeoutExpired:
            stopped = False
        if not stopped and mode != "immediate":
            # A fast stop waits for the shutdown checkpoint, which can take minutes on a loaded disk (seen: > 60 s
            # under CI load); committed data is in the WAL either way, so finish the stop as a crash would.
            self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop",
                      timeout=40, check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def socket_dsn(self, database: str = "postgres") -> str:
        """The DSN over the Unix socket in ``folder``: reachable from another network namespace (the tests'
        Orthanc runs in one) where 127.0.0.1 is not ours."""
        return f"postgresql://{self.user}@/{database}?host={self.folder}&port={self.port}"

    def create_database(self, name: str) -> str:
        """A new, empty database (dropped first if there); returns its DSN."""
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._run(pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise PgServerError(f"PostgreSQL on port {self.port} not ready after {timeout} s")

    def __enter__(self) -> "PgServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
