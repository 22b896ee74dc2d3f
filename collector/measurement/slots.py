"""Concurrency for the open measurement endpoints (HTTP transfers, ndt7, LibreSpeed, the
speed-test page's): one pool of transfer slots, with a share per client.

Anyone can open these endpoints, so a few idle sockets must not hold every slot (issue
12): each client may hold at most ``per_client`` slots, a client being one IPv4 address
or one IPv6 /64 (one customer's LAN, which a single host can fill with addresses at
will, RFC 4291 §2.5.1 interface identifiers). Every handler also bounds its own time
(measurement.max_duration_s), so even an allowed slot is released.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import AsyncIterator

from aiohttp import web

from collector.config import MeasurementConfig
from collector.errors import ApiError
from collector.metrics import Metrics


def client_key(address: str | None) -> str:
    """The unit a client's slots are counted in: an IPv4 address, or an IPv6 /64."""
    try:
        ip = ipaddress.ip_address((address or "").split("%")[0])
    except ValueError:
        return address or "unknown"
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class TransferSlots:
    """Counts running transfers, in all and per client; refuses one above either limit."""

    def __init__(self, limit: int, per_client: int, metrics: Metrics | None = None) -> None:
        self.limit = limit
        self.per_client = per_client
        self.running = 0
        self.by_client: dict[str, int] = {}
        self.metrics = metrics
        if metrics is not None:
            metrics.transfers_limit.set(limit)

    @contextlib.asynccontextmanager
    async def slot(self, address: str | None) -> AsyncIterator[None]:
        key = client_key(address)
        held = self.by_client.get(key, 0)
        if held >= self.per_client:
            self._refused("per_client")
            raise ApiError(429, f"too many transfers from {key}: {held} running (limit "
                                f"{self.per_client} per client)", retry_after="5")
        if self.running >= self.limit:
            self._refused("busy")
            raise ApiError(503, f"server busy: {self.limit} transfers already running",
                           retry_after="5")
        self.running += 1
        self.by_client[key] = held + 1
        if self.metrics is not None:
            self.metrics.transfers.inc()
        try:
            yield
        finally:
            if self.metrics is not None:
                self.metrics.transfers.dec()
            self.running -= 1
            left = self.by_client[key] - 1
            if left:
                self.by_client[key] = left
            else:
                del self.by_client[key]  # no entry per past client: memory stays bounded


    def _refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.transfers_refused.labels(reason).inc()


CONFIG = web.AppKey("measurement_config", MeasurementConfig)
SLOTS = web.AppKey("transfer_slots", TransferSlots)
