"""What every route module shares: the application's keys, running a store call on a
database thread, reading a body within bounds, the caller's role checked against the
route's declared one, domain errors mapped to HTTP, and the query parameters of a scope.

Every refusal is JSON ``{"error": message, "field": name-or-null}`` with a 4xx status
(and ``"code"`` where a client acts on the reason: a refused measurement ticket's).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import psycopg
from aiohttp import web

from agent.schema import encodes
from collector import auth, safetext
from collector.config import CollectorConfig
from collector.errors import (
    AlreadyExists,
    ApiError,
    BadParameter,
    DomainError,
    NotFound,
    StoreError,
    Unacceptable,
)
from collector.intake.commit import GroupCommit
from collector.limits import RateLimiter
from collector.metrics import Metrics
from collector.reports import service
from collector.reports.text import Scope
from collector.routing import role_of
from collector.storage.store import Store

T = TypeVar("T")
log = logging.getLogger("bbprobe.collector")

CONFIG = web.AppKey("config", CollectorConfig)
STORE = web.AppKey("store", Store)
DB_THREADS = web.AppKey("db_threads", ThreadPoolExecutor)
# Bodies of probes are inflated and decoded here when large (issue 23, finding 4): a
# 12 MiB result decoded on the event loop held every other request for a second. Below
# 256 KiB (inflated, at most) a body stays on the loop: a 250 KB result decodes in about
# 10 ms, and handing every 100 KB agcom result to a thread cost 13-18 % of ingest
# throughput (benchmarks/ingest.py, docs/benchmarks.md).
DECODE_THREADS = web.AppKey("decode_threads", ThreadPoolExecutor)
DECODE_INLINE_BYTES = 256 * 1024
# Results are stored through the group commit (web/commit.py).
COMMITS = web.AppKey("group_commit", GroupCommit)
SINK = web.AppKey("influx_sink", object)
LIMITER = web.AppKey("rate_limiter", RateLimiter)
# Anonymous browser results, per client: apart from the probes' limiter, never off.
ANON_LIMITER = web.AppKey("anonymous_limiter", RateLimiter)
# The alerter (collector/alerts/worker.py), when [alerts] enabled: a report wakes it.
ALERTER = web.AppKey("alerter", object)
# Prometheus event metrics (collector/metrics.py); absent with metrics.enabled = false.
METRICS = web.AppKey("metrics", Metrics)


def count(request: web.Request, fn: Callable[[Metrics], None]) -> None:
    """Count an event in this process's metrics, if it keeps them."""
    metrics = request.app.get(METRICS)
    if metrics is not None:
        fn(metrics)

# What a store raises when the database is away (a restart, a failover, a lock).
StoreUnavailable = (StoreError, psycopg.OperationalError, sqlite3.OperationalError)

# Domain errors (the service layer's) as HTTP statuses: the one place that knows both.
STATUS_OF: tuple[tuple[type[DomainError], int], ...] = (
    (AlreadyExists, 409), (NotFound, 404), (Unacceptable, 422), (BadParameter, 400),
)


async def db(request: web.Request, fn: Callable[[Store], T]) -> T:
    """Run ``fn(store)`` on a database thread (one for SQLite; the pool's size for
    PostgreSQL): the event loop never waits for a query or an fsync."""
    return await on_db(request.app, fn)


async def on_db(app: web.Application, fn: Callable[[Store], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(
        app[DB_THREADS], partial(fn, app[STORE]))


async def off_loop(request: web.Request, size: int, fn: Callable[[], T]) -> T:
    """``fn()`` on a decode thread when its input is ``size`` bytes or more (a body's
    size once inflated, at most: ``inflated_bound``), else here: a small body costs less
    than the hand-over, a large one must not stall the loop."""
    pool = request.app.get(DECODE_THREADS)
    if pool is None or size < DECODE_INLINE_BYTES:
        return fn()
    return await asyncio.get_running_loop().run_in_executor(pool, fn)


def json_response(data: object, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    """A JSON reply whose every string is valid Unicode (collector/safetext.py): a
    stored text no UTF-8 writer can encode never makes a read a 500 (issue 23)."""
    return web.json_response(data, status=status, headers=headers, dumps=safetext.dumps)


def error_body(status: int, message: str, field: str | None = None,
               code: str | None = None) -> web.Response:
    body: dict[str, str | None] = {"error": message, "field": field}
    if code is not None:
        body["code"] = code
    return json_response(body, status=status)


def http_status(exc: DomainError) -> int:
    return next(status for kind, status in STATUS_OF if isinstance(exc, kind))


@web.middleware
async def plain_ipv4(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A collector listening on "::" (both families on one socket) sees an IPv4 client
    as ::ffff:a.b.c.d (RFC 4291 §2.5.5.2). Every handler sees a.b.c.d, as on an IPv4
    socket: the rate buckets, the measurement slots, the stored client address, the
    customer-network filter and LibreSpeed's getIP all read request.remote."""
    remote = request.remote
    if remote and remote[:7].lower() == "::ffff:":
        try:
            mapped = ipaddress.ip_address(remote).ipv4_mapped  # type: ignore[union-attr]
        except ValueError:
            mapped = None
        if mapped is not None:
            request = request.clone(remote=str(mapped))
    return await handler(request)


def _unfit(text: str) -> bool:
    """Text no route takes in a path or a query: a control character (NUL was a 500 on
    PostgreSQL, which cannot store it: issue 23, finding 7) or a lone surrogate."""
    if any(c < " " or c == "\x7f" for c in text):
        return True
    return not encodes(text)


@web.middleware
async def sane_request(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse (400, naming where) a path or query parameter no route could take, before
    any handler or database sees it."""
    if _unfit(request.path):
        return error_body(400, "the path holds a control character or invalid Unicode")
    for key, value in request.query.items():
        if _unfit(key) or _unfit(value):
            name = safetext.terminal(key)[:40]
            return error_body(400, f"{name}: a control character or invalid Unicode in "
                              "the query", name)
    return await handler(request)


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_body(exc.status, exc.message, exc.field, exc.code)
        response.headers.update(exc.headers)
        if exc.close:
            response.force_close()
        if exc.challenge:
            response.headers["WWW-Authenticate"] = 'Basic realm="bbprobe", charset="UTF-8"'
        if exc.retry_after is not None:
            response.headers["Retry-After"] = exc.retry_after
        elif exc.status == 503:
            response.headers["Retry-After"] = "5"
        return response
    except DomainError as exc:
        return error_body(http_status(exc), exc.message, exc.field)
    except StoreUnavailable as exc:
        # The database is away (a PostgreSQL restart or failover, a locked SQLite file):
        # a 503 the agent retries, never a 500; the reason goes to the log, not to the
        # caller (who may be anyone).
        log.warning("%s %s: database unavailable: %s", request.method, request.path,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        response = error_body(503, "the database is unavailable; retry later")
        response.headers["Retry-After"] = "5"
        return response
    except psycopg.DataError as exc:
        # A value PostgreSQL cannot hold that a check above let through (a NUL in text,
        # a number out of its type's range): the caller's input, a 422, never a 500
        # (issue 23, finding 7). Logged, since a check is missing.
        log.warning("%s %s: a value the database refused: %s", request.method,
                    request.path, str(exc).splitlines()[0] if str(exc) else "")
        return error_body(422, "a value cannot be stored (a NUL character or a number "
                          "out of range)")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_body(exc.status, exc.reason)


def content_encoding(request: web.Request) -> str:
    """The request's Content-Encoding, normalised ("identity" when none)."""
    return request.headers.get("Content-Encoding", "identity").strip().lower()


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


@web.middleware
async def access(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Analyst and admin routes need such a token (Bearer, or Basic with the token as
    password for browsers); revocation takes effect on the next request. Public and
    probe routes pass (a probe route's handler authenticates the probe)."""
    if request.match_info.http_exception is not None:
        return await handler(request)
    role = role_of(request)
    if role in ("public", "probe"):
        return await handler(request)
    changes = request.method not in ("GET", "HEAD", "OPTIONS")
    if changes:
        refuse_cross_site(request)
    if role == "analyst" and not request.app[CONFIG].server.query_auth and not changes:
        return await handler(request)
    token = auth.bearer(request.headers.get("Authorization"))
    found = None if token is None else \
        await db(request, lambda s: s.role_for_token(auth.hash_token(token)))
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


# --- query parameters ------------------------------------------------------------------------


def query_scope(request: web.Request, store: Store | None = None) -> Scope:
    probes = request.query.getall("probe", []) or None
    filters = {k: request.query[k] for k in (*service.METADATA_FILTERS,
                                             *service.SESSION_FILTERS) if k in request.query}
    return service.scope(probes, request.query.get("since"), request.query.get("until"),
                         request.query.get("period"), store=store, filters=filters)


async def scope_of(request: web.Request) -> Scope:
    """The query's scope (metadata filters read the probes, on a database thread)."""
    return await db(request, lambda store: query_scope(request, store))


def query_limit(request: web.Request) -> int | None:
    raw = request.query.get("limit")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 7) or \
            not 1 <= int(raw) <= 1_000_000:
        raise ApiError(400, f"limit: expected an integer within 1..1000000, got {raw!r}",
                       field="limit")
    return int(raw)


def query_format(request: web.Request, allowed: tuple[str, ...] = ("json", "csv")) -> str:
    fmt = request.query.get("format", allowed[0])
    if fmt not in allowed:
        raise ApiError(400, f"format: expected one of {', '.join(allowed)}, got {fmt!r}",
                       field="format")
    return fmt


def query_flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false"):
        raise ApiError(400, f"{name}: expected true or false, got {raw!r}", field=name)
    return raw == "true"
