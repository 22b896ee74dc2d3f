"""Probe tokens: 256 random bits, shown once, stored only as a SHA-256 digest.

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
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 512:
        return None
    return token
