"""Customers' own tests (the /speedtest page, ndt7 clients) stay out of compliance unless an
analyst includes them, and then add speeds only, from the report's period and optionally
one client network. Queries run on each backend; the API and CLI on the collector's SQLite
file."""

from __future__ import annotations

import json
from contextlib import closing

import pytest
from click.testing import CliRunner

from collector.cli import main as cli
from collector.compliance import targets as targets_mod
from collector.compliance.evaluate import Observations
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.reports import service
from collector.scope import resolve_scope
from collector.server.testing import RunningCollector
from collector.storage.store import Store
from tests.factories import attempt, session, store_result
from tests.httpclient import request

DAY = "2026-11-21"


def _ndt7(uuid: str, test: str, bps: float | None, client: str,
          reason: str = "done") -> dict[str, object]:
    return {"UUID": uuid, "Test": test, "Client": client, "EndReason": reason,
            "Summary": {"throughput_bps": bps, "min_rtt_ms": 20.0}}


def _fill(store: Store) -> None:
    """One probe session (download 50, upload 10 Mbit/s); a browser result and three ndt7
    subtests from two customer networks, in the same day; one browser result the day
    after (outside the scope)."""
    register_probe(store, "p1", LineMetadata())
    store_result(store, session("p1", started_at=f"{DAY}T10:00:00.000000Z",
                                transfers=[attempt("download", bps=50e6),
                                           attempt("upload", bps=10e6)]))
    store.add_browser_result(f"{DAY}T11:00:00.000000Z", "203.0.113.7", json.dumps(
        {"download_bps": 30e6, "upload_bps": 5e6, "rtts_ms": [9.0]}))
    store.add_browser_result("2026-11-22T11:00:00.000000Z", "203.0.113.8", json.dumps(
        {"download_bps": 1e6, "upload_bps": 1e6}))
    for uuid, test, bps, client, reason in (
            ("a", "download", 40e6, "203.0.113.9:50000", "done"),
            ("b", "upload", 8e6, "[2001:db8::1]:50001", "client_closed"),
            ("c", "download", 2e6, "198.51.100.4:50002", "client_reset")):
        archive = _ndt7(uuid, test, bps, client, reason)
        store.add_ndt7_test(archive, f"{DAY}T12:00:0{ord(uuid) - 97}.000000Z",
                            f"{DAY}T12:00:10.000000Z")


def test_observations_count_customers_and_add_speeds_only_when_included() -> None:
    """Customer tests are always counted by kind; their speeds join the samples only when
    included, and a customer test never adds a transfer attempt (failure rate is the
    probes')."""
    apart, included = Observations(), Observations(customer_included=True)
    for obs in (apart, included):
        obs.add_customer("browser", "download", 30_000.0)
        obs.add_customer("ndt7", "upload", None)  # did not end normally: counted only
    assert apart.customer_tests == included.customer_tests == {"browser": 1, "ndt7": 1}
    assert apart.download_kbps == [] and included.download_kbps == [30_000.0]
    assert included.upload_kbps == [] and included.upload_attempts == 0


def test_report_keeps_customers_apart_unless_asked(store: Store) -> None:
    """The report counts the period's customer tests but keeps their speeds out; included,
    they add download and upload samples only (failure rate, delay, loss stay the
    probes'); a customer network, IPv4 or IPv6, narrows which ones."""
    _fill(store)
    table = targets_mod.load("")
    where = resolve_scope(None, DAY, "2026-11-22")
    apart = service.compliance(store, where, table)
    with_all = service.compliance(store, where, table,
                                  customers=service.Customers(include=True))
    only_net = service.compliance(store, where, table, customers=service.Customers(
        include=True, network="203.0.113.0/24"))
    v6 = service.observations(store, where, customers=service.Customers(
        include=True, network="2001:db8::/32"))
    samples = {r.id: r.samples for r in apart.indicators}
    assert samples["download_p95_kbps"] == 1 and samples["upload_p95_kbps"] == 1
    # The day's browser result gives both directions; ndt7: one ok download, one ok
    # upload (ended by its client, as ndt7-js does), one reset (no speed).
    assert dict(apart.customer_tests) == {"browser": 2, "ndt7": 3}
    assert not apart.customer_included
    got = {r.id: r.samples for r in with_all.indicators}
    assert got["download_p95_kbps"] == 1 + 2 and got["upload_p95_kbps"] == 1 + 2
    # Failure rate, delay and loss stay the probes' own.
    for key in ("download_failure_ratio", "upload_failure_ratio", "delay_mean_ms",
                "loss_ratio"):
        assert got[key] == samples[key]
    net = {r.id: r.samples for r in only_net.indicators}
    assert net["download_p95_kbps"] == 1 + 2  # browser 203.0.113.7 + ndt7 203.0.113.9
    assert net["upload_p95_kbps"] == 1 + 1
    assert v6.upload_kbps == [10_000.0, 8_000.0] and v6.customer_tests == {"ndt7": 1}


def test_api_and_cli_include_customers(collector: RunningCollector) -> None:
    """include_customer and customer_network work alike in the report API, the page and
    the CLI; a bad value is a 400 (or a usage error) naming the parameter."""
    with closing(collector.open_store()) as store:
        _fill(store)
    base = collector.url + f"/api/v1/report?since={DAY}&until=2026-11-22"
    status, apart, _ = request("GET", base)
    assert status == 200
    assert apart["customer"] == {"tests": {"browser": 2, "ndt7": 3}, "included": False}
    status, included, _ = request("GET", base + "&include_customer=true"
                                              "&customer_network=203.0.113.0/24")
    assert status == 200 and included["customer"]["included"] is True
    by_id = {i["id"]: i["samples"] for i in included["indicators"]}
    assert by_id["download_p95_kbps"] == 3
    status, page, _ = request("GET", collector.url + f"/report?since={DAY}&until=2026-11-22"
                                                     "&include_customer=true")
    assert status == 200 and b"Customer tests:" in page and b"included at the analyst" in page
    for query, field in (("include_customer=yes", "include_customer"),
                         ("include_customer=true&customer_network=nonsense",
                          "customer_network")):
        status, body, _ = request("GET", base + "&" + query)
        assert (status, body["field"]) == (400, field)

    runner = CliRunner()
    db = ["--db", str(collector.db_path)]
    done = runner.invoke(cli.main, [*db, "report", "--since", DAY, "--until", "2026-11-22"])
    assert done.exit_code == 0, done.output
    assert "Customer: 2 browser speed test(s), 3 ndt7 subtest(s) in the period; kept apart" \
        in done.output
    done = runner.invoke(cli.main, [*db, "report", "--since", DAY, "--until", "2026-11-22",
                                    "--include-customer", "--format", "json"])
    assert done.exit_code == 0 and json.loads(done.output)["customer"]["included"] is True
    done = runner.invoke(cli.main, [*db, "report", "--include-customer",
                                    "--customer-network", "not-a-net"])
    assert done.exit_code != 0 and "--customer-network" in done.output
    assert "Traceback" not in done.output


@pytest.mark.parametrize("client", ["203.0.113.7", "203.0.113.7:5", "[2001:db8::1]:5",
                                    "2001:db8::1"])
def test_client_addresses_in_every_stored_form_are_matched(client: str) -> None:
    """A client recorded as address, address:port, [v6]:port or bare v6 yields the bare
    address a customer network is matched against."""
    from collector.storage.sql.anonymous import client_host

    assert client_host(client) in ("203.0.113.7", "2001:db8::1")
