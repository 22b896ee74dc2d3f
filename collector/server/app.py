"""The collector web application, assembled: the store and its database threads, the
routes of each caller (web/*_routes.py, roles declared there), the measurement endpoints
(collector/measurement), background tasks (anonymous-table pruning, the InfluxDB copy),
TLS, and serving until a signal.

Handlers are thin: parse -> ``ingest``/``service`` -> JSON. Store calls run on database
threads (one for SQLite, ``storage.pool_size`` for PostgreSQL), so the event loop never
waits on a query or an fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from collector import keys, tickets
from collector.alerts import notifiers
from collector.alerts.worker import Alerter
from collector.config import CollectorConfig, ServerConfig
from collector.errors import CollectorError, ConfigError
from collector.intake.commit import GroupCommit
from collector.limits import RateLimiter
from collector.measurement import ndt7
from collector.measurement import routes as measurement
from collector.measurement.slots import Gate
from collector.metrics import METRICS, Metrics
from collector.routing import Routes
from collector.sinks.influx import InfluxSink
from collector.storage.model import Quota
from collector.storage.sql.backends import open_store
from collector.storage.store import AnonymousStore, Store
from collector.tickets import Verifier
from collector.web import (
    accesslog,
    admin_routes,
    analyst_routes,
    fleet_routes,
    keys_routes,
    metrics_routes,
    probe_routes,
    public_routes,
    ticket_routes,
)
from collector.web.accesslog import access_log
from collector.web.app_keys import (
    ALERTER,
    ANON_LIMITER,
    COMMITS,
    CONFIG,
    DB_THREADS,
    DECODE_THREADS,
    LIMITER,
    READER,
    SINK,
    STORE,
)
from collector.web.middleware import access, errors, plain_ipv4, sane_request
from collector.web.public_routes import anonymous_quota
from collector.web.threads import on_db

log = logging.getLogger("bbprobe.collector")

PRUNE_INTERVAL_S = 3600.0
# PostgreSQL's partitions of the coming months, made again daily by a serving collector
# (the start makes them too): one that runs for months must not route new sessions to
# the default partition (review 2, finding 7). The pass waits on its own database work
# at most PARTITIONS_DEADLINE_S (each statement is bounded there too).
PARTITIONS_INTERVAL_S = 24 * 3600.0
PARTITIONS_DEADLINE_S = 300.0


def _prune(browser: Quota, ndt7_quota: Quota, store: AnonymousStore) -> None:
    store.prune_anonymous(browser, ndt7_quota)


async def prune_anonymous(cfg: CollectorConfig,
                          run: Callable[[Callable[[AnonymousStore], None]], Awaitable[None]]
                          ) -> None:
    """At start and every hour: the anonymous tables' retention also holds for a table
    that receives nothing new."""
    while True:
        try:
            await run(partial(_prune, anonymous_quota(cfg),
                              anonymous_quota(cfg, "ndt7_tests")))
        except Exception as exc:  # a busy or damaged database: try again next hour
            log.warning("pruning the anonymous tables failed: %s", exc)
        await asyncio.sleep(PRUNE_INTERVAL_S)


def _maintain_partitions(store: Store) -> None:
    store.maintain_partitions()  # type: ignore[attr-defined]  # PostgreSQL's only


async def maintain_partitions(run: Callable[[Callable[[Store], None]], Awaitable[None]]
                              ) -> None:
    """Daily, after the start's pass: create the coming months' partitions (a store that
    has them: PostgreSQL's), within a deadline; a failure is logged and tried tomorrow."""
    while True:
        await asyncio.sleep(PARTITIONS_INTERVAL_S)
        try:
            async with asyncio.timeout(PARTITIONS_DEADLINE_S):
                await run(_maintain_partitions)
        except TimeoutError:
            log.warning("creating partitions ahead took more than %.0f s; tried again "
                        "tomorrow", PARTITIONS_DEADLINE_S)
        except Exception as exc:  # a busy or unreachable database: tomorrow
            log.warning("creating partitions ahead failed: %s", exc)


async def _store_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Open the store (on its own thread: migrations may take a while), own the background
    tasks, and close it all in order."""
    cfg = app[CONFIG]
    loop = asyncio.get_running_loop()
    opener = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bbprobe-db-open")
    reader = None
    try:
        store = await loop.run_in_executor(opener, lambda: open_store(
            cfg.storage, outbox=cfg.influxdb.enabled))
        if cfg.storage.read_url:
            # After the store: its migrations are what the replica must have replayed.
            try:
                reader = await loop.run_in_executor(opener, lambda: open_store(
                    cfg.storage, read_only=True))
            except BaseException:
                await loop.run_in_executor(opener, store.close)
                raise
    finally:
        opener.shutdown(wait=False)
    app[STORE] = store
    if reader is not None:
        app[READER] = reader
    # The analysts' reads share these threads with the store's calls: each holds one
    # connection of either pool at a time.
    app[DB_THREADS] = ThreadPoolExecutor(max_workers=store.concurrency,
                                         thread_name_prefix="bbprobe-db")
    # Two: large bodies decode beside the loop, never more than two at once (a flood of
    # them waits its turn instead of taking every core).
    app[DECODE_THREADS] = ThreadPoolExecutor(max_workers=2,
                                             thread_name_prefix="bbprobe-decode")

    async def run(fn: Callable[[Store], Any]) -> Any:
        return await on_db(app, fn)

    commits = GroupCommit(run, slots=store.concurrency)
    app[COMMITS] = commits

    tasks = [asyncio.create_task(prune_anonymous(cfg, run), name="bbprobe-prune-anonymous")]
    if hasattr(store, "maintain_partitions"):
        tasks.append(asyncio.create_task(maintain_partitions(run),
                                         name="bbprobe-partitions"))
    sink = None
    if cfg.influxdb.enabled:
        sink = InfluxSink(cfg.influxdb, run)
        app[SINK] = sink
        tasks.append(asyncio.create_task(sink.supervise(), name="bbprobe-influx-sink"))
    alerter = None
    if cfg.alerts.enabled:
        alerter = Alerter(cfg, {n.name: n for n in notifiers.build(cfg.alerts)}, run,
                          outbox=cfg.influxdb.enabled)
        app[ALERTER] = alerter
        tasks.append(asyncio.create_task(alerter.supervise(), name="bbprobe-alerter"))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await commits.close()
        if alerter is not None:
            with contextlib.suppress(CollectorError, OSError):
                await alerter.release()
        if sink is not None:
            owner = sink.owner
            with contextlib.suppress(CollectorError, OSError):
                await run(lambda s: s.outbox_release(owner))
            await loop.run_in_executor(None, sink.close)
        await run(lambda s: s.close())
        if reader is not None:
            await loop.run_in_executor(app[DB_THREADS], reader.close)
        app[DB_THREADS].shutdown(wait=True)
        app[DECODE_THREADS].shutdown(wait=True)


async def _metrics_listener(app: web.Application, reuse_port: bool) -> AsyncIterator[None]:
    """The open /metrics on metrics.listen, for as long as the application runs (after
    the store opened: cleanup contexts start in order)."""
    try:
        runner = await metrics_routes.listener(app, reuse_port)
    except OSError as exc:
        raise ConfigError(f"metrics.listen: cannot listen on {app[CONFIG].metrics.listen}: "
                          f"{exc.strerror or exc}") from None
    try:
        yield
    finally:
        await runner.cleanup()


# What a collector process serves: everything, or only the store's side
# (ingestion, queries, reports, admin), or only the measurement endpoints (HTTP, ndt7,
# LibreSpeed, the speed-test page), which need no database and no targets, so that
# measurement servers can sit close to the probes, away from the store of record.
ROLES = ("all", "ingest", "measurement")


def create_app(cfg: CollectorConfig, role: str = "all", *,
               reuse_port: bool = False, metrics_dir: str | None = None) -> web.Application:
    """``metrics_dir``: a worker of ``serve --workers`` counts its metrics there
    (collector/metrics.py); ``reuse_port``: it shares its listeners with the others."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    metrics = Metrics(metrics_dir) if cfg.metrics.enabled else None
    # The timing middleware is the outermost: it sees the status the client gets. The
    # log's sees it too, and the client's address as plain_ipv4 gives it.
    middlewares = [plain_ipv4, access_log, errors, sane_request, access] if metrics is None \
        else [metrics_routes.timing(metrics), plain_ipv4, access_log, errors, sane_request,
              access]
    app = web.Application(middlewares=middlewares, client_max_size=cfg.server.max_body_bytes)
    app[CONFIG] = cfg
    routes = Routes(app)
    authority = None
    if cfg.tickets.enabled and role != "measurement":
        authority = app[ticket_routes.AUTHORITY] = ticket_routes.Authority(cfg, role)
    if metrics is not None:
        app[METRICS] = metrics
        app[metrics_routes.CACHE] = metrics_routes.Cached()  # the route's and the listener's
        if role != "measurement":  # the token check needs the store
            metrics_routes.add_routes(routes)
    if role == "measurement":
        routes.get("/healthz", public_routes.healthz, role="public")
    else:
        if cfg.server.probe_requests_per_min > 0:
            app[LIMITER] = RateLimiter(cfg.server.probe_requests_per_min,
                                       cfg.server.probe_burst)
        app[ANON_LIMITER] = RateLimiter(cfg.anonymous.browser_results_per_min, 3)
        app.cleanup_ctx.append(_store_lifecycle)
        if authority is not None:  # after the store: its directory exists
            app.cleanup_ctx.append(partial(_own_key, authority))
        probe_routes.add_routes(routes)
        keys_routes.setup(app, routes)
        analyst_routes.add_routes(routes)
        admin_routes.add_routes(routes)
        fleet_routes.add_routes(routes)
        public_routes.add_routes(routes)
        ticket_routes.add_routes(routes)
    if metrics is not None and cfg.metrics.listen:
        # After the store's context: it starts once the store is open and stops first.
        app.cleanup_ctx.append(partial(_metrics_listener, reuse_port=reuse_port))
    if role == "ingest":
        return app
    measurement.add_page(routes, record=role == "all", anonymous=cfg.anonymous)
    if role == "all":
        public_routes.add_result_page(routes)
    if cfg.measurement.enabled:
        quota_cfg = cfg

        async def store_subtest(sub: ndt7.Subtest) -> None:
            archive = sub.archive()
            quota = anonymous_quota(quota_cfg, "ndt7_tests")
            await on_db(app, lambda s: s.add_ndt7_test(archive, archive["StartTime"],
                                                       archive["EndTime"], quota))

        async def keep_no_subtest(sub: ndt7.Subtest) -> None:
            """A measurement-only server has no store: the client has its own record."""

        measurement.add_routes(routes, cfg.measurement,
                               store_subtest if role == "all" else keep_no_subtest, metrics,
                               ticket_gate(cfg, authority))
    return app


def ticket_gate(cfg: CollectorConfig, authority: ticket_routes.Authority | None
                ) -> Gate | None:
    """What this server's measurement endpoints verify tickets with: the trusted keys
    (read now: a bad file stops the start), and the collector's own key when it issues
    (at first need: it may not exist yet). None: no ticket is accepted here."""
    if not cfg.tickets.enabled:
        return None
    trusted = keys.trusted_keys(cfg.tickets.trusted_keys)
    if not trusted and authority is None:
        return None  # a measurement-only server trusting no key: every transfer anonymous
    return Gate(Verifier(trusted, tickets.audience_of(cfg.tickets.audience),
                         foreign=tickets.audience_of(cfg.tickets.servers)),
                authority.own if authority is not None else None)


async def _own_key(authority: ticket_routes.Authority, app: web.Application
                   ) -> AsyncIterator[None]:
    """The collector's ticket key, read (or generated) at start beside the loop, so the
    first instruction fetch does not wait on it; unusable, it is logged and tried again
    at need (keys.OwnKey), and the collector serves on (tickets wait, not results)."""
    await authority.own.get()
    yield


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


def dual_stack(host: str) -> bool:
    """Whether ``host`` is IPv6's unspecified address ("::"): then one socket accepts
    IPv6 and IPv4 (as IPv4-mapped addresses, RFC 4291 §2.5.5.2). asyncio sets
    IPV6_V6ONLY on every IPv6 socket it binds, which would leave IPv4 unserved; "::1"
    or any other IPv6 address is IPv6 only, "0.0.0.0" IPv4 only."""
    return host.strip("[]") == "::"


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound dual-stack TCP socket on [::]:``port`` (IPV6_V6ONLY off: Linux's
    default, set explicitly so net.ipv6.bindv6only = 1 cannot change it)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
    except BaseException:
        sock.close()
        raise
    return sock


async def start(cfg: CollectorConfig, *, reuse_port: bool = False, role: str = "all",
                metrics_dir: str | None = None) -> tuple[web.AppRunner, str]:
    """Start serving; returns the runner and the bound base URL. ``reuse_port``: several
    processes listen on the same port (SO_REUSEPORT) and the kernel spreads connections."""
    # auto_decompress=False: bodies reach the handlers as sent, so an encoded body is
    # refused (415) without the parser ever inflating it (compression bombs).
    # keepalive_timeout: aiohttp closes a connection that has not completed a request
    # within it, from the moment it opens (and between requests): the header timeout.
    runner = web.AppRunner(
        create_app(cfg, role, reuse_port=reuse_port, metrics_dir=metrics_dir),
        access_log=None, handle_signals=False, shutdown_timeout=5.0, auto_decompress=False,
        keepalive_timeout=cfg.server.header_timeout_s,
    )
    try:
        await runner.setup()
        site: web.BaseSite
        if dual_stack(cfg.server.host):
            site = web.SockSite(runner, listening_socket(cfg.server.host, cfg.server.port,
                                                         reuse_port),
                                ssl_context=tls_context(cfg.server))
        else:
            site = web.TCPSite(runner, cfg.server.host, cfg.server.port,
                               ssl_context=tls_context(cfg.server),
                               reuse_port=reuse_port or None)
        await site.start()
    except BaseException:
        # What started (the store, the metrics listener) stops: nothing stays bound.
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    scheme = "https" if cfg.server.tls_cert else "http"
    url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"
    if cfg.server.addr_file:
        write_addr_file(cfg.server.addr_file, url)
    return runner, url


def write_addr_file(path: str, url: str) -> None:
    """The bound URL, for scripts and tests, written whole (temp file and rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(url + "\n")
    tmp.replace(target)


async def serve(cfg: CollectorConfig, on_ready: Callable[[str], None], *,
                reuse_port: bool = False, role: str = "all",
                metrics_dir: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly."""
    runner, url = await start(cfg, reuse_port=reuse_port, role=role, metrics_dir=metrics_dir)
    # Everything loaded so far (modules, the app, the store) lives as long as the
    # process: out of the collector's sight, a full collection no longer walks it. A
    # result allocates some 10,000 tuples, so collections are frequent: with the heap
    # frozen, ingest spends about a tenth less CPU (docs/benchmarks.md).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    on_ready(url)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        accesslog.flush()  # a forked worker exits without atexit: write what is queued
