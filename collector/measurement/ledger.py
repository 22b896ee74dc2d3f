"""What each measurement ticket has used on this server (issue 24): pure, the clock given.

Per ticket: transfers running, bytes moved (both directions), and busy seconds, the time
during which at least one of its transfers ran (so 20 parallel streams for 10 s use 10 s,
as a session plans them: agent/budget.py). A ticket's entry lives until its expiry (plus
the verifier's leeway, while the verifier would still accept it: dropped sooner, a
reused ticket would start afresh), and never while one of its transfers runs. The ledger
holds at most ``max_tickets`` entries: a full one refuses new tickets (the slots answer
503) rather than grow; only tickets whose signature verified reach it.
"""

from __future__ import annotations

from dataclasses import dataclass

from collector.tickets import LEEWAY_S, Claims

# A fleet of 10,000 probes, each with one ticket a 15-minute session and tickets living
# 20 minutes, holds about 2 entries a probe; each entry is a few hundred bytes.
MAX_TICKETS = 50_000
# How often (seconds, monotonic) expired entries are swept while the ledger is not full.
SWEEP_INTERVAL_S = 60.0


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


class Refusal(Exception):
    """The ledger refuses a transfer: ``reason`` (an allowance code, ticket_streams or
    ledger_full) and one line saying why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Ledger:
    def __init__(self, max_tickets: int = MAX_TICKETS) -> None:
        self.max_tickets = max_tickets
        self.tickets: dict[str, Usage] = {}
        self._swept = float("-inf")

    def check(self, claims: Claims, now: float, wall: float) -> Usage | None:
        """Raise Refusal if a transfer under ``claims`` may not start now; its usage so
        far (None: the first under this ticket). Nothing changes but expired entries."""
        usage = self.tickets.get(claims.ticket_id)
        if usage is None:
            self.sweep(now, wall)
            if len(self.tickets) >= self.max_tickets:
                raise Refusal("ledger_full", f"{self.max_tickets} tickets in use here; "
                              "retry later")
        used = usage or Usage(claims)
        allowance = claims.allowance
        if used.running >= allowance.streams:
            raise Refusal("ticket_streams", f"ticket {claims.ticket_id} already runs "
                          f"{used.running} transfers (its allowance: {allowance.streams} "
                          "at once)")
        if used.bytes >= allowance.bytes:
            raise Refusal("allowance_bytes", f"ticket {claims.ticket_id} has moved "
                          f"{used.bytes} bytes, its allowance of {allowance.bytes}")
        if used.busy(now) >= allowance.duration_s:
            raise Refusal("allowance_duration", f"ticket {claims.ticket_id} has measured "
                          f"for {used.busy(now):.0f} s, its allowance of "
                          f"{allowance.duration_s:g} s")
        return usage

    def start(self, claims: Claims, now: float, wall: float) -> Usage:
        """Check, then count one more transfer running under ``claims``."""
        usage = self.check(claims, now, wall)
        if usage is None:
            usage = self.tickets[claims.ticket_id] = Usage(claims)
        if usage.running == 0:
            usage.busy_since = now
        usage.running += 1
        return usage

    def stop(self, usage: Usage, now: float, wall: float) -> None:
        usage.running -= 1
        if usage.running == 0:
            usage.busy_s += now - usage.busy_since
            if wall > usage.claims.expires_at + LEEWAY_S:
                self.tickets.pop(usage.claims.ticket_id, None)

    def sweep(self, now: float, wall: float) -> None:
        """Drop the entries of expired tickets with nothing running: every
        SWEEP_INTERVAL_S, or at once when the ledger is full."""
        if now - self._swept < SWEEP_INTERVAL_S and len(self.tickets) < self.max_tickets:
            return
        self._swept = now
        for ticket_id in [t for t, u in self.tickets.items()
                          if not u.running and wall > u.claims.expires_at + LEEWAY_S]:
            del self.tickets[ticket_id]
