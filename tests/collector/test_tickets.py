"""Measurement tickets end to end, over real TCP: collectors on 127.0.0.1 port 0
issue them (with the instruction, and at POST /api/v1/tickets); a measurement-only
server (``serve --role measurement``, its own process, no database) verifies them with
the collector's public key; every kind of bad ticket is refused with its code; the slots
count ticketed transfers per ticket, keep a reserve strangers cannot take, and leave the
per-address rule exactly as it was for requests without a ticket."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import spec
from agent.ticket import Allowance, origin, peek
from collector import keys, tickets
from collector.cli.main import main
from collector.config import CollectorConfig, load
from collector.server import app as app_mod
from collector.server.testing import (
    RunningCollector,
    running_collector,
    serve_in_thread,
    serve_process,
)
from collector.tickets import TicketPolicy
from tests.httpclient import request

POLICY = TicketPolicy(expiry_s=1200, streams=20, bytes=10**12, duration_s=900)


def _config(tickets_kw: dict[str, Any] | None = None, **measurement: Any) -> CollectorConfig:
    base = CollectorConfig()
    return replace(base, server=replace(base.server, query_auth=False),
                   measurement=replace(base.measurement, **measurement),
                   tickets=replace(base.tickets, **(tickets_kw or {})))


def _private(c: RunningCollector) -> Ed25519PrivateKey:
    """The collector's signing key (generated now if it has not needed it yet): tests
    sign tickets of their own with it, to shape their allowance or their times."""
    return keys.load_or_generate(c.db_path.parent / keys.TICKET_KEY_FILE, "test")


def _sign(key: Ed25519PrivateKey, servers: tuple[str, ...], policy: TicketPolicy = POLICY,
          now: float | None = None, probe: str = "p1") -> str:
    return tickets.issue(key, keys.thumbprint(key.public_key()), probe, servers, policy,
                         time.time() if now is None else now)


def _ask(url: str, path: str, ticket: str | None = None, source: str = "127.0.0.1",
         method: str = "GET", headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    """One request from ``source``: (status, headers lower-cased, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, headers={**({spec.TICKET_HEADER: ticket} if ticket
                                               else {}), **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _refusal(url: str, ticket: str, path: str = spec.DOWNLOAD_PATH + "?bytes=1000"
             ) -> tuple[int, str | None, str | None]:
    """(status, the Bbprobe-Ticket-Refused header, the JSON body's code)."""
    status, headers, body = _ask(url, path, ticket)
    code = json.loads(body).get("code") if body.startswith(b"{") else None
    return status, headers.get(spec.TICKET_REFUSED_HEADER.lower()), code


def _held_upload(url: str, ticket: str | None) -> bytes:
    """An upload that announces a megabyte and sends one byte: it holds its slot."""
    host = urlsplit(url).netloc
    extra = f"{spec.TICKET_HEADER}: {ticket}\r\n" if ticket else ""
    return (f"POST {spec.UPLOAD_PATH} HTTP/1.1\r\nHost: {host}\r\n{extra}"
            "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\nx"
            ).encode()


@contextmanager
def _holding(url: str, requests: list[tuple[str, bytes]]) -> Iterator[list[socket.socket]]:
    """One connection per (source address, request), sent and never read further."""
    parts = urlsplit(url)
    opened = []
    try:
        for source, raw in requests:
            s = socket.create_connection((parts.hostname, parts.port), timeout=20,
                                         source_address=(source, 0))
            s.sendall(raw)
            opened.append(s)
        yield opened
    finally:
        for s in opened:
            s.close()


def _health(c: RunningCollector) -> dict[str, Any]:
    _, doc, _ = request("GET", c.url + "/api/v1/health")
    measurement: dict[str, Any] = doc["measurement"]
    return measurement


def _until_running(c: RunningCollector, ticketed: int, anonymous: int) -> None:
    """Wait until the server has taken the held transfers (no timing assert: a bound
    on waiting for the server's own progress)."""
    deadline = time.monotonic() + 30
    while (got := _health(c))["transfers_ticketed"] != ticketed or \
            got["transfers_anonymous"] != anonymous:
        assert time.monotonic() < deadline, got
        time.sleep(0.05)


def _status_line(s: socket.socket) -> bytes:
    s.settimeout(20)
    return s.recv(65536)


def _probe_headers(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


WANT = {spec.TICKET_REQUEST_HEADER: "1"}
NDT7_UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Protocol": "net.measurementlab.ndt.v7"}


def test_issued_with_the_instruction_and_alone(tmp_path: Path) -> None:
    """The instruction carries a ticket when asked (on the 304 too), POST gives one as
    JSON; it names this collector's origin, and this collector admits it. The key was
    generated beside the database, mode 0600."""
    with running_collector(tmp_path / "c") as c:
        token = c.add_probe("p1")
        status, _, headers = request("GET", c.url + spec.INSTRUCTION_PATH,
                                     headers=_probe_headers(token))
        assert status == 200 and spec.TICKET_HEADER.lower() not in headers
        status, _, headers = request("GET", c.url + spec.INSTRUCTION_PATH,
                                     headers=_probe_headers(token, **WANT))
        first = peek(headers[spec.TICKET_HEADER.lower()])
        assert (status, first.probe, first.servers) == (200, "p1", (origin(c.url),))
        assert first.allowance == Allowance(spec.MAX_STREAMS, spec.MAX_SESSION_BYTES,
                                            spec.MAX_SESSION_S)
        status, _, headers = request("GET", c.url + spec.INSTRUCTION_PATH, headers=_probe_headers(
            token, **WANT, **{"If-None-Match": headers["etag"]}))
        again = peek(headers[spec.TICKET_HEADER.lower()])
        assert status == 304 and again.ticket_id != first.ticket_id
        status, doc, _ = request("POST", c.url + spec.TICKETS_PATH,
                                 headers=_probe_headers(token))
        assert status == 200 and set(doc) == {"ticket", "ticket_id", "expires_at", "servers"}
        issued = peek(doc["ticket"])
        assert (doc["ticket_id"], doc["servers"]) == (issued.ticket_id, [origin(c.url)])
        assert doc["expires_at"].endswith(".000000Z")
        assert request("POST", c.url + spec.TICKETS_PATH)[0] == 401
        status, headers, body = _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=1000", doc["ticket"])
        assert (status, len(body)) == (200, 1000)
        assert _health(c)["tickets"] == 1
        key_file = tmp_path / "c" / keys.TICKET_KEY_FILE
        assert key_file.stat().st_mode & 0o777 == 0o600


def test_tickets_off_is_the_old_per_address_rule(tmp_path: Path) -> None:
    """tickets.enabled = false: no ticket issued (POST 404 saying why), a presented one
    is served as anonymous, nothing is reserved, and the per-address and busy refusals
    are exactly the old ones."""
    cfg = _config({"enabled": False}, max_concurrent=4, max_concurrent_per_client=2)
    with running_collector(tmp_path / "c", cfg) as c:
        token = c.add_probe("p1")
        status, doc, _ = request("POST", c.url + spec.TICKETS_PATH,
                                 headers=_probe_headers(token))
        assert (status, doc["error"]) == (404, "tickets are not issued here (tickets.enabled "
                                               "= false): measure without one")
        _, _, headers = request("GET", c.url + spec.INSTRUCTION_PATH,
                                headers=_probe_headers(token, **WANT))
        assert spec.TICKET_HEADER.lower() not in headers
        status, headers, _ = _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", "not-a-ticket")
        assert status == 200 and spec.TICKET_REFUSED_HEADER.lower() not in headers
        assert _health(c)["reserved_for_tickets"] == 0
        held = [("127.0.0.2", _held_upload(c.url, None))] * 2 + \
            [("127.0.0.3", _held_upload(c.url, "not-a-ticket"))] * 2
        with _holding(c.url, held):
            _until_running(c, 0, 4)
            status, _, body = _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", source="127.0.0.2")
            assert (status, json.loads(body)["error"]) == (
                429, "too many transfers from 127.0.0.2: 2 running (limit 2 per client)")
            status, _, body = _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", source="127.0.0.4")
            assert (status, json.loads(body)["error"]) == (
                503, "server busy: 4 transfers already running")


def test_a_measurement_only_server_verifies_without_a_database(tmp_path: Path) -> None:
    """A `serve --role measurement` process trusting the collector's public key (from
    `tickets key --out`) admits the collector's tickets and refuses every bad one with its
    code; a second one answering to another origin refuses the ticket as wrong_server;
    no ticket at all is the per-address rule; it never opens a database."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ms = f"http://127.0.0.1:{port}"
    with running_collector(tmp_path / "c", _config({"servers": (ms,)})) as c:
        pem = tmp_path / "collector-tickets.pem"
        result = CliRunner().invoke(main, ["--db", str(c.db_path), "tickets", "key",
                                           "--out", str(pem)], catch_exceptions=False)
        assert result.exit_code == 0
        kid = keys.thumbprint(keys.load_public(pem, "pem"))
        assert result.stdout.splitlines()[-1] == f"kid {kid}"
        assert json.loads(result.stdout.splitlines()[-2])["kid"] == kid
        config = tmp_path / "ms.toml"
        config.write_text(
            f'[server]\nrole = "measurement"\nhost = "127.0.0.1"\nport = {port}\n'
            f'[storage]\npath = "{tmp_path / "nodb" / "never.sqlite3"}"\n'
            f'[tickets]\ntrusted_keys = ["{pem}"]\naudience = ["{ms}/"]\n')
        probe = c.add_probe("p1")
        _, doc, _ = request("POST", c.url + spec.TICKETS_PATH, headers=_probe_headers(probe))
        ticket = doc["ticket"]
        assert doc["servers"] == [ms, origin(c.url)]
        private = _private(c)
        assert keys.thumbprint(private.public_key()) == kid
        stranger = Ed25519PrivateKey.generate()
        header, payload, signature = ticket.split(".")
        claims = json.loads(jwt.utils.base64url_decode(payload))
        claims["bbprobe"]["bytes"] *= 10
        tampered = ".".join((header, jwt.utils.base64url_encode(
            json.dumps(claims).encode()).decode(), signature))
        foreign = jwt.encode({**claims, "iss": "another-collector"}, private,
                             algorithm="EdDSA", headers={"kid": kid})
        bad = {
            "unknown_key": _sign(stranger, (ms,)),
            "bad_signature": tickets.issue(stranger, kid, "p1", (ms,), POLICY, time.time()),
            "expired": _sign(private, (ms,), now=time.time() - 1200 - 120),
            "not_yet_valid": _sign(private, (ms,), now=time.time() + 3600),
            "wrong_server": _sign(private, ("http://127.0.0.1:9",)),
            "wrong_issuer": foreign,
            "malformed": "eyJhbGciOiJFZERTQSJ9.e30",
        }
        with serve_process(config) as (url, _server):
            assert url == ms
            status, _, body = _ask(ms, spec.DOWNLOAD_PATH + "?bytes=1000", ticket)
            assert (status, len(body)) == (200, 1000)
            for code, token in bad.items():
                assert _refusal(ms, token) == (403, code, code), code
            assert _refusal(ms, tampered) == (403, "bad_signature", "bad_signature")
            assert _ask(ms, spec.DOWNLOAD_PATH + "?bytes=10")[0] == 200  # an older agent
            status, _, body = _ask(ms, spec.ECHO_PATH + "?capacity=1", bad["expired"])
            assert (status, json.loads(body)["code"]) == (403, "expired")
            other = replace(load(config), server=replace(load(config).server, port=0),
                            tickets=replace(load(config).tickets,
                                            audience=("http://elsewhere.example:8080",)))
            with serve_in_thread(lambda: app_mod.start(other, role="measurement")) as second:
                assert _refusal(second, ticket) == (403, "wrong_server", "wrong_server")
        assert not (tmp_path / "nodb").exists()
        # The collector admits its own ticket too (it is named in it, by request origin).
        assert _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", ticket)[0] == 200


def test_a_measurement_server_trusting_no_key_serves_tickets_as_anonymous(
        tmp_path: Path) -> None:
    """No trusted key: a presented ticket is ignored (as by an older server), not
    refused, and no slot is reserved."""
    cfg = replace(_config(max_concurrent=2), storage=replace(
        CollectorConfig().storage, path=str(tmp_path / "nodb" / "x.sqlite3")))
    with serve_in_thread(lambda: app_mod.start(cfg, role="measurement")) as url:
        status, headers, _ = _ask(url, spec.DOWNLOAD_PATH + "?bytes=10", "junk")
        assert status == 200 and spec.TICKET_REFUSED_HEADER.lower() not in headers
        held = [("127.0.0.2", _held_upload(url, None)), ("127.0.0.3", _held_upload(url, None))]
        with _holding(url, held):
            deadline = time.monotonic() + 30
            while _ask(url, spec.ECHO_PATH + "?capacity=1", source="127.0.0.4")[0] == 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # Both slots went to strangers: none was kept for tickets.
            status, _, body = _ask(url, spec.DOWNLOAD_PATH + "?bytes=10", source="127.0.0.4")
            assert (status, json.loads(body)["error"]) == (
                503, "server busy: 2 transfers already running")
    assert not (tmp_path / "nodb").exists()


def test_allowances_are_counted_per_ticket(tmp_path: Path) -> None:
    """A ticket used past its bytes, its busy seconds or its streams is refused: 403
    with allowance_bytes / allowance_duration, 429 naming its streams; the refusals are
    counted by reason in the metrics."""
    with running_collector(tmp_path / "c", _config()) as c:
        key, here = _private(c), (origin(c.url),)
        small = _sign(key, here, replace(POLICY, bytes=3000))
        for _ in range(2):
            assert _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=1000", small)[0] == 200
        status, headers, body = _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=2000", small)
        assert (status, headers[spec.TICKET_REFUSED_HEADER.lower()],
                json.loads(body)["error"]) == (403, "allowance_bytes", "ticket refused "
                                               "(allowance_bytes): 2000 bytes asked; the "
                                               "ticket has 1000 left")
        status, headers, body = _ask(c.url, spec.DOWNLOAD_PATH + "?duration_s=5", small)
        assert (status, headers["content-length"], len(body)) == (200, "1000", 1000)
        assert _refusal(c.url, small) == (403, "allowance_bytes", "allowance_bytes")
        # LibreSpeed's download is metered too: 3 MiB left, 3 chunks of 1 MiB.
        mib = _sign(key, here, replace(POLICY, bytes=3 * 1024 * 1024))
        status, headers, _ = _ask(c.url, "/backend/garbage.php?ckSize=8", mib)
        assert (status, headers["content-length"]) == (200, str(3 * 1024 * 1024))

        brief = _sign(key, here, replace(POLICY, duration_s=1.0))
        with _holding(c.url, [("127.0.0.1", _held_upload(c.url, brief))]) as (held,):
            answer = _status_line(held)  # cut at the ticket's one second, not at 60 s
        # The ticket's time, not the upload's failure: a ticket refusal, not a 413.
        assert answer.startswith(b"HTTP/1.1 403") and \
            f"{spec.TICKET_REFUSED_HEADER}: allowance_duration".encode() in answer
        assert b"stopped after 1.0 s: the ticket's 1 s of measuring are used" in answer
        assert _refusal(c.url, brief) == (403, "allowance_duration", "allowance_duration")
        assert _refusal(c.url, brief, spec.ECHO_PATH + "?capacity=1") == (
            403, "allowance_duration", "allowance_duration")

        pair = _sign(key, here, replace(POLICY, streams=2))
        with _holding(c.url, [("127.0.0.1", _held_upload(c.url, pair))] * 2):
            _until_running(c, 2, 0)
            status, headers, body = _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", pair)
            assert (status, headers["retry-after"]) == (429, "5")
            assert headers[spec.REFUSED_HEADER.lower()] == "ticket_streams"
            assert json.loads(body)["error"] == (f"ticket {peek(pair).ticket_id} already "
                                                 "runs 2 transfers (its allowance: 2 at "
                                                 "once)")
            status, headers, _ = _ask(c.url, spec.ECHO_PATH + "?capacity=1", pair)
            assert (status, headers[spec.REFUSED_HEADER.lower()]) == (429, "ticket_streams")
            assert _ask(c.url, spec.ECHO_PATH + "?capacity=1")[0] == 200  # the address
        _, metrics, _ = request("GET", c.url + "/metrics", raw=True)
        text = metrics.decode()
        # Capacity asks are not transfers: their refusals are not counted.
        for reason, times in (("allowance_bytes", 2), ("allowance_duration", 2),
                              ("ticket_streams", 1), ("expired", 0)):
            assert (f'bbprobe_collector_measurement_transfers_refused_total{{reason="{reason}"}}'
                    f" {times:.1f}") in text, reason
        assert "bbprobe_collector_measurement_transfers_ticketed 0.0" in text


def _metric(c: RunningCollector, name: str, **labels: str) -> float:
    _, metrics, _ = request("GET", c.url + "/metrics", raw=True)
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                     if labels else "")
    for line in metrics.decode().splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {wanted}")


def test_tickets_with_the_instruction_are_within_the_probe_rate(tmp_path: Path) -> None:
    """Each instruction fetch asking for a ticket mints one: it takes one of the probe's
    requests from its rate limit. Beyond it the instruction still comes, without a
    ticket; POST /api/v1/tickets is refused alike; fetches not asking are not counted."""
    base = _config()
    cfg = replace(base, server=replace(base.server, probe_requests_per_min=1.0,
                                       probe_burst=3))
    with running_collector(tmp_path / "c", cfg) as c:
        token = c.add_probe("p1")
        got = []
        for _ in range(5):
            status, _, headers = request("GET", c.url + spec.INSTRUCTION_PATH,
                                         headers=_probe_headers(token, **WANT))
            assert status == 200
            got.append(spec.TICKET_HEADER.lower() in headers)
        assert got == [True, True, True, False, False]
        assert request("GET", c.url + spec.INSTRUCTION_PATH,
                       headers=_probe_headers(token))[0] == 200
        status, _, headers = request("POST", c.url + spec.TICKETS_PATH,
                                     headers=_probe_headers(token))
        assert status == 429 and "retry-after" in headers
        assert _metric(c, "bbprobe_collector_rate_limited_total", limiter="probe") == 3


def test_one_probe_cannot_take_the_ledger_or_the_reserve(tmp_path: Path) -> None:
    """However many tickets one probe's credential has minted, a server keeps 8 of them
    in use (the 9th: 403 too_many_tickets) and runs at most one ticket's streams for all
    of them together (429 ticket_streams, marked); other probes are not affected."""
    with running_collector(tmp_path / "c", _config()) as c:
        key, here = _private(c), (origin(c.url),)
        minted = [_sign(key, here) for _ in range(9)]
        for ticket in minted[:8]:
            assert _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", ticket)[0] == 200
        status, headers, body = _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", minted[8])
        assert (status, headers[spec.TICKET_REFUSED_HEADER.lower()],
                json.loads(body)["error"]) == (
            403, "too_many_tickets", "ticket refused (too_many_tickets): probe p1 already "
            "has 8 tickets in use here (at most 8): measure with one of them")
        assert _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", minted[0])[0] == 200
        assert _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", _sign(key, here, probe="p2")
                    )[0] == 200
        pair = [_sign(key, here, replace(POLICY, streams=2), probe="p3") for _ in range(2)]
        with _holding(c.url, [("127.0.0.1", _held_upload(c.url, pair[0]))] * 2):
            _until_running(c, 2, 0)
            status, headers, body = _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", pair[1])
            assert (status, headers[spec.REFUSED_HEADER.lower()],
                    json.loads(body)["error"]) == (
                429, "ticket_streams", "probe p3's tickets already run 2 transfers (a "
                "ticket's allowance: 2 at once)")
        assert _metric(c, "bbprobe_collector_measurement_transfers_refused_total",
                       reason="too_many_tickets") == 1


def test_a_ticket_with_less_left_is_refused_before_the_transfer(tmp_path: Path) -> None:
    """A transfer asking for more seconds or bytes than its ticket has left is refused
    at once (403 and the allowance code), not started and cut short (which the agent
    would record as the line's failure); ndt7 asks for its subtest's 10 s."""
    with running_collector(tmp_path / "c", _config()) as c:
        key, here = _private(c), (origin(c.url),)
        short = _sign(key, here, replace(POLICY, duration_s=2.0, bytes=1000))
        status, headers, body = _ask(c.url, spec.DOWNLOAD_PATH + "?duration_s=5", short)
        assert (status, headers[spec.TICKET_REFUSED_HEADER.lower()],
                json.loads(body)["error"]) == (
            403, "allowance_duration", "ticket refused (allowance_duration): 5 s asked; "
            "the ticket has 2.0 s left")
        status, headers, body = _ask(c.url, spec.UPLOAD_PATH + "?bytes=2000", short,
                                     method="POST")
        assert (status, headers[spec.TICKET_REFUSED_HEADER.lower()],
                json.loads(body)["error"]) == (
            403, "allowance_bytes", "ticket refused (allowance_bytes): 2000 bytes asked; "
            "the ticket has 1000 left")
        status, _, body = _ask(c.url, spec.DOWNLOAD_PATH + "?duration_s=0.2", short)
        assert status == 200 and 0 < len(body) <= 1000
        status, headers, _ = _ask(c.url, "/ndt/v7/download", _sign(
            key, here, replace(POLICY, duration_s=5.0)), headers=NDT7_UPGRADE)
        assert (status, headers[spec.TICKET_REFUSED_HEADER.lower()]) == (
            403, "allowance_duration")


def test_a_host_header_does_not_make_this_server_another(tmp_path: Path) -> None:
    """A lone collector takes its audience from the Host header. A ticket it issued for
    another server (tickets.servers), replayed here with that server's name in Host, is
    wrong_server; and a probe sending that Host gets no ticket naming it as this one.
    (config.py refuses such a config unless tickets.audience is set: this is the second
    line of defence, for configs built in code.)"""
    ms = "http://ms.example:8080"
    with running_collector(tmp_path / "c", _config({"servers": (ms,)})) as c:
        key = _private(c)
        replayed = _sign(key, (ms,))
        status, headers, _ = _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", replayed,
                                  headers={"Host": "ms.example:8080"})
        assert (status, headers[spec.TICKET_REFUSED_HEADER.lower()]) == (403,
                                                                         "wrong_server")
        token = c.add_probe("p1")
        status, _, headers = request("GET", c.url + spec.INSTRUCTION_PATH, headers=_probe_headers(
            token, **WANT, Host="ms.example:8080"))
        assert peek(headers[spec.TICKET_HEADER.lower()]).servers == (ms,)
        assert _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", _sign(key, (ms, origin(c.url)))
                    )[0] == 200


def test_capacity_asks_are_bounded_per_address_and_not_refusals(tmp_path: Path) -> None:
    """echo?capacity=1 answers a refusal without counting it as a refused transfer; one
    address may ask 20 at once and a few a second after that (429, marked), each
    forged ticket otherwise costing a signature check; another address is not affected."""
    with running_collector(tmp_path / "c", _config()) as c:
        forged = _sign(Ed25519PrivateKey.generate(), (origin(c.url),))
        statuses = [_ask(c.url, spec.ECHO_PATH + "?capacity=1", forged)[0] for _ in range(20)]
        assert statuses == [403] * 20
        status, headers, body = _ask(c.url, spec.ECHO_PATH + "?capacity=1", forged)
        assert (status, headers[spec.REFUSED_HEADER.lower()]) == (429, "per_client")
        assert json.loads(body)["error"].startswith("too many capacity asks from 127.0.0.1")
        assert _ask(c.url, spec.ECHO_PATH)[0] == 200  # a plain echo is not an ask
        assert _ask(c.url, spec.ECHO_PATH + "?capacity=1", source="127.0.0.2")[0] == 200
        assert _metric(c, "bbprobe_collector_measurement_transfers_refused_total",
                       reason="unknown_key") == 0
        assert _metric(c, "bbprobe_collector_rate_limited_total", limiter="capacity") == 1


def test_probes_behind_one_address(tmp_path: Path) -> None:
    """From 127.0.0.1 with 20 slots per client: 25 ticketed transfers (three probes'
    tickets) all run, while anonymous ones from the same address still get their 20 and
    no more, refused with the old message."""
    with running_collector(tmp_path / "c", _config()) as c:
        key, here = _private(c), (origin(c.url),)
        probes = [_sign(key, here, probe=f"p{i}") for i in range(3)]
        ticketed = [("127.0.0.1", _held_upload(c.url, probes[i % 3])) for i in range(25)]
        anonymous = [("127.0.0.1", _held_upload(c.url, None))] * 20
        with _holding(c.url, ticketed + anonymous):
            _until_running(c, 25, 20)
            status, _, body = _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10")
            assert (status, json.loads(body)["error"]) == (
                429, "too many transfers from 127.0.0.1: 20 running (limit 20 per client)")
            assert _health(c)["clients"] == 1


def test_strangers_cannot_take_the_reserve(tmp_path: Path) -> None:
    """8 slots, half kept for tickets: strangers from four addresses take their four,
    the next stranger gets 503 (also from echo?capacity=1), a ticketed probe still
    measures; with the reserve full too, the ticket gets the plain busy refusal."""
    with running_collector(tmp_path / "c", _config(max_concurrent=8)) as c:
        key, here = _private(c), (origin(c.url),)
        ticket = _sign(key, here)
        strangers = [(f"127.0.0.{n}", _held_upload(c.url, None)) for n in range(2, 6)]
        with _holding(c.url, strangers):
            _until_running(c, 0, 4)
            status, _, body = _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", source="127.0.0.6")
            assert (status, json.loads(body)["error"]) == (
                503, "server busy: 4 transfers without a ticket already running (4 of 8 "
                     "slots are kept for ticketed probes)")
            assert _ask(c.url, spec.ECHO_PATH + "?capacity=1", source="127.0.0.6")[0] == 503
            assert _ask(c.url, spec.ECHO_PATH + "?capacity=1", ticket, "127.0.0.6")[0] == 200
            assert _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", ticket, "127.0.0.6")[0] == 200
            with _holding(c.url, [("127.0.0.6", _held_upload(c.url, ticket))] * 4):
                _until_running(c, 4, 4)
                status, _, body = _ask(c.url, spec.DOWNLOAD_PATH + "?bytes=10", ticket)
                assert (status, json.loads(body)["error"]) == (
                    503, "server busy: 8 transfers already running")
        assert _ask(c.url, spec.ECHO_PATH)[0] == 200  # without the query, as before


def test_ndt7_reads_the_ticket_too(tmp_path: Path) -> None:
    """An ndt7 upgrade presenting a forged ticket is refused before the WebSocket."""
    with running_collector(tmp_path / "c", _config()) as c:
        forged = _sign(Ed25519PrivateKey.generate(), (origin(c.url),))
        status, _, _ = _ask(c.url, "/ndt/v7/download", forged)
        assert status == 400  # no subprotocol: refused before the ticket is read
        status, headers, _ = _ask(c.url, "/ndt/v7/download", forged, headers=NDT7_UPGRADE)
        assert (status, headers[spec.TICKET_REFUSED_HEADER.lower()]) == (403, "unknown_key")


def test_cli_issues_a_ticket(tmp_path: Path) -> None:
    """`tickets issue` prints a ticket the collector's key verifies, for the servers
    given; without any server to name it says so."""
    db = str(tmp_path / "c.sqlite3")
    result = CliRunner().invoke(main, ["--db", db, "tickets", "issue", "--probe", "p9",
                                       "--server", "https://ms.example/x"],
                                catch_exceptions=False)
    assert result.exit_code == 0
    private = keys.load_private(tmp_path / keys.TICKET_KEY_FILE, "key")
    verifier = tickets.Verifier({keys.thumbprint(private.public_key()): private.public_key()},
                                ("https://ms.example:443",))
    claims = verifier.verify(result.stdout.strip(), None, time.time())
    assert (claims.probe, claims.servers) == ("p9", ("https://ms.example:443",))
    assert result.stderr.startswith(f"# ticket {claims.ticket_id} for p9, expires ")
    result = CliRunner().invoke(main, ["--db", db, "tickets", "issue", "--probe", "p9"])
    assert (result.exit_code, result.stderr) == (
        2, "bbprobe-collector: give --server URL: tickets.servers and tickets.audience "
           "are empty\n")


def test_check_config_reads_the_ticket_keys(tmp_path: Path) -> None:
    """check-config fails, in one line, on a trusted key file that holds no key."""
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    config = tmp_path / "ms.toml"
    config.write_text(f'[server]\nrole = "measurement"\n[tickets]\ntrusted_keys = ["{junk}"]\n'
                      'audience = ["https://ms.example"]\n')
    result = CliRunner().invoke(main, ["--config", str(config), "check-config"])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"bbprobe-collector: tickets.trusted_keys[0]: {str(junk)!r} "
                                    "is not a PEM public key (")
    assert result.stderr.count("\n") == 1


def test_check_config_wants_an_audience_where_host_could_lie(tmp_path: Path) -> None:
    """A server trusting another issuer's key, or a measuring collector naming other
    servers, must list its own URLs: one line naming tickets.audience."""
    pem = tmp_path / "issuer.pem"
    pem.write_text(keys.public_pem(Ed25519PrivateKey.generate().public_key()))
    config = tmp_path / "c.toml"
    for table, why in ((f'[server]\nrole = "measurement"\n[tickets]\n'
                        f'trusted_keys = ["{pem}"]\n', "tickets.trusted_keys is set"),
                       ('[tickets]\nservers = ["https://ms.example"]\n',
                        "tickets.servers is set")):
        config.write_text(table)
        result = CliRunner().invoke(main, ["--config", str(config), "check-config"])
        assert result.exit_code == 2
        assert result.stderr.startswith(f"bbprobe-collector: {config}: tickets.audience: "
                                        "must list this ")
        assert why in result.stderr and result.stderr.count("\n") == 1


def test_a_ticket_header_that_is_not_utf8_is_a_refusal_not_a_500(tmp_path: Path) -> None:
    """aiohttp hands header bytes that are not UTF-8 over as lone surrogates, which the
    JWT library cannot encode: found by the mangled-ticket property test
    (tests/collector/test_ticket_core.py). Now a 403 malformed, on a measurement
    endpoint and on the capacity ask alike."""
    with running_collector(tmp_path / "c", _config()) as c:
        host, port = c.url.split("//")[1].split(":")
        for path in (spec.DOWNLOAD_PATH + "?bytes=1000", spec.ECHO_PATH + "?capacity=1"):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
                          + b"Bbprobe-Ticket: a.\xff\xfe.b\r\nConnection: close\r\n\r\n")
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    head += chunk
            assert head.startswith(b"HTTP/1.1 403"), head[:200]
            assert b"bbprobe-ticket-refused: malformed" in head.lower(), head[:400]
