"""The web application's shared state: one typed key per object the server assembly
(server/app.py) puts on the application and the handlers read back.

Named ``app_keys``, not ``keys``: collector/keys.py holds the tickets' signing keys.
The event metrics' key lives with the metrics (collector/metrics.py ``METRICS``), since
the measurement servers count through it too and import nothing of the web edge; each
route module keeps the keys only it reads (``ticket_routes.AUTHORITY``,
``metrics_routes.CACHE``).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from aiohttp import web

from collector.config import CollectorConfig
from collector.intake.commit import GroupCommit
from collector.limits import RateLimiter
from collector.sinks.influx import SinkState
from collector.storage.store import Store


class Wakeable(Protocol):
    """A background worker a request wakes when it brings work: the alerter (a completed
    campaign to certify), the InfluxDB sink (a stored result to copy)."""

    @property
    def wake(self) -> asyncio.Event: ...


class InfluxCopy(Wakeable, Protocol):
    """What requests see of the InfluxDB sink (collector/sinks/influx.py): a stored
    result wakes it, and the analysts' health shows its state."""

    @property
    def state(self) -> SinkState: ...


CONFIG = web.AppKey("config", CollectorConfig)
STORE = web.AppKey("store", Store)
# The replica analysts' reads use (storage.read_url), when one is set: web/threads.py
# ``analyst_db``.
READER = web.AppKey("reader", Store)
# Store calls run here (web/threads.py): one thread for SQLite, storage.pool_size for
# PostgreSQL.
DB_THREADS = web.AppKey("db_threads", ThreadPoolExecutor)
# Large probe bodies are inflated and decoded here (web/threads.py ``off_loop``).
DECODE_THREADS = web.AppKey("decode_threads", ThreadPoolExecutor)
# Results are stored through the group commit (collector/intake/commit.py).
COMMITS = web.AppKey("group_commit", GroupCommit)
# The InfluxDB copy, when [influxdb] enabled.
SINK = web.AppKey("influx_sink", InfluxCopy)
# The probes' requests per minute (server.probe_requests_per_min), when limited.
LIMITER = web.AppKey("rate_limiter", RateLimiter)
# Anonymous browser results, per client: apart from the probes' limiter, never off.
ANON_LIMITER = web.AppKey("anonymous_limiter", RateLimiter)
# The alerter (collector/alerts/worker.py), when [alerts] enabled: a health report
# announcing a completed campaign wakes it.
ALERTER = web.AppKey("alerter", Wakeable)
