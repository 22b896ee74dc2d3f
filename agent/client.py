"""The collector's API as the probe calls it: ``CollectorClient``, one per collector and
token, each method one HTTP request, its reply a value or a ``DeliveryError`` that says
whether a retry may succeed (5xx, 408, 425, 429 and network errors) and how long the
collector asks to wait (Retry-After, RFC 9110 §10.2.3). What to send, in what order and
how often to try is agent/delivery.py's.

Every request carries the probe's wall clock (X-Bbprobe-Sent-At), so the collector can
measure the probe's skew, and result bodies go compressed (zstd or gzip) until a
collector refuses the encoding.
"""

from __future__ import annotations

import gzip
import json
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import zstandard

from agent import jose, neterrors, spec
from agent.errors import ConfigError, DeliveryError
from agent.identity import identity_for
from agent.schema import utc_now

RETRYABLE_STATUS = frozenset({408, 425, 429})
# Public on every bbprobe server, collector or measurement-only (collector/web/
# public_routes.py): that the process answers, and nothing else.
LIVENESS_PATH = "/healthz"
# `bbprobe check` waits no longer for it: a server that takes longer to answer one small
# GET would fail a measurement's transfers anyway (wire.CONNECT_TIMEOUT_S is 10 s).
LIVENESS_TIMEOUT_S = 5.0
BATCH_PATH = spec.RESULTS_PATH + "/batch"
GAPS_PATH = "/api/v1/gaps"
# Where the probe enrols its public key (trust on first use; agent/probekey.py).
KEY_PATH = "/api/v1/probe/key"


def compress(data: bytes, encoding: str) -> bytes:
    """A request body in a Content-Encoding the collector inflates (zstd or gzip)."""
    if encoding == "zstd":
        return bytes(zstandard.ZstdCompressor(level=3).compress(data))
    if encoding == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    raise ValueError(f"unknown encoding {encoding!r}")


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date, RFC 9110
    §10.2.3); None when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit() and len(text) <= 9:
        return float(text)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - now).total_seconds())


def connection_problem(exc: BaseException, timeout_s: float | None = None) -> str:
    """An aiohttp or socket failure in a few words: "connection refused" (the errno's
    text, agent/neterrors.py) rather than aiohttp's "Cannot connect to host H:P
    ssl:default [Connect call failed ...]", which names TLS for a plain http URL too."""
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return f"no answer within {timeout_s:g} s" if timeout_s else "timed out"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"the certificate of {exc.host}:{exc.port} is not trusted: " \
               f"{exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return neterrors.describe(exc.os_error)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without a reply"
    if isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError):
        return neterrors.describe(exc)
    return str(exc) or type(exc).__name__


async def server_answers(url: str, timeout_s: float = LIVENESS_TIMEOUT_S) -> str | None:
    """Whether the bbprobe server at ``url`` (a collector or a measurement-only server)
    answers its public liveness route (GET /healthz, no token) within ``timeout_s``:
    None when it does, else what went wrong, in a few words."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, \
                session.get(url.rstrip("/") + LIVENESS_PATH,
                            headers={"User-Agent": "bbprobe-agent"}) as resp:
            await resp.read()
            if resp.status != 200:
                return f"GET {LIVENESS_PATH} answered HTTP {resp.status}: not a bbprobe " \
                       "server, or one behind a proxy that refuses it"
    except (aiohttp.ClientError, OSError) as exc:
        return connection_problem(exc, timeout_s)
    return None


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    result_id: str
    status: int
    error: str | None


def match_outcomes(sent: Sequence[str], reply: Any) -> list[ItemOutcome]:
    """The collector's batch reply as one outcome per sent result id, in ``sent`` order,
    matched by ``result_id`` (never by position). Raises a retryable ``DeliveryError``
    unless the reply lists each sent id exactly once and nothing else: then nothing is
    deleted and the batch goes again later. Pure."""
    items = reply.get("items") if isinstance(reply, dict) else None
    if not isinstance(items, list):
        raise DeliveryError("collector's batch reply has no list of items", retryable=True)
    by_id: dict[str, ItemOutcome] = {}
    for item in items:
        rid = item.get("result_id") if isinstance(item, dict) else None
        status = item.get("status") if isinstance(item, dict) else None
        if not isinstance(rid, str) or isinstance(status, bool) or not isinstance(status, int):
            raise DeliveryError("collector's batch reply has an item without a result_id "
                                "and status", retryable=True)
        if rid in by_id:
            raise DeliveryError(f"collector's batch reply lists result {rid} twice",
                                retryable=True)
        error = item.get("error")
        by_id[rid] = ItemOutcome(rid, status, error if isinstance(error, str) else None)
    missing = [rid for rid in sent if rid not in by_id]
    extra = sorted(set(by_id) - set(sent))
    if missing or extra or len(items) != len(sent):
        raise DeliveryError(
            f"collector's batch reply does not match the {len(sent)} result(s) sent ("
            f"{len(missing)} missing, {len(extra)} not sent); kept for a later retry",
            retryable=True)
    return [by_id[rid] for rid in sent]


def _error_message(status: int, body: bytes) -> str:
    try:
        data: Any = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return f"HTTP {status}: {data['error']}"
    except ValueError:
        pass
    return f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"


def _error_field(body: bytes) -> str | None:
    """The document field a collector's refusal names, if any."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        return None
    field = data.get("field") if isinstance(data, dict) else None
    return field if isinstance(field, str) and field else None


# An RFC 7638 SHA-256 thumbprint: 43 base64url characters.
_KID_RE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")


def _kid_in(reply: Any, sent: str | None = None) -> str | None:
    """The kid a key reply names: its ``bound_kid`` or ``kid`` member, else the one
    thumbprint its ``error`` text holds other than ``sent`` (the key sent)."""
    if not isinstance(reply, dict):
        return None
    for name in ("bound_kid", "kid"):
        kid = reply.get(name)
        if isinstance(kid, str) and _KID_RE.fullmatch(kid):
            return kid
    error = reply.get("error")
    found = {k for k in _KID_RE.findall(error) if k != sent} \
        if isinstance(error, str) else set()
    return found.pop() if len(found) == 1 else None


class CollectorClient:
    """Talks to the collector's API with the probe's bearer token. Every request carries
    the probe's wall clock (X-Bbprobe-Sent-At) so the collector can measure skew."""

    def __init__(self, url: str, token: str, timeout_s: float = spec.PUSH_TIMEOUT_S, *,
                 ca_file: str = "", client_cert: str = "", client_key: str = "",
                 compression: str = "none") -> None:
        self.url = url.rstrip("/")
        self.token = token
        # What this client delivers: only what was spooled for the same token (or, with
        # none, the same client certificate, read here: ConfigError if it cannot be).
        self.identity = identity_for(url, token, client_cert)
        # Bodies are sent with this Content-Encoding until a collector refuses it.
        self.compression = compression
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.ssl: ssl.SSLContext | bool = True
        if ca_file or client_cert:
            try:
                context = ssl.create_default_context(cafile=ca_file or None)
                if client_cert:
                    context.load_cert_chain(client_cert, client_key or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"collector TLS: cannot load CA, certificate or key: "
                                  f"{exc}") from None
            if client_cert and not token and \
                    identity_for(url, token, client_cert) != self.identity:
                # Replaced between the two reads: which certificate TLS would present
                # cannot be told, so neither may say whose spooled results these are.
                raise ConfigError(f"collector.client_cert: {client_cert} changed while it "
                                  "was being loaded; try again")
            self.ssl = context

    def _session(self) -> aiohttp.ClientSession:
        headers = {"User-Agent": "bbprobe-agent"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return aiohttp.ClientSession(
            timeout=self.timeout, trust_env=False, headers=headers,
            connector=aiohttp.TCPConnector(ssl=self.ssl),
        )

    async def _request(self, method: str, path: str, data: bytes | None = None) -> Any:
        encoding = self.compression if data is not None else "none"
        try:
            return await self._send(method, path, data, encoding)
        except DeliveryError as exc:
            if exc.status != 415 or encoding == "none":
                raise
        # A collector that inflates no request body (415, RFC 9110 §15.5.16) takes plain
        # JSON only: from now on, send that.
        self.compression = "none"
        return await self._send(method, path, data, "none")

    async def _send(self, method: str, path: str, data: bytes | None, encoding: str,
                    extra: Mapping[str, str] | None = None, *, full: bool = False,
                    accept: frozenset[int] = frozenset()) -> Any:
        """The reply's JSON (None when empty); with ``full``, (status, headers, JSON).
        A status in ``accept`` is a reply, not a DeliveryError (its JSON body, or None
        when it is not JSON)."""
        headers = {"X-Bbprobe-Sent-At": utc_now(), **(extra or {})}
        if data is not None:
            headers["Content-Type"] = "application/json"
            if encoding != "none":
                data = compress(data, encoding)
                headers["Content-Encoding"] = encoding
        try:
            async with self._session() as session, session.request(
                method, self.url + path, data=data, headers=headers
            ) as resp:
                body = await resp.read()
                if resp.status in accept and resp.status >= 400:
                    try:
                        parsed = json.loads(body) if body else None
                    except ValueError:
                        parsed = None
                    return (resp.status, resp.headers, parsed) if full else parsed
                if resp.status >= 400:
                    retryable = resp.status >= 500 or resp.status in RETRYABLE_STATUS
                    raise DeliveryError(
                        _error_message(resp.status, body), retryable=retryable,
                        status=resp.status, field=_error_field(body),
                        retry_after_s=parse_retry_after(resp.headers.get("Retry-After"),
                                                        datetime.now(UTC)),
                    )
                parsed = json.loads(body) if body else None
                return (resp.status, resp.headers, parsed) if full else parsed
        except (aiohttp.ClientError, OSError) as exc:
            raise DeliveryError(f"cannot reach the collector at {self.url}: "
                                f"{connection_problem(exc, self.timeout.total)}",
                                retryable=True) from None
        except ValueError:
            raise DeliveryError("collector sent a reply that is not JSON", retryable=True) from None

    async def whoami(self) -> str:
        reply = await self._request("GET", spec.WHOAMI_PATH)
        if not isinstance(reply, dict) or not isinstance(reply.get("probe_id"), str):
            raise DeliveryError("collector's whoami reply has no probe_id", retryable=True)
        return str(reply["probe_id"])

    async def push(self, body: bytes) -> bool:
        """Send one result; True if newly stored, False if the collector already had it."""
        reply = await self._request("POST", spec.RESULTS_PATH, body)
        return bool(isinstance(reply, dict) and reply.get("stored"))

    async def push_batch(self, results: Sequence[tuple[str, bytes]]) -> list[ItemOutcome]:
        """Send (result id, body) pairs in one request (one collector transaction); an
        outcome each, in the order given, matched by result id."""
        reply = await self._request(
            "POST", BATCH_PATH, b'{"results":[' + b",".join(b for _, b in results) + b"]}")
        return match_outcomes([rid for rid, _ in results], reply)

    async def push_gap(self, body: bytes) -> None:
        await self._request("POST", GAPS_PATH, body)

    async def instruction(self, etag: str | None) -> tuple[str | None, Any] | None:
        """The probe's central instruction (LMAP's instruction, RFC 7594): (ETag,
        document), or None when the collector says the one held (``etag``) is still
        current (304, RFC 9110 §13.1.2)."""
        return (await self.instruction_and_ticket(etag, want_ticket=False))[0]

    async def instruction_and_ticket(self, etag: str | None, *, want_ticket: bool = True
                                     ) -> tuple[tuple[str | None, Any] | None, str | None]:
        """``instruction``, asking for a measurement ticket with it (agent/tickets.py): (what
        ``instruction`` returns, the ``Bbprobe-Ticket`` header of the reply, 200 or 304
        alike; None from a collector that issues none)."""
        extra = {"If-None-Match": etag} if etag else {}
        if want_ticket:
            extra[spec.TICKET_REQUEST_HEADER] = "1"
        status, headers, doc = await self._send("GET", spec.INSTRUCTION_PATH, None, "none",
                                                extra, full=True)
        got = None if status == 304 else (headers.get("ETag"), doc)
        return got, headers.get(spec.TICKET_HEADER) if want_ticket else None

    async def ticket(self) -> Any:
        """A measurement ticket of its own (agent/tickets.py): the collector's JSON reply
        ({"ticket", "ticket_id", "expires_at", "servers"}), or None from a collector that
        issues none (404: an older collector, or tickets not enabled)."""
        try:
            return await self._request("POST", spec.TICKETS_PATH, b"{}")
        except DeliveryError as exc:
            if exc.status == 404:
                return None
            raise

    async def enrol_key(self, jwk: Mapping[str, Any], proof: Mapping[str, str] | None = None,
                        rotation: Mapping[str, str] | None = None
                        ) -> tuple[int, str | None]:
        """Send the probe's public key (``PUT /api/v1/probe/key``, body ``{"jwk": ...}``
        with the key's ``proof`` of possession and a ``rotation`` statement by the old
        key, agent/keydocs.py, when given): (status, kid). 201 enrolled (or rotated) or
        200 already known, with the kid the collector computed; 409, another key is
        bound to this probe's token, with that key's kid; 404, a collector too old to
        take keys (None). Anything else is a DeliveryError, as for every request, and so
        is a 409 that names no other key (this key is revoked, or first use is over):
        its message says why. A collector older than proofs refuses a body with one
        (422, 'body must be {"jwk"...'): the key is sent again without it."""
        doc: dict[str, Any] = {"jwk": dict(jwk)}
        if proof is not None:
            doc["proof"] = dict(proof)
        if rotation is not None:
            doc["rotation"] = dict(rotation)
        try:
            status, _, reply = await self._put_key(doc)
        except DeliveryError as exc:
            if proof is None or rotation is not None or exc.status != 422 or \
                    exc.field != "jwk" or "body must be" not in str(exc):
                raise
            del doc["proof"]
            status, _, reply = await self._put_key(doc)
        try:
            sent = jose.thumbprint(jwk)
        except jose.JoseError:
            sent = None
        kid = _kid_in(reply, sent)
        if status == 409 and kid in (None, sent):  # the key sent is the one in the way
            error = reply.get("error") if isinstance(reply, dict) else None
            raise DeliveryError(f"HTTP 409: {error}" if isinstance(error, str)
                                else "HTTP 409", retryable=False, status=409,
                                field=_error_field(json.dumps(reply).encode()))
        return status, kid

    async def _put_key(self, doc: Mapping[str, Any]) -> Any:
        body = json.dumps(doc, separators=(",", ":")).encode()
        return await self._send("PUT", KEY_PATH, body, "none", full=True,
                                accept=frozenset({404, 409}))

    async def report_health(self, body: bytes) -> None:
        """The probe's health report (LMAP's reported state): what the fleet page shows."""
        await self._request("POST", spec.HEALTH_PATH, body)

