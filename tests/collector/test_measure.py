"""Measurement endpoints over real TCP: download source, upload sink, echo."""

from __future__ import annotations

import itertools

import pytest

from agent import spec
from collector.server.testing import RunningCollector
from tests.httpclient import request


def test_download_exact_bytes_incompressible(collector: RunningCollector) -> None:
    """bytes=N sends exactly N random bytes that do not compress."""
    import zlib

    status, body, headers = request("GET", collector.url + spec.DOWNLOAD_PATH + "?bytes=300000")
    assert status == 200
    assert len(body) == 300_000
    assert headers["cache-control"] == "no-store"
    assert len(zlib.compress(body, 9)) > 0.99 * len(body)


def test_download_by_duration(collector: RunningCollector) -> None:
    """duration_s sends until the time is up, then closes: the body ends before the
    Content-Length cap, by design."""
    import http.client
    import time
    from urllib.parse import urlsplit

    parts = urlsplit(collector.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", spec.DOWNLOAD_PATH + "?duration_s=0.3")
    resp = conn.getresponse()
    assert resp.status == 200
    assert int(resp.getheader("Content-Length")) == collector.config.measurement.max_bytes
    received = 0
    started = time.monotonic()
    try:
        while chunk := resp.read(1 << 20):
            received += len(chunk)
    except http.client.IncompleteRead as exc:
        received += len(exc.partial)
    elapsed = time.monotonic() - started
    conn.close()
    assert received > 0
    assert elapsed < 5  # it stopped by itself


def test_upload_report(collector: RunningCollector) -> None:
    """The sink reports the bytes it received and monotone (t, bytes) samples."""
    payload = b"\x5a" * 1_000_000
    status, report, _ = request("POST", collector.url + spec.UPLOAD_PATH + "?bytes=1000000",
                                payload, {"Content-Type": "application/octet-stream"})
    assert status == 200
    assert report["bytes_received"] == 1_000_000
    samples = report["samples"]
    assert samples[0] == [0.0, 0]
    assert samples[-1][1] == 1_000_000
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(samples))


def test_upload_short_of_announced_size(collector: RunningCollector) -> None:
    """A body shorter than bytes=N is a failed transfer (400), not a measurement."""
    status, body, _ = request("POST", collector.url + spec.UPLOAD_PATH + "?bytes=2000",
                              b"x" * 1000, {"Content-Type": "application/octet-stream"})
    assert (status, body["error"]) == (400, "received 1000 bytes, expected 2000")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (spec.DOWNLOAD_PATH, "give bytes=N or duration_s=S (or both)"),
        (spec.DOWNLOAD_PATH + "?bytes=lots", "bytes: expected a number, got 'lots'"),
        (spec.DOWNLOAD_PATH + "?duration_s=3601", "duration_s: must be within 0.001..60, "
         "got 3601"),
        (spec.DOWNLOAD_PATH + "?bytes=0", "bytes: must be within 1..5e+10, got 0"),
    ],
)
def test_bad_measurement_requests(collector: RunningCollector, path: str, message: str) -> None:
    """Requests outside the caps are refused with 400 naming the parameter."""
    status, body, _ = request("GET", collector.url + path)
    assert (status, body["error"]) == (400, message)


def test_echo(collector: RunningCollector) -> None:
    """Echo answers at once with a tiny body."""
    status, body, _ = request("GET", collector.url + spec.ECHO_PATH)
    assert (status, body) == (200, b"ok")
