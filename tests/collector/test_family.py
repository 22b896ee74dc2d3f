"""IPv6 at the collector: listening on "::" serves both families and "::1"
IPv6 only; the IP version each session measured over is stored with its facts, and a
scope (CLI, API) can keep one family."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector.cli.main import main
from collector.config import CollectorConfig, StorageConfig
from collector.errors import BadParameter
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.reports import service
from collector.scope import resolve_scope
from collector.server import app
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from tests.conftest import IN_CI
from tests.factories import attempt, session, store_result


def _ipv6_loopback() -> None:
    """Skip (fail under CI=true) when this host has no IPv6 loopback to listen on."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        if IN_CI:
            pytest.fail(f"CI=true but IPv6 loopback is unavailable: {exc}")
        pytest.skip(f"no IPv6 loopback (::1) here: {exc}")


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
    return body


def _reaches(host: str, port: int) -> bool:
    """Whether the collector answers HTTP at host:port (any status: it was reached)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/api/v1/health", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.parametrize(("host", "over_ipv4", "over_ipv6"), [
    ("::", True, True), ("::1", False, True), ("127.0.0.1", True, False)])
def test_listen_address_decides_the_families(tmp_path: Path, host: str, over_ipv4: bool,
                                             over_ipv6: bool) -> None:
    """server.host "::" on port 0 answers at 127.0.0.1 and at [::1] (one dual-stack
    socket); "::1" only over IPv6; "127.0.0.1" only over IPv4. The URL it reports puts
    an IPv6 address in brackets."""
    _ipv6_loopback()
    base = CollectorConfig()
    cfg = replace(base, server=replace(base.server, host=host, port=0),
                  storage=replace(base.storage, path=str(tmp_path / "c.sqlite3")))

    async def check() -> tuple[str, bool, bool]:
        runner, url = await app.start(cfg)
        try:
            port = int(url.rsplit(":", 1)[1])
            return (url, await asyncio.to_thread(_reaches, "127.0.0.1", port),
                    await asyncio.to_thread(_reaches, "[::1]", port))
        finally:
            await runner.cleanup()

    url, v4, v6 = asyncio.run(check())
    assert (v4, v6) == (over_ipv4, over_ipv6)
    if host == "::":
        # An IPv4 client is seen as a.b.c.d, not ::ffff:a.b.c.d (LibreSpeed's getIP
        # shows what every handler sees).
        async def client_address() -> str:
            runner, url = await app.start(cfg)
            try:
                port = int(url.rsplit(":", 1)[1])
                body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}"
                                               "/backend/getIP.php?isp=false")
                return str(json.loads(body)["processedString"])
            finally:
                await runner.cleanup()

        assert asyncio.run(client_address()).startswith("127.0.0.1")
    assert url.startswith("http://[::]:" if host == "::" else
                          "http://[::1]:" if host == "::1" else "http://127.0.0.1:")


def test_the_port_reservation_of_workers_is_dual_stack() -> None:
    """serve --workers N on "::" port 0 reserves the port for both families, as its
    workers will bind it."""
    from collector.server.workers import _reserve_port

    _ipv6_loopback()
    holder = _reserve_port("::")
    try:
        assert holder.family == socket.AF_INET6
        assert holder.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    finally:
        holder.close()


def _fill(store: Store) -> None:
    register_probe(store, "p1", LineMetadata())
    for hour in ("10", "11"):
        for fam, bps in (("ipv4", 50e6), ("ipv6", 20e6)):
            store_result(store, replace(
                session(started_at=f"2026-03-02T{hour}:00:00.000000Z",
                        transfers=[attempt("download", bps=bps), attempt("upload", bps=bps)]),
                address_family=fam, address_family_requested="both"))
    store_result(store, session(started_at="2026-03-02T12:00:00.000000Z"))


@pytest.fixture
def mixed(store: Store) -> Store:
    """Probe p1 measuring dual stack (an IPv4 and an IPv6 session per slot, IPv6 slower),
    and one session of an older agent (no family); on each backend (the family column is
    SQLite migration 16, PostgreSQL 6)."""
    _fill(store)
    return store


def test_scope_by_family(mixed: Store) -> None:
    """family=ipv4|ipv6 keeps that family's sessions in the listing, the facts, the
    compliance observations and the hourly series; without it, every session; a session
    of unknown family matches neither."""
    for fam, kbps in (("ipv4", 50_000.0), ("ipv6", 20_000.0)):
        where = resolve_scope(None, None, None, filters={"family": fam})
        assert where.family == fam
        assert f"{'IPv4' if fam == 'ipv4' else 'IPv6'} sessions only" in where.describe()
        assert len(service.listing(mixed, where)) == 2
        facts = service.samples(mixed, where)
        assert [f.speeds("download") for f in facts] == [(kbps,), (kbps,)]
        assert all(f.result_id for f in facts)
        obs = service.observations(mixed, where)
        assert obs.sessions == 2
        assert sorted(set(obs.download_kbps)) == [kbps]
        hourly = mixed.hourly(family=fam)
        assert [(h.hour, h.sessions) for h in hourly] == [("2026-03-02T10", 1),
                                                          ("2026-03-02T11", 1)]
    everything = resolve_scope(None, None, None)
    assert everything.family is None
    assert len(service.listing(mixed, everything)) == 5
    assert service.observations(mixed, everything).sessions == 5


def test_a_whole_day_of_one_family_is_read_from_the_sessions(mixed: Store) -> None:
    """Whole days usually come from the day rollup, which does not split by family: a
    family scope over whole days still counts only its own sessions."""
    where = resolve_scope(None, "2026-03-01", "2026-03-05", filters={"family": "ipv6"})
    assert service.observations(mixed, where).sessions == 2


def test_bad_family_is_refused() -> None:
    """A family other than ipv4/ipv6 is a BadParameter naming the field and the choices."""
    with pytest.raises(BadParameter) as info:
        resolve_scope(None, None, None, filters={"family": "ipv5"})
    assert str(info.value) == "family: expected one of ipv4, ipv6, got 'ipv5'"
    assert info.value.field == "family"


def test_cli_report_and_results_by_family(tmp_path: Path) -> None:
    """bbprobe-collector report/results --family ipv6: the IPv6 sessions only, said so in
    the scope line (on the SQLite file `--db` names)."""
    db = str(tmp_path / "c.sqlite3")
    with closing(open_store(StorageConfig(path=db))) as store:
        _fill(store)
    runner = CliRunner()
    done = runner.invoke(main, ["--db", db, "results", "--family", "ipv6", "--format",
                                "json"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert len(json.loads(done.output)["results"]) == 2
    report = runner.invoke(main, ["--db", db, "report", "--family", "ipv4"],
                           catch_exceptions=False)
    assert report.exit_code in (0, 1), report.output
    assert "IPv4 sessions only; 2 session(s)" in report.output
    wrong = runner.invoke(main, ["--db", db, "results", "--family", "ipx"])
    assert wrong.exit_code == 2
    assert "'ipx' is not one of 'ipv4', 'ipv6'" in wrong.output


def _dual_stack_day(store: Store, probe: str) -> None:
    """One probe measured every quarter hour of a day over IPv4 and IPv6 alike (96
    sessions each: a complete 96-in-24-h campaign per family)."""
    from datetime import UTC, datetime, timedelta

    from agent.schema import format_utc

    start = datetime(2026, 3, 2, 0, 1, tzinfo=UTC)
    for i in range(96):
        at = format_utc(start + timedelta(minutes=15 * i))
        for fam, bps in (("ipv4", 80e6), ("ipv6", 20e6)):
            store_result(store, replace(session(probe, started_at=at, transfers=[
                attempt("download", bps=bps), attempt("upload", bps=bps / 10)]),
                address_family=fam, address_family_requested="both"))


def test_a_dual_stack_line_is_certified_per_family(store: Store) -> None:
    """Each slot measured over both families: two campaigns. A certificate without a
    family is refused, naming it; each family's counts its own sessions (4 a band, not
    8) and judges its own speeds; a report can be split by family."""
    from collector.compliance import targets

    register_probe(store, "ds-1", LineMetadata(download_min_kbps=50_000.0))
    _dual_stack_day(store, "ds-1")
    with pytest.raises(BadParameter, match="family: this line was measured over IPv4 "
                                           "and IPv6"):
        service.certificate(store, "ds-1", None, None, "96in24h", "UTC")
    v4 = service.certificate(store, "ds-1", None, None, "96in24h", "UTC", "ipv4")
    v6 = service.certificate(store, "ds-1", None, None, "96in24h", "UTC", "ipv6")
    assert set(v4.band_counts) == {4} and set(v6.band_counts) == {4}
    assert (v4.verdict, v6.verdict, v6.family) == ("no_breach", "breach", "ipv6")
    table = targets.load("")
    parts = service.breakdown(store, resolve_scope(None, None, None), table, ["family"])
    assert [(key["family"], r.sessions) for key, _where, r in parts] == [
        ("ipv4", 96), ("ipv6", 96)]
    with pytest.raises(BadParameter, match="family: completeness counts every session"):
        service.completeness(store, resolve_scope(None, None, None,
                                                  filters={"family": "ipv6"}))
