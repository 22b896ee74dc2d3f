"""Keys (Ed25519, RFC 8032; collector/fleet/probe_keys.py):

- ``PUT /api/v1/probe/key`` (role "probe"): the agent's enrolment, body ``{"jwk": JWK,
  "proof": JWS, "rotation"?: JWS}`` (RFC 8037 §2, at most MAX_REQUEST_BYTES).
  ``proof``, the key's proof of possession (agent/keydocs.py), is required (missing or
  bad: 422, field "proof"): without it any probe with no key bound could take another
  probe's published public key on first use and pass for it (review M4). Every released
  agent that enrols sends one; an admin's pin (`bbprobe-collector probe key set`) needs
  none. Without ``rotation``, the first key a probe sends is bound to it (trust on first
  use: recorded with the time and the address it came from), even when another probe
  holds it too (one device on several lines): 201 ``{"kid", "status": "enrolled"}``; the
  same key again 200 ``"known"``; another key 409 with ``bound_kid`` the bound key's kid.
  With ``rotation``, a statement signed by the probe's current key handing over to
  ``jwk``: 201 ``{"kid", "status": "rotated", "previous_kid"}`` (the old key stays,
  past), 200 ``"known"`` when already done (a retry); signed by a key the probe does not
  hold, holds revoked, or not verifying 422 (field "rotation"), by a past key 409 with
  ``bound_kid``. A body that is not an Ed25519 public JWK 422, one line. Every change
  drops the in-process key snapshots ingest verifies with (collector/intake/keyring.py)
  and the JWK Set cache.
- ``GET /.well-known/bbprobe-keys.json`` (role "public": public keys are public): the
  JWK Set (RFC 7517 §5) of the collector's evidence key and every probe key ever bound,
  with its status, made at most once per JWKS_CACHE_S and bounded (JWKS_MAX_KEYS).

The evidence key is read (or made) beside the event loop at start (keys.OwnKey); while
it is unusable the set is served without it, and the log says why once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agent import jose
from agent.schema import utc_now
from collector import keys
from collector.errors import ApiError
from collector.fleet import probe_keys
from collector.intake import ingest, keyring
from collector.routing import Routes
from collector.web.app_keys import CONFIG
from collector.web.probe_routes import ingesting_probe, probe_body
from collector.web.replies import json_response
from collector.web.threads import db, on_db

ENROL_PATH = "/api/v1/probe/key"
JWKS_PATH = "/.well-known/bbprobe-keys.json"
# A JWK is under 200 bytes, a proof or a rotation statement under 1,000.
MAX_REQUEST_BYTES = 8192
BODY_MEMBERS = frozenset({"jwk", "proof", "rotation"})


@dataclass(slots=True)
class Cached:
    made_at: float = -1e18
    body: bytes = b""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


EVIDENCE = web.AppKey("evidence_key", keys.OwnKey)
JWKS_CACHE = web.AppKey("jwks_cache", Cached)


def _jwk_of_body(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or "jwk" not in data or not set(data) <= BODY_MEMBERS:
        raise ApiError(422, 'body must be {"jwk": {...}, "proof": {...}} (an Ed25519 public '
                       'JWK, RFC 8037, and its proof of possession), with a "rotation" JWS '
                       'if any', field="jwk")
    jwk = data["jwk"]
    if not isinstance(jwk, dict):
        raise ApiError(422, "jwk: expected a JSON object", field="jwk")
    return jwk


def _conflict(exc: probe_keys.KeyConflict) -> web.Response:
    """A 409 naming the key in the way as a member (the Error schema's ``bound_kid``)."""
    return json_response({"error": exc.message, "field": exc.field,
                          "bound_kid": exc.bound_kid}, status=409)


async def put_probe_key(request: web.Request) -> web.Response:
    """Probe: enrol its public key, or rotate to a new one (see the module docstring)."""
    probe = await ingesting_probe(request)
    raw = await probe_body(request, MAX_REQUEST_BYTES)
    data = ingest.parse_json(raw)
    jwk = _jwk_of_body(data)
    try:
        public_key = jose.public_key_of_jwk(jwk)
    except jose.JoseError as exc:
        raise ApiError(422, str(exc), field="jwk") from None
    probe_keys.check_proof(data.get("proof"), jwk)
    address = request.remote
    rotation = data.get("rotation")
    try:
        if rotation is not None:
            fresh, key = await db(request, lambda s: probe_keys.rotate(
                s, probe, public_key, rotation, utc_now(), address))
        else:
            fresh, key = await db(request, lambda s: probe_keys.bind(
                s, probe, public_key, "tofu", utc_now(), address))
    except probe_keys.KeyConflict as exc:
        return _conflict(exc)
    if fresh:
        # A rotation may move the device's other probes too: drop every snapshot.
        keyring.invalidate(None if rotation is not None else probe)
        request.app[JWKS_CACHE].made_at = -1e18  # the set shows it from now
    reply: dict[str, Any] = {"kid": key.kid, "status": "known"}
    if fresh and rotation is None:
        reply["status"] = "enrolled"
    elif fresh:
        reply.update(status="rotated", previous_kid=str(jose.header_of(rotation)["kid"]))
    return json_response(reply, status=201 if fresh else 200)


async def jwks_body(app: web.Application) -> bytes:
    """The JWK Set's bytes, made at most once per JWKS_CACHE_S."""
    cache = app[JWKS_CACHE]
    async with cache.lock:
        if time.monotonic() - cache.made_at >= probe_keys.JWKS_CACHE_S:
            own = await app[EVIDENCE].get()
            public = own.public if own is not None else None
            limit = probe_keys.JWKS_MAX_KEYS
            # Read and rendered on a database thread: a large fleet's set (megabytes)
            # never holds the event loop.
            cache.body = await on_db(app, lambda s: json.dumps(
                probe_keys.jwk_set(public, s.all_probe_keys(limit + 1), limit),
                separators=(",", ":")).encode())
            cache.made_at = time.monotonic()
        return cache.body


async def get_jwks(request: web.Request) -> web.Response:
    """Public: the JWK Set (see the module docstring)."""
    body = await jwks_body(request.app)
    return web.Response(body=body, content_type="application/jwk-set+json", headers={
        "Cache-Control": f"public, max-age={int(probe_keys.JWKS_CACHE_S)}"})


async def _evidence_key(app: web.Application) -> AsyncIterator[None]:
    """The evidence key, read (or made) at start beside the loop (keys.OwnKey)."""
    await app[EVIDENCE].get()
    yield


def setup(app: web.Application, routes: Routes) -> None:
    """The key routes and their state, on a collector with a store (after the store's
    context: the key's directory exists)."""
    cfg = app[CONFIG]
    app[EVIDENCE] = keys.OwnKey(lambda: keys.evidence_signing_key(cfg), "evidence",
                                meanwhile="the JWK Set is served without it")
    app[JWKS_CACHE] = Cached()
    app.cleanup_ctx.append(_evidence_key)
    routes.put(ENROL_PATH, put_probe_key, role="probe")
    routes.get(JWKS_PATH, get_jwks, role="public")
