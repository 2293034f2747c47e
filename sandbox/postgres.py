"""A throwaway PostgreSQL cluster on loopback for tests and benchmarks: initdb into a temporary folder,
start the server binaries of the machine (`pg_config --bindir`), create fresh databases, stop.

PostgreSQL refuses to run as root; as root (CI), the cluster runs as the `postgres` user."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def bindir() -> str:
    """The folder of initdb and postgres: `pg_config --bindir`, else Debian's usual place."""
    candidates = []
    if shutil.which("pg_config"):
        candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip())
    candidates += sorted((f"/usr/lib/postgresql/{v}/bin" for v in os.listdir("/usr/lib/postgresql")), reverse=True) \
        if os.path.isdir("/usr/lib/postgresql") else []
    for folder in candidates:
        if folder and os.path.exists(os.path.join(folder, "initdb")) and os.path.exists(os.path.join(folder, "postgres")):
            return folder
    raise PostgresUnavailable("PostgreSQL server binaries (initdb, postgres) not found; install Debian's postgresql")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """`with PostgresCluster() as pg: url = pg.create_database()`."""

    def __init__(self, port: int | None = None) -> None:
        self.bin = bindir()
        self.port = port or _free_port()
        self.root = tempfile.mkdtemp(prefix="iapo-pg-")
        self.data = os.path.join(self.root, "data")
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.process: subprocess.Popen | None = None

    def _cmd(self, *args: str) -> list[str]:
        return [*self.run_as, *args]

    def start(self, timeout: float = 60.0) -> "PostgresCluster":
        if self.run_as:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(self._cmd(os.path.join(self.bin, "initdb"), "-D", self.data, "-A", "trust", "-U", "postgres",
                                 "--no-sync", "-E", "UTF8"), check=True, capture_output=True)
        log = open(os.path.join(self.root, "server.log"), "w")
        self.process = subprocess.Popen(
            self._cmd(os.path.join(self.bin, "postgres"), "-D", self.data, "-p", str(self.port), "-k", self.root,
                      "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=300",
                      "-c", "shared_buffers=64MB"),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                self._sql("postgres", "select 1")
                return self
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start; see {self.root}/server.log") from None
                time.sleep(0.2)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _sql(self, database: str, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        name = name or f"iapo_{uuid.uuid4().hex[:12]}"
        self._sql("postgres", f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PostgresCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
