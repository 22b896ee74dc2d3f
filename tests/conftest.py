"""Shared fixtures: a real collector on 127.0.0.1:0 with SQLite in tmp_path, a store on
each backend (SQLite and a PostgreSQL the tests start), fast configs, namespaces, a PKI."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.config import StorageConfig
from collector.server.testing import RunningCollector, running_collector
from collector.storage.sql.backends import open_store
from collector.storage.store import Store

IN_CI = os.environ.get("CI", "").lower() == "true"


def icmp_allowed() -> bool:
    """Raw ICMP (root/CAP_NET_RAW) or unprivileged ICMP sockets are available."""
    for kind in (socket.SOCK_RAW, socket.SOCK_DGRAM):
        try:
            socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP).close()
            return True
        except PermissionError:
            continue
    return False


# Fixtures that make a test slow whatever it does: a PostgreSQL cluster, a network
# namespace, a network lab, a VictoriaMetrics server (test_influx.py); the postgresql
# side of ``storage`` is marked where it is declared.
SLOW_FIXTURES = frozenset({"pg_cluster", "pg_url", "netns", "lab_dir", "victoria"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests using a slow fixture are marked slow before `-m` selects; privileged tests
    must run in CI (root), and elsewhere they skip, saying why."""
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if icmp_allowed():
        return
    for item in items:
        if "privileged" in item.keywords:
            if IN_CI:
                raise pytest.UsageError(
                    "CI=true requires root/CAP_NET_RAW for privileged tests; refusing to skip"
                )
            item.add_marker(pytest.mark.skip(
                reason="needs root, CAP_NET_RAW or net.ipv4.ping_group_range for ICMP"))


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of our own with only loopback up; deleted afterwards.

    Needs root (CAP_SYS_ADMIN) and iproute2; required under CI=true, skipped elsewhere.
    """
    if os.geteuid() != 0 or shutil.which("ip") is None:
        if IN_CI:
            pytest.fail("CI=true needs root and iproute2 for network-namespace tests")
        pytest.skip("needs root and iproute2 (ip netns) for a private network namespace")
    name = f"bbp-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


@pytest.fixture
def lab_dir(tmp_path: Path) -> Path:
    """A work dir for a network lab, after checking the lab can be built here."""
    from tests.lab import netlab

    reason = netlab.available()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI=true but the network lab cannot run: {reason}")
        pytest.skip(f"network lab: {reason}")
    return tmp_path


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[RunningCollector]:
    with running_collector(tmp_path / "collector") as running:
        yield running


FAST_AGENT = """
profile = "custom"
state_dir = "{state}"

[ping]
count = 5
interval_s = 0.02
timeout_s = 0.5

[download]
streams = 2
warmup_s = 0.2
window_s = 0.6
sample_interval_s = 0.05

[upload]
streams = 2
warmup_s = 0.2
window_s = 0.6
sample_interval_s = 0.05

[checks]
# Tests share the machine with the collector under test: CPU load is not the line's.
max_cpu_percent = 100.0

[delivery]
retry_min_s = 0.2
retry_max_s = 1.0
max_wait_s = 1.5
max_requests_per_s = 50
"""


@pytest.fixture
def fast_config(tmp_path: Path) -> Path:
    """An agent config with short tests (about 3 s a session) and a private state dir."""
    path = tmp_path / "agent.toml"
    path.write_text(FAST_AGENT.format(state=tmp_path / "state"))
    return path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and client certificates for probe p1 and
    for a name no probe has, all made with openssl."""
    if shutil.which("openssl") is None:
        if IN_CI:
            pytest.fail("CI=true but openssl is missing")
        pytest.skip("needs openssl to make test certificates")
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=bbprobe test CA", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, subject, ext in (("server", "/CN=127.0.0.1", ["-extfile", "san.cnf"]),
                               ("p1", "/CN=p1", []), ("nobody", "/CN=nobody", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", subject, cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)
    return d


# --- the storage backends: SQLite, and a real PostgreSQL the tests start -----------------


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[object]:
    """A throwaway PostgreSQL cluster for the session (tests/pg.py). Required under
    CI=true (`make test` installs Debian's postgresql when root); skipped elsewhere."""
    from tests import pg

    reason = pg.unavailable()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI=true but PostgreSQL cannot run here: {reason}")
        pytest.skip(f"PostgreSQL: {reason}")
    with pg.cluster() as running:
        yield running


@pytest.fixture
def pg_url(pg_cluster: object) -> Iterator[str]:
    """A fresh, empty database of its own for one test; its URI (with the password)."""
    from tests.pg import Cluster

    assert isinstance(pg_cluster, Cluster)
    name = pg_cluster.create_database()
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> StorageConfig:
    """The [storage] section of a fresh store, once per backend: SQLite, and a real
    PostgreSQL (marked slow: it needs the session's cluster, `-m "not slow"` leaves it
    out)."""
    if request.param == "sqlite":
        return StorageConfig(path=str(tmp_path / "conformance.sqlite3"))
    url = request.getfixturevalue("pg_url")
    return StorageConfig(backend="postgresql", url=url, pool_size=4)


@pytest.fixture
def store(storage: StorageConfig) -> Iterator[Store]:
    """A fresh store opened through the product's seam (``open_store``), once per
    backend; closed afterwards. Tests of queries, reports, facts and the outbox use it."""
    opened = open_store(storage)
    try:
        yield opened
    finally:
        opened.close()
