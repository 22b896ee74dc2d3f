"""Where a session's measurement ticket comes from (issue 24), the I/O edge of
agent/ticket.py (which stays pure).

A session takes one ticket (its ``jti`` is one a session): the one the collector sent with
the instruction fetch (``Bbprobe-Ticket`` on the instruction GET, 200 or 304: no round
trip of its own) while it is still usable, else one asked for alone (POST
/api/v1/tickets, at most TICKET_TIMEOUT_S). Under dual stack the IPv4 session takes the
prefetched ticket and the IPv6 session asks for its own.

Nothing here raises: with no ticket (no collector, an older collector, tickets not
issued, a header or reply that does not parse, a collector away) the session measures
as before, under the measurement server's per-address rule, and the progress line says
why.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from agent.errors import DeliveryError
from agent.schema import SchemaError, TicketUse, decode, format_utc, to_dict
from agent.ticket import Ticket, TicketError, peek

if TYPE_CHECKING:
    from agent.delivery import CollectorClient

# One POST: never let it hold a session back longer than this.
TICKET_TIMEOUT_S = 10.0
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


def read(token: str | None) -> tuple[Ticket | None, str | None]:
    """A ticket from a header or a reply (pure): (the ticket, None), (None, why not),
    or (None, None) when there is none."""
    if token is None or not token.strip():
        return None, None
    token = token.strip()
    if not _TOKEN_RE.fullmatch(token):
        return None, "the collector's ticket is not a compact JWS"
    try:
        ticket = peek(token)
        # It goes into the result as it is: a ticket the schema would refuse would
        # cost the result, not just the ticket.
        decode(TicketUse, json.loads(json.dumps(to_dict(use_record(ticket, None, None)))))
    except (TicketError, SchemaError, ValueError, OverflowError, OSError) as exc:
        return None, f"the collector's ticket is unusable: {exc}"
    return ticket, None


def offer_of(header: str | None) -> Offer:
    """The Offer of an answered instruction fetch whose ticket header is ``header``."""
    ticket, error = read(header)
    return Offer(ticket, error, answered=True)


def short_id(ticket: Ticket) -> str:
    return ticket.ticket_id[:8] + ("…" if len(ticket.ticket_id) > 8 else "")


def use_record(ticket: Ticket, server_url: str | None, refused: str | None) -> TicketUse:
    """The result's account of the session's ticket (pure): presented when it names the
    session's server."""
    return TicketUse(
        ticket_id=ticket.ticket_id,
        expires_at=format_utc(datetime.fromtimestamp(ticket.expires_at, UTC)),
        servers=ticket.servers, presented=ticket.covers(server_url), refused=refused)


@dataclass(frozen=True, slots=True)
class Taken:
    ticket: Ticket | None
    # What the progress line says when there is no ticket and that is no problem.
    note: str | None = None


class TicketSource:
    """The tickets of one slot's sessions (one, or two under dual stack). ``warn`` is
    told every problem (a ticket that did not parse, a collector that did not answer):
    ``bbprobe run`` shows it as a progress line, the daemon logs it. What is no problem
    (the collector issues no tickets) is the ``Taken.note`` the session shows."""

    def __init__(self, client: CollectorClient | None, offer: Offer | None = None, *,
                 timeout_s: float = TICKET_TIMEOUT_S,
                 warn: Callable[[str], None] | None = None) -> None:
        self._client = client
        self._offer: Offer | None = offer or Offer()
        self._timeout_s = timeout_s
        self._warn = warn
        # The collector answered without a ticket, or 404 to the POST: it issues none.
        self._none = False

    def _problem(self, message: str) -> Taken:
        if self._warn is not None:
            self._warn(message + ": measuring without a ticket")
        return Taken(None)

    async def take(self) -> Taken:
        """The ticket for the next session (never raises)."""
        offer, self._offer = self._offer, None
        if self._client is None:
            return Taken(None)
        if offer is not None:
            if offer.ticket is not None and offer.ticket.usable():
                return Taken(offer.ticket)
            if offer.error is not None and self._warn is not None:
                self._warn(f"{offer.error}: asking for another")
            self._none = offer.answered and offer.ticket is None and offer.error is None
        if self._none:
            return Taken(None, "the collector issues no measurement tickets: measuring "
                               "under the server's per-address rule")
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._client.ticket()
        except TimeoutError:
            return self._problem(f"no ticket: the collector did not answer in "
                                 f"{self._timeout_s:g} s")
        except DeliveryError as exc:
            return self._problem(f"no ticket: {exc}")
        if reply is None:
            self._none = True
            return Taken(None, "the collector issues no measurement tickets (404: an older "
                               "collector, or tickets off): measuring under the server's "
                               "per-address rule")
        token = reply.get("ticket") if isinstance(reply, dict) else None
        ticket, error = read(token if isinstance(token, str) else None)
        if ticket is None:
            return self._problem(error or "no ticket: the collector's reply has none")
        if not ticket.usable():
            return self._problem(f"no ticket: ticket {short_id(ticket)} expires at "
                                 f"{use_record(ticket, None, None).expires_at}, too soon "
                                 f"by this probe's clock")
        return Taken(ticket)
