"""Where a handler's slow work runs, so that the event loop never waits on it: store calls
on the database threads, and the decoding of a large body on the decode threads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import TypeVar

from aiohttp import web

from collector.storage.store import Store
from collector.web.app_keys import DB_THREADS, DECODE_THREADS, READER, STORE

T = TypeVar("T")

# Below 256 KiB (inflated, at most) a body is decoded on the loop: a 250 KB result decodes
# in about 10 ms, and handing every 100 KB agcom result to a thread cost 13-18 % of ingest
# throughput. Above it, a thread: a 12 MiB result decoded on the loop held every other
# request for a second (benchmarks/ingest.py, docs/benchmarks.md).
DECODE_INLINE_BYTES = 256 * 1024


async def db(request: web.Request, fn: Callable[[Store], T]) -> T:
    """Run ``fn(store)`` on a database thread (one for SQLite; the pool's size for
    PostgreSQL): the event loop never waits for a query or an fsync."""
    return await on_db(request.app, fn)


async def analyst_db(request: web.Request, fn: Callable[[Store], T]) -> T:
    """``db`` for an analyst's read (a report, a listing, a certificate): on the replica
    storage.read_url when one is set, so that the primary's capacity stays the probes'
    (docs/scaling.md, section 7); on the store itself otherwise."""
    store = request.app.get(READER)
    if store is None:
        store = request.app[STORE]
    return await asyncio.get_running_loop().run_in_executor(
        request.app[DB_THREADS], partial(fn, store))


async def on_db(app: web.Application, fn: Callable[[Store], T]) -> T:
    """``db`` for work that has no request: background tasks, the metrics listener."""
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
