"""Where a session's measurement ticket comes from, the I/O edge of agent/ticket.py
(which stays pure).

A session takes one ticket (its ``jti`` is one a session): the one the collector sent with
the instruction fetch (``Bbprobe-Ticket`` on the instruction GET, 200 or 304: no round
trip of its own) while it is still usable, else one asked for alone (POST
/api/v1/tickets, at most spec.TICKET_TIMEOUT_S, and no longer than the session's refusal
allowance leaves: the time the POST takes is charged to it, agent/budget.py). Under dual
stack the IPv4 session takes the prefetched ticket and the IPv6 session asks for its own.
A ticket's receipt time is taken here, on the monotonic clock: how long it stays usable
is its lifetime from then (agent/ticket.py), whatever the probe's wall clock says.

Nothing here raises: with no ticket (no collector, an older collector, tickets not
issued, a header or reply that does not parse, a collector away) the session measures
as before, under the measurement server's per-address rule, and the progress line says
why.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from agent import spec
from agent.decoding import SchemaError, decode
from agent.errors import DeliveryError
from agent.schema import TicketUse, format_utc, to_dict
from agent.ticket import EXPIRY_MARGIN_S, Ticket, TicketError, peek

if TYPE_CHECKING:
    from agent.client import CollectorClient

# A JWS compact serialisation is base64url parts joined by dots (RFC 7515 §7.1): anything
# else would be copied into a request head as it is.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")


@dataclass(frozen=True, slots=True)
class Offer:
    """What the instruction fetch said about tickets."""

    ticket: Ticket | None = None
    # Why the ticket it carried cannot be used (a header that does not parse).
    error: str | None = None
    # The collector answered the fetch (200, 304, or 404 from one that predates
    # instructions): a ticket-issuing collector sends one then, so with none it issues
    # none and no POST is made. False: no answer (away, timed out): asked by POST.
    answered: bool = False


def read(token: str | None, received_at: float) -> tuple[Ticket | None, str | None]:
    """A ticket from a header or a reply, received at monotonic time ``received_at``
    (pure): (the ticket, None), (None, why not), or (None, None) when there is none."""
    if token is None or not token.strip():
        return None, None
    token = token.strip()
    if not _TOKEN_RE.fullmatch(token):
        return None, "the collector's ticket is not a compact JWS"
    try:
        ticket = peek(token, received_at=received_at)
        # It goes into the result as it is: a ticket the schema would refuse would
        # cost the result, not just the ticket.
        decode(TicketUse, json.loads(json.dumps(to_dict(use_record(ticket, None, None)))))
    except (TicketError, SchemaError, ValueError, OverflowError, OSError) as exc:
        return None, f"the collector's ticket is unusable: {exc}"
    return ticket, None


def offer_of(header: str | None, received_at: float | None = None) -> Offer:
    """The Offer of an answered instruction fetch whose ticket header is ``header``,
    received at monotonic time ``received_at`` (None: now)."""
    ticket, error = read(header, time.monotonic() if received_at is None else received_at)
    return Offer(ticket, error, answered=True)


def short_id(ticket: Ticket) -> str:
    return ticket.ticket_id[:8] + ("…" if len(ticket.ticket_id) > 8 else "")


def use_record(ticket: Ticket, server_url: str | None, refused: str | None, *,
               withheld: bool = False) -> TicketUse:
    """The result's account of the session's ticket (pure): presented when it names the
    session's server, unless the session ``withheld`` it (its method needs more streams
    at once than the ticket allows)."""
    return TicketUse(
        ticket_id=ticket.ticket_id,
        expires_at=format_utc(datetime.fromtimestamp(ticket.expires_at, UTC)),
        servers=ticket.servers, presented=not withheld and ticket.covers(server_url),
        refused=refused)


@dataclass(frozen=True, slots=True)
class Taken:
    ticket: Ticket | None
    # What the progress line says when there is no ticket and that is no problem.
    note: str | None = None
    # Seconds spent getting it (the POST; 0 for the instruction fetch's): the session
    # charges them to its refusal allowance.
    spent_s: float = 0.0


class TicketSource:
    """The tickets of one slot's sessions (one, or two under dual stack). ``warn`` is
    told every problem (a ticket that did not parse, a collector that did not answer):
    ``bbprobe run`` shows it as a progress line, the daemon logs it. What is no problem
    (the collector issues no tickets) is the ``Taken.note`` the session shows.
    ``clock``: monotonic seconds (a ticket's receipt, the POST's time)."""

    def __init__(self, client: CollectorClient | None, offer: Offer | None = None, *,
                 timeout_s: float = spec.TICKET_TIMEOUT_S,
                 warn: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._offer: Offer | None = offer or Offer()
        self._timeout_s = timeout_s
        self._warn = warn
        self._clock = clock
        # The collector answered without a ticket, or 404 to the POST: it issues none.
        self._none = False

    def _problem(self, message: str, spent_s: float = 0.0) -> Taken:
        if self._warn is not None:
            self._warn(message + ": measuring without a ticket")
        return Taken(None, spent_s=spent_s)

    async def take(self, limit_s: float | None = None) -> Taken:
        """The ticket for the next session (never raises); a POST for it waits at most
        ``limit_s`` (the session's refusal allowance; None: TICKET_TIMEOUT_S alone), and
        none is made when that is nothing."""
        offer, self._offer = self._offer, None
        if self._client is None:
            return Taken(None)
        if offer is not None:
            if offer.ticket is not None and offer.ticket.usable(self._clock()):
                return Taken(offer.ticket)
            if offer.error is not None and self._warn is not None:
                self._warn(f"{offer.error}: asking for another")
            self._none = offer.answered and offer.ticket is None and offer.error is None
        if self._none:
            return Taken(None, "the collector issues no measurement tickets: measuring "
                               "under the server's per-address rule")
        timeout_s = self._timeout_s if limit_s is None else min(self._timeout_s, limit_s)
        if timeout_s <= 0:
            return Taken(None, "no ticket asked for: this session's plan leaves no time "
                               "for it (agent/budget.py): measuring under the server's "
                               "per-address rule")
        started = self._clock()
        try:
            async with asyncio.timeout(timeout_s):
                reply = await self._client.ticket()
        except TimeoutError:
            return self._problem(f"no ticket: the collector did not answer in "
                                 f"{timeout_s:g} s", self._clock() - started)
        except DeliveryError as exc:
            return self._problem(f"no ticket: {exc}", self._clock() - started)
        received = self._clock()
        spent_s = received - started
        if reply is None:
            self._none = True
            return Taken(None, "the collector issues no measurement tickets (404: an older "
                               "collector, or tickets off): measuring under the server's "
                               "per-address rule", spent_s)
        token = reply.get("ticket") if isinstance(reply, dict) else None
        ticket, error = read(token if isinstance(token, str) else None, received)
        if ticket is None:
            return self._problem(error or "no ticket: the collector's reply has none",
                                 spent_s)
        if not ticket.usable(received):
            return self._problem(f"no ticket: ticket {short_id(ticket)} is valid for "
                                 f"{ticket.lifetime_s:g} s from issue, not more than the "
                                 f"{EXPIRY_MARGIN_S:g} s margin", spent_s)
        return Taken(ticket, spent_s=spent_s)
