"""Tokens (probes', analysts', admins', metrics'): 256 random bits, shown once, stored
only as a SHA-256 digest. Roles: a probe token sends that probe's results; an analyst
token reads (queries, reports, pages); an admin token reads and administers (probes); a
metrics token reads GET /metrics and nothing else (what a Prometheus server holds: a
scrape credential that leaks exposes no report). What each role reaches is in
collector/routing.py. A probe's token is replaced by rotation (fleet/probes.py), the old
one refused from the next request.

A slow password hash buys nothing for 256-bit random secrets (no dictionary to try), and a
plain digest lets the collector find the probe with one indexed lookup.
"""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "bbp_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or of ``Basic`` with the
    token as password (what a browser sends for the HTML pages); None otherwise."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if not token or len(token) > 1024:
        return None
    if scheme.lower() == "basic":
        import base64
        import binascii

        try:
            decoded = base64.b64decode(token, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        token = decoded.partition(":")[2]
        return token if _plausible(token) else None
    if scheme.lower() != "bearer":
        return None
    return token if _plausible(token) else None


def _plausible(token: str) -> bool:
    """A token is printable ASCII (RFC 6750 b64token; ours are ``bbp_`` + URL-safe
    base64). Anything else is no token: a header of raw bytes arrives as lone surrogates
    that no hash could encode, and must be a 401, not a 5xx."""
    return bool(token) and token.isascii() and token.isprintable()
