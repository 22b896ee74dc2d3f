"""The collector web application: ingestion, analyst queries, measurement endpoints.

Handlers are thin: parse -> ``ingest``/``service`` -> JSON. Database calls run on one
dedicated thread (SQLite has one writer; the event loop never blocks on fsync).
Every refusal is JSON ``{"error": message, "field": name-or-null}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sqlite3
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from agent import spec
from agent.schema import NUMBER_LIMIT, format_utc, parse_utc, physical_bounds, utc_now
from collector import __version__, auth, ingest, measure, service
from collector.compliance import targets as targets_mod
from collector.compliance.completeness import completeness
from collector.config import CollectorConfig, ServerConfig
from collector.errors import ApiError, ConfigError
from collector.limits import RateLimiter
from collector.report import (
    LISTING_COLUMNS,
    PROBE_COLUMNS,
    REPORT_COLUMNS,
    SAMPLE_COLUMNS,
    Scope,
    format_csv,
    report_dict,
    report_rows,
    sample_rows,
)
from collector.slots import SLOTS, client_key
from collector.storage.model import NewResult, Quota
from collector.storage.sqlite import SqliteStore

log = logging.getLogger("bbprobe.collector")
T = TypeVar("T")

CONFIG = web.AppKey("config", CollectorConfig)
STORE = web.AppKey("store", SqliteStore)
DB_THREAD = web.AppKey("db_thread", ThreadPoolExecutor)
SINK = web.AppKey("influx_sink", object)
LIMITER = web.AppKey("rate_limiter", RateLimiter)
# Anonymous browser results, per client: apart from the probes' limiter, never off.
ANON_LIMITER = web.AppKey("anonymous_limiter", RateLimiter)


async def db(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(store, *args)`` on the database thread."""
    loop = asyncio.get_running_loop()
    app = request.app
    return await loop.run_in_executor(app[DB_THREAD], partial(fn, app[STORE], *args))


def error_body(status: int, message: str, field: str | None = None) -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status)


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_body(exc.status, exc.message, exc.field)
        if exc.challenge:
            response.headers["WWW-Authenticate"] = 'Basic realm="bbprobe", charset="UTF-8"'
        if exc.retry_after is not None:
            response.headers["Retry-After"] = exc.retry_after
        elif exc.status == 503:
            response.headers["Retry-After"] = "5"
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_body(exc.status, exc.reason)


# --- ingestion -------------------------------------------------------------------------------


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused with 413 past ``limit`` and 408 when it does not arrive
    within server.body_timeout_s (a slow client cannot hold a request open)."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"body of {request.content_length} bytes exceeds the "
                            f"{limit}-byte limit")
    timeout = request.app[CONFIG].server.body_timeout_s
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"body exceeds the {limit}-byte limit")
    except TimeoutError:
        raise ApiError(408, f"request body not received within {timeout:g} s") from None
    return bytes(body)


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


async def authenticated_probe(request: web.Request) -> str:
    """The probe behind a request: by its bearer token, or by a client certificate
    verified against server.client_ca (whose CN must name a live probe); both, if both
    are shown, must agree."""
    cfg = request.app[CONFIG].server
    by_cert = _peer_probe(request) if cfg.client_cert != "off" else None
    token = auth.bearer(request.headers.get("Authorization"))
    if by_cert is not None:
        probe = await db(request, SqliteStore.probe, by_cert)
        if probe is None or probe.revoked_at is not None:
            raise ApiError(401, f"client certificate names no active probe ({by_cert!r})")
        if token is not None:
            owner = await db(request, SqliteStore.probe_for_token, auth.hash_token(token))
            if owner is None or owner.name != by_cert:
                raise ApiError(403, "the token and the client certificate name different "
                               "probes")
        return by_cert
    if cfg.client_cert == "required":
        raise ApiError(401, "a client certificate is required (server.client_cert)")
    if token is None:
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
    probe = await db(request, SqliteStore.probe_for_token, auth.hash_token(token))
    if probe is None:
        raise ApiError(401, "unknown or revoked token")
    return probe.name


PUBLIC = frozenset({"/healthz", "/api/v1/openapi.json", "/speedtest"})
PROBE_POSTS = frozenset({spec.RESULTS_PATH, spec.RESULTS_PATH + "/batch", "/api/v1/gaps"})


def required_role(request: web.Request) -> str | None:
    """Who may call this route: None (anyone), "probe" (checked by the handler),
    "analyst" (analyst or admin) or "admin"."""
    path = request.path
    if path in PUBLIC or path.startswith(("/measure/", "/ndt/v7/")):
        return None
    from collector import librespeed

    if librespeed.is_librespeed(path):
        return None  # measurement endpoints of the LibreSpeed protocol: open, capped
    if path == "/api/v1/browser-results" and request.method == "POST":
        return None  # anonymous customers' results, kept apart, rate-limited
    if path == spec.WHOAMI_PATH or (request.method == "POST" and path in PROBE_POSTS):
        return "probe"
    if request.method == "POST" and path.startswith("/api/v1/probes"):
        return "admin"
    return "analyst"


@web.middleware
async def access(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Analyst and admin routes need such a token (Bearer, or Basic with the token as
    password for browsers); revocation takes effect on the next request."""
    role = required_role(request)
    if request.match_info.http_exception is not None or role in (None, "probe"):
        return await handler(request)
    changes = request.method not in ("GET", "HEAD", "OPTIONS")
    if changes:
        refuse_cross_site(request)
    if role == "analyst" and not request.app[CONFIG].server.query_auth and not changes:
        return await handler(request)
    token = auth.bearer(request.headers.get("Authorization"))
    found = None if token is None else \
        await db(request, SqliteStore.role_for_token, auth.hash_token(token))
    if found is None:
        raise ApiError(401, "this needs an analyst or admin token (Authorization: Bearer "
                       "<token>; `bbprobe-collector token add`)" if token is None else
                       "unknown or revoked token", challenge=True)
    have, _name = found
    if have == "probe":
        raise ApiError(403, "a probe token can only send its results; use an analyst or "
                       "admin token")
    if role == "admin" and have != "admin":
        raise ApiError(403, "this needs an admin token")
    return await handler(request)


def refuse_cross_site(request: web.Request) -> None:
    """State-changing analyst and admin routes (CSRF, issue 12). A browser that cached
    an admin's Basic credentials attaches them to any site's form post; it never attaches
    a Bearer header by itself. So these routes take Bearer only, a JSON body only (a
    form or text/plain post cannot send one without a CORS preflight, which we never
    grant), and refuse what the browser marks as cross-site."""
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("bearer "):
        raise ApiError(401, "changes need 'Authorization: Bearer <token>' (a browser's "
                            "Basic login is for reading pages only)")
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        raise ApiError(403, "cross-site request refused (Sec-Fetch-Site: cross-site)")
    # No Origin comparison: behind a TLS-terminating proxy our scheme and host are not
    # the browser's, and with Bearer required it would add nothing.
    if request.can_read_body and request.content_type != "application/json":
        raise ApiError(415, f"expected Content-Type: application/json, got "
                            f"{request.content_type!r}")


async def ingesting_probe(request: web.Request) -> str:
    """The probe behind a write request, within its rate limit, sending JSON."""
    probe = await authenticated_probe(request)
    limiter = request.app.get(LIMITER)
    if limiter is not None:
        wait = limiter.take(probe)
        if wait is not None:
            raise ApiError(429, f"probe {probe!r} is over its rate of "
                           f"{request.app[CONFIG].server.probe_requests_per_min:g} requests "
                           f"a minute; retry in {wait:.1f} s",
                           retry_after=limiter.retry_after(wait))
    ctype = request.content_type
    if ctype != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {ctype!r}")
    encoding = request.headers.get("Content-Encoding", "identity").lower()
    if encoding != "identity":
        raise ApiError(415, f"Content-Encoding {encoding!r} is not accepted; send identity")
    return probe


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
    return (moment - datetime.now(UTC)).total_seconds()


def new_result(accepted: ingest.Accepted, probe: str, received_at: str,
               skew: float | None) -> NewResult:
    r = accepted.result
    return NewResult(result_id=r.result_id, probe_name=probe, schema_version=r.schema_version,
                     started_at=accepted.started_at, ended_at=accepted.ended_at,
                     received_at=received_at, body=accepted.body,
                     body_sha256=accepted.body_sha256, facts=accepted.facts,
                     clock_skew_s=skew, session_seq=r.session_seq)


def _wake_sink(request: web.Request) -> None:
    sink = request.app.get(SINK)
    if sink is not None:
        sink.wake.set()  # type: ignore[attr-defined]


async def post_result(request: web.Request) -> web.Response:
    probe = await ingesting_probe(request)
    skew = clock_skew(request)
    raw = await read_body(request, request.app[CONFIG].server.max_body_bytes)
    accepted = ingest.parse_body(raw)
    result = accepted.result
    if result.probe_id != probe:
        raise ApiError(
            403,
            f"result is for probe {result.probe_id!r} but the token belongs to {probe!r}",
            field="probe_id",
        )
    (outcome,) = await db(request, SqliteStore.insert_results,
                          [new_result(accepted, probe, utc_now(), skew)])
    if outcome == "conflict":
        raise ApiError(409, f"result {result.result_id} was already stored with other content",
                       field="result_id")
    if outcome == "stored":
        _wake_sink(request)
    return web.json_response(
        {"result_id": result.result_id, "stored": outcome == "stored",
         "duplicate": outcome == "duplicate"},
        status=201 if outcome == "stored" else 200,
    )


async def post_batch(request: web.Request) -> web.Response:
    """Many results in one request and one transaction (an agent's backlog after an
    outage). Answers 200 with one item per result, in order: 201 stored, 200 duplicate,
    409 conflict, 403 another probe's, 422 invalid (with the field)."""
    probe = await ingesting_probe(request)
    skew = clock_skew(request)
    cfg = request.app[CONFIG].server
    data = ingest.parse_json(await read_body(request, cfg.max_batch_bytes))
    if not isinstance(data, dict) or set(data) != {"results"} or \
            not isinstance(data["results"], list):
        raise ApiError(422, 'body must be {"results": [result, ...]}', field="results")
    items = data["results"]
    if not items:
        raise ApiError(422, "results: empty batch", field="results")
    if len(items) > cfg.max_batch_results:
        raise ApiError(413, f"results: {len(items)} results exceed the per-batch limit of "
                       f"{cfg.max_batch_results}", field="results")
    received = utc_now()
    replies: list[dict[str, Any]] = []
    fresh: list[tuple[int, NewResult]] = []
    for index, item in enumerate(items):
        rid = item.get("result_id") if isinstance(item, dict) else None
        reply: dict[str, Any] = {"result_id": rid if isinstance(rid, str) else None}
        replies.append(reply)
        try:
            accepted = ingest.accept(item)
        except ApiError as exc:
            reply.update(status=exc.status, error=exc.message, field=exc.field)
            continue
        if accepted.result.probe_id != probe:
            reply.update(status=403, error=f"result is for probe {accepted.result.probe_id!r}"
                         f" but the token belongs to {probe!r}", field="probe_id")
            continue
        fresh.append((index, new_result(accepted, probe, received, skew)))
    outcomes = await db(request, SqliteStore.insert_results, [n for _, n in fresh])
    for (index, _), outcome in zip(fresh, outcomes, strict=True):
        status = {"stored": 201, "duplicate": 200, "conflict": 409}[outcome]
        replies[index].update(status=status, error=None if status < 300 else
                              "already stored with other content")
    if "stored" in outcomes:
        _wake_sink(request)
    return web.json_response({"items": replies})


async def post_gap(request: web.Request) -> web.Response:
    """A gap record: results a probe dropped before delivering them (spool bounds)."""
    import hashlib

    from agent.schema import SchemaError, parse_gap

    probe = await ingesting_probe(request)
    raw = await read_body(request, request.app[CONFIG].server.max_body_bytes)
    try:
        gap = parse_gap(ingest.parse_json(raw))
    except SchemaError as exc:
        raise ApiError(422, str(exc), field=exc.path or None) from None
    if gap.probe_id != probe:
        raise ApiError(403, f"gap record is for probe {gap.probe_id!r} but the token belongs "
                       f"to {probe!r}", field="probe_id")
    outcome = await db(request, SqliteStore.insert_gap, gap.gap_id, probe, utc_now(),
                       gap.reason, gap.dropped, gap.first_started_at, gap.last_started_at,
                       hashlib.sha256(raw).hexdigest(), gap.dropped_seq_ranges)
    if outcome == "conflict":
        raise ApiError(409, f"gap {gap.gap_id} was already stored with other content",
                       field="gap_id")
    return web.json_response({"gap_id": gap.gap_id, "stored": outcome == "stored"},
                             status=201 if outcome == "stored" else 200)


BROWSER_NUMBERS = ("rtt_min_ms", "rtt_mean_ms", "jitter_ms", "download_bps",
                   "download_bytes", "upload_bps", "upload_bytes")


def check_browser_result(data: Any) -> dict[str, Any]:
    """A browser speed-test result (anonymous): known keys only; every number finite,
    >= 0 and within its unit's physical limit (or null); at most 100 RTTs; a small flat
    ``method``; 422 naming the first problem."""
    if not isinstance(data, dict):
        raise ApiError(422, "expected a JSON object")
    allowed = {"method", "user_agent", "rtts_ms", *BROWSER_NUMBERS}
    for key, value in data.items():
        if key not in allowed:
            raise ApiError(422, f"{key}: unknown field", field=key)
        if key in BROWSER_NUMBERS and value is not None:
            _check_number(key, value, physical_bounds(key, {"ge": 0})["le"])
    rtts = data.get("rtts_ms", [])
    if not isinstance(rtts, list) or len(rtts) > 100:
        raise ApiError(422, "rtts_ms: expected at most 100 numbers", field="rtts_ms")
    for value in rtts:
        _check_number("rtts_ms", value, physical_bounds("rtts_ms", {})["le"])
    user_agent = data.get("user_agent", "")
    if not isinstance(user_agent, str) or len(user_agent) > 512:
        raise ApiError(422, "user_agent: expected a string of at most 512 characters",
                       field="user_agent")
    method = data.get("method", {})
    if not isinstance(method, dict) or len(method) > 32 or any(
            not isinstance(k, str) or len(k) > 64 or not _small_scalar(v)
            for k, v in method.items()):
        raise ApiError(422, "method: expected an object of at most 32 short keys with "
                            "numbers, booleans or short strings", field="method")
    return data


def _check_number(key: str, value: Any, limit: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 <= value <= limit):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ApiError(422, f"{key}: expected a number from 0 to {limit:g} or null, got "
                            f"{shown}", field=key)


def _small_scalar(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int | float):
        return abs(value) <= NUMBER_LIMIT
    return isinstance(value, str) and len(value) <= 256


async def post_browser_result(request: web.Request) -> web.Response:
    """An anonymous browser speed test (/speedtest): stored apart from probe results,
    never in compliance; rate-limited per client (address, or IPv6 /64) and kept within
    the anonymous quota."""
    limiter = request.app[ANON_LIMITER]
    client = request.remote or "unknown"
    wait = limiter.take(client_key(client))
    if wait is not None:
        raise ApiError(429, f"too many results from {client}; retry in {wait:.1f} s",
                       retry_after=limiter.retry_after(wait))
    data = check_browser_result(ingest.parse_json(await read_body(request, 64 * 1024)))
    row = await db(request, SqliteStore.add_browser_result, utc_now(), client,
                   json.dumps(data, sort_keys=True), anonymous_quota(request.app[CONFIG]))
    return web.json_response({"id": row}, status=201)


def anonymous_quota(cfg: CollectorConfig, table: str = "browser_results") -> Quota:
    keep_after = datetime.now(UTC) - timedelta(days=cfg.anonymous.retention_days)
    rows = cfg.anonymous.ndt7_max_rows if table == "ndt7_tests" else cfg.anonymous.max_rows
    return Quota(format_utc(keep_after), rows)


PRUNE_INTERVAL_S = 3600.0


async def prune_anonymous(cfg: CollectorConfig, on_db: Callable[..., Awaitable[Any]]) -> None:
    """At start and every hour: the anonymous tables' retention also holds for a table
    that receives nothing new."""
    while True:
        try:
            await on_db(SqliteStore.prune_anonymous, anonymous_quota(cfg),
                        anonymous_quota(cfg, "ndt7_tests"))
        except sqlite3.Error as exc:  # a busy or damaged database: try again next hour
            log.warning("pruning the anonymous tables failed: %s", exc)
        await asyncio.sleep(PRUNE_INTERVAL_S)


async def list_browser_results(request: web.Request) -> web.Response:
    from collector.service import parse_time

    rows = await db(request, SqliteStore.browser_results,
                    parse_time(request.query.get("since"), "since"),
                    parse_time(request.query.get("until"), "until"))
    return web.json_response({"browser_results": rows})


async def list_ndt7_tests(request: web.Request) -> web.Response:
    """ndt7 subtests third-party clients ran against this server (never in compliance
    unless an analyst includes them)."""
    from collector.service import parse_time

    measurements = request.query.get("measurements", "false")
    if measurements not in ("true", "false"):
        raise ApiError(400, f"measurements: expected true or false, got {measurements!r}")
    rows = await db(request, SqliteStore.ndt7_tests,
                    parse_time(request.query.get("since"), "since"),
                    parse_time(request.query.get("until"), "until"), measurements == "true")
    return web.json_response({"ndt7_tests": rows})


async def speedtest(request: web.Request) -> web.Response:
    from collector import speedtest_page

    return web.Response(text=speedtest_page.page(), content_type="text/html")


async def list_gaps(request: web.Request) -> web.Response:
    where = await db(request, lambda store: _scope(request, store))
    rows = await db(request, SqliteStore.gaps,
                    list(where.probes) if where.probes is not None else None,
                    where.since, where.until)
    return web.json_response({"gaps": rows})


async def get_completeness(request: web.Request) -> web.Response:
    where = await db(request, lambda store: _scope(request, store))
    inputs = await db(request, service.completeness_inputs, where)
    # The arithmetic off the database thread: ingestion does not wait for a report.
    rows = await asyncio.to_thread(completeness, *inputs)
    return web.json_response({"completeness": [r.to_dict() for r in rows]})


async def whoami(request: web.Request) -> web.Response:
    return web.json_response({"probe_id": await authenticated_probe(request)})


# --- queries ---------------------------------------------------------------------------------


def _scope(request: web.Request, store: SqliteStore | None = None) -> Scope:
    probes = request.query.getall("probe", []) or None
    filters = {k: request.query[k] for k in service.METADATA_FILTERS if k in request.query}
    return service.scope(probes, request.query.get("since"), request.query.get("until"),
                         request.query.get("period"), store=store, filters=filters)


def _limit(request: web.Request) -> int | None:
    raw = request.query.get("limit")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 7) or \
            not 1 <= int(raw) <= 1_000_000:
        raise ApiError(400, f"limit: expected an integer within 1..1000000, got {raw!r}",
                       field="limit")
    return int(raw)


def _format(request: web.Request, allowed: tuple[str, ...] = ("json", "csv")) -> str:
    fmt = request.query.get("format", allowed[0])
    if fmt not in allowed:
        raise ApiError(400, f"format: expected one of {', '.join(allowed)}, got {fmt!r}",
                       field="format")
    return fmt


async def list_probes(request: web.Request) -> web.Response:
    fmt = _format(request)
    probes = await db(request, SqliteStore.probes)
    if fmt == "csv":
        return web.Response(text=format_csv((p.to_dict() for p in probes), PROBE_COLUMNS),
                            content_type="text/csv")
    return web.json_response({"probes": [p.to_dict() for p in probes]})


async def add_probe(request: web.Request) -> web.Response:
    """Admin: register a probe with its line metadata; the answer holds its token, the
    only time the token exists in clear."""
    from dataclasses import fields

    from collector.storage.model import LineMetadata

    data = ingest.parse_json(await read_body(request, 64 * 1024))
    allowed = {"probe_id"} | {f.name for f in fields(LineMetadata)}
    if not isinstance(data, dict) or not isinstance(data.get("probe_id"), str):
        raise ApiError(422, "probe_id: required, a string", field="probe_id")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(422, f"{unknown[0]}: unknown field", field=unknown[0])
    line: dict[str, Any] = {}
    for f in fields(LineMetadata):
        value = data.get(f.name)
        numeric = f.name.endswith(("_kbps", "_ms", "_ratio"))
        if value is None:
            line[f.name] = None
        elif numeric and isinstance(value, int | float) and not isinstance(value, bool) \
                and value >= 0:
            line[f.name] = float(value)
        elif not numeric and isinstance(value, str):
            line[f.name] = value
        else:
            wanted = "a number >= 0" if numeric else "a string"
            raise ApiError(422, f"{f.name}: expected {wanted}, got {value!r}", field=f.name)
    from collector.errors import StoreError

    try:
        token = await db(request, service.register_probe, data["probe_id"],
                         LineMetadata(**line))
    except StoreError as exc:
        raise ApiError(409 if "already exists" in str(exc) else 422, str(exc),
                       field="probe_id") from None
    return web.json_response({"probe_id": data["probe_id"], "token": token}, status=201)


async def revoke_probe(request: web.Request) -> web.Response:
    """Admin: revoke a probe's token at once (its results stay)."""
    name = request.match_info["name"]
    done = await db(request, SqliteStore.revoke_probe, name, utc_now())
    if not done:
        raise ApiError(404, f"no active probe named {name!r}", field="name")
    return web.json_response({"probe_id": name, "revoked": True})


async def list_samples(request: web.Request) -> web.Response:
    """Per-test samples of a scope as CSV, in the ``evaluate --samples`` format."""
    _format(request, ("csv",))
    where = await db(request, lambda store: _scope(request, store))
    sessions = await db(request, service.samples, where, _include_invalid(request))
    return web.Response(text=format_csv(sample_rows(sessions), SAMPLE_COLUMNS),
                        content_type="text/csv")


async def list_results(request: web.Request) -> web.Response:
    fmt = _format(request)
    where = await db(request, lambda store: _scope(request, store))
    rows = await db(request, service.listing, where, _limit(request))
    if fmt == "csv":
        return web.Response(text=format_csv(rows, LISTING_COLUMNS), content_type="text/csv")
    return web.json_response({"results": rows})


async def get_result(request: web.Request) -> web.Response:
    row = await db(request, SqliteStore.result, request.match_info["result_id"])
    if row is None:
        raise ApiError(404, f"no result {request.match_info['result_id']}")
    return web.Response(text=row.body, content_type="application/json")


REPORT_FORMATS = ("json", "csv", "html")


def _include_invalid(request: web.Request) -> bool:
    raw = request.query.get("include_invalid", "false").lower()
    if raw not in ("true", "false"):
        raise ApiError(400, f"include_invalid: expected true or false, got {raw!r}",
                       field="include_invalid")
    return raw == "true"


def _customers(request: web.Request) -> service.Customers:
    raw = request.query.get("include_customer", "false").lower()
    if raw not in ("true", "false"):
        raise ApiError(400, f"include_customer: expected true or false, got {raw!r}",
                       field="include_customer")
    return service.Customers(include=raw == "true", network=service.parse_network(
        request.query.get("customer_network")))


async def _targets_and_scope(request: web.Request) -> tuple[targets_mod.Targets, Scope]:
    """The configured targets table (read off the event loop) and the query's scope."""
    path = request.app[CONFIG].compliance.targets
    table = await asyncio.get_running_loop().run_in_executor(None, targets_mod.load, path)
    return table, await db(request, lambda store: _scope(request, store))


async def get_report(request: web.Request) -> web.Response:
    """The compliance report of a scope: JSON (default), CSV (one row per indicator) or
    the HTML page with plots."""
    fmt = _format(request, REPORT_FORMATS)
    if fmt == "html":
        return await report_page(request)
    table, where = await _targets_and_scope(request)
    report = await db(request, service.compliance, where, table, _include_invalid(request),
                      _customers(request))
    if fmt == "csv":
        return web.Response(text=format_csv(report_rows(report, where), REPORT_COLUMNS),
                            content_type="text/csv")
    return web.json_response(report_dict(report, where))


async def report_page(request: web.Request) -> web.Response:
    """``/report``: the HTML report of the scope in the query (per probe: ?probe=NAME)."""
    table, where = await _targets_and_scope(request)
    timezone = request.query.get("timezone", "Europe/Rome")
    page = await db(request, service.report_page, where, table, timezone,
                    _include_invalid(request), "Allegato 2 compliance report",
                    _customers(request))
    return web.Response(text=page, content_type="text/html")


async def index_page(request: web.Request) -> web.Response:
    """``/``: every probe with its line and links to its report and certificate."""
    from collector import html_report

    probes = await db(request, SqliteStore.probes)
    return web.Response(text=html_report.index(probes), content_type="text/html")


async def get_certificate(request: web.Request) -> web.Response:
    from collector.report import certificate_dict

    probe = request.query.get("probe")
    if not probe:
        raise ApiError(400, "probe: required", field="probe")
    q = request.query
    fmt = _format(request, ("json", "html"))
    cert = await db(request, service.certificate, probe, q.get("since"), q.get("until"),
                    q.get("rule", "96in24h"), q.get("timezone", "Europe/Rome"))
    if fmt == "html":
        from agent.schema import utc_now
        from collector.html_report import certificate_page

        return web.Response(text=certificate_page(cert, utc_now()), content_type="text/html")
    return web.json_response(certificate_dict(cert))


async def openapi_document(request: web.Request) -> web.Response:
    from collector import openapi

    return web.json_response(openapi.document())


async def healthz(request: web.Request) -> web.Response:
    """Public liveness: that this process answers, and nothing else (no versions, no
    error texts, no queue sizes for strangers; issue 12). Analysts: /api/v1/health."""
    return web.json_response({"status": "ok"})


async def health(request: web.Request) -> web.Response:
    """The details, for analysts: version, the measurement slots, the InfluxDB copy (its
    state, outbox and dead letters)."""
    doc: dict[str, Any] = {"status": "ok", "version": __version__}
    slots = request.app.get(SLOTS)
    if slots is not None:
        doc["measurement"] = {"transfers_running": slots.running,
                              "clients": len(slots.by_client), "limit": slots.limit,
                              "per_client": slots.per_client}
    sink = request.app.get(SINK)
    if sink is not None:
        from dataclasses import asdict

        doc["influxdb"] = {**asdict(sink.state),  # type: ignore[attr-defined]
                           "outbox": await db(request, SqliteStore.outbox_size),
                           "dead_letters_stored": await db(request,
                                                           SqliteStore.outbox_dead_count)}
        if not sink.state.running:  # type: ignore[attr-defined]
            doc["status"] = "degraded"
    return web.json_response(doc)


# --- application -----------------------------------------------------------------------------


def create_app(cfg: CollectorConfig) -> web.Application:
    app = web.Application(middlewares=[errors, access],
                          client_max_size=cfg.server.max_body_bytes)
    app[CONFIG] = cfg
    if cfg.server.probe_requests_per_min > 0:
        app[LIMITER] = RateLimiter(cfg.server.probe_requests_per_min, cfg.server.probe_burst)
    app[ANON_LIMITER] = RateLimiter(cfg.anonymous.browser_results_per_min, 3)

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bbprobe-db")
        loop = asyncio.get_running_loop()
        app[DB_THREAD] = executor
        app[STORE] = await loop.run_in_executor(
            executor, partial(SqliteStore, cfg.storage.path, outbox=cfg.influxdb.enabled))
        async def on_db(fn: Callable[..., T], *args: Any) -> T:
            return await loop.run_in_executor(executor, fn, app[STORE], *args)

        prune_task = asyncio.create_task(prune_anonymous(cfg, on_db),
                                         name="bbprobe-prune-anonymous")
        sink_task = None
        if cfg.influxdb.enabled:
            from collector.influx import InfluxSink

            sink = InfluxSink(cfg.influxdb, on_db)
            app[SINK] = sink
            sink_task = asyncio.create_task(sink.supervise(), name="bbprobe-influx-sink")
        yield
        prune_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prune_task
        if sink_task is not None:
            sink_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sink_task
            await loop.run_in_executor(None, app[SINK].close)  # type: ignore[attr-defined]
        await loop.run_in_executor(executor, app[STORE].close)
        executor.shutdown(wait=True)

    app.cleanup_ctx.append(store_ctx)
    app.router.add_post(spec.RESULTS_PATH, post_result)
    app.router.add_post(spec.RESULTS_PATH + "/batch", post_batch)
    app.router.add_post("/api/v1/gaps", post_gap)
    app.router.add_get("/api/v1/gaps", list_gaps)
    app.router.add_get("/api/v1/completeness", get_completeness)
    app.router.add_get(spec.WHOAMI_PATH, whoami)
    app.router.add_get(spec.RESULTS_PATH, list_results)
    app.router.add_get(spec.RESULTS_PATH + "/{result_id}", get_result)
    app.router.add_get("/api/v1/probes", list_probes)
    app.router.add_post("/api/v1/probes", add_probe)
    app.router.add_post("/api/v1/probes/{name}/revoke", revoke_probe)
    app.router.add_get("/api/v1/samples", list_samples)
    app.router.add_get("/api/v1/report", get_report)
    app.router.add_get("/api/v1/certificate", get_certificate)
    app.router.add_get("/api/v1/openapi.json", openapi_document)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/v1/health", health)
    app.router.add_get("/", index_page)
    app.router.add_get("/speedtest", speedtest)
    app.router.add_post("/api/v1/browser-results", post_browser_result)
    app.router.add_get("/api/v1/browser-results", list_browser_results)
    app.router.add_get("/api/v1/ndt7-results", list_ndt7_tests)
    app.router.add_get("/report", report_page)
    if cfg.measurement.enabled:
        from collector import ndt7

        measure.add_routes(app, cfg.measurement)

        async def store_ndt7(sub: ndt7.Subtest) -> None:
            archive = sub.archive()
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(app[DB_THREAD], partial(
                SqliteStore.add_ndt7_test, app[STORE], archive, archive["StartTime"],
                archive["EndTime"], anonymous_quota(cfg, "ndt7_tests")))

        ndt7.add_routes(app, store_ndt7)
    return app


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """TLS from the configured certificate and key; client certificates verified against
    client_ca when server.client_cert asks for them."""
    if not server.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
        if server.client_cert != "off":
            context.load_verify_locations(server.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED if server.client_cert == "required" \
                else ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"server TLS: cannot load certificate, key or CA: {exc}") from None
    return context


async def start(cfg: CollectorConfig) -> tuple[web.AppRunner, str]:
    """Start serving; returns the runner and the bound base URL."""
    # auto_decompress=False: bodies reach the handlers as sent, so an encoded body is
    # refused (415) without the parser ever inflating it (compression bombs).
    # keepalive_timeout: aiohttp closes a connection that has not completed a request
    # within it, from the moment it opens (and between requests): the header timeout.
    runner = web.AppRunner(
        create_app(cfg), access_log=None, handle_signals=False, shutdown_timeout=5.0,
        auto_decompress=False, keepalive_timeout=cfg.server.header_timeout_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, cfg.server.host, cfg.server.port,
                       ssl_context=tls_context(cfg.server))
    await site.start()
    host, port = runner.addresses[0][:2]
    scheme = "https" if cfg.server.tls_cert else "http"
    url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"
    if cfg.server.addr_file:
        target = Path(cfg.server.addr_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(url + "\n")
        tmp.replace(target)
    return runner, url


async def serve(cfg: CollectorConfig, on_ready: Callable[[str], None]) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly."""
    runner, url = await start(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    on_ready(url)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
