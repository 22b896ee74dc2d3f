"""What each measurement ticket has used on this server: pure, the clock given.

Per ticket: transfers running, bytes moved (both directions), and busy seconds, the time
during which at least one of its transfers ran (so 20 parallel streams for 10 s use 10 s,
as a session plans them: agent/budget.py). A ticket's entry lives until its expiry (plus
the verifier's leeway, while the verifier would still accept it: dropped sooner, a
reused ticket would start afresh), and never while one of its transfers runs.

Per probe (a ticket's ``sub``), since one probe's credential can have its collector mint
tickets at its rate limit: at most ``per_probe`` live entries (a new ticket beyond them is
refused, too_many_tickets), and its tickets' running transfers together at most the
streams of the ticket asking (ticket_streams), so one probe cannot take more than one
ticket's share of the slots nor fill the ledger.

The ledger holds at most ``max_tickets`` entries: a full one refuses new tickets (the
slots answer 503) rather than grow; only tickets whose signature verified reach it.
Expired entries leave by a heap ordered by expiry, so a full ledger costs no scan.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from collector.errors import CollectorError
from collector.tickets import LEEWAY_S, Claims

# A fleet of 10,000 probes, each with one ticket a 15-minute session and tickets living
# 20 minutes, holds about 2 entries a probe; each entry is a few hundred bytes.
MAX_TICKETS = 50_000
# Live tickets of one probe at one server. An honest probe holds 2 or 3: a session every
# 15 minutes with 20-minute tickets, its IPv4 and IPv6 sessions, a technician's
# check-config; 8 leaves room for retries, and keeps one stolen probe credential to 8
# entries of MAX_TICKETS however many tickets it has minted.
MAX_TICKETS_PER_PROBE = 8


@dataclass(slots=True)
class Usage:
    claims: Claims
    running: int = 0
    bytes: int = 0
    busy_s: float = 0.0  # closed busy periods
    busy_since: float = 0.0  # monotonic start of the open one (running > 0)

    def busy(self, now: float) -> float:
        return self.busy_s + (now - self.busy_since if self.running else 0.0)

    def bytes_left(self) -> int:
        return max(0, self.claims.allowance.bytes - self.bytes)

    def seconds_left(self, now: float) -> float:
        return max(0.0, self.claims.allowance.duration_s - self.busy(now))


@dataclass(slots=True)
class ProbeUse:
    """One probe's live tickets here and their transfers running."""

    tickets: int = 0
    running: int = 0


class Refusal(CollectorError):
    """The ledger refuses a transfer: ``reason`` (an allowance code, too_many_tickets,
    ticket_streams or ledger_full) and one line saying why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Ledger:
    def __init__(self, max_tickets: int = MAX_TICKETS,
                 per_probe: int = MAX_TICKETS_PER_PROBE) -> None:
        self.max_tickets = max_tickets
        self.per_probe = per_probe
        self.tickets: dict[str, Usage] = {}
        self.probes: dict[str, ProbeUse] = {}
        # (the wall time an entry may go, ticket id): at most one item per entry, plus
        # the items of entries dropped as their last transfer ended, until their time.
        self._expiry: list[tuple[float, str]] = []

    def check(self, claims: Claims, now: float, wall: float, *, seconds: float | None = None,
              nbytes: int | None = None) -> Usage | None:
        """Raise Refusal if a transfer under ``claims`` may not start now, or cannot have
        what it asks for (``seconds`` of measuring, ``nbytes`` bytes) from what the
        ticket has left; its usage so far (None: the first under this ticket here).
        Nothing changes but expired entries."""
        self.sweep(wall)
        usage = self.tickets.get(claims.ticket_id)
        probe = self.probes.get(claims.probe) or ProbeUse()
        if usage is None:
            if probe.tickets >= self.per_probe:
                raise Refusal("too_many_tickets", f"probe {claims.probe} already has "
                              f"{probe.tickets} tickets in use here (at most "
                              f"{self.per_probe}): measure with one of them")
            if len(self.tickets) >= self.max_tickets:
                raise Refusal("ledger_full", f"{self.max_tickets} tickets in use here; "
                              "retry later")
        used = usage or Usage(claims)
        allowance = claims.allowance
        if used.running >= allowance.streams:
            raise Refusal("ticket_streams", f"ticket {claims.ticket_id} already runs "
                          f"{used.running} transfers (its allowance: {allowance.streams} "
                          "at once)")
        if probe.running >= allowance.streams:
            raise Refusal("ticket_streams", f"probe {claims.probe}'s tickets already run "
                          f"{probe.running} transfers (a ticket's allowance: "
                          f"{allowance.streams} at once)")
        if used.bytes >= allowance.bytes:
            raise Refusal("allowance_bytes", f"ticket {claims.ticket_id} has moved "
                          f"{used.bytes} bytes, its allowance of {allowance.bytes}")
        if used.busy(now) >= allowance.duration_s:
            raise Refusal("allowance_duration", f"ticket {claims.ticket_id} has measured "
                          f"for {used.busy(now):.0f} s, its allowance of "
                          f"{allowance.duration_s:g} s")
        if nbytes is not None and nbytes > used.bytes_left():
            raise Refusal("allowance_bytes", f"{nbytes} bytes asked; the ticket has "
                          f"{used.bytes_left()} left")
        if seconds is not None and seconds > used.seconds_left(now):
            raise Refusal("allowance_duration", f"{seconds:g} s asked; the ticket has "
                          f"{used.seconds_left(now):.1f} s left")
        return usage

    def start(self, claims: Claims, now: float, wall: float) -> Usage:
        """Check, then count one more transfer running under ``claims``."""
        usage = self.check(claims, now, wall)
        if usage is None:
            usage = self.tickets[claims.ticket_id] = Usage(claims)
            self.probes.setdefault(claims.probe, ProbeUse()).tickets += 1
            heapq.heappush(self._expiry, (claims.expires_at + LEEWAY_S, claims.ticket_id))
        if usage.running == 0:
            usage.busy_since = now
        usage.running += 1
        self.probes[claims.probe].running += 1
        return usage

    def stop(self, usage: Usage, now: float, wall: float) -> None:
        usage.running -= 1
        self.probes[usage.claims.probe].running -= 1
        if usage.running == 0:
            usage.busy_s += now - usage.busy_since
            if wall > usage.claims.expires_at + LEEWAY_S:
                self._drop(usage.claims.ticket_id)

    def sweep(self, wall: float) -> None:
        """Drop the entries of expired tickets with nothing running (one still running
        goes as its last transfer stops): O(1) when none has expired."""
        while self._expiry and self._expiry[0][0] < wall:
            _, ticket_id = heapq.heappop(self._expiry)
            usage = self.tickets.get(ticket_id)
            if usage is not None and not usage.running:
                self._drop(ticket_id)

    def _drop(self, ticket_id: str) -> None:
        usage = self.tickets.pop(ticket_id, None)
        if usage is None:
            return
        probe = self.probes[usage.claims.probe]
        probe.tickets -= 1
        if not probe.tickets and not probe.running:
            del self.probes[usage.claims.probe]
