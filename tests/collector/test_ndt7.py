"""ndt7 on the collector (shared/reference/protocols.md §5) against bbprobe's own ndt7 client
and raw WebSocket clients on loopback; M-Lab's official client runs in the network lab
(tests/integration/test_open_protocols.py).

The subtests here run 1.5 s instead of the protocol's 10 s (measurement.ndt7_runtime_s).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.probes import ndt7 as client
from collector.config import CollectorConfig
from collector.measurement import ndt7, tcpinfo
from collector.server.testing import RunningCollector, running_collector
from tests.httpclient import request

RUNTIME = 1.5
# The subset of TCPInfo the ndt7 spec makes normative (§5.5).
SPEC_TCPINFO = {"BusyTime", "BytesAcked", "BytesReceived", "BytesSent", "BytesRetrans",
                "ElapsedTime", "MinRTT", "RTT", "RTTVar", "RWndLimited", "SndBufLimited"}


@pytest.fixture
def short(tmp_path: Path) -> Iterator[RunningCollector]:
    base = CollectorConfig()
    cfg = replace(base, server=replace(base.server, query_auth=False),
                  measurement=replace(base.measurement, ndt7_runtime_s=RUNTIME))
    with running_collector(tmp_path / "collector", cfg) as running:
        yield running


def _stored(running: RunningCollector, expected: int) -> list[dict[str, Any]]:
    """The stored subtests, waiting briefly: the server stores after its Close."""
    import time

    for _ in range(100):
        store = running.open_store()
        try:
            rows = store.ndt7_tests(measurements=True)
        finally:
            store.close()
        if len(rows) >= expected:
            return rows
        time.sleep(0.05)
    return rows


# --- pure parts ------------------------------------------------------------------------------


def test_tcpinfo_decodes_by_offset_and_omits_what_the_kernel_did_not_return() -> None:
    """struct tcp_info is decoded field by field at the kernel's offsets (64-bit counters, the
    AppLimited bit, unlimited pacing as -1); a shorter struct from an older kernel omits the
    fields it lacks; the BBR info decodes, and a short one is None."""
    raw = bytearray(tcpinfo.SIZE)
    raw[0] = 1  # State: established
    raw[7] = 0b111  # AppLimited is the low bit only
    struct.pack_into("=I", raw, 68, 20_123)  # RTT µs
    struct.pack_into("=q", raw, 112, -1)  # MaxPacingRate unlimited
    struct.pack_into("=Q", raw, 120, 7_000_000_000)  # BytesAcked beyond 32 bits
    struct.pack_into("=Q", raw, 128, 12_345)  # BytesReceived
    struct.pack_into("=I", raw, 148, 19_000)  # MinRTT
    struct.pack_into("=Q", raw, 208, 99)  # BytesRetrans
    full = tcpinfo.decode(bytes(raw))
    assert (full["State"], full["AppLimited"], full["RTT"], full["MaxPacingRate"]) == \
        (1, 1, 20_123, -1)
    assert (full["BytesAcked"], full["BytesReceived"], full["MinRTT"],
            full["BytesRetrans"]) == (7_000_000_000, 12_345, 19_000, 99)
    assert SPEC_TCPINFO - {"ElapsedTime"} <= set(full)
    old_kernel = tcpinfo.decode(bytes(raw[:104]))  # a kernel from before pacing_rate
    assert "TotalRetrans" in old_kernel and "BytesAcked" not in old_kernel
    assert tcpinfo.decode_bbr(struct.pack("=5I", 5, 1, 20_000, 739, 512)) == {
        "BW": (1 << 32) + 5, "MinRTT": 20_000, "PacingGain": 739, "CwndGain": 512}
    assert tcpinfo.decode_bbr(b"\0" * 8) is None


def test_tcpinfo_reads_a_real_socket() -> None:
    """TCP_INFO from a loopback connection counts the bytes actually sent and received; a UDP
    socket gives an empty mapping, not an error."""
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as sender:
        receiver, _ = server.accept()
        with receiver:
            sender.sendall(b"x" * 100_000)
            got = 0
            while got < 100_000:
                got += len(receiver.recv(65536))
            assert tcpinfo.read(receiver)["BytesReceived"] == 100_000
            sent = tcpinfo.read(sender)
            assert sent["BytesSent"] >= 100_000 and sent["State"] == 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert tcpinfo.read(udp) == {}  # not TCP: nothing, not an error


def test_message_size_doubles_at_a_sixteenth_of_the_queue_up_to_one_mebibyte() -> None:
    """ndt7 download messages start at 8 KiB and double once the bytes queued reach 16 times the
    current size, never shrinking and capped at 1 MiB (ndt7 spec)."""
    size, queued, seen = ndt7.FIRST_MESSAGE, 0, []
    for _ in range(10_000):
        queued += size
        size = ndt7.next_size(size, queued)
        seen.append(size)
    assert seen[0] == 8192 and max(seen) == 1 << 20 and seen == sorted(seen)
    assert ndt7.next_size(8192, 16 * 8192 - 1) == 8192  # just below a sixteenth: stays
    assert ndt7.next_size(8192, 16 * 8192) == 16384


def test_measurement_spacing_is_memoryless_within_the_servers_bounds() -> None:
    """Measurement messages are spaced by an exponential draw with mean 250 ms, clamped to
    25-625 ms (as ndt-server's memoryless ticker)."""
    rng = random.Random(7)
    gaps = [ndt7.next_interval(rng) for _ in range(20_000)]
    assert min(gaps) == 0.025 and max(gaps) == 0.625
    assert 0.2 < sum(gaps) / len(gaps) < 0.26  # exponential mean 250 ms, clamped


@pytest.mark.parametrize(("query", "problem"), [
    ("early_exit=100", "early_exit"), ("early_exit=", "early_exit"),
    ("a=" + "x" * 5000, "longer than 4096"),
])
def test_bad_queries_are_named(query: str, problem: str) -> None:
    """A query with early_exit other than 250, an empty early_exit, or a value over 4096
    characters is refused naming the problem."""
    with pytest.raises(ValueError, match=problem):
        ndt7.parse_query(query)


def test_query_becomes_client_metadata() -> None:
    """Query parameters become the archive's ClientMetadata in order, dropping server_secret,
    and early_exit=250 turns on early exit."""
    metadata, early = ndt7.parse_query(
        "client_name=x&client_name=y&server_secret=1&flag&early_exit=250")
    assert metadata == [{"Name": "client_name", "Value": "x"}, {"Name": "flag", "Value": ""},
                        {"Name": "early_exit", "Value": "250"}]
    assert early is True


# --- the server, over real connections --------------------------------------------------


@pytest.mark.parametrize("headers", [
    {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},  # no subprotocol
    {"Sec-WebSocket-Protocol": "net.measurementlab.ndt.v7"},  # no upgrade
])
def test_upgrade_without_the_subprotocol_or_the_upgrade_is_a_400(
        collector: RunningCollector, headers: dict[str, str]) -> None:
    """A WebSocket upgrade without the net.measurementlab.ndt.v7 subprotocol, or the subprotocol
    without an upgrade, is answered 400 naming what is missing."""
    status, body, _ = request("GET", collector.url + "/ndt/v7/download", None, headers)
    assert status == 400
    assert "net.measurementlab.ndt.v7" in body["error"] or "Upgrade" in body["error"]


def test_early_exit_other_than_250_is_a_400(collector: RunningCollector) -> None:
    """An upload with early_exit other than 250 is refused with 400 naming early_exit."""
    status, body, _ = request("GET", collector.url + "/ndt/v7/upload?early_exit=1", None,
                              {"Sec-WebSocket-Protocol": "net.measurementlab.ndt.v7"})
    assert status == 400 and "early_exit" in body["error"]


@pytest.mark.slow
def test_agent_ndt7_client_against_the_collector(short: RunningCollector) -> None:
    """Both subtests end with the server's Close 1000; the download's bytes counted by the
    client are exactly the bytes the server sent; every server measurement carries the
    kernel's TCPInfo (the spec subset) and ConnectionInfo; the records are stored."""
    down, up = asyncio.run(client.run(short.url, runtime_s=RUNTIME))
    assert down.ok and up.ok, (down.error, up.error)
    assert down.server_end == "close 1000" and up.server_end == "close 1000"
    assert down.throughput_bps and up.throughput_bps
    assert down.min_rtt_ms is not None and down.retrans_ratio is not None
    for sub in (down, up):
        assert sub.server_measurements
        for message in sub.server_measurements:
            assert set(message["TCPInfo"]) >= SPEC_TCPINFO
            assert message["ConnectionInfo"]["Server"] == short.url.split("://")[1]
    # Upload figure = the server's last BytesReceived over its ElapsedTime (the Go client's)
    last = up.server_measurements[-1]["TCPInfo"]
    assert up.throughput_bps == pytest.approx(
        8 * last["BytesReceived"] / (last["ElapsedTime"] / 1e6))

    rows = _stored(short, 2)
    by_test = {row["Test"]: row for row in rows}
    assert set(by_test) == {"download", "upload"}
    assert by_test["download"]["EndReason"] == by_test["upload"]["EndReason"] == "done"
    # Every byte the server queued (binary and text) reached the client before the Close.
    assert down.client_bytes == by_test["download"]["Summary"]["app_bytes"]
    assert {"Name": "client_name", "Value": "bbprobe"} in by_test["download"]["ClientMetadata"]
    assert by_test["upload"]["Summary"]["throughput_bps"] > 0
    status, listed, _ = request("GET", short.url + "/api/v1/ndt7-results")
    assert status == 200 and len(listed["ndt7_tests"]) == 2
    assert "ServerMeasurements" not in listed["ndt7_tests"][0]  # only when asked
    assert short.count_results() == 0  # not a probe result


def test_server_pings_after_measurements_and_records_client_measurements(
        short: RunningCollector) -> None:
    """A raw client: the server's pings carry a nanosecond timestamp; a client's text
    message during a download is kept as a client measurement."""
    pings: list[bytes] = []

    async def main() -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(
                short.url + "/ndt/v7/download", protocols=(ndt7.SUBPROTOCOL,),
                autoping=False) as ws:
            await ws.send_str(json.dumps({"AppInfo": {"ElapsedTime": 1, "NumBytes": 2}}))
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.PING:
                    pings.append(msg.data)
                    await ws.pong(msg.data)

    asyncio.run(main())
    assert pings and all(p.isdigit() and len(p) >= 19 for p in pings)
    (row,) = _stored(short, 1)
    assert row["ClientMeasurements"] == [{"AppInfo": {"ElapsedTime": 1, "NumBytes": 2}}]


def test_binary_from_the_client_during_a_download_ends_it(short: RunningCollector) -> None:
    """A binary message from the client during a download closes the test normally (1000) and
    stores it ended by protocol_error, naming the binary message."""
    async def main() -> int | None:
        async with aiohttp.ClientSession() as session, session.ws_connect(
                short.url + "/ndt/v7/download", protocols=(ndt7.SUBPROTOCOL,)) as ws:
            await ws.send_bytes(b"\0" * 1024)
            async for _ in ws:
                pass
            return ws.close_code

    assert asyncio.run(main()) == 1000
    (row,) = _stored(short, 1)
    assert row["EndReason"] == "protocol_error" and "binary" in row["Error"]


def test_a_client_that_vanishes_is_recorded_not_fatal(short: RunningCollector) -> None:
    """A client that drops the connection mid-download: the server records the subtest as
    ended by the client and keeps serving."""
    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(short.url + "/ndt/v7/download",
                                          protocols=(ndt7.SUBPROTOCOL,))
            await ws.receive()
            transport = ws._response.connection.transport  # type: ignore[union-attr]
            assert transport is not None
            transport.abort()  # an RST, not a Close

    asyncio.run(main())
    (row,) = _stored(short, 1)
    assert row["EndReason"] in ("client_reset", "client_closed", "client_error")
    down, = asyncio.run(client.run(short.url, ("download",), runtime_s=RUNTIME))
    assert down.ok


def test_client_failures_are_results_with_the_reason(tmp_path: Path) -> None:
    """A server without ndt7 (measurement role off: 404), nobody listening, a bad URL:
    each a failed subtest naming why, none an exception."""
    base = CollectorConfig()
    cfg = replace(base, measurement=replace(base.measurement, enabled=False))
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    with running_collector(tmp_path / "c", cfg) as plain:
        not_ndt7 = asyncio.run(client.subtest(plain.url, "download"))
    refused = asyncio.run(client.subtest(f"ws://127.0.0.1:{closed_port}", "upload"))
    bad = asyncio.run(client.subtest("ftp://example.invalid", "download"))
    assert not not_ndt7.ok and "handshake refused: HTTP 404" in (not_ndt7.error or "")
    assert not refused.ok and "Connect" in (refused.error or "")
    assert not bad.ok and "expected ws://" in (bad.error or "")
    assert not_ndt7.throughput_bps is None and refused.throughput_bps is None


@pytest.mark.slow
def test_ndt7_command(short: RunningCollector) -> None:
    """``bbprobe ndt7``: one line per subtest naming the method; exit 6 and the reason when
    the server cannot be reached; JSON keeps the raw samples."""
    import subprocess
    import sys

    agent = [sys.executable, "-m", "agent"]
    done = subprocess.run([*agent, "--server", short.url, "ndt7"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("download") and "Mbit/s" in lines[0] and "min RTT" in lines[0]
    assert lines[1].startswith("upload") and "BytesReceived" in lines[1]
    done = subprocess.run([*agent, "--server", short.url, "ndt7", "--direction", "download",
                           "--json"], capture_output=True, text=True, timeout=60, check=False)
    (sub,) = json.loads(done.stdout)
    assert sub["ok"] and sub["client_samples"] and sub["server_measurements"]
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    done = subprocess.run([*agent, "--server", f"http://127.0.0.1:{port}", "ndt7"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 6 and "FAILED" in done.stdout and "Traceback" not in done.stderr


# aiohttp's TLS client leaves the raw socket of a refused handshake to be closed after
# the event loop has ended (asyncio's SSL shutdown needs one more turn); the process is
# ending there anyway. Only that warning is let through, and only here.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_wss_with_a_verified_certificate(tmp_path: Path, pki: Path) -> None:
    """A collector with TLS serves ndt7 over wss://; the client verifies the server
    against the given CA and refuses it without."""
    import ssl

    base = CollectorConfig()
    cfg = replace(base, server=replace(base.server, query_auth=False,
                                       tls_cert=str(pki / "server.pem"),
                                       tls_key=str(pki / "server.key")),
                  measurement=replace(base.measurement, ndt7_runtime_s=RUNTIME))
    with running_collector(tmp_path / "c", cfg) as tls:
        assert tls.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        down, = asyncio.run(client.run(tls.url, ("download",), ssl_context=trusted,
                                       runtime_s=RUNTIME))
        untrusted, = asyncio.run(client.run(tls.url, ("download",), runtime_s=RUNTIME))
    import gc

    gc.collect()  # that socket's warning, here, under this test's filter
    assert down.ok and down.url.startswith("wss://") and down.server_end == "close 1000"
    assert not untrusted.ok and "certificate" in (untrusted.error or "").lower()


def test_an_anonymous_subtest_stores_a_bounded_amount(short: RunningCollector) -> None:
    """Memory a client can make the server hold (a security review's finding): each subtest kept up
    to 200 x 8 KiB of the client's own messages (5 subtests added 9.9 MB in 1.1 s). Now at most 64
    KiB of them are kept per subtest; the rest are counted."""
    message = json.dumps({"AppInfo": {"ElapsedTime": 1, "NumBytes": 2}, "pad": "x" * 8000})

    async def main() -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(
                short.url + "/ndt/v7/upload", protocols=(ndt7.SUBPROTOCOL,)) as ws:
            for _ in range(150):
                await ws.send_str(message)
            await ws.close()

    asyncio.run(main())
    (row,) = _stored(short, 1)
    kept = row["ClientMeasurements"]
    assert len(kept) == ndt7.MAX_CLIENT_MEASUREMENTS_TOTAL_BYTES // len(message)
    assert row["ClientMeasurementsDropped"] == 150 - len(kept)
    body = short.db_path.stat().st_size
    assert body < 2 * 1024 * 1024  # was 150 x 8 KiB = 1.2 MB of messages alone
