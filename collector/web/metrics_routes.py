"""``GET /metrics``: the Prometheus exposition, and the middleware that times every
request.

- On the main port the route's role is "metrics": a metrics token (`token add --role
  metrics`, which reads nothing else: what a Prometheus server should hold), or an
  analyst or admin token; open only where server.query_auth = false opens every read.
- With metrics.listen set, a second listener serves only ``/metrics`` there, with no
  token (``listener``), for a Prometheus that cannot hold one, on an address only it
  reaches. A measurement-only server exposes its metrics only this way.

A scrape's body is made at most once per metrics.min_interval_s, however often (and by
however many) it is asked: the database is read once per interval, and a flood of
requests on an open listener costs a dictionary lookup each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client.exposition import generate_latest

from agent.config import split_listen
from collector import __version__
from collector.config import CollectorConfig
from collector.errors import StoreUnavailable
from collector.fleet import control
from collector.metrics import METRICS, Metrics
from collector.routing import Routes
from collector.storage.store import Store
from collector.web.app_keys import CONFIG, STORE
from collector.web.exposition import Family, ProbeState, Snapshot, state_families, text_format
from collector.web.threads import on_db

log = logging.getLogger("bbprobe.collector")

PATH = "/metrics"
STATE_TIMEOUT_S = 10.0
# The text format every Prometheus reads (2.x and 3.x): names are the legacy charset, so
# prometheus-client's output is this format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def read_snapshot(store: Store, cfg: CollectorConfig, outbox: bool,
                  now: datetime | None = None) -> Snapshot:
    """The scrape-time state, on a database thread."""
    moment = now or datetime.now(UTC)
    fleet_cfg, m = cfg.fleet, cfg.metrics
    rows = control.fleet_rows(store, fleet_cfg.silent_after_s, fleet_cfg.validity_days,
                              moment, versions=False)
    probes = {p.name: p for p in store.probes() if p.revoked_at is None}
    limit = m.per_probe_max if m.per_probe else 0
    chosen = sorted(r["probe_id"] for r in rows)[:limit]
    sessions = {f.probe_id: f for f in store.latest_sessions(chosen)} if chosen else {}
    by_name = {r["probe_id"]: r for r in rows}
    per_probe = [ProbeState(probes[name], by_name[name]["last_seen"],
                            bool(by_name[name]["silent"]), sessions.get(name))
                 for name in chosen if name in probes]
    return Snapshot(
        database_size_bytes=store.size_bytes(),
        outbox_results=store.outbox_size() if outbox else None,
        outbox_dead_letters=store.outbox_dead_count() if outbox else None,
        probes=len(rows), silent=sum(bool(r["silent"]) for r in rows),
        healthy=sum(bool(r["healthy"]) for r in rows), per_probe=per_probe,
        per_probe_omitted=len(rows) - len(per_probe))


@dataclass(slots=True)
class Cached:
    made_at: float = -1e18
    body: bytes = b""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


CACHE = web.AppKey("metrics_cache", Cached)


async def _state(app: web.Application) -> str:
    """The database's part: none on a measurement-only server; on a database error, a
    0 in bbprobe_collector_state_up (and the reason in the log), never a failed scrape:
    the event metrics are still worth having, and the 0 is what an alert looks for."""
    if STORE not in app:
        return ""
    cfg = app[CONFIG]
    up = 1.0
    families: list[Family] = []
    try:
        # Bounded: a database that hangs (a failover without a statement timeout) must
        # not hold every scrape, nor the lock they queue on.
        async with asyncio.timeout(STATE_TIMEOUT_S):
            snap = await on_db(app, lambda s: read_snapshot(s, cfg, cfg.influxdb.enabled))
        families = state_families(snap, __version__)
    except TimeoutError:
        up = 0.0
        log.warning("metrics: the database did not answer within %g s", STATE_TIMEOUT_S)
    except Exception as exc:  # any fault: the scrape still answers, with state_up 0
        up = 0.0
        log.warning("metrics: reading the database failed: %s",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                    exc_info=not isinstance(exc, StoreUnavailable))
    families.append(Family("bbprobe_collector_state_up", "1 if this scrape read the "
                           "database's state (fleet, outbox, size), 0 if it could not.",
                           [("", up)]))
    return text_format(families)


async def render(app: web.Application) -> bytes:
    """The exposition (text format 0.0.4, which every Prometheus reads), made at most
    once per min_interval_s."""
    cache = app[CACHE]
    async with cache.lock:
        if time.monotonic() - cache.made_at >= app[CONFIG].metrics.min_interval_s:
            state = await _state(app)
            events = generate_latest(app[METRICS].registry())
            cache.body = events + state.encode()
            cache.made_at = time.monotonic()
        return cache.body


async def get_metrics(request: web.Request) -> web.Response:
    return await get_metrics_of(request.app, request)


def route_label(request: web.Request) -> str:
    """The route's template ("/api/v1/probes/{name}"), never the path a client chose:
    the label set stays the routes this collector has."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def timing(metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware: every request's route, method, status and duration."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[
            [web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
        finally:
            metrics.request(route_label(request), request.method, status,
                            time.perf_counter() - started)

    return middleware


def add_routes(routes: Routes) -> None:
    routes.get(PATH, get_metrics, role="metrics")


async def listener(app: web.Application, reuse_port: bool) -> web.AppRunner:
    """The open ``/metrics`` on metrics.listen, for ``app``'s metrics and store."""
    metrics_app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return await get_metrics_of(app, request)

    metrics_app.router.add_get(PATH, handler)
    runner = web.AppRunner(metrics_app, access_log=None, handle_signals=False,
                           shutdown_timeout=1.0,
                           keepalive_timeout=app[CONFIG].server.header_timeout_s)
    await runner.setup()
    host, port = split_listen(app[CONFIG].metrics.listen)
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner


async def get_metrics_of(app: web.Application, request: web.Request) -> web.Response:
    response = web.Response(body=await render(app))
    response.headers["Content-Type"] = CONTENT_TYPE
    return response
