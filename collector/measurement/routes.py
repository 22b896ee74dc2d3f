"""Registers every measurement endpoint and the page (roles: public), with the transfer
slots they share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from agent import payload
from collector.config import AnonymousConfig, MeasurementConfig
from collector.measurement import http, librespeed, ndt7, page
from collector.measurement.slots import (
    CAPACITY_LIMITER,
    GATE,
    MEASUREMENT_CONFIG,
    SLOTS,
    Gate,
    TransferSlots,
    capacity_limiter,
    reserved_slots,
)
from collector.metrics import Metrics
from collector.routing import Routes


def add_page(routes: Routes, *, record: bool = True,
             anonymous: AnonymousConfig | None = None) -> None:
    """The speed-test page and its style sheet and script (served even when the endpoints
    are off: it says so); ``record=False``: it does not post its result (a
    measurement-only server); ``anonymous``: the retention its privacy note states."""
    text = page.page(record, anonymous)
    files = page.assets()

    async def speedtest(request: web.Request) -> web.Response:
        return web.Response(text=text, content_type="text/html", headers=page.PAGE_HEADERS)

    async def asset(request: web.Request) -> web.Response:
        found = files.get(request.match_info["asset"])
        if found is None:
            raise web.HTTPNotFound()
        # Named by a digest of its content: a new version has a new name, so this one
        # may be cached for good.
        return web.Response(body=found.body, content_type=found.content_type, headers={
            **page.PAGE_HEADERS, "Cache-Control": "public, max-age=31536000, immutable"})

    with routes.measurement():  # a page load is part of a test: counted, not a line each
        routes.get("/speedtest", speedtest, role="public")
        routes.get(r"/speedtest/{asset:speedtest\.[0-9a-f]{12}\.(?:css|js)}", asset,
                   role="public")


def add_routes(routes: Routes, cfg: MeasurementConfig,
               store_subtest: Callable[[ndt7.Subtest], Awaitable[None]],
               metrics: Metrics | None = None, gate: Gate | None = None) -> None:
    """Every measurement endpoint, sharing one set of transfer slots; ``gate``: the
    tickets this server accepts (None: none, every transfer is anonymous)."""
    routes.app[MEASUREMENT_CONFIG] = cfg
    routes.app[SLOTS] = TransferSlots(cfg.max_concurrent, cfg.max_concurrent_per_client,
                                      metrics, reserved=reserved_slots(cfg, gate is not None),
                                      max_bytes=cfg.max_bytes,
                                      max_duration_s=cfg.max_duration_s)
    routes.app[CAPACITY_LIMITER] = capacity_limiter()
    if gate is not None:
        routes.app[GATE] = gate
    payload.file()  # generate the random payload now, not during the first test
    with routes.measurement():
        http.add_routes(routes)
        librespeed.add_routes(routes)
        ndt7.add_routes(routes, store_subtest)
