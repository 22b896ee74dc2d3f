"""Registers every measurement endpoint and the page (roles: public), with the transfer
slots they share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from agent import payload
from collector.config import MeasurementConfig
from collector.measurement import http, librespeed, ndt7
from collector.measurement.page import page
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


def add_page(routes: Routes, *, record: bool = True) -> None:
    """The speed-test page (served even when the endpoints are off: it says so);
    ``record=False``: it does not post its result (a measurement-only server)."""
    text = page(record)

    async def speedtest(request: web.Request) -> web.Response:
        return web.Response(text=text, content_type="text/html")

    routes.get("/speedtest", speedtest, role="public")


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
    http.add_routes(routes)
    librespeed.add_routes(routes)
    ndt7.add_routes(routes, store_subtest)
