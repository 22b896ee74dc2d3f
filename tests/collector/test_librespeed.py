"""The LibreSpeed-compatible backend (protocols.md §6.8 checklist), over real HTTP."""

from __future__ import annotations

import http.client
import json
import os
from urllib.parse import urlsplit

import pytest

from collector import librespeed
from collector.testing import RunningCollector


def _conn(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)


@pytest.mark.parametrize("path", librespeed.paths("garbage"))
def test_garbage_sends_cksize_mebibytes_of_incompressible_data(
        collector: RunningCollector, path: str) -> None:
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


@pytest.mark.parametrize("path", librespeed.paths("getIP"))
def test_get_ip_labels_local_addresses(collector: RunningCollector, path: str) -> None:
    conn = _conn(collector.url)
    conn.request("GET", f"{path}?isp=true&distance=km&r=3")
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    conn.close()
    assert doc == {"processedString": "127.0.0.1 - localhost IPv4 access", "rawIspInfo": ""}


def test_ip_descriptions() -> None:
    assert librespeed.describe_ip("10.0.0.5") == "10.0.0.5 - private IPv4 access"
    assert librespeed.describe_ip("100.64.1.2") == "100.64.1.2 - CGNAT IPv4 access"
    assert librespeed.describe_ip("fd00::1") == "fd00::1 - private IPv6 access"
    assert librespeed.describe_ip("8.8.8.8") == "8.8.8.8"


def test_browser_speed_test_runs_in_chromium_and_is_recorded(
        collector: RunningCollector, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Headless Chromium opens /speedtest (short warm-up and window); the page pings,
    downloads and uploads over the LibreSpeed endpoints and posts its result, which the
    collector keeps apart from probe results (none of them counts in compliance)."""
    import subprocess
    import time

    from tests.collector.test_html_report import _chromium
    from tests.httpclient import request

    argv = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
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
])
def test_browser_results_are_validated(collector: RunningCollector, doc: object,
                                       field: str) -> None:
    from tests.httpclient import request

    status, body, _ = request("POST", collector.url + "/api/v1/browser-results",
                              json.dumps(doc).encode(), {"Content-Type": "application/json"})
    assert (status, body["field"]) == (422, field)
