"""Measurement tickets on the server side: issuing and verifying. Pure apart from the
key objects (no file, socket or clock: ``now`` is given).

The claims are agent/ticket.py's (the agent reads them unverified): a JWT (RFC 7519)
signed with Ed25519 (EdDSA, RFC 8037), its JWS header's ``kid`` the signing key's RFC 7638
thumbprint (collector/keys.py), so a server trusting several keys (a collector's key
rotated) picks the right one without trying each.

A server verifies a ticket offline, with the public keys it trusts, and refuses it with
one ``TicketRefused`` code (sent back in the Bbprobe-Ticket-Refused header):

    malformed       not a compact JWS, or its claims are not a ticket's
    unknown_key     signed by a key this server does not trust (its kid)
    bad_signature   the signature does not match (forged, or the payload was altered)
    wrong_issuer    not issued by a bbprobe collector (iss)
    not_yet_valid   issued in the future (iat), beyond LEEWAY_S of clock skew
    expired         past its exp, beyond LEEWAY_S
    wrong_server    none of its servers (aud) is this one (its audience)

The measurement slots add the ledger's (collector/measurement/ledger.py): allowance_bytes
and allowance_duration (the ticket has less left than the transfer asks for, or nothing),
and too_many_tickets (its probe already uses as many tickets here as one may).
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.ticket import ISSUER, MAX_TICKET_CHARS, Allowance, TicketError, origin, peek
from collector.errors import CollectorError

ALGORITHM = "EdDSA"
# Clocks of the collector and of a measurement server may disagree by this much (NTP
# keeps them within milliseconds; a minute covers a server whose sync lags).
LEEWAY_S = 60.0
# Verified tickets remembered, so the 20 streams x N tests of a session verify once: a
# session holds one ticket, so this covers that many sessions at once per process. Only
# tickets whose signature verified enter (a stranger cannot fill it with forgeries).
CACHE_ENTRIES = 4096

CODES = ("malformed", "unknown_key", "bad_signature", "wrong_issuer", "not_yet_valid",
         "expired", "wrong_server")


class TicketRefused(CollectorError):
    """A ticket this server does not accept; ``code`` is one of CODES (or an allowance
    code of the slots), ``message`` one line saying why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class TicketPolicy:
    expiry_s: float
    streams: int
    bytes: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified ticket grants."""

    ticket_id: str
    probe: str
    servers: tuple[str, ...]
    expires_at: float  # seconds since the epoch
    allowance: Allowance


def issue(private_key: Ed25519PrivateKey, kid: str, probe: str, servers: Iterable[str],
          policy: TicketPolicy, now: float) -> str:
    """A ticket for ``probe`` at ``servers`` (origins), valid from ``now`` (seconds since
    the epoch) for policy.expiry_s; a new id (uuid4) each time."""
    claims: dict[str, Any] = {
        "iss": ISSUER, "sub": probe, "jti": str(uuid.uuid4()), "aud": list(servers),
        "iat": int(now), "exp": int(now + policy.expiry_s),
        "bbprobe": {"streams": policy.streams, "bytes": policy.bytes,
                    "duration_s": policy.duration_s},
    }
    return jwt.encode(claims, private_key, algorithm=ALGORITHM, headers={"kid": kid})


def origin_of(scheme: str, host: str | None) -> str | None:
    """The origin a request was made to (its scheme and Host header), or None when the
    Host header names no usable host."""
    if not host:
        return None
    try:
        return origin(f"{scheme}://{host}")
    except ValueError:
        return None


def audience_of(urls: Iterable[str]) -> tuple[str, ...]:
    """Origins of configured URLs, in order, each once (config.py validated them)."""
    return tuple(dict.fromkeys(origin(u) for u in urls))


# Time and audience are checked here, against ``now``, rather than by PyJWT (which reads
# the clock itself and names no reason a client could act on).
_SIGNATURE_ONLY: Any = {"verify_signature": True, "verify_exp": False, "verify_nbf": False,
                        "verify_iat": False, "verify_aud": False, "verify_iss": False}


class Verifier:
    """Verifies tickets with the public keys it trusts (by kid) for a server whose
    audience is ``audience`` (origins). Empty: each request's own origin (its Host
    header, the client's to choose: config.py allows it only to a collector trusting no
    other key and naming no other server), except ``foreign`` ones (tickets.servers:
    other servers' origins, never this one's)."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey], audience: Collection[str] = (),
                 cache_entries: int = CACHE_ENTRIES, *, foreign: Collection[str] = ()
                 ) -> None:
        self.keys = dict(keys)
        self.audience = frozenset(audience)
        self.foreign = frozenset(foreign)
        self.cache_entries = cache_entries
        self._cache: OrderedDict[bytes, Claims] = OrderedDict()

    def trust(self, kid: str, key: Ed25519PublicKey) -> None:
        self.keys[kid] = key

    def verify(self, token: str, request_origin: str | None, now: float) -> Claims:
        """The ticket's claims, or TicketRefused. ``request_origin``: this request's
        origin (origin_of), the audience when none is configured."""
        token = token.strip()
        if not token.isascii():
            # A compact JWS is base64url and dots. aiohttp hands over header bytes that are
            # not UTF-8 as lone surrogates, which PyJWT cannot encode (a 500): refused here.
            raise TicketRefused("malformed", "a ticket is ASCII (base64url and dots)")
        digest = hashlib.sha256(token.encode("ascii")).digest()
        claims = self._cache.get(digest)
        if claims is None:
            claims = self._verified(token, now)
            self._remember(digest, claims, now)
        else:
            self._cache.move_to_end(digest)
        if now > claims.expires_at + LEEWAY_S:
            raise TicketRefused("expired", f"ticket {claims.ticket_id} expired "
                                f"{now - claims.expires_at:.0f} s ago")
        if self.audience:
            audience, this = self.audience, ", ".join(sorted(self.audience))
        elif request_origin in self.foreign:
            audience, this = frozenset(), f"{request_origin} is another server's"
        else:
            audience = frozenset((request_origin,) if request_origin else ())
            this = request_origin or "no Host"
        if audience.isdisjoint(claims.servers):
            raise TicketRefused("wrong_server", f"ticket {claims.ticket_id} names other "
                                f"servers ({', '.join(claims.servers[:3]) or 'none'}), not "
                                f"this one ({this})")
        return claims

    def _remember(self, digest: bytes, claims: Claims, now: float) -> None:
        if len(self._cache) >= self.cache_entries:
            for key in [k for k, c in self._cache.items()
                        if now > c.expires_at + LEEWAY_S]:
                del self._cache[key]
            while len(self._cache) >= self.cache_entries:
                self._cache.popitem(last=False)  # the least recently used
        self._cache[digest] = claims

    def _verified(self, token: str, now: float) -> Claims:
        if len(token) > MAX_TICKET_CHARS:
            raise TicketRefused("malformed", f"longer than {MAX_TICKET_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TicketRefused("malformed", f"not a JWT: {exc}") from None
        kid = header.get("kid")
        if header.get("alg") != ALGORITHM or not isinstance(kid, str):
            raise TicketRefused("malformed", f"expected alg {ALGORITHM} and a kid in the "
                                "JWS header")
        key = self.keys.get(kid)
        if key is None:
            raise TicketRefused("unknown_key", f"signed by a key this server does not "
                                f"trust (kid {kid[:64]!r})")
        try:
            payload = jwt.decode(token, key, algorithms=[ALGORITHM], options=_SIGNATURE_ONLY)
        except jwt.InvalidSignatureError:
            raise TicketRefused("bad_signature", "the signature does not match the "
                                "ticket (forged or altered)") from None
        except jwt.PyJWTError as exc:
            raise TicketRefused("malformed", f"not a JWT: {exc}") from None
        if payload.get("iss") != ISSUER:
            raise TicketRefused("wrong_issuer", f"issued by {str(payload.get('iss'))[:64]!r}, "
                                f"not {ISSUER!r}")
        try:
            ticket = peek(token)
        except (TicketError, OverflowError) as exc:  # OverflowError: an "Infinity"
            raise TicketRefused("malformed", f"claims: {exc}") from None
        allowance = ticket.allowance
        if allowance.streams < 1 or allowance.bytes < 0 or not allowance.duration_s >= 0:
            raise TicketRefused("malformed", "claims: bbprobe: an allowance below zero")
        if ticket.issued_at > now + LEEWAY_S:
            raise TicketRefused("not_yet_valid", f"ticket {ticket.ticket_id} is issued "
                                f"{ticket.issued_at - now:.0f} s in the future (clocks "
                                "apart?)")
        return Claims(ticket_id=ticket.ticket_id, probe=ticket.probe, servers=ticket.servers,
                      expires_at=ticket.expires_at, allowance=allowance)
