"""A security review found that anonymous sockets could hold every measurement slot for minutes.
Reproduced as the finding did it, over real TCP: idle LibreSpeed downloads that never read
and uploads that announce a megabyte and send one byte. Now every handler has a deadline
and each client (an IPv4 address or an IPv6 /64) has its share of the slots."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from agent import spec
from collector.config import CollectorConfig
from collector.measurement.slots import client_key
from collector.server.testing import RunningCollector, running_collector
from tests.httpclient import request


def _config(max_concurrent: int, per_client: int, duration_s: float) -> CollectorConfig:
    base = CollectorConfig()
    return replace(base,
                   server=replace(base.server, query_auth=False),
                   measurement=replace(base.measurement, max_concurrent=max_concurrent,
                                       max_concurrent_per_client=per_client,
                                       max_duration_s=duration_s))


@contextmanager
def _hostile(collector: RunningCollector, source: str, requests: list[bytes]
             ) -> Iterator[list[socket.socket]]:
    """Open one connection per request from ``source``, send it, and never read."""
    parts = urlsplit(collector.url)
    opened = []
    try:
        for raw in requests:
            s = socket.create_connection((parts.hostname, parts.port), timeout=10,
                                         source_address=(source, 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(raw)
            opened.append(s)
        time.sleep(0.3)  # let the server take the slots
        yield opened
    finally:
        for s in opened:
            s.close()


IDLE_DOWNLOAD = b"GET /backend/garbage.php?ckSize=1024 HTTP/1.1\r\nHost: x\r\n\r\n"
TRICKLE_UPLOAD = (b"POST /backend/empty.php HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\nx")


def _download(collector: RunningCollector) -> int:
    status, _, _ = request("GET", collector.url + spec.DOWNLOAD_PATH + "?bytes=1000")
    return status


@pytest.mark.slow
def test_idle_sockets_release_their_slots_at_the_deadline(tmp_path: Path) -> None:
    """The finding's setup: 4 slots, 2 idle downloads and 2 trickling uploads. They hold
    the slots only until max_duration_s; then an agent's download gets through."""
    with running_collector(tmp_path, _config(4, 20, 2.0)) as collector, \
            _hostile(collector, "127.0.0.1", [IDLE_DOWNLOAD] * 2 + [TRICKLE_UPLOAD] * 2):
        assert _download(collector) == 503  # all four held, for now
        deadline = time.monotonic() + 20
        while _download(collector) != 200:
            assert time.monotonic() < deadline, "slots still held long after 2 s"
            time.sleep(0.5)
        # Every one of the four released, not just one.
        _, health, _ = request("GET", collector.url + "/api/v1/health")
        assert (health["measurement"]["transfers_running"],
                health["measurement"]["clients"]) == (0, 0)


def test_one_client_cannot_take_every_slot(tmp_path: Path) -> None:
    """With 2 slots per client, a third from the same address gets 429, and another
    client still measures while the first holds its share."""
    with running_collector(tmp_path, _config(8, 2, 60.0)) as collector, \
            _hostile(collector, "127.0.0.2", [IDLE_DOWNLOAD] * 3) as held:
        held[2].settimeout(10)
        answer = held[2].recv(4096)
        assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
        assert b"too many transfers from 127.0.0.2: 2 running (limit 2 per client)" in answer
        assert _download(collector) == 200  # 127.0.0.1 is another client


NDT7_UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Protocol": "net.measurementlab.ndt.v7"}


def test_capacity_refusals_are_marked_as_the_servers(tmp_path: Path) -> None:
    """Every 429 and 503 for capacity, from every measurement endpoint and the capacity
    ask, carries Bbprobe-Refused with its reason: the agent counts only a marked refusal
    as the server's (a path's proxy may answer 429/503 too)."""
    asks = [("GET", spec.DOWNLOAD_PATH + "?bytes=10", {}),
            ("POST", spec.UPLOAD_PATH + "?bytes=1", {"Content-Length": "1"}),
            ("GET", spec.ECHO_PATH + "?capacity=1", {}),
            ("GET", "/backend/garbage.php", {}),
            ("POST", "/backend/empty.php", {"Content-Length": "1"}),
            ("GET", "/ndt/v7/download", NDT7_UPGRADE),
            ("GET", "/ndt/v7/upload", NDT7_UPGRADE)]
    base = _config(3, 2, 60.0)
    cfg = replace(base, tickets=replace(base.tickets, enabled=False))  # no reserve
    with running_collector(tmp_path, cfg) as collector, \
            _hostile(collector, "127.0.0.2", [IDLE_DOWNLOAD] * 2), \
            _hostile(collector, "127.0.0.3", [IDLE_DOWNLOAD]):
        for source, status, reason in (("127.0.0.2", 429, "per_client"),
                                       ("127.0.0.4", 503, "busy")):
            for method, path, headers in asks:
                got = _raw(collector, source, method, path, headers)
                assert got[:2] == (status, reason), (path, got)


def _raw(collector: RunningCollector, source: str, method: str, path: str,
         headers: dict[str, str]) -> tuple[int, str | None, bytes]:
    parts = urlsplit(collector.url)
    conn = http.client.HTTPConnection(str(parts.hostname), parts.port, timeout=10,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body=b"x" if method == "POST" else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader(spec.REFUSED_HEADER), resp.read()
    finally:
        conn.close()


def test_clients_are_addresses_and_ipv6_64s() -> None:
    """Transfer slots are keyed by IPv4 address and by IPv6 /64 (one subscriber's prefix); an
    IPv4-mapped address is its IPv4, a link-local one its /64, none is 'unknown'."""
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == \
        "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key(None) == "unknown"
