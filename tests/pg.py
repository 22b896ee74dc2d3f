"""A throwaway PostgreSQL cluster for tests and benchmarks: Debian's ``postgresql``
binaries, ``initdb`` into a temporary directory, listening on 127.0.0.1 at a free port
and on a Unix socket in that directory; stopped and deleted afterwards.

As root the server runs as the ``postgres`` system user (PostgreSQL refuses to run as
root). The application connects over TCP as role ``bbprobe`` with a password
(scram-sha-256), as a collector would; the superuser connects over the Unix socket to
create and drop one database per test.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

APP_ROLE = "bbprobe"


def bindir() -> Path | None:
    """Where Debian's PostgreSQL server programs are (the newest major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def unavailable() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if bindir() is None:
        return "PostgreSQL server binaries not found (Debian package postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no 'postgres' user to run the server"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Cluster:
    port: int
    socket_dir: Path
    password: str
    bindir: Path

    def url(self, dbname: str, *, with_password: bool = True) -> str:
        secret = f":{quote(self.password, safe='')}" if with_password else ""
        return f"postgresql://{APP_ROLE}{secret}@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser over the Unix socket; returns the output."""
        done = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres",
             "-d", dbname, "-c", sql],
            capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout

    def create_database(self) -> str:
        name = f"bbp_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name} OWNER {APP_ROLE}")
        return name

    def drop_database(self, name: str) -> None:
        with suppress(RuntimeError):
            self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *cmd]
    return cmd


@contextmanager
def cluster(*, durable: bool = False, keep: Path | None = None) -> Iterator[Cluster]:
    """Start a cluster; ``durable=False`` turns fsync off (tests: speed, not crash
    safety); benchmarks pass True to measure PostgreSQL as deployed. ``keep``: the
    cluster lives in this directory, made on the first call, started again by later
    ones, and stopped cleanly (not removed) at the end (a benchmark loads a large
    fleet once and measures it later)."""
    binaries = bindir()
    if binaries is None:
        raise RuntimeError("no PostgreSQL binaries")
    root = keep if keep is not None else Path(tempfile.mkdtemp(prefix="bbprobe-pg-"))
    data, sockets = root / "data", root / "run"
    pwfile = root / "pw"
    fresh = not (data / "PG_VERSION").exists()
    if fresh:
        _init(binaries, root, data, sockets, pwfile, durable)
    password = pwfile.read_text().strip()
    port = _free_port()
    log = root / "server.log"
    subprocess.run(_as_server_user(
        [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
         "-o", f"-p {port}", "start"]), check=True, capture_output=True, timeout=90)
    made = Cluster(port, sockets, password, binaries)
    try:
        if fresh:
            made.psql(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{password}'")
        yield made
    finally:
        subprocess.run(_as_server_user(
            [str(binaries / "pg_ctl"), "-D", str(data), "-m",
             "fast" if keep is not None else "immediate", "-w", "-t", "600",
             "stop"]), check=False, capture_output=True, timeout=900)
        time.sleep(0.1)
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def _init(binaries: Path, root: Path, data: Path, sockets: Path, pwfile: Path,
          durable: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    data.mkdir(exist_ok=True)
    sockets.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        for path in (root, data, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    pwfile.write_text(secrets.token_urlsafe(18) + "\n")
    if os.geteuid() == 0:
        os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
    pwfile.chmod(0o600)
    subprocess.run(_as_server_user(
        [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
         "--auth-host=scram-sha-256", "--pwfile", str(pwfile), "-E", "UTF8",
         "--locale=C.UTF-8"]), check=True, capture_output=True, timeout=120)
    settings = ["listen_addresses = '127.0.0.1'",
                f"unix_socket_directories = '{sockets}'", "max_connections = 200",
                "shared_buffers = 128MB", "logging_collector = off"]
    if not durable:
        settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
    with (data / "postgresql.conf").open("a") as conf:
        conf.write("\n".join(settings) + "\n")
