"""Issuing measurement tickets to probes (collector/tickets.py says what a ticket is), on
the roles that hold the probes' registry ("all", "ingest").

- ``GET /api/v1/instruction`` with ``Bbprobe-Want-Ticket``: the ticket comes back in the
  ``Bbprobe-Ticket`` response header, on a 200 and on a 304 alike (web/fleet_routes.py),
  so the daemon gets one with the fetch it makes at every slot anyway. Asking takes one
  request from the probe's rate limit (server.probe_requests_per_min): beyond it the
  instruction comes without a ticket;
- ``POST /api/v1/tickets``: a ticket alone, as JSON (for ``once`` and for a session whose
  ticket expired), within the probe's rate limit. The body, if any, is ignored (at most
  MAX_REQUEST_BYTES).

A ticket names the measurement servers it may be used at (its audience): the origins of
tickets.servers, and this collector's own when it serves the measurement endpoints (role
"all" with measurement.enabled): tickets.audience if configured, else the origin the
probe reached it at (the request's scheme and Host; never one of tickets.servers', and
config.py requires tickets.audience of a collector that names other servers).

The signing key is read (or generated) beside the event loop at start, and while it is
unusable again at most every keys.RETRY_S when a ticket is asked for: POST answers 503,
the instruction comes without a ticket, and the log says why once (keys.OwnKey).

With tickets.enabled = false the instruction carries no ticket and ``POST`` answers 404
with the reason: the agent then measures per address, exactly as with a collector that
predates tickets (which also answers 404), so one code path serves both.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from aiohttp import web

from agent import spec
from agent.schema import format_utc
from agent.ticket import Ticket, peek
from collector import keys, tickets
from collector.config import CollectorConfig
from collector.errors import ApiError
from collector.routing import Routes
from collector.web.params import read_body
from collector.web.probe_routes import limited_probe, over_rate
from collector.web.replies import json_response

log = logging.getLogger("bbprobe.collector")
MAX_REQUEST_BYTES = 4096


def ticket_document(ticket: Ticket) -> dict[str, object]:
    """A ticket as ``POST /api/v1/tickets`` answers: the token, and for a reader its id,
    expiry and servers."""
    return {"ticket": ticket.token, "ticket_id": ticket.ticket_id,
            "expires_at": format_utc(datetime.fromtimestamp(ticket.expires_at, UTC)),
            "servers": list(ticket.servers)}


class Authority:
    """The collector's side of tickets: its signing key (``own``, the holder its
    measurement endpoints share: keys.OwnKey), and what its tickets name."""

    def __init__(self, cfg: CollectorConfig, role: str,
                 environ: Mapping[str, str] = os.environ) -> None:
        t = cfg.tickets
        self.cfg = cfg
        self.policy = tickets.TicketPolicy(t.expiry_s, t.streams, t.bytes, t.duration_s)
        self.servers = tickets.audience_of(t.servers)
        # This collector names itself only where it serves the measurement endpoints.
        self.measures = role == "all" and cfg.measurement.enabled
        self.own_audience = tickets.audience_of(t.audience)
        self.own = keys.OwnKey(lambda: keys.ticket_signing_key(cfg, environ))
        self._said_no_server = False

    def audience(self, request_origin: str | None) -> tuple[str, ...]:
        own: tuple[str, ...] = ()
        if self.measures:
            if self.own_audience:
                own = self.own_audience
            elif request_origin and request_origin not in self.servers:
                # The origin the probe reached us at (a lone collector: config.py makes
                # one naming other servers configure its audience), never one of the
                # other servers' (a Host header is the client's to choose).
                own = (request_origin,)
        return tuple(dict.fromkeys((*self.servers, *own)))

    def issue(self, key: keys.SigningKey, probe: str, request_origin: str | None,
              now: float, servers: tuple[str, ...] | None = None) -> Ticket:
        """A ticket signed with ``key`` for ``probe`` at ``servers`` (origins; default:
        its audience); ApiError (409) when it could name no server."""
        servers = servers or self.audience(request_origin)
        if not servers:
            raise ApiError(409, "no measurement server to name in a ticket: this "
                           "collector serves no measurement endpoints and tickets.servers "
                           "is empty")
        return peek(tickets.issue(key.private, key.kid, probe, servers, self.policy, now))

    async def issue_for(self, probe: str, request_origin: str | None) -> Ticket:
        """A ticket now, the key read beside the loop at its first need; ApiError: 409
        (no server to name), 503 (the key is unusable: keys.OwnKey logged why)."""
        key = await self.own.get()
        if key is None:
            raise ApiError(503, "tickets cannot be issued now (the collector's signing key "
                           "is unusable; its log says why)", retry_after="60")
        return self.issue(key, probe, request_origin, time.time())

    def no_server(self, exc: ApiError) -> None:
        """Log, once (it is the configuration's state), that no ticket names a server."""
        if not self._said_no_server:
            self._said_no_server = True
            log.warning("tickets: none issued: %s", exc.message)


AUTHORITY = web.AppKey("ticket_authority", Authority)


def request_origin(request: web.Request) -> str | None:
    # The Host header, not request.host: without one aiohttp would look up this machine's
    # name (a DNS query).
    return tickets.origin_of(request.scheme, request.headers.get("Host"))


async def instruction_headers(request: web.Request, probe: str) -> dict[str, str]:
    """Bbprobe-Ticket for an instruction fetch that asks for one (Bbprobe-Want-Ticket),
    within the probe's rate limit (each fetch asking mints a ticket); none when tickets
    are off, cannot be issued now or the probe is over its rate: the instruction matters
    more than the ticket, and the probe then measures per address."""
    authority = request.app.get(AUTHORITY)
    if authority is None or spec.TICKET_REQUEST_HEADER not in request.headers:
        return {}
    if over_rate(request, probe) is not None:
        return {}
    try:
        issued = await authority.issue_for(probe, request_origin(request))
    except ApiError as exc:
        if exc.status == 409:
            authority.no_server(exc)
        return {}  # 503: the key's holder logged why, once
    return {spec.TICKET_HEADER: issued.token}


async def post_ticket(request: web.Request) -> web.Response:
    """Probe: a ticket, as JSON."""
    probe = await limited_probe(request)
    await read_body(request, MAX_REQUEST_BYTES)  # bounded, and ignored
    authority = request.app.get(AUTHORITY)
    if authority is None:
        raise ApiError(404, "tickets are not issued here (tickets.enabled = false): "
                       "measure without one")
    issued = await authority.issue_for(probe, request_origin(request))
    return json_response(ticket_document(issued), headers={"Cache-Control": "no-store"})


def add_routes(routes: Routes) -> None:
    routes.post(spec.TICKETS_PATH, post_ticket, role="probe")
