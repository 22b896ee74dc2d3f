"""Who may do what (reliability.md C5), TLS with optional client certificates, and slow
clients (C3). Real collector, real sockets, certificates made with openssl."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from collector.cli.main import main
from collector.config import CollectorConfig, ServerConfig
from collector.server.testing import RunningCollector, running_collector
from tests.factories import session_dict
from tests.httpclient import request

AUTH = replace(CollectorConfig(), server=replace(ServerConfig(), query_auth=True))


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[RunningCollector]:
    with running_collector(tmp_path, AUTH) as collector:
        yield collector


def _get(url: str, token: str | None = None, basic: str | None = None) -> tuple[int, object,
                                                                                 dict[str, str]]:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if basic is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(
            f"analyst:{basic}".encode()).decode()
    return request("GET", url, headers=headers)


QUERIES = ["/api/v1/results", "/api/v1/probes", "/api/v1/report", "/api/v1/samples",
           "/api/v1/gaps", "/api/v1/certificate?probe=p1", "/report", "/"]


@pytest.mark.parametrize("path", QUERIES)
def test_queries_need_an_analyst_token(guarded: RunningCollector, path: str) -> None:
    """No token: 401 with a Basic challenge (browsers ask); a probe token: 403; an
    analyst token, as Bearer or as Basic password: served."""
    probe_token = guarded.add_probe("p1")
    analyst = guarded.add_token("ana")
    status, body, headers = _get(guarded.url + path)
    assert status == 401 and headers["www-authenticate"].startswith("Basic realm=")
    status, body, _ = _get(guarded.url + path, probe_token)
    assert status == 403 and "probe token can only send its results" in body["error"]  # type: ignore[index]
    assert _get(guarded.url + path, analyst)[0] == 200
    assert _get(guarded.url + path, basic=analyst)[0] == 200


def test_public_routes_stay_open(guarded: RunningCollector) -> None:
    """With query authentication on, the health check, the OpenAPI document and the measurement
    endpoints (bbprobe's and LibreSpeed's) still answer without a token."""
    for path in ("/healthz", "/api/v1/openapi.json", "/measure/v1/echo",
                 "/measure/v1/download?bytes=1000", "/backend/empty.php", "/getIP",
                 "/garbage.php?ckSize=1"):
        assert _get(guarded.url + path)[0] == 200, path


def test_admin_registers_and_revokes_probes_revocation_is_immediate(
        guarded: RunningCollector) -> None:
    """Only an admin token registers a probe (its token returned once) or revokes one;
    a revoked probe's next post is refused; a revoked analyst token reads nothing."""
    admin = guarded.add_token("boss", "admin")
    analyst = guarded.add_token("ana")
    doc = {"probe_id": "roma-1", "operator": "BT Italia", "download_min_kbps": 2200}
    body = json.dumps(doc).encode()
    status, reply, _ = request("POST", guarded.url + "/api/v1/probes", body,
                               {"Authorization": f"Bearer {analyst}",
                                "Content-Type": "application/json"})
    assert status == 403
    status, reply, _ = request("POST", guarded.url + "/api/v1/probes", body,
                               {"Authorization": f"Bearer {admin}",
                                "Content-Type": "application/json"})
    assert status == 201
    probe_token = reply["token"]  # type: ignore[index]
    post = session_dict(probe_id="roma-1")
    headers = {"Authorization": f"Bearer {probe_token}", "Content-Type": "application/json"}
    assert request("POST", guarded.url + "/api/v1/results", json.dumps(post).encode(),
                   headers)[0] == 201
    status, _, _ = request("POST", guarded.url + "/api/v1/probes/roma-1/revoke", b"",
                           {"Authorization": f"Bearer {admin}"})
    assert status == 200
    status, reply, _ = request("POST", guarded.url + "/api/v1/results",
                               json.dumps(session_dict(probe_id="roma-1")).encode(), headers)
    assert (status, reply["error"]) == (401, "unknown or revoked token")  # type: ignore[index]
    result = CliRunner().invoke(main, ["--db", str(guarded.db_path), "token", "revoke", "ana"])
    assert result.exit_code == 0
    assert _get(guarded.url + "/api/v1/results", analyst)[0] == 401
    listing = CliRunner().invoke(main, ["--db", str(guarded.db_path), "token", "list"])
    assert "ana  analyst  (revoked" in listing.output and "boss  admin  (active" in listing.output


def test_tokens_are_stored_as_digests(guarded: RunningCollector) -> None:
    """An analyst token's clear text is in neither the SQLite file nor its WAL (only its digest
    is stored)."""
    secret = guarded.add_token("ana")
    raw = guarded.db_path.read_bytes()
    wal = Path(str(guarded.db_path) + "-wal")
    if wal.exists():
        raw += wal.read_bytes()
    assert secret.encode() not in raw


# --- TLS ---------------------------------------------------------------------------------


def _tls_post(url: str, pki: Path, doc: object, token: str | None,
              cert: str | None) -> tuple[int, object]:
    import http.client
    from urllib.parse import urlsplit

    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert is not None:
        context.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    parts = urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=context,
                                       timeout=30)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", "/api/v1/results", json.dumps(doc).encode(), headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_tls_with_client_certificates(tmp_path: Path, pki: Path) -> None:
    """HTTPS from the configured certificate; a probe's verified client certificate
    authenticates it without a token; a certificate for no probe is 401; a token of
    another probe next to the certificate is 403; a plain token still works."""
    cfg = replace(AUTH, server=replace(
        AUTH.server, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
        client_cert="optional", client_ca=str(pki / "ca.pem")))
    with running_collector(tmp_path / "c", cfg) as collector:
        assert collector.url.startswith("https://127.0.0.1:")
        p1 = collector.add_probe("p1")
        p2 = collector.add_probe("p2")
        assert _tls_post(collector.url, pki, session_dict(probe_id="p1"), None, "p1")[0] == 201
        status, body = _tls_post(collector.url, pki, session_dict(probe_id="p1"), None,
                                 "nobody")
        assert (status, body["error"]) == (  # type: ignore[index]
            401, "client certificate names no active probe ('nobody')")
        status, body = _tls_post(collector.url, pki, session_dict(probe_id="p1"), p2, "p1")
        assert status == 403
        assert _tls_post(collector.url, pki, session_dict(probe_id="p2"), p2, None)[0] == 201
        assert _tls_post(collector.url, pki, session_dict(probe_id="p1"), p1, None)[0] == 201
        # The agent's own client: trusts the test CA, identifies by certificate alone.
        import asyncio

        from agent.client import CollectorClient

        agent = CollectorClient(collector.url, "", 10, ca_file=str(pki / "ca.pem"),
                                client_cert=str(pki / "p1.pem"),
                                client_key=str(pki / "p1.key"))
        assert asyncio.run(agent.whoami()) == "p1"
        assert asyncio.run(agent.push(json.dumps(session_dict(probe_id="p1")).encode()))

        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(collector.url)
        stranger = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=30,
                                               context=ssl.create_default_context())
        with pytest.raises(ssl.SSLCertVerificationError):  # our CA is not the system's
            stranger.request("GET", "/healthz")
        stranger.close()


def test_bad_tls_config_is_named(tmp_path: Path) -> None:
    """A TLS certificate without its key, or client certificates required without TLS, is
    refused at config load naming the keys."""
    from collector.config import parse
    from collector.errors import ConfigError

    with pytest.raises(ConfigError, match=r"server\.tls_cert and server\.tls_key: give both"):
        parse({"server": {"tls_cert": "x.pem"}})
    with pytest.raises(ConfigError, match=r"server\.client_cert = .required. needs"):
        parse({"server": {"client_cert": "required"}})


# --- slow clients ------------------------------------------------------------------------


def test_slow_clients_do_not_stop_ingestion(tmp_path: Path) -> None:
    """300 connections trickling request headers a byte at a time: meanwhile 30 results
    are all stored, and the server closes the slow connections after header_timeout_s."""
    cfg = replace(AUTH, server=replace(AUTH.server, header_timeout_s=1.0,
                                       probe_requests_per_min=0))
    with running_collector(tmp_path, cfg) as collector:
        token = collector.add_probe("p1")
        host, port = collector.url.removeprefix("http://").split(":")
        slow = []
        for _ in range(300):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"POST /api/v1/results HTTP/1.1\r\nHo")
            slow.append(s)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        codes = [request("POST", collector.url + "/api/v1/results",
                         json.dumps(session_dict(probe_id="p1")).encode(), headers)[0]
                 for _ in range(30)]
        assert codes == [201] * 30
        time.sleep(1.5)
        closed = 0
        for s in slow:
            try:
                s.sendall(b"s")
                s.settimeout(5)
                if s.recv(1) == b"":
                    closed += 1
            except OSError:
                closed += 1
            finally:
                s.close()
        assert closed == 300


def _basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"admin:{token}".encode()).decode()


@pytest.mark.parametrize(("headers", "body", "status", "error"), [
    # The finding: a cross-site form post, with the admin's cached Basic credentials.
    ({"Content-Type": "application/x-www-form-urlencoded", "Origin": "https://evil.example",
      "Sec-Fetch-Site": "cross-site"}, b"x=1", 401,
     "changes need 'Authorization: Bearer <token>' (a browser's Basic login is for "
     "reading pages only)"),
    ({"Origin": "https://evil.example"}, b"", 401, None),
    # Bearer, but what a browser marks as another site's, or from another origin.
    ({"bearer": True, "Sec-Fetch-Site": "cross-site"}, b"", 403,
     "cross-site request refused (Sec-Fetch-Site: cross-site)"),
])
def test_cross_site_requests_cannot_revoke(guarded: RunningCollector,
                                           headers: dict[str, Any], body: bytes, status: int,
                                           error: str | None) -> None:
    """Cross-site request forgery (a security review's finding): state-changing routes take Bearer
    only and refuse what the browser marks cross-site; the probe stays active."""
    admin = guarded.add_token("boss", "admin")
    guarded.add_probe("roma-1")
    sent = {k: v for k, v in headers.items() if k != "bearer"}
    sent["Authorization"] = f"Bearer {admin}" if headers.get("bearer") else _basic(admin)
    got, reply, _ = request("POST", guarded.url + "/api/v1/probes/roma-1/revoke", body, sent)
    assert got == status, reply
    if error is not None:
        assert reply["error"] == error  # type: ignore[index]
    listing = CliRunner().invoke(main, ["--db", str(guarded.db_path), "probe", "list"])
    assert "roma-1" in listing.output and "revoked" not in listing.output


def test_a_text_plain_body_cannot_register_a_probe(guarded: RunningCollector) -> None:
    """A JSON body sent as text/plain (what a cross-site form can send without a CORS
    preflight) is refused with 415, even with a Bearer token; application/json works."""
    admin = guarded.add_token("boss", "admin")
    body = json.dumps({"probe_id": "roma-2"}).encode()
    got, reply, _ = request("POST", guarded.url + "/api/v1/probes", body,
                            {"Authorization": f"Bearer {admin}", "Content-Type": "text/plain"})
    assert (got, reply["error"]) == (  # type: ignore[index]
        415, "expected Content-Type: application/json, got 'text/plain'")
    got, _, _ = request("POST", guarded.url + "/api/v1/probes", body,
                        {"Authorization": f"Bearer {admin}",
                         "Content-Type": "application/json", "Origin": guarded.url})
    assert got == 201  # a same-origin page with a Bearer token may


@pytest.mark.parametrize("path", ["/api/v1/results", "/api/v1/whoami", "/report"])
def test_a_token_of_raw_bytes_is_a_401_not_a_5xx(guarded: RunningCollector,
                                                  path: str) -> None:
    """An Authorization header of bytes that are not text (anyone may send one) is no
    token: 401, never a 500 from hashing what cannot be encoded."""
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                  b"Authorization: Bearer \xff\xfe\x80abc\r\nConnection: close\r\n\r\n")
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    assert head.split(b" ", 2)[1] == b"401", head[:200]
