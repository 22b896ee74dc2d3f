"""The probes' public keys over a store: binding one (trust on first use at the agent's
enrolment, ``PUT /api/v1/probe/key``; pinned by an admin, ``probe add --key``, ``probe
key set``), revoking one, and the JWK Set (RFC 7517 §5) that publishes them with the
collector's own evidence key. Shared by the CLI and the web edge; refusals are domain
errors with one-line messages (``AlreadyExists`` 409, ``NotFound`` 404, ``Unacceptable``
422 at the web edge).

Keys are Ed25519 (RFC 8032) as JWKs (RFC 8037 §2), named by their RFC 7638 thumbprint;
the encodings are agent/jose.py's. What is stored is the canonical public JWK (kty, crv,
x): members a client added are not kept."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import jose
from collector.errors import AlreadyExists, NotFound, Unacceptable
from collector.storage.model import KeySource, ProbeKey
from collector.storage.store import ProbeKeyStore

# A key file is a PEM public key (about 113 bytes) or a JWK (under 200): more is not one.
MAX_KEY_FILE_BYTES = 16 * 1024
# The JWK Set lists at most this many probe keys (a fleet of 10,000 probes with a
# rotation or two each, about 300 bytes a key: some 10 MB at most, made at most once per
# JWKS_CACHE_S). Beyond it the set is cut, and says so.
JWKS_MAX_KEYS = 30_000
JWKS_CACHE_S = 60.0


def key_text(public_key: Ed25519PublicKey) -> tuple[str, str]:
    """(kid, the canonical JWK as JSON text) of a public key."""
    jwk = jose.jwk_of(public_key)
    return jose.thumbprint(jwk), json.dumps(jwk, sort_keys=True, separators=(",", ":"))


def read_key_file(path: str) -> Ed25519PublicKey:
    """An Ed25519 public key from a file: PEM (SubjectPublicKeyInfo, what ``bbprobe key
    show`` prints) or a JWK (JSON); Unacceptable naming the file otherwise."""
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise Unacceptable(f"{path}: cannot read: {exc.strerror or exc}", "key") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise Unacceptable(f"{path}: larger than a public key ({MAX_KEY_FILE_BYTES} bytes "
                           "at most)", "key")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Unacceptable(f"{path}: not text (a PEM public key or a JWK)", "key") from None
    try:
        if text.startswith("{"):
            try:
                jwk = json.loads(text)
            except ValueError as exc:
                raise jose.JoseError(f"jwk: not JSON ({exc})") from None
            return jose.public_key_of_jwk(jwk)
        return jose.public_key_of_pem(text)
    except jose.JoseError as exc:
        raise Unacceptable(f"{path}: {exc}", "key") from None


def bind(store: ProbeKeyStore, name: str, public_key: Ed25519PublicKey, source: KeySource,
         at: str, address: str | None = None, *, replace: bool = False
         ) -> tuple[bool, ProbeKey]:
    """Bind ``public_key`` to probe ``name`` (see ProbeKeyStore.bind_probe_key): (whether
    it is new, the binding). AlreadyExists (409, field "jwk") naming the key in the way,
    NotFound for an unknown probe."""
    kid, jwk = key_text(public_key)
    outcome, key = store.bind_probe_key(name, kid, jwk, source, at, address,
                                        replace=replace)
    if outcome == "no_probe":
        raise NotFound(f"no probe named {name!r}", "probe_id")
    if outcome in ("enrolled", "known"):
        assert key is not None
        return outcome == "enrolled", key
    if outcome == "bound":
        assert key is not None
        raise AlreadyExists(f"probe {name!r} has key {key.kid} bound ({key.source}, since "
                            f"{key.bound_from}), not {kid}; a new key is bound by an "
                            f"admin (`bbprobe-collector probe key set {name} FILE`)", "jwk")
    if outcome == "taken":
        assert key is not None
        whose = "another probe's" if key.probe_name != name else \
            f"this probe's {key.status} key"
        raise AlreadyExists(f"key {kid} is {whose} and is never bound again: make a new "
                            "key", "jwk")
    raise AlreadyExists(f"probe {name!r} has no key bound and has had one (first use is "
                        f"over): an admin pins its key (`bbprobe-collector probe key set "
                        f"{name} FILE`)", "jwk")


def jwk_entry(key: ProbeKey) -> dict[str, Any]:
    """A probe key as a member of the JWK Set (a revoked one says when and why)."""
    about: dict[str, Any] = {"holder": "probe", "probe": key.probe_name,
                             "status": key.status, "since": key.bound_from,
                             "until": key.bound_until, "source": key.source}
    if key.revoked_at is not None:
        about.update(revoked_at=key.revoked_at, revoked_reason=key.revoked_reason)
    return {**json.loads(key.jwk), "use": "sig", "alg": "EdDSA", "kid": key.kid,
            "bbprobe": about}


def collector_entry(public_key: Ed25519PublicKey) -> dict[str, Any]:
    """The collector's evidence key as a member of the JWK Set."""
    kid, jwk = key_text(public_key)
    return {**json.loads(jwk), "use": "sig", "alg": "EdDSA", "kid": kid,
            "bbprobe": {"holder": "collector"}}


def jwk_set(collector_key: Ed25519PublicKey | None, keys: Sequence[ProbeKey],
            limit: int = JWKS_MAX_KEYS) -> dict[str, Any]:
    """The JWK Set (RFC 7517 §5): the collector's evidence key (when usable), then every
    probe key bound, current, past and revoked, at most ``limit`` of them."""
    members = [collector_entry(collector_key)] if collector_key is not None else []
    members += [jwk_entry(k) for k in keys[:limit]]
    document: dict[str, Any] = {"keys": members}
    if len(keys) > limit:
        document["truncated"] = True
    return document
