"""What a request asks with: its query parameters (a scope, a limit, a format, a flag)
and its body (read within bounds and in time, with its Content-Encoding). Each is
refused with a 4xx naming the parameter at fault."""

from __future__ import annotations

import asyncio

from aiohttp import web

from collector.errors import ApiError
from collector.scope import METADATA_FILTERS, SESSION_FILTERS, Scope, resolve_scope
from collector.storage.store import Store
from collector.web.app_keys import CONFIG
from collector.web.threads import db


def query_scope(request: web.Request, store: Store | None = None) -> Scope:
    """The query's scope; a ``probe`` that is not registered, or metadata that selects
    no probe, is a 404 naming the parameter and the nearest names."""
    probes = request.query.getall("probe", []) or None
    filters = {k: request.query[k] for k in (*METADATA_FILTERS, *SESSION_FILTERS)
               if k in request.query}
    return resolve_scope(probes, request.query.get("since"), request.query.get("until"),
                         request.query.get("period"), filters=filters,
                         known=None if store is None else store.probes)


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
