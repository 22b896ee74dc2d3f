"""Routes probes call (role "probe"): deliver results (plain, or signed by the probe's
key: intake/signed.py), batches and gap records, and ask who they are. The probe is
authenticated by its token or client certificate, within its rate limit."""

from __future__ import annotations

import functools
import hashlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from agent import spec
from agent.canonical import canonical_gap
from agent.decoding import SchemaError, parse_gap
from agent.evidence import SignedResult
from agent.schema import GapRecord, format_utc, parse_utc, utc_now
from collector import auth
from collector.errors import ApiError, StoreUnavailable
from collector.intake import ingest, signed
from collector.intake.keyring import KeyRing, KeySnapshot
from collector.limits import RateLimiter
from collector.metrics import count
from collector.routing import Routes
from collector.storage.model import GapSignature, NewResult, ResultSignature
from collector.web import accesslog
from collector.web.app_keys import COMMITS, CONFIG, LIMITER, SINK
from collector.web.params import content_encoding, read_body
from collector.web.replies import json_response
from collector.web.threads import db, off_loop


def _peer_probe(request: web.Request) -> str | None:
    """The probe named by a verified client certificate's subject CN, if one was shown."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _issued_before(request: web.Request, moment: str) -> bool:
    """Whether the client certificate shown was issued (its notBefore) before
    ``moment``. X.509 times are whole seconds (RFC 5280 4.1.2.5): one issued in the
    moment's own second counts as after it. A notBefore that cannot be read counts as
    before (refused, never let through)."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    try:
        issued = ssl.cert_time_to_seconds((cert or {})["notBefore"])
    except (KeyError, TypeError, ValueError):
        return True
    return issued < int(parse_utc(moment).timestamp())


async def authenticated_probe(request: web.Request) -> str:
    """The probe behind a request: by its bearer token, or by a client certificate
    verified against server.client_ca (whose CN must name a live probe, and which must
    have been issued since the probe's credentials were last replaced: the lost or
    leaked device holds its certificate too); both, if both are shown, must agree."""
    cfg = request.app[CONFIG].server
    by_cert = _peer_probe(request) if cfg.client_cert != "off" else None
    token = auth.bearer(request.headers.get("Authorization"))
    digest = auth.hash_token(token) if token is not None else None
    if by_cert is not None:
        probe = await db(request, lambda s: s.probe(by_cert))
        if probe is None or probe.revoked_at is not None:
            raise ApiError(401, f"client certificate names no active probe ({by_cert!r})")
        if probe.rotated_at is not None and _issued_before(request, probe.rotated_at):
            raise ApiError(401, f"client certificate issued before the probe's credentials "
                           f"were replaced ({by_cert!r} rotated {probe.rotated_at}): it "
                           "needs one issued since")
        if digest is not None:
            owner = await db(request, lambda s: s.probe_for_token(digest))
            if owner is None or owner.name != by_cert:
                raise ApiError(403, "the token and the client certificate name different "
                               "probes")
        accesslog.note_probe(request, by_cert)
        return by_cert
    if cfg.client_cert == "required":
        raise ApiError(401, "a client certificate is required (server.client_cert)")
    if digest is None:
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
    probe = await db(request, lambda s: s.probe_for_token(digest))
    if probe is None:
        raise ApiError(401, "unknown or revoked token")
    accesslog.note_probe(request, probe.name)
    return probe.name


async def ingesting_probe(request: web.Request) -> str:
    """The probe behind a write request, within its rate limit, sending JSON."""
    probe = await limited_probe(request)
    ctype = request.content_type
    if ctype != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {ctype!r}")
    encoding = content_encoding(request)
    if encoding not in ingest.ENCODINGS:
        raise ApiError(415, f"Content-Encoding {encoding!r} is not accepted; send one of "
                       f"{', '.join(ingest.ENCODINGS)}")
    return probe


async def limited_probe(request: web.Request) -> str:
    """The probe behind a request, within its rate limit (server.probe_requests_per_min)."""
    probe = await authenticated_probe(request)
    wait = over_rate(request, probe)
    if wait is not None:
        raise ApiError(429, f"probe {probe!r} is over its rate of "
                       f"{request.app[CONFIG].server.probe_requests_per_min:g} requests "
                       f"a minute; retry in {wait:.1f} s",
                       retry_after=RateLimiter.retry_after(wait))
    return probe


def over_rate(request: web.Request, probe: str) -> float | None:
    """Take one of ``probe``'s requests from its rate limit: None when within it, else
    the seconds to wait (counted in the metrics)."""
    limiter = request.app.get(LIMITER)
    if limiter is None:
        return None
    wait = limiter.take(probe)
    if wait is not None:
        count(request, lambda m: m.rate_limited.labels("probe").inc())
    return wait


async def probe_body(request: web.Request, limit: int) -> bytes:
    """A probe's body within ``limit``, as sent and once inflated (an authenticated
    probe may compress it: ingest.inflate; the aiohttp parser never inflates, app.py)."""
    raw = await read_body(request, limit)
    encoding = content_encoding(request)
    return ingest.inflate(raw, encoding, limit)


def clock_skew(request: web.Request) -> float | None:
    """Probe clock minus ours, from X-Bbprobe-Sent-At (reliability.md A9)."""
    sent = request.headers.get("X-Bbprobe-Sent-At")
    if sent is None:
        return None
    try:
        moment = parse_utc(sent)
    except ValueError:
        raise ApiError(400, f"X-Bbprobe-Sent-At: expected an ISO 8601 UTC timestamp, got "
                       f"{sent[:40]!r}", field="X-Bbprobe-Sent-At") from None
    skew = (moment - datetime.now(UTC)).total_seconds()
    # Stored with every result and shown in the fleet: as plausible as any time a writer
    # gives (a clock at 1970 is 1.8e9 s behind; year 1 would be 6e10 s).
    if moment < ingest.EARLIEST - timedelta(days=366 * 31) or skew > ingest.PLANNED_AHEAD_S:
        raise ApiError(400, f"X-Bbprobe-Sent-At: {sent[:40]!r} is not a plausible time",
                       field="X-Bbprobe-Sent-At")
    return skew


def new_result(accepted: ingest.Accepted, probe: str, received_at: str,
               skew: float | None, signature: ResultSignature | None = None) -> NewResult:
    r = accepted.result
    return NewResult(result_id=r.result_id, probe_name=probe, schema_version=r.schema_version,
                     started_at=accepted.started_at, ended_at=accepted.ended_at,
                     received_at=received_at, body=accepted.body,
                     body_sha256=accepted.body_sha256, facts=accepted.facts,
                     clock_skew_s=skew, session_seq=r.session_seq, packed=accepted.packed,
                     signature=signature)


async def key_snapshot(request: web.Request, probe: str) -> KeySnapshot:
    """``probe``'s keys as signatures are judged against (intake/keyring.py): a fresh
    snapshot without a store call, else read on a database thread."""
    ring = request.app[KEYRING]
    fresh = ring.cached(probe)
    if fresh is not None:
        return fresh
    return await db(request, lambda s: ring.snapshot(s, probe))


def _count_stored(request: web.Request, news: list[NewResult], outcomes: list[str]) -> None:
    """Count the stored results by their signature (metrics)."""
    statuses = [signed.status_of(n.signature)
                for n, outcome in zip(news, outcomes, strict=True) if outcome == "stored"]
    if statuses:
        count(request, lambda m: m.signature_statuses(statuses))


def _result_id(item: Any) -> str | None:
    """The result_id a refused batch item names, if it names one (the reply says it)."""
    if isinstance(item, bytes):
        try:
            item = ingest.parse_json(item)
        except ApiError:
            return None
    rid = item.get("result_id") if isinstance(item, dict) else None
    return rid if isinstance(rid, str) else None


def _wake_sink(request: web.Request) -> None:
    sink = request.app.get(SINK)
    if sink is not None:
        sink.wake.set()


def counted(handler: Callable[[web.Request], Awaitable[web.Response]]
            ) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A result route whose refusals of the whole request are counted, by reason, in
    the metrics (the handler counts what it stores, and a batch's refused items)."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except ApiError as exc:
            status = exc.status
            # A conflict is an outcome of its own, counted where it is found.
            if status != 409:
                count(request, lambda m: m.result_refused(status))
            raise
        except StoreUnavailable:
            count(request, lambda m: m.result_refused(503))
            raise

    return wrapper


def _decoded(raw: bytes, encoding: str, limit: int, probe: str
             ) -> ingest.Accepted | signed.Signed:
    """A single result's body, inflated and decoded, plain or signed (on a decode thread
    when large); ``limit`` is the result's own (a signed one's payload), its wire form
    may be a third larger (signed.wire_limit)."""
    body = ingest.inflate(raw, encoding, signed.wire_limit(limit))
    decoded = signed.parse_item(body, probe)
    signed.check_size(decoded, len(body), limit)
    return decoded


def _refused_signature(request: web.Request, exc: ApiError) -> ApiError:
    count(request, lambda m: m.signature_statuses(["refused"]))
    return exc


@counted
async def post_result(request: web.Request) -> web.Response:
    probe = await ingesting_probe(request)
    skew = clock_skew(request)
    limit = request.app[CONFIG].server.max_body_bytes
    raw = await read_body(request, signed.wire_limit(limit))
    encoding = content_encoding(request)
    size = ingest.inflated_bound(raw, encoding, signed.wire_limit(limit))
    try:
        decoded = await off_loop(request, size, lambda: _decoded(raw, encoding, limit, probe))
    except ApiError as exc:
        if exc.code in SIGNATURE_CODES:
            raise _refused_signature(request, exc) from None
        raise
    accepted = decoded.accepted if isinstance(decoded, signed.Signed) else decoded
    result = accepted.result
    accesslog.note_result(request, result.result_id, accepted.body_sha256)
    if result.probe_id != probe:
        raise ApiError(
            403,
            f"result is for probe {result.probe_id!r} but the token belongs to {probe!r}",
            field="probe_id",
        )
    ingest.check_times(result, datetime.now(UTC))
    signature: ResultSignature | None = None
    try:
        if isinstance(decoded, signed.Signed):
            keys = await key_snapshot(request, probe)
            signature = signed.judge(decoded, keys)
        else:
            signed.check_unsigned(request.app[CONFIG].evidence.require_signatures)
    except ApiError as exc:
        raise _refused_signature(request, exc) from None
    item = new_result(accepted, probe, utc_now(), skew, signature)
    (outcome,) = await request.app[COMMITS].insert([item])
    count(request, lambda m: m.result_outcomes([outcome]))
    _count_stored(request, [item], [outcome])
    if outcome == "conflict":
        raise ApiError(409, f"result {result.result_id} was already stored with other content",
                       field="result_id")
    if outcome == "stored":
        _wake_sink(request)
    return json_response(
        {"result_id": result.result_id, "stored": outcome == "stored",
         "duplicate": outcome == "duplicate"},
        status=201 if outcome == "stored" else 200,
    )


@dataclass(slots=True)
class Judged:
    """A batch item: accepted (its signature, when signed, judged after the batch is
    read) or refused (``accepted`` None), and its reply."""

    accepted: ingest.Accepted | None
    reply: dict[str, Any]
    opened: signed.Signed | None = None
    signature: ResultSignature | None = None


def _judge_batch(raw: bytes, encoding: str, cfg: Any, probe: str,
                 now: datetime, require_signatures: bool) -> list[Judged]:
    """Each result of a batch body, accepted or refused (its reply), in order; a signed
    one's signature is judged next (``_judge_all``). Every result is held to the
    single-result limit (max_body_bytes), so that a batch cannot carry in a result the
    single-result route would refuse. Runs on a decode thread when large."""
    body = ingest.inflate(raw, encoding, cfg.max_batch_bytes)
    # Each result's own bytes, for the fast path (ingest.parse_body); or, for a body
    # msgspec will not split, the standard reading, which names what is wrong.
    items: list[Any] | None = ingest.batch_items(body)
    if items is None:
        data = ingest.parse_json(body)
        if not isinstance(data, dict) or set(data) != {"results"} or \
                not isinstance(data["results"], list):
            raise ApiError(422, 'body must be {"results": [result, ...]}', field="results")
        items = data["results"]
    if not items:
        raise ApiError(422, "results: empty batch", field="results")
    if len(items) > cfg.max_batch_results:
        raise ApiError(413, f"results: {len(items)} results exceed the per-batch limit of "
                       f"{cfg.max_batch_results}", field="results")
    judged: list[Judged] = []
    for index, item in enumerate(items):
        reply: dict[str, Any] = {"result_id": None}
        try:
            size = len(item) if isinstance(item, bytes) else ingest.encoded_size(item)
            if size > signed.wire_limit(cfg.max_body_bytes):
                raise ApiError(413, f"results[{index}]: {size} bytes exceed the "
                               f"{cfg.max_body_bytes}-byte limit of one result",
                               field=f"results[{index}]")
            decoded = signed.parse_item(item, probe) if isinstance(item, bytes) else \
                signed.accept_item(item, probe)
            signed.check_size(decoded, size, cfg.max_body_bytes, f"results[{index}]: ")
            opened = decoded if isinstance(decoded, signed.Signed) else None
            accepted = decoded.accepted if isinstance(decoded, signed.Signed) else decoded
            reply["result_id"] = accepted.result.result_id
            if accepted.result.probe_id != probe:
                raise ApiError(403, f"result is for probe {accepted.result.probe_id!r} but "
                               f"the token belongs to {probe!r}", field="probe_id")
            ingest.check_times(accepted.result, now)
            if opened is None:
                signed.check_unsigned(require_signatures)
        except ApiError as exc:
            _refuse(reply, exc, item)
            judged.append(Judged(None, reply))
            continue
        judged.append(Judged(accepted, reply, opened))
    return judged


def _refuse(reply: dict[str, Any], exc: ApiError, item: Any = None) -> None:
    reply.update(result_id=reply["result_id"] or _result_id(item), status=exc.status,
                 error=exc.message, field=exc.field)
    if exc.code in SIGNATURE_CODES:
        reply["signature_refused"] = True  # counted once the batch is answered


# ApiError codes of a refusal for the result's signature (intake/signed.py).
SIGNATURE_CODES = frozenset({"malformed_signature", "unknown_key", "revoked_key",
                             "replaced_key", "bad_signature", "unsigned", "not_numbered"})


def _judge_all(raw: bytes, encoding: str, cfg: Any, probe: str, now: datetime,
               require_signatures: bool, keys: KeySnapshot) -> list[Judged]:
    """The batch read (``_judge_batch``), then each signed result's signature judged
    against the probe's keys: each gets its signature, or is refused in its reply. One
    call, on one decode thread when large (a second hand-over per request cost more
    than the Ed25519 checks, some 50-300 µs a result, it would move)."""
    judged = _judge_batch(raw, encoding, cfg, probe, now, require_signatures)
    for j in judged:
        if j.opened is None or j.accepted is None:
            continue
        try:
            j.signature = signed.judge(j.opened, keys)
        except ApiError as exc:
            _refuse(j.reply, exc)
            j.accepted = None
    return judged


@counted
async def post_batch(request: web.Request) -> web.Response:
    """Many results in one request and one transaction (an agent's backlog after an
    outage). Answers 200 with one item per result, in order: 201 stored, 200 duplicate,
    409 conflict, 403 another probe's, 413 over the size of one result, 422 invalid
    (with the field)."""
    probe = await ingesting_probe(request)
    skew = clock_skew(request)
    cfg = request.app[CONFIG].server
    raw = await read_body(request, cfg.max_batch_bytes)
    encoding = content_encoding(request)
    now = datetime.now(UTC)
    size = ingest.inflated_bound(raw, encoding, cfg.max_batch_bytes)
    require = request.app[CONFIG].evidence.require_signatures
    # The probe's keys before the body is read: a snapshot (cached, intake/keyring.py)
    # costs nothing when no item turns out signed.
    keys = await key_snapshot(request, probe)
    judged = await off_loop(request, size, lambda: _judge_all(
        raw, encoding, cfg, probe, now, require, keys))
    received = utc_now()
    replies = [j.reply for j in judged]
    fresh = [(index, new_result(j.accepted, probe, received, skew, j.signature))
             for index, j in enumerate(judged) if j.accepted is not None]
    news = [n for _, n in fresh]
    outcomes = await request.app[COMMITS].insert(news) if news else []
    for (index, _), outcome in zip(fresh, outcomes, strict=True):
        status = {"stored": 201, "duplicate": 200, "conflict": 409}[outcome]
        replies[index].update(status=status, error=None if status < 300 else
                              "already stored with other content")
    count(request, lambda m: m.result_outcomes(outcomes))
    _count_stored(request, news, list(outcomes))
    refused = [r["status"] for r in replies if r.get("status", 0) >= 400
               and r["status"] != 409]
    if refused:
        count(request, lambda m: m.results_refused(refused))
    by_signature = sum(1 for r in replies if r.pop("signature_refused", False))
    if by_signature:
        count(request, lambda m: m.signature_statuses(["refused"] * by_signature))
    if "stored" in outcomes:
        _wake_sink(request)
    accesslog.note_batch(request, replies, [j.accepted.body_sha256 if j.accepted else None
                                            for j in judged])
    return json_response({"items": replies})


def _decoded_gap(sent: bytes, encoding: str, limit: int, probe: str
                 ) -> tuple[bytes, GapRecord, SignedResult | None]:
    """A gap record's body, inflated and decoded (on a decode thread when large): plain,
    or signed (the JWS taken apart, unverified; a record spooled before its probe knew
    its name is named ``probe``, as a signed result is)."""
    raw = ingest.inflate(sent, encoding, limit)
    data = ingest.parse_json(raw)
    opened = None
    if signed.looks_signed(data):
        opened, data = signed.open_gap_item(data)
        if isinstance(data, dict) and data.get("probe_id") == "":
            data["probe_id"] = probe
    try:
        return raw, parse_gap(data), opened
    except SchemaError as exc:
        raise ApiError(422, str(exc), field=exc.path or None) from None


async def post_gap(request: web.Request) -> web.Response:
    """A gap record: results a probe dropped before delivering them (spool bounds),
    plain or signed by the probe's key (judged as a signed result is, its key covering
    the record's recorded_at: intake/signed.py); stored whole either way."""
    probe = await ingesting_probe(request)
    limit = signed.wire_limit(request.app[CONFIG].server.max_body_bytes)
    sent = await read_body(request, limit)
    encoding = content_encoding(request)
    raw, gap, opened = await off_loop(request, ingest.inflated_bound(sent, encoding, limit),
                                      lambda: _decoded_gap(sent, encoding, limit, probe))
    if gap.probe_id != probe:
        raise ApiError(403, f"gap record is for probe {gap.probe_id!r} but the token belongs "
                       f"to {probe!r}", field="probe_id")
    ingest.check_times(gap, datetime.now(UTC))
    recorded = format_utc(parse_utc(gap.recorded_at))
    if opened is None:
        digest = hashlib.sha256(raw).hexdigest()
        signature = GapSignature(canonical_gap(gap), recorded, "unsigned")
    else:
        digest = opened.sha256
        keys = await key_snapshot(request, probe)
        signature = signed.judge_gap(opened, recorded, keys)
    # Stored in the collector's UTC spelling, so they sort and filter as text.
    first, last = (format_utc(parse_utc(t)) for t in (gap.first_started_at,
                                                       gap.last_started_at))
    outcome = await db(request, lambda s: s.insert_gap(
        gap.gap_id, probe, utc_now(), gap.reason, gap.dropped, first, last, digest,
        gap.dropped_seq_ranges, signature=signature))
    if outcome == "conflict":
        raise ApiError(409, f"gap {gap.gap_id} was already stored with other content",
                       field="gap_id")
    return json_response({"gap_id": gap.gap_id, "stored": outcome == "stored",
                          "signature": signature.status},
                         status=201 if outcome == "stored" else 200)


async def whoami(request: web.Request) -> web.Response:
    return json_response({"probe_id": await authenticated_probe(request)})


# Each collector's snapshots of its probes' keys (intake/keyring.py).
KEYRING = web.AppKey("keyring", KeyRing)


def add_routes(routes: Routes) -> None:
    routes.app[KEYRING] = KeyRing()
    routes.post(spec.RESULTS_PATH, post_result, role="probe")
    routes.post(spec.RESULTS_PATH + "/batch", post_batch, role="probe")
    routes.post("/api/v1/gaps", post_gap, role="probe")
    routes.get(spec.WHOAMI_PATH, whoami, role="probe")
