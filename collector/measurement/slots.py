"""Concurrency for the open measurement endpoints (HTTP transfers, ndt7, LibreSpeed, the
speed-test page's): one pool of transfer slots, shared by anonymous clients and by the
fleet's probes measuring under a ticket.

Anyone can open these endpoints, so a few idle sockets must not hold every slot: each
anonymous client may hold at most ``per_client`` slots, a client being one IPv4 address
or one IPv6 /64 (one customer's LAN, which a single host can fill with addresses at will,
RFC 4291 §2.5.1 interface identifiers). Every handler also bounds its own time
(measurement.max_duration_s), so even an allowed slot is released.

Probes behind one address (carrier-grade NAT) would share that address's slots, so a probe
may present a ticket its collector signed (collector/tickets.py): its transfers are
counted per ticket (collector/measurement/ledger.py: streams at once, bytes, busy
seconds), not against its address. Tickets and anonymous clients share the pool, but
``reserved`` slots are for tickets only, so strangers cannot starve the fleet; a stranger
at a ticketed probe's address keeps its own per-address share.

Every capacity refusal (429, 503) carries spec.REFUSED_HEADER with its reason (busy,
per_client, anonymous_share, ticket_streams, ledger_full): only a refusal so marked is
the server's to the agent, a bare 429 or 503 may come from anything on the path. A
refused ticket is a 403 with spec.TICKET_REFUSED_HEADER instead.

A request's ticket is read from the Bbprobe-Ticket header only (never a query parameter:
URLs end up in error texts and logs). A server that accepts no tickets (tickets.enabled
= false, or a measurement-only server trusting no key) serves it as anonymous, as an
older server would.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from agent import spec
from collector.config import MeasurementConfig
from collector.errors import ApiError
from collector.keys import OwnKey
from collector.limits import RateLimiter
from collector.measurement.ledger import Ledger, Refusal, Usage
from collector.metrics import Metrics
from collector.tickets import Claims, TicketRefused, Verifier, origin_of

RETRY_AFTER_S = "5"
# Capacity asks (echo?capacity=1) per client (an address or a /64): each may cost an
# Ed25519 verification (a forged ticket is never cached). An agent asks once per
# candidate server at a session's start, so a burst covers several probes behind one
# address starting together; beyond the rate, 429 (marked per_client).
CAPACITY_ASKS_PER_MIN = 300.0
CAPACITY_ASKS_BURST = 20
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


def capacity_refused(status: int, reason: str, message: str,
                     retry_after: str = RETRY_AFTER_S) -> ApiError:
    """A refusal for capacity (429, 503), marked as this server's (spec.REFUSED_HEADER)."""
    return ApiError(status, message, retry_after=retry_after,
                    headers={spec.REFUSED_HEADER: reason})


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

    def out_of_time(self) -> ApiError:
        """The refusal of a transfer stopped at its ticket's time (``seconds`` was less
        than the request's own cap): a ticket refusal, not the transfer's failure
        (counted); the connection closes after it."""
        self.refused("allowance_duration")
        allowance = self.usage.claims.allowance.duration_s if self.usage else 0.0
        return ticket_refused("allowance_duration", f"stopped after {self.seconds:.1f} s: "
                              f"the ticket's {allowance:g} s of measuring are used",
                              close=True)


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

    def check(self, address: str | None, claims: Claims | None = None, *,
              seconds: float | None = None, nbytes: int | None = None,
              count: bool = True) -> Usage | None:
        """Raise the refusal a transfer from ``address`` (under ``claims``, asking for
        ``seconds`` and ``nbytes`` if it says) would get now; takes nothing. Its ticket's
        usage so far, if any. ``count``: a refusal is counted in the metrics (not for a
        capacity ask, which is no transfer)."""
        refused = self.refused if count else (lambda reason: None)
        if claims is not None:
            try:
                usage = self.ledger.check(claims, self.clock(), self.wall(),
                                          seconds=seconds, nbytes=nbytes)
            except Refusal as exc:
                refused(exc.reason)
                if exc.reason == "ticket_streams":
                    raise capacity_refused(429, exc.reason, exc.message) from None
                if exc.reason == "ledger_full":
                    raise capacity_refused(503, exc.reason, exc.message,
                                           retry_after="30") from None
                raise ticket_refused(exc.reason, exc.message) from None
            self._busy(refused)
            return usage
        key = client_key(address)
        held = self.by_client.get(key, 0)
        if held >= self.per_client:
            refused("per_client")
            raise capacity_refused(429, "per_client", f"too many transfers from {key}: "
                                   f"{held} running (limit {self.per_client} per client)")
        self._busy(refused)
        if self.reserved and self.running - self.ticketed >= self.limit - self.reserved:
            refused("anonymous_share")
            raise capacity_refused(503, "anonymous_share", f"server busy: "
                                   f"{self.limit - self.reserved} transfers without a "
                                   f"ticket already running ({self.reserved} of "
                                   f"{self.limit} slots are kept for ticketed probes)")
        return None

    def _busy(self, refused: Callable[[str], None]) -> None:
        if self.running >= self.limit:
            refused("busy")
            raise capacity_refused(503, "busy", f"server busy: {self.limit} transfers "
                                   "already running")

    @contextlib.asynccontextmanager
    async def slot(self, address: str | None, claims: Claims | None = None, *,
                   seconds: float | None = None, nbytes: int | None = None
                   ) -> AsyncIterator[Transfer]:
        """A slot for one transfer, or the refusal (check). ``seconds``, ``nbytes``: what
        the request asks for, if it says: a ticket with less left is refused now
        (allowance_duration, allowance_bytes), rather than cut short later."""
        self.check(address, claims, seconds=seconds, nbytes=nbytes)
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
    collector that issues, its own, asked of its holder (keys.OwnKey, shared with the
    issuing side) when a ticket names a key the verifier does not know yet."""

    def __init__(self, verifier: Verifier, own: OwnKey | None = None) -> None:
        self.verifier = verifier
        self.own = own

    async def verify(self, token: str, request_origin: str | None, now: float) -> Claims:
        try:
            return self.verifier.verify(token, request_origin, now)
        except TicketRefused as exc:
            if exc.code != "unknown_key" or self.own is None:
                raise
            # The holder reads the key beside the loop, once (or at most every RETRY_S
            # while it is unusable), and answers from memory after that.
            key = await self.own.get()
            if key is None or key.kid in self.verifier.keys:
                raise
            self.verifier.trust(key.kid, key.public)
        return self.verifier.verify(token, request_origin, now)


async def presented(request: web.Request, *, count: bool = True) -> Claims | None:
    """The verified claims of the ticket in the request's Bbprobe-Ticket header; None
    without one, or where no ticket is accepted; a refused one raises (403), counted
    unless ``count`` is false (a capacity ask)."""
    token = request.headers.get(spec.TICKET_HEADER)
    gate = request.app.get(GATE)
    if token is None or gate is None:
        return None
    try:
        # The Host header, not request.host: without one aiohttp would look up this
        # machine's name (a DNS query a stranger could trigger at will).
        return await gate.verify(token, origin_of(request.scheme,
                                                  request.headers.get("Host")),
                                 time.time())
    except TicketRefused as exc:
        if count:
            request.app[SLOTS].refused(exc.code)
        raise ticket_refused(exc.code, exc.message) from None


def capacity_limiter() -> RateLimiter:
    return RateLimiter(CAPACITY_ASKS_PER_MIN, CAPACITY_ASKS_BURST)


MEASUREMENT_CONFIG = web.AppKey("measurement_config", MeasurementConfig)
SLOTS = web.AppKey("transfer_slots", TransferSlots)
GATE = web.AppKey("ticket_gate", Gate)
CAPACITY_LIMITER = web.AppKey("capacity_limiter", RateLimiter)
