"""The probes' public keys over a store: binding one (trust on first use at the agent's
enrolment, ``PUT /api/v1/probe/key``, with the key's proof of possession, required: a
published public key is no one's to take without its private half; pinned by an admin,
``probe add --key``, ``probe key set``; handed over by a rotation JWS signed with the
probe's current key, ``bbprobe key rotate``), revoking one, and the JWK Set (RFC 7517
§5) that publishes every binding with the collector's own evidence key. Shared by the
CLI and the web edge; refusals are domain errors with one-line messages
(``AlreadyExists`` 409, ``NotFound`` 404, ``Unacceptable`` 422 at the web edge); a 409
about a key in the way is a ``KeyConflict`` naming that key's kid.

One key may be bound to several probes (a technician's laptop on several lines, one
token each): a probe that never had a key takes, on first use, a key another probe
holds. A key is never bound again to a probe whose history holds it, nor anywhere once
revoked.

Keys are Ed25519 (RFC 8032) as JWKs (RFC 8037 §2), named by their RFC 7638 thumbprint;
the encodings are agent/jose.py's, the proof and rotation statements agent/keydocs.py's.
What is stored is the canonical public JWK (kty, crv, x): members a client added are not
kept."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import jose, keydocs
from collector.errors import AlreadyExists, NotFound, Unacceptable
from collector.storage.model import KeySource, ProbeKey
from collector.storage.store import ProbeKeyStore

# A key file is a PEM public key (about 113 bytes) or a JWK (under 200): more is not one.
MAX_KEY_FILE_BYTES = 16 * 1024
# The JWK Set lists at most this many probe key bindings (a fleet of 10,000 probes with
# a rotation or two each, about 300 bytes a binding, 1 kB with its rotation statement:
# some 20 MB at most, made at most once per JWKS_CACHE_S). Beyond it the set is cut, and
# says so.
JWKS_MAX_KEYS = 30_000
# The most keys a probe's history may reach by its own rotations (``rotate``).
MAX_ROTATED_KEYS = 64
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


class KeyConflict(AlreadyExists):
    """A 409 about a key in the way: ``bound_kid`` names it (the web edge's reply says
    it as a member, so an agent need not read the message)."""

    def __init__(self, message: str, bound_kid: str) -> None:
        super().__init__(message, "jwk")
        self.bound_kid = bound_kid


def bind(store: ProbeKeyStore, name: str, public_key: Ed25519PublicKey, source: KeySource,
         at: str, address: str | None = None, *, replace: bool = False
         ) -> tuple[bool, ProbeKey]:
    """Bind ``public_key`` to probe ``name`` (see ProbeKeyStore.bind_probe_key): (whether
    it is new, the binding). KeyConflict (409, field "jwk") naming the key in the way,
    AlreadyExists (409) when first use is over, NotFound for an unknown probe."""
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
        raise KeyConflict(f"probe {name!r} has key {key.kid} bound ({key.source}, since "
                          f"{key.bound_from}), not {kid}; a new key is bound by a rotation "
                          f"signed with the bound key (`bbprobe key rotate`) or by an admin "
                          f"(`bbprobe-collector probe key set {name} FILE`)", key.kid)
    if outcome == "taken":
        assert key is not None
        raise KeyConflict(_taken(name, kid, key), key.kid)
    raise AlreadyExists(f"probe {name!r} has no key bound and has had one (first use is "
                        f"over): an admin pins its key (`bbprobe-collector probe key set "
                        f"{name} FILE`)", "jwk")


def _taken(name: str, kid: str, key: ProbeKey) -> str:
    if key.probe_name != name:
        return (f"key {kid} was revoked on probe {key.probe_name!r} at {key.revoked_at} "
                f"({key.revoked_reason}) and is never bound again: make a new key")
    return f"key {kid} is this probe's {key.status} key and is never bound again: make a " \
        "new key"


def check_proof(proof: Any, jwk: Mapping[str, Any]) -> None:
    """Unacceptable (422, field "proof") unless ``proof`` shows possession of ``jwk``'s
    private key (agent/keydocs.py). None (no proof sent) is refused too: without it any
    probe with no key bound could take another probe's published key on first use and
    pass for it (review M4); every agent that enrols sends one."""
    if proof is None:
        raise Unacceptable("proof: required: the key's proof of possession (a JWS by the "
                           "key itself, typ bbprobe-key-enrolment), which the agent sends "
                           "when it enrols", "proof")
    try:
        keydocs.check_proof(proof, jwk)
    except jose.JoseError as exc:
        raise Unacceptable(str(exc), "proof") from None


def rotate(store: ProbeKeyStore, name: str, new_key: Ed25519PublicKey, statement: Any,
           at: str, address: str | None = None) -> tuple[bool, ProbeKey]:
    """Bind ``new_key`` to probe ``name`` by a rotation statement (agent/keydocs.py)
    signed with the probe's current key: the current key is bound until ``at`` and
    stays as past, the statement is kept with the new key, and every other probe whose
    current key is the old one moves with it (the same device). (whether it is new: a
    retry of an accepted rotation is not, the binding.) Unacceptable (422, field
    "rotation") for a statement that is malformed, does not verify, or is signed by a
    key the probe does not hold or holds revoked; KeyConflict (409) when the signing key
    is a past key of the probe, or the new key may not be bound; NotFound."""
    new_kid, jwk = key_text(new_key)
    try:
        rot = keydocs.open_rotation(statement, json.loads(jwk))
    except jose.JoseError as exc:
        raise Unacceptable(str(exc), "rotation") from None
    held = store.probe_keys(name)
    old = next((k for k in held if k.kid == rot.old_kid), None)
    current = next((k for k in held if k.status == "current"), None)
    if current is not None and current.kid == new_kid:
        return False, current  # accepted before; the agent asks again after a crash
    if old is None:
        theirs = f"its key: {current.kid}" if current is not None else "it has none"
        raise Unacceptable(f"rotation: signed with key {rot.old_kid}, which is not a key "
                           f"of probe {name} ({theirs})", "rotation")
    if old.revoked_at is not None:
        raise Unacceptable(f"rotation: signed with key {old.kid} of probe {name}, revoked "
                           f"{old.revoked_at}: {old.revoked_reason}", "rotation")
    try:
        keydocs.verify_rotation(rot, jose.public_key_of_jwk(json.loads(old.jwk)))
    except jose.JoseError as exc:
        raise Unacceptable(f"{exc} (key {old.kid} of probe {name})", "rotation") from None
    if len(held) >= MAX_ROTATED_KEYS:
        # Every key a probe ever held stays (what it signed must stay verifiable), and
        # the public JWK Set lists them all: a probe rotating without end would push the
        # other probes' keys out of it (JWKS_MAX_KEYS). A device rotates a few times in
        # its life; past this, an admin decides (`probe key set`).
        raise KeyConflict(f"probe {name} already has {len(held)} keys in its history, "
                          f"the most a probe may rotate to ({MAX_ROTATED_KEYS}); an admin "
                          "binds a new key with `bbprobe-collector probe key set`",
                          old.kid)
    outcome, key = store.rotate_probe_key(name, old.kid, new_kid, jwk, at, address,
                                          keydocs.text_of(rot.jws))
    if outcome == "no_probe":
        raise NotFound(f"no probe named {name!r}", "probe_id")
    if outcome in ("rotated", "known"):
        assert key is not None
        return outcome == "rotated", key
    if outcome == "taken":
        assert key is not None
        raise KeyConflict(_taken(name, new_kid, key), key.kid)
    bound = key.kid if key is not None else "none"
    raise KeyConflict(f"rotation: signed with key {old.kid}, which is no longer probe "
                      f"{name}'s current key (its key: {bound}); rotate from the current "
                      "key, or an admin pins the new one", bound)


def jwk_entry(key: ProbeKey) -> dict[str, Any]:
    """A probe key as a member of the JWK Set (a revoked one says when and why)."""
    about: dict[str, Any] = {"holder": "probe", "probe": key.probe_name,
                             "status": key.status, "since": key.bound_from,
                             "until": key.bound_until, "source": key.source}
    if key.revoked_at is not None:
        about.update(revoked_at=key.revoked_at, revoked_reason=key.revoked_reason)
    if key.rotation_jws is not None:
        # The old key's hand-over, so a reader can check it offline (agent/keydocs.py).
        about["rotation"] = json.loads(key.rotation_jws)
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
    binding of a probe key, current, past and revoked, at most ``limit`` of them. A key
    bound to several probes is a member per probe, with the same kid: the same key
    (RFC 7517 §4.5 asks distinct kids of distinct keys only), each saying its probe."""
    members = [collector_entry(collector_key)] if collector_key is not None else []
    members += [jwk_entry(k) for k in keys[:limit]]
    document: dict[str, Any] = {"keys": members}
    if len(keys) > limit:
        document["truncated"] = True
    return document
