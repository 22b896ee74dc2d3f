"""Measurement tickets as the agent sees them: pure.

A ticket is a JWT (RFC 7519) the collector signs with Ed25519 (EdDSA, RFC 8037); a
measurement server verifies it offline with the collector's public key and counts the
ticket's transfers per ticket, not per client address, so probes behind one address
(carrier-grade NAT) do not take each other's slots. Its claims:

- ``iss``: ``ISSUER``; ``sub``: the probe's name; ``jti``: the ticket's id (one a session);
- ``aud``: the measurement servers it may be used at, as origins (``origin``);
- ``iat``, ``exp``: issued and expiry, seconds since the epoch;
- ``bbprobe``: the allowance, ``{"streams": N, "bytes": N, "duration_s": S}``: transfers at
  once, bytes moved in all (both directions), and seconds during which at least one of its
  transfers runs.

The agent never verifies the signature (it got the ticket from its own collector over its
authenticated channel, and only servers can tell forged from genuine): it reads the claims
to know where it may present the ticket, and until when. It presents a ticket only to a
server named in ``aud``: a ticket is a bearer credential, and a stranger's server could
spend it elsewhere.

Until when is judged by the ticket's lifetime (``exp`` - ``iat``, both the collector's
clock) counted from when the agent received it, on the agent's monotonic clock, never by
comparing ``exp`` with the probe's wall clock: a probe whose clock runs 20 minutes fast
would otherwise never use a 15-minute ticket (the servers check ``exp`` on their own
clocks, which are the collector's business).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agent.errors import AgentError

ISSUER = "bbprobe-collector"
# Above any JWT the collector issues (a few hundred bytes): a longer header is refused
# before it is decoded.
MAX_TICKET_CHARS = 4096
# A ticket within this many seconds of its expiry is not presented any more (a session
# would start a transfer the server refuses mid-way): a fresh one is asked for.
EXPIRY_MARGIN_S = 30.0


class TicketError(AgentError, ValueError):
    """Not a ticket the agent can use (malformed claims)."""


@dataclass(frozen=True, slots=True)
class Allowance:
    streams: int
    bytes: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class Ticket:
    token: str
    ticket_id: str
    probe: str
    servers: tuple[str, ...]
    issued_at: float
    expires_at: float
    allowance: Allowance
    # When the agent received it, on its monotonic clock (seconds); None: not received
    # by an agent (the collector reads its own tickets), never usable.
    received_at: float | None = None

    @property
    def lifetime_s(self) -> float:
        """Seconds from issue to expiry, by the collector's clock."""
        return self.expires_at - self.issued_at

    def remaining_s(self, now: float) -> float | None:
        """Seconds left at monotonic time ``now``: the lifetime counted from receipt
        (the collector mints a ticket for each request, so it was issued moments
        before: the request's round trip, which EXPIRY_MARGIN_S covers); None when the
        agent did not receive it."""
        if self.received_at is None:
            return None
        return self.received_at + self.lifetime_s - now

    def usable(self, now: float) -> bool:
        """Whether to present it at monotonic time ``now``: more than EXPIRY_MARGIN_S of
        its lifetime left (see the module docstring)."""
        left = self.remaining_s(now)
        return left is not None and left > EXPIRY_MARGIN_S

    def covers(self, url: str | None) -> bool:
        """Whether this ticket names the server at ``url`` (its origin)."""
        if not url:
            return False
        try:
            return origin(url) in self.servers
        except ValueError:
            return False


def origin(url: str) -> str:
    """A server's origin as tickets name it: ``scheme://host:port``, the scheme and host
    lower-cased, the port always written (so http://h and http://h:80 are one server),
    IPv6 literals in brackets. Raises ValueError for a URL with no host."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "ws", "wss"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"no host in {url!r}")
    port = parts.port or (443 if scheme in ("https", "wss") else 80)
    # ws(s) is how ndt7 reaches the same server as http(s).
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


def _b64(part: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TicketError(f"not base64url: {exc}") from None


def claims_of(token: str) -> dict[str, Any]:
    """The claims of a compact JWS, unverified (see the module docstring)."""
    if len(token) > MAX_TICKET_CHARS:
        raise TicketError(f"longer than {MAX_TICKET_CHARS} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise TicketError("not a compact JWS (three dot-separated parts)")
    try:
        claims = json.loads(_b64(parts[1]))
    except ValueError as exc:
        raise TicketError(f"claims are not JSON: {exc}") from None
    if not isinstance(claims, dict):
        raise TicketError("claims are not a JSON object")
    return claims


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TicketError(f"{name}: expected a number")
    return float(value)


def peek(token: str, *, received_at: float | None = None) -> Ticket:
    """A ticket's claims, checked for shape (not for signature); ``received_at``: when
    the agent received it (monotonic seconds), which a ticket needs to be usable."""
    token = token.strip()
    c = claims_of(token)
    aud = c.get("aud")
    servers = (aud,) if isinstance(aud, str) else aud
    if not isinstance(servers, list | tuple) or not all(isinstance(s, str) for s in servers):
        raise TicketError("aud: expected a list of server origins")
    allowance = c.get("bbprobe")
    if not isinstance(allowance, dict):
        raise TicketError("bbprobe: expected the allowance object")
    jti, sub = c.get("jti"), c.get("sub")
    if not isinstance(jti, str) or not jti or not isinstance(sub, str):
        raise TicketError("jti and sub: expected strings")
    return Ticket(
        token=token, ticket_id=jti, probe=sub, servers=tuple(servers),
        issued_at=_number(c.get("iat"), "iat"), expires_at=_number(c.get("exp"), "exp"),
        allowance=Allowance(int(_number(allowance.get("streams"), "bbprobe.streams")),
                            int(_number(allowance.get("bytes"), "bbprobe.bytes")),
                            _number(allowance.get("duration_s"), "bbprobe.duration_s")),
        received_at=received_at)
