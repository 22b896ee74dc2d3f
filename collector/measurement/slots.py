"""Concurrency for the open measurement endpoints (HTTP transfers, ndt7, LibreSpeed, the
speed-test page's): one pool of transfer slots, shared by anonymous clients and by the
fleet's probes measuring under a ticket.

Anyone can open these endpoints, so a few idle sockets must not hold every slot (issue
12): each anonymous client may hold at most ``per_client`` slots, a client being one IPv4
address or one IPv6 /64 (one customer's LAN, which a single host can fill with addresses
at will, RFC 4291 §2.5.1 interface identifiers). Every handler also bounds its own time
(measurement.max_duration_s), so even an allowed slot is released.

Probes behind one address (carrier-grade NAT) would share that address's slots, so a
probe may present a ticket its collector signed (issue 24, collector/tickets.py): its
transfers are counted per ticket (collector/measurement/ledger.py: streams at once,
bytes, busy seconds), not against its address. Tickets and anonymous clients share the
pool, but ``reserved`` slots are for tickets only, so strangers cannot starve the fleet;
a stranger at a ticketed probe's address keeps its own per-address share.

A request's ticket is read from the Bbprobe-Ticket header only (never a query parameter:
URLs end up in error texts and logs). A server that accepts no tickets (tickets.enabled
= false, or a measurement-only server trusting no key) serves it as anonymous, as an
older server would.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import spec
from collector.config import MeasurementConfig
from collector.errors import ApiError, ConfigError
from collector.measurement.ledger import Ledger, Refusal, Usage
from collector.metrics import Metrics
from collector.tickets import Claims, TicketRefused, Verifier, origin_of

log = logging.getLogger("bbprobe.collector")
RETRY_AFTER_S = "5"
_DEFAULTS = MeasurementConfig()


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


def ticket_refused(code: str, message: str, close: bool = False) -> ApiError:
    """A refused ticket: 403, the code in the body and in Bbprobe-Ticket-Refused."""
    return ApiError(403, f"ticket refused ({code}): {message}", field=spec.TICKET_HEADER,
                    code=code, headers={spec.TICKET_REFUSED_HEADER: code}, close=close)


def reserved_slots(cfg: MeasurementConfig, accepts_tickets: bool) -> int:
    """Slots anonymous transfers may not take."""
    return math.floor(cfg.max_concurrent * cfg.ticket_reserved_share) if accepts_tickets \
        else 0


class Transfer:
    """One admitted transfer: its caps (``seconds``, ``bytes``: the per-request caps, or
    less when its ticket has less left) and its ticket's byte meter."""

    __slots__ = ("bytes", "refused", "seconds", "usage")

    def __init__(self, seconds: float, nbytes: int, usage: Usage | None,
                 refused: Callable[[str], None] = lambda reason: None) -> None:
        self.seconds = seconds
        self.bytes = nbytes
        self.usage = usage
        self.refused = refused  # counts a refusal by reason (the metrics)

    def take(self, n: int) -> int:
        """Bytes about to be sent: how many of ``n`` the ticket still allows (all of
        them without a ticket), counted as used."""
        if self.usage is None:
            return n
        grant = min(n, self.usage.bytes_left())
        self.usage.bytes += grant
        return grant

    def record(self, n: int) -> bool:
        """Bytes received: counted; False once the ticket's allowance is exceeded."""
        if self.usage is None:
            return True
        self.usage.bytes += n
        return self.usage.bytes <= self.usage.claims.allowance.bytes

    def over(self, detail: str | None = None) -> ApiError:
        """The refusal of a transfer its ticket has not the bytes for (counted); the
        connection closes after it (the rest of a body is not read)."""
        self.refused("allowance_bytes")
        allowance = self.usage.claims.allowance.bytes if self.usage else 0
        return ticket_refused("allowance_bytes",
                              detail or f"the ticket's {allowance} bytes are used", close=True)


class TransferSlots:
    """Counts running transfers, in all, per anonymous client and per ticket; refuses
    one above a limit. ``clock``: monotonic seconds; ``wall``: seconds since the epoch
    (tickets' expiry)."""

    def __init__(self, limit: int, per_client: int, metrics: Metrics | None = None, *,
                 reserved: int = 0, max_bytes: int = _DEFAULTS.max_bytes,
                 max_duration_s: float = _DEFAULTS.max_duration_s,
                 ledger: Ledger | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self.per_client = per_client
        self.reserved = reserved
        self.max_bytes = max_bytes
        self.max_duration_s = max_duration_s
        self.running = 0
        self.ticketed = 0
        self.by_client: dict[str, int] = {}
        self.ledger = ledger or Ledger()
        self.clock = clock
        self.wall = wall
        self.metrics = metrics
        if metrics is not None:
            metrics.transfers_limit.set(limit)

    def check(self, address: str | None, claims: Claims | None = None) -> Usage | None:
        """Raise the refusal a transfer from ``address`` (under ``claims``) would get
        now; takes nothing. Its ticket's usage so far, if any."""
        if claims is not None:
            try:
                usage = self.ledger.check(claims, self.clock(), self.wall())
            except Refusal as exc:
                self.refused(exc.reason)
                if exc.reason == "ticket_streams":
                    raise ApiError(429, exc.message, retry_after=RETRY_AFTER_S) from None
                if exc.reason == "ledger_full":
                    raise ApiError(503, exc.message, retry_after="30") from None
                raise ticket_refused(exc.reason, exc.message) from None
            self._busy()
            return usage
        key = client_key(address)
        held = self.by_client.get(key, 0)
        if held >= self.per_client:
            self.refused("per_client")
            raise ApiError(429, f"too many transfers from {key}: {held} running (limit "
                                f"{self.per_client} per client)", retry_after=RETRY_AFTER_S)
        self._busy()
        if self.reserved and self.running - self.ticketed >= self.limit - self.reserved:
            self.refused("anonymous_share")
            raise ApiError(503, f"server busy: {self.limit - self.reserved} transfers "
                                f"without a ticket already running ({self.reserved} of "
                                f"{self.limit} slots are kept for ticketed probes)",
                           retry_after=RETRY_AFTER_S)
        return None

    def _busy(self) -> None:
        if self.running >= self.limit:
            self.refused("busy")
            raise ApiError(503, f"server busy: {self.limit} transfers already running",
                           retry_after=RETRY_AFTER_S)

    @contextlib.asynccontextmanager
    async def slot(self, address: str | None, claims: Claims | None = None
                   ) -> AsyncIterator[Transfer]:
        self.check(address, claims)
        if claims is not None:
            now = self.clock()
            # check() passed: start() cannot refuse (nothing ran in between).
            usage = self.ledger.start(claims, now, self.wall())
            transfer = Transfer(min(self.max_duration_s, usage.seconds_left(now)),
                                min(self.max_bytes, usage.bytes_left()), usage, self.refused)
            self.ticketed += 1
            key = None
        else:
            transfer = Transfer(self.max_duration_s, self.max_bytes, None)
            key = client_key(address)
            self.by_client[key] = self.by_client.get(key, 0) + 1
        self.running += 1
        self._count(+1, claims is not None)
        try:
            yield transfer
        finally:
            self._count(-1, claims is not None)
            self.running -= 1
            if key is None:
                self.ticketed -= 1
                assert transfer.usage is not None
                self.ledger.stop(transfer.usage, self.clock(), self.wall())
            else:
                left = self.by_client[key] - 1
                if left:
                    self.by_client[key] = left
                else:
                    del self.by_client[key]  # no entry per past client: memory bounded

    def _count(self, step: int, ticketed: bool) -> None:
        if self.metrics is not None:
            self.metrics.transfers.inc(step)
            if ticketed:
                self.metrics.transfers_ticketed.inc(step)

    def refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.transfers_refused.labels(reason).inc()


class Gate:
    """This server's verification of presented tickets: the keys it trusts and, on a
    collector that issues, its own, loaded (or generated) at first need by ``own_key``."""

    def __init__(self, verifier: Verifier,
                 own_key: Callable[[], tuple[str, Ed25519PublicKey]] | None = None) -> None:
        self.verifier = verifier
        self._own_key = own_key

    def verify(self, token: str, request_origin: str | None, now: float) -> Claims:
        if self._own_key is not None:
            load, self._own_key = self._own_key, None  # tried once: never a read a request
            try:
                self.verifier.trust(*load())
            except ConfigError as exc:
                log.error("tickets: this collector's signing key is unusable, so its "
                          "tickets are refused here: %s", exc)
        return self.verifier.verify(token, request_origin, now)


def presented(request: web.Request) -> Claims | None:
    """The verified claims of the ticket in the request's Bbprobe-Ticket header; None
    without one, or where no ticket is accepted; a refused one raises (403)."""
    token = request.headers.get(spec.TICKET_HEADER)
    gate = request.app.get(GATE)
    if token is None or gate is None:
        return None
    try:
        # The Host header, not request.host: without one aiohttp would look up this
        # machine's name (a DNS query a stranger could trigger at will).
        return gate.verify(token, origin_of(request.scheme, request.headers.get("Host")),
                           time.time())
    except TicketRefused as exc:
        request.app[SLOTS].refused(exc.code)
        raise ticket_refused(exc.code, exc.message) from None


CONFIG = web.AppKey("measurement_config", MeasurementConfig)
SLOTS = web.AppKey("transfer_slots", TransferSlots)
GATE = web.AppKey("ticket_gate", Gate)
