"""The LibreSpeed-compatible backend (protocols.md §6.8 checklist), over real HTTP."""

from __future__ import annotations

import http.client
import json
import logging
import os
import struct
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from collector.measurement import librespeed
from collector.server.testing import RunningCollector
from collector.storage.store import Store


def _conn(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)


@pytest.mark.parametrize("path", librespeed.paths("garbage"))
def test_garbage_sends_cksize_mebibytes_of_incompressible_data(
        collector: RunningCollector, path: str) -> None:
    """garbage.php sends ckSize MiB of incompressible bytes, uncached, without content encoding
    and open to any origin."""
    conn = _conn(collector.url)
    conn.request("GET", f"{path}?r=0.5&ckSize=3", headers={"Accept-Encoding": "identity"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 200 and len(body) == 3 * 1024 * 1024
    assert resp.getheader("Content-Type") == "application/octet-stream"
    assert "no-store" in resp.getheader("Cache-Control", "")
    assert resp.getheader("Access-Control-Allow-Origin") == "*"
    assert resp.getheader("Content-Encoding") is None
    import zlib

    assert len(zlib.compress(body[:1 << 20], 6)) > 0.99 * (1 << 20)  # incompressible


@pytest.mark.parametrize(("raw", "chunks"), [(None, 4), ("0", 4), ("x", 4), ("-2", 4),
                                             ("1", 1), ("1024", 1024), ("5000", 1024)])
def test_cksize_rules(raw: str | None, chunks: int) -> None:
    """ckSize: missing, zero, negative or not a number gives LibreSpeed's default of 4 chunks;
    larger values are capped at 1024."""
    assert librespeed.chunks_wanted(raw) == chunks


@pytest.mark.parametrize("path", librespeed.paths("empty"))
def test_empty_answers_nothing_and_drains_uploads(collector: RunningCollector,
                                                  path: str) -> None:
    """Ping: 200 with exactly 0 bytes (librespeed-cli marks a server down otherwise);
    upload: a 20 MiB body drained, then the same; keep-alive: both on one connection;
    OPTIONS preflight answered with CORS headers."""
    conn = _conn(collector.url)
    conn.request("GET", f"{path}?r=1")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"")
    blob = os.urandom(20 * 1024 * 1024)
    conn.request("POST", f"{path}?r=2", body=blob,
                 headers={"Content-Type": "application/octet-stream"})
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"")
    conn.request("OPTIONS", path, headers={"Origin": "http://example.test",
                                           "Access-Control-Request-Method": "POST"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200
    assert "Content-Encoding" in resp.getheader("Access-Control-Allow-Headers", "")
    assert "HEAD" in resp.getheader("Access-Control-Allow-Methods", "")
    # What the preflight advertises works (HEAD was once a 405), and every reply
    # lets a page of another origin time it (Timing-Allow-Origin).
    conn = _conn(collector.url)
    conn.request("HEAD", f"{path}?r=3")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"")
    assert resp.getheader("Timing-Allow-Origin") == "*"
    assert resp.getheader("Access-Control-Allow-Origin") == "*"
    conn.close()


@pytest.mark.parametrize("name", librespeed.NAMES)
def test_every_reply_allows_cross_origin_timing(collector: RunningCollector,
                                                name: str) -> None:
    """Every LibreSpeed endpoint answers GET and OPTIONS with Timing-Allow-Origin: *, so a
    browser on another origin can time it."""
    for method in ("GET", "OPTIONS"):
        conn = _conn(collector.url)
        conn.request(method, librespeed.paths(name)[0] + "?ckSize=1")
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status == 200 and resp.getheader("Timing-Allow-Origin") == "*", method


def test_a_client_going_away_is_one_debug_line(collector: RunningCollector,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """LibreSpeed's page cancels its streams when a test's time is up: a download
    closed mid-stream and an upload cut mid-body leave one debug line each, and no
    traceback (there were about five a browser test)."""
    import socket
    import time

    parts = urlsplit(collector.url)
    with caplog.at_level(logging.DEBUG):
        for request in (b"GET /backend/garbage.php?ckSize=1024 HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"POST /backend/empty.php HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: 100000000\r\n\r\n" + b"x" * 200_000):
            with socket.create_connection((parts.hostname, parts.port)) as sock:
                sock.sendall(request)
                if request.startswith(b"GET"):
                    sock.recv(65536)  # the download has started
                time.sleep(0.2)
                # An abortive close (RST), as a browser cancelling its fetch.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                struct.pack("ii", 1, 0))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(
                "went away" in r.getMessage() for r in caplog.records) < 2:
            time.sleep(0.1)
    went = [r for r in caplog.records if "went away" in r.getMessage()]
    assert [r.levelno for r in went] == [logging.DEBUG, logging.DEBUG], went
    assert {r.getMessage().split()[1] for r in went} == {"download", "upload"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize("path", librespeed.paths("getIP"))
def test_get_ip_labels_local_addresses(collector: RunningCollector, path: str) -> None:
    """getIP.php answers LibreSpeed's JSON with the client's address labelled (loopback here)
    and no ISP lookup."""
    conn = _conn(collector.url)
    conn.request("GET", f"{path}?isp=true&distance=km&r=3")
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    conn.close()
    assert doc == {"processedString": "127.0.0.1 - localhost IPv4 access", "rawIspInfo": ""}


def test_ip_descriptions() -> None:
    """Private, CGNAT and IPv6 ULA addresses are labelled as such; a public address is shown
    bare."""
    assert librespeed.describe_ip("10.0.0.5") == "10.0.0.5 - private IPv4 access"
    assert librespeed.describe_ip("100.64.1.2") == "100.64.1.2 - CGNAT IPv4 access"
    assert librespeed.describe_ip("fd00::1") == "fd00::1 - private IPv6 access"
    assert librespeed.describe_ip("8.8.8.8") == "8.8.8.8"


@pytest.mark.slow
def test_browser_speed_test_runs_in_chromium_and_is_recorded(
        collector: RunningCollector, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Headless Chromium opens /speedtest (short warm-up and window); the page pings,
    downloads and uploads over the LibreSpeed endpoints and posts its result, which the
    collector keeps apart from probe results (none of them counts in compliance)."""
    import subprocess
    import time

    from tests.browser import chromium
    from tests.httpclient import request

    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--remote-debugging-port=0",
            collector.url + "/speedtest?autostart=1&warmup_s=0.5&window_s=1.5&streams=2"]
    browser = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HOME": str(tmp_path)})
    try:
        deadline = time.monotonic() + 90
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline and not rows:
            _, body, _ = request("GET", collector.url + "/api/v1/browser-results")
            rows = body["browser_results"]
            time.sleep(0.5)
    finally:
        browser.terminate()
        browser.wait(30)
    assert rows, "the page never posted a result"
    (row,) = rows
    assert row["download_bps"] > 1e6 and row["upload_bps"] > 1e6  # loopback: fast
    assert row["rtt_min_ms"] >= 0 and len(row["rtts_ms"]) == 9
    assert "Chrome" in row["user_agent"] and row["client"] == "127.0.0.1"
    assert collector.count_results() == 0  # not a probe result


@pytest.mark.parametrize(("doc", "field"), [
    ({"download_bps": -1}, "download_bps"), ({"admin": True}, "admin"),
    ({"rtts_ms": ["x"]}, "rtts_ms"), ({"upload_bps": True}, "upload_bps"),
    # A 400-digit integer was once accepted and broke every report after it.
    ({"download_bps": 10**400}, "download_bps"), ({"upload_bps": 1.7e308}, "upload_bps"),
    ({"rtts_ms": [1e300]}, "rtts_ms"), ({"jitter_ms": 10**30}, "jitter_ms"),
    ({"method": {"x": 10**100}}, "method"), ({"user_agent": "x" * 10_000}, "user_agent"),
])
def test_browser_results_are_validated(collector: RunningCollector, doc: object,
                                       field: str) -> None:
    """A browser result with a negative, non-numeric, boolean or out-of-range number (a
    400-digit integer, 1.7e308, an oversized nested value) or an over-long user agent is a
    422 naming the field."""
    from tests.httpclient import request

    status, body, _ = request("POST", collector.url + "/api/v1/browser-results",
                              json.dumps(doc).encode(), {"Content-Type": "application/json"})
    assert (status, body["field"]) == (422, field)


def test_an_absurd_browser_row_cannot_break_reports(store: Store) -> None:
    """A row stored before numbers were bounded (as the finding's 400-digit integer was)
    counts as no speed: the report with customers included still answers."""
    from collector.compliance import targets
    from collector.reports import service
    from collector.scope import Scope

    store.add_browser_result("2026-11-21T11:00:00.000000Z", "203.0.113.7",
                             json.dumps({"download_bps": 10**400, "upload_bps": 5e6}))
    speeds = store.customer_speeds()
    assert speeds == [("browser", "download", None), ("browser", "upload", 5000.0)]
    report = service.compliance(store, Scope(probes=None, since=None, until=None),
                                targets.load(""), customers=service.Customers(True))
    assert dict(report.customer_tests) == {"browser": 2}


def test_anonymous_tables_stay_within_their_quota(store: Store) -> None:
    """Retention and a row cap for the anonymous tables (an unauthenticated endpoint must
    not grow the database without bound). Checked every 64 inserts: older rows than the
    retention go, and past max_rows the oldest."""
    from collector.storage.model import Quota
    from collector.storage.sql.anonymous import PRUNE_EVERY

    quota = Quota(keep_after="2026-01-01T00:00:00.000000Z", max_rows=100)
    store.add_browser_result("2025-06-01T00:00:00.000000Z", "203.0.113.1", "{}", quota)
    for n in range(2, 2 * PRUNE_EVERY + 1):
        store.add_browser_result(f"2026-02-01T00:{n // 60:02d}:{n % 60:02d}.000000Z",
                                 "203.0.113.1", json.dumps({"n": n}), quota)
    rows = store.browser_results()
    assert len(rows) == 100  # the cap, and the one from 2025 is gone
    assert min(r["received_at"] for r in rows) >= "2026-01-01"
    assert max(r["n"] for r in rows) == 2 * PRUNE_EVERY  # the newest are kept
    # A quiet table: retention applied by the hourly pass, without new rows.
    later = Quota(keep_after="2026-02-01T00:01:00.000000Z", max_rows=100)
    store.prune_anonymous(later, later)
    assert min(r["received_at"] for r in store.browser_results()) >= \
        "2026-02-01T00:01:00"


def test_browser_results_are_rate_limited_per_client(tmp_path: Path) -> None:
    """Anonymous posts: a burst of 3, then 429 with Retry-After, per client address."""
    from dataclasses import replace

    from collector.config import CollectorConfig
    from collector.server.testing import running_collector
    from tests.httpclient import request

    base = CollectorConfig()
    cfg = replace(base, server=replace(base.server, query_auth=False,
                                       probe_requests_per_min=0))
    with running_collector(tmp_path, cfg) as collector:
        codes = [request("POST", collector.url + "/api/v1/browser-results",
                         json.dumps({"download_bps": 1e6}).encode(),
                         {"Content-Type": "application/json"})[0] for _ in range(5)]
    assert codes == [201, 201, 201, 429, 429]


def test_rate_limit_buckets_expire() -> None:
    """A security review found a bucket per address, never expired, that, grew with every new
    address. A bucket that has refilled is forgotten at the next sweep."""
    from collector.limits import SWEEP_MIN, RateLimiter

    now = [0.0]
    limiter = RateLimiter(60, 3, clock=lambda: now[0])  # a bucket refills in 3 s
    most = 0
    for n in range(20 * SWEEP_MIN):  # a new address every 10 ms: 300 live at any time
        now[0] += 0.01
        assert limiter.take(f"addr-{n}") is None
        most = max(most, len(limiter.buckets))
    assert most <= SWEEP_MIN  # not 20 x SWEEP_MIN
    now[0] += 10
    assert len(limiter.buckets) > 0 and limiter.take("late") is None
    limiter._sweep(now[0])
    assert list(limiter.buckets) == ["late"]


def test_cksize_never_breaks_the_open_endpoint() -> None:
    """'²' passes str.isdigit() and int() refuses it; thousands of
    digits too. Both were a 500 on an endpoint anyone can reach."""
    assert librespeed.chunks_wanted("²") == 4
    assert librespeed.chunks_wanted("9" * 5000) == 1024
    assert librespeed.chunks_wanted("0") == 4 and librespeed.chunks_wanted("0012") == 12
