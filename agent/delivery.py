"""Result delivery: pushes what the spool (agent.spool) holds to the collector.

Contract (shared/reference/reliability.md A1-A9):
- A spooled result is removed only after the collector's 2xx for that result id, so a
  crash or an unreachable collector loses nothing.
- Network errors, 408, 425, 429 and 5xx are retried with exponential backoff (retry_min_s
  doubling to retry_max_s, +-50 % jitter), honouring a Retry-After up to retry_max_s.
  A result the collector refuses for good moves to ``dead-letter/`` with the reason next
  to it; ``bbprobe status`` lists them, ``bbprobe dead-letter retry|drop`` sends them
  again or deletes them. Nothing is dropped silently.
- A backlog goes oldest first, in batches (``POST /api/v1/results/batch``, one collector
  transaction each), at most ``max_requests_per_s`` requests a second. Each spooled file
  is read and parsed before it joins a batch: a damaged one (an SD card's truncated write)
  moves to ``dead-letter/`` instead of making every batch it is in a 400. The collector's
  per-result replies are matched by ``result_id``; a reply that does not account for
  exactly the results sent deletes nothing (they are sent again later). A 413, a 422 or a
  400 naming a field on a batch of several halves the batch size, so one bad document
  cannot hold up the rest; a 400 that names no field is the request's, not a
  document's, and stops delivery with everything kept.
- Gap records go first, each under the identity of the results it stands for. Delivery
  sends only what was spooled for the same token (``agent.identity.claim``); the rest
  stays spooled untouched, is counted (``DeliveryReport.waiting``) and listed by
  ``bbprobe status`` per identity.
- A result measured before the collector named the probe (whoami) is spooled without a
  ``probe_id`` and named at delivery by that same token's whoami: never a guess, never
  another probe's name.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import zstandard

from agent import spec
from agent.config import DeliveryConfig
from agent.errors import ConfigError, DeliveryError
from agent.identity import Claim, Identity, claim, identity_for
from agent.schema import utc_now
from agent.spool import Entry, Spool, file_id, parse_spooled

RETRYABLE_STATUS = frozenset({408, 425, 429})
BATCH_PATH = spec.RESULTS_PATH + "/batch"
GAPS_PATH = "/api/v1/gaps"


# --- pure policy -------------------------------------------------------------------------


def compress(data: bytes, encoding: str) -> bytes:
    """A request body in a Content-Encoding the collector inflates (zstd or gzip)."""
    if encoding == "zstd":
        return bytes(zstandard.ZstdCompressor(level=3).compress(data))
    if encoding == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    raise ValueError(f"unknown encoding {encoding!r}")


def backoff_s(failures: int, lo: float, hi: float, u: float) -> float:
    """Delay before retry number ``failures`` (1, 2, ...): lo x 2^(failures-1), capped at
    hi, times a jitter factor 0.5 + u for u in [0, 1) (+-50 %)."""
    base: float = min(hi, lo * 2.0 ** max(failures - 1, 0))
    return base * (0.5 + u)


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


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    result_id: str
    status: int
    error: str | None


def batches(entries: Sequence[Entry], max_results: int, max_bytes: int) -> list[list[Entry]]:
    """Consecutive batches, oldest first, within both caps (a result larger than
    ``max_bytes`` goes alone). Pure."""
    out: list[list[Entry]] = []
    current: list[Entry] = []
    size = 0
    for e in entries:
        if current and (len(current) >= max_results or size + e.size > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append(e)
        size += e.size
    if current:
        out.append(current)
    return out


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


# --- the collector client ----------------------------------------------------------------


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
        # A collector from before issue 14 takes plain JSON only: from now on, send that.
        self.compression = "none"
        return await self._send(method, path, data, "none")

    async def _send(self, method: str, path: str, data: bytes | None, encoding: str,
                    extra: Mapping[str, str] | None = None, *, full: bool = False) -> Any:
        """The reply's JSON (None when empty); with ``full``, (status, headers, JSON)."""
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
            raise DeliveryError(
                f"cannot reach the collector at {self.url}: {exc or type(exc).__name__}",
                retryable=True,
            ) from None
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
        """The probe's central instruction (issue 15): (ETag, document), or None when the
        collector says the one held (``etag``) is still current (304)."""
        return (await self.instruction_and_ticket(etag, want_ticket=False))[0]

    async def instruction_and_ticket(self, etag: str | None, *, want_ticket: bool = True
                                     ) -> tuple[tuple[str | None, Any] | None, str | None]:
        """``instruction``, asking for a measurement ticket with it (issue 24): (what
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
        """A measurement ticket of its own (issue 24): the collector's JSON reply
        ({"ticket", "ticket_id", "expires_at", "servers"}), or None from a collector that
        issues none (404: one from before issue 24, or tickets not enabled)."""
        try:
            return await self._request("POST", spec.TICKETS_PATH, b"{}")
        except DeliveryError as exc:
            if exc.status == 404:
                return None
            raise

    async def report_health(self, body: bytes) -> None:
        """The probe's health report (issue 15): what the fleet page shows."""
        await self._request("POST", spec.HEALTH_PATH, body)


# --- delivery ----------------------------------------------------------------------------


@dataclass(slots=True)
class DeliveryReport:
    delivered: list[str] = field(default_factory=list)  # result ids the collector acked
    dead_lettered: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    gaps_sent: int = 0
    requests: int = 0
    retries: int = 0
    pending: int = 0  # still in the spool, this identity's
    waiting: int = 0  # spooled for another identity (or unplaceable): left as they are
    error: str | None = None  # why delivery stopped early


Sleep = Callable[[float], Awaitable[None]]


async def deliver(spool: Spool, client: CollectorClient, cfg: DeliveryConfig | None = None,
                  *, probe_id: str | None = None, clock: Callable[[], float] = time.monotonic,
                  sleep: Sleep = asyncio.sleep,
                  jitter: Callable[[], float] = random.random) -> DeliveryReport:
    """Push gap records, then every spooled result oldest first in batches, retrying
    retryable failures with backoff until ``cfg.max_wait_s`` has passed. Cancelling it
    (SIGTERM) loses nothing: a result leaves the spool only after its 2xx.

    Only documents spooled for this client's token are sent (``claim``); the others stay
    as they are, counted in ``waiting``. A document spooled without a probe id is sent
    under ``probe_id`` (the configured one, or the collector's answer for this token at
    the start of this session); when that is None too, the collector is asked (whoami)
    first, and until it answers nothing unnamed is sent."""
    cfg = cfg or spool.cfg
    report = DeliveryReport()
    deadline = clock() + cfg.max_wait_s
    failures = 0
    last_request = float("-inf")
    batch_results = cfg.batch_results
    known = probe_id or None
    # Whose each file is, read once: (recorded identity, probe_id if none was recorded).
    owners: dict[Path, tuple[Identity | None, str | None]] = {}

    def claimed(path: Path) -> Claim:
        if path not in owners:
            recorded = spool.identity_of(path)
            owners[path] = (recorded, None if recorded else spool.facts(path)[1])
        return claim(*owners[path], client.identity, known)

    while True:
        gaps = [p for p in spool.gaps() if claimed(p) != "wait"]
        if gaps:
            id_key, paths = "gap_id", gaps[:1]
        else:
            todo = batches([e for e in spool.entries() if claimed(e.path) != "wait"],
                           batch_results, cfg.batch_bytes)
            if not todo:
                break
            id_key, paths = "result_id", [e.path for e in todo[0]]
        try:
            docs = _read_for_sending(spool, paths, id_key, report)
        except OSError as exc:
            # Cannot even set a damaged file aside: stop rather than send around it forever.
            report.error = f"cannot move a damaged spool file to dead-letter: {exc}"
            spool.note(last_error=report.error)
            break
        if docs is None:
            continue  # something was set aside or is gone: plan the batch again
        # Unnamed, or (older spools) placed only by the name the collector gives us.
        unnamed = known is None and any(not doc.get("probe_id") or claimed(path) == "ask"
                                        for path, doc in docs)
        wait = last_request + 1 / cfg.max_requests_per_s - clock()
        if wait > 0:
            await sleep(wait)
        last_request = clock()
        report.requests += 1
        spool.note(last_attempt_at=utc_now())
        try:
            stored = 0
            if unnamed:
                known = await client.whoami()
                continue  # the push is the next request, paced like any other
            bodies = [(file_id(path), _body(doc, known)) for path, doc in docs]
            if id_key == "gap_id":
                await client.push_gap(bodies[0][1])
                spool.remove(paths[0])
                report.gaps_sent += 1
            else:
                outcomes = await client.push_batch(bodies)
                for path, outcome in zip(paths, outcomes, strict=True):
                    if 200 <= outcome.status < 300:
                        spool.remove(path)
                        report.delivered.append(outcome.result_id)
                        stored += 1
                    elif outcome.status >= 500 or outcome.status in RETRYABLE_STATUS:
                        continue  # stays spooled; the next pass sends it again
                    else:
                        reason = f"HTTP {outcome.status}: {outcome.error or 'refused'}"
                        target = spool.dead_letter(path, reason)
                        report.dead_lettered.append((str(target), reason))
            failures = 0
            batch_results = min(cfg.batch_results, batch_results * 2)  # grow back
            spool.note(add={"delivered_total": stored}, last_success_at=utc_now(),
                       last_error=None)
        except DeliveryError as exc:
            document_fault = exc.status in (413, 422) or (exc.status == 400 and
                                                          exc.field is not None)
            if not exc.retryable and not unnamed and document_fault:
                if len(paths) > 1:
                    # One document too large or refused spoils its whole batch: halve the
                    # batches (same data) until it goes alone and the rest get through.
                    batch_results = max(1, len(paths) // 2)
                    continue
                # This one document is refused for good: set it aside, go on. A 400 that
                # names no field is the request's (a proxy, a header), not the
                # document's: it stops below with everything kept, rather than moving
                # the whole spool to dead-letter one result at a time.
                target = spool.dead_letter(paths[0], str(exc))
                report.dead_lettered.append((str(target), str(exc)))
                continue
            if not exc.retryable:
                # 401/403/404...: the request, not a result, is refused. Keep everything.
                report.error = str(exc)
                spool.note(last_error=str(exc))
                break
            failures += 1
            delay = exc.retry_after_s if exc.retry_after_s is not None else \
                backoff_s(failures, cfg.retry_min_s, cfg.retry_max_s, jitter())
            delay = min(delay, cfg.retry_max_s)
            spool.note(last_error=str(exc))
            if clock() + delay > deadline:
                report.error = str(exc)
                break
            report.retries += 1
            await sleep(delay)
    left = spool.entries()
    report.waiting = sum(claimed(e.path) == "wait" for e in left)
    report.pending = len(left) - report.waiting
    return report


def _body(doc: dict[str, Any], probe_id: str | None) -> bytes:
    """The document to send: named now if it was spooled before the probe's name was
    known (the spool file keeps it unnamed: a lost reply resends it under the same
    name, asked again)."""
    if not doc.get("probe_id"):
        assert probe_id is not None  # deliver() asks whoami before sending unnamed ones
        doc = {**doc, "probe_id": probe_id}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _read_for_sending(spool: Spool, paths: Sequence[Path], id_key: str,
                      report: DeliveryReport) -> list[tuple[Path, dict[str, Any]]] | None:
    """Each file parsed (``parse_spooled``), or None when one had to be set aside in
    dead-letter (damaged, or a second file with the same id) or vanished meanwhile
    (another bbprobe delivered it): the caller plans its batch again."""
    out: list[tuple[Path, dict[str, Any]]] = []
    seen: set[str] = set()
    complete = True
    for path in paths:
        problem: str | None
        try:
            raw = path.read_bytes()
        except FileNotFoundError as exc:
            if not os.path.lexists(path):
                complete = False
                continue
            # Still listed but cannot be opened (a dangling link): set it aside, or every
            # pass would find it again.
            problem = f"unreadable: {exc.strerror or exc}"
        except OSError as exc:
            problem = f"unreadable: {exc.strerror or exc}"
        else:
            try:
                doc = parse_spooled(raw, file_id(path), id_key)
                problem = None if doc[id_key] not in seen else \
                    f"a second spool file for {id_key} {doc[id_key]}"
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            reason = f"damaged spool file, not sent: {problem}"
            target = spool.dead_letter(path, reason)
            report.dead_lettered.append((str(target), reason))
            complete = False
            continue
        seen.add(doc[id_key])
        out.append((path, doc))
    return out if complete else None
