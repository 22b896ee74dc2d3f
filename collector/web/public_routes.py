"""Routes anyone may call (role "public"): liveness, the OpenAPI document, and the
anonymous browser speed-test results. Everything here is hostile input: bounded in
size, rate per client, and stored rows."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from agent.schema import NUMBER_LIMIT, format_utc, physical_bounds
from collector.config import CollectorConfig
from collector.errors import ApiError
from collector.intake import ingest
from collector.measurement import page
from collector.measurement.slots import client_key
from collector.metrics import count
from collector.routing import Routes
from collector.storage.model import Quota
from collector.web import openapi
from collector.web.app_keys import ANON_LIMITER, CONFIG
from collector.web.params import content_encoding, read_body
from collector.web.replies import json_response
from collector.web.threads import db

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


def anonymous_quota(cfg: CollectorConfig, table: str = "browser_results") -> Quota:
    keep_after = datetime.now(UTC) - timedelta(days=cfg.anonymous.retention_days)
    rows = cfg.anonymous.ndt7_max_rows if table == "ndt7_tests" else cfg.anonymous.max_rows
    return Quota(format_utc(keep_after), rows)


async def post_browser_result(request: web.Request) -> web.Response:
    """An anonymous browser speed test (/speedtest): stored apart from probe results,
    never in compliance; rate-limited per client (address, or IPv6 /64) and kept within
    the anonymous quota."""
    limiter = request.app[ANON_LIMITER]
    client = request.remote or "unknown"
    wait = limiter.take(client_key(client))
    if wait is not None:
        count(request, lambda m: m.rate_limited.labels("anonymous").inc())
        raise ApiError(429, f"too many results from {client}; retry in {wait:.1f} s",
                       retry_after=limiter.retry_after(wait))
    encoding = content_encoding(request)
    if encoding != "identity":
        # Only an authenticated probe may make the collector inflate: a stranger's few
        # compressed bytes could cost it a thousandfold in CPU and memory.
        raise ApiError(415, f"Content-Encoding {encoding!r} is not accepted here; send "
                       "identity")
    data = check_browser_result(ingest.parse_json(await read_body(request, 64 * 1024)))
    # The result's link: its receipt time and a random key kept in its body (a client
    # cannot set that field: unknown fields are refused above).
    received, key = datetime.now(UTC), page.new_key()
    body = json.dumps({**data, page.SHARE_KEY: key}, sort_keys=True)
    quota = anonymous_quota(request.app[CONFIG])
    row = await db(request, lambda s: s.add_browser_result(format_utc(received), client,
                                                           body, quota))
    link = page.share_link(received, key)
    return json_response({"id": row, "link": link, "url": f"speedtest/result/{link}"},
                         status=201)


async def browser_result_page(request: web.Request) -> web.Response:
    """The page a saved browser result's link opens: its figures and time (never its
    address or user agent); an HTML 404 for a link that names no stored result."""
    anonymous = request.app[CONFIG].anonymous
    wanted = page.parse_link(request.match_info["link"])
    row = None if wanted is None else await db(
        request, lambda s: s.browser_result(wanted[0], wanted[1], page.SHARE_KEY))
    headers = {**page.PAGE_HEADERS, "X-Robots-Tag": "noindex"}
    if row is None:
        return web.Response(status=404, text=page.missing_page(anonymous),
                            content_type="text/html", headers=headers)
    return web.Response(text=page.result_page(row, anonymous), content_type="text/html",
                        headers=headers)


async def openapi_document(request: web.Request) -> web.Response:
    return json_response(openapi.document())


async def healthz(request: web.Request) -> web.Response:
    """Public liveness: that this process answers, and nothing else (no versions, no
    error texts, no queue sizes: nothing that helps a stranger aim an attack). Analysts:
    /api/v1/health."""
    return json_response({"status": "ok"})


def add_routes(routes: Routes) -> None:
    routes.get("/healthz", healthz, role="public")
    routes.get("/api/v1/openapi.json", openapi_document, role="public")
    routes.post("/api/v1/browser-results", post_browser_result, role="public")


def add_result_page(routes: Routes) -> None:
    """A saved browser result's page (where the speed-test page is served with a store)."""
    routes.get("/speedtest/result/{link}", browser_result_page, role="public")
