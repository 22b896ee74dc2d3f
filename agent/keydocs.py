"""The two statements a probe key makes about keys, pure: made by the agent, checked by
the collector (collector/fleet/probe_keys.py) and by an offline verifier. Both are JWS in
the flattened JSON serialization (RFC 7515 §7.2.2), alg EdDSA (RFC 8037), kid the
signing key's RFC 7638 thumbprint (agent/jose.py); payloads are JSON with sorted keys.

- Enrolment proof (typ ``bbprobe-key-enrolment``), signed by the key being enrolled over
  ``{"jwk": its public JWK, "at": UTC}``: proof of possession (as RFC 7800 §3 and ACME,
  RFC 8555 §7.3, ask of a key before binding it), so nobody can enrol a public key they
  do not hold and have a device's results attributed to the wrong line. It names no
  probe and has no expiry: replayed, it binds only a key the replayer cannot sign with.
- Rotation (typ ``bbprobe-key-rotation``), signed by the OLD key over ``{"new_jwk",
  "new_kid", "at"}``: the old key hands over to the new one, so a verifier who trusts
  the old key can follow the history to the new one without trusting the collector.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent import jose
from agent.evidence import JWS_MEMBERS, ROTATION_TYP
from agent.jose import JoseError

ENROLMENT_TYP = "bbprobe-key-enrolment"
# A statement is a few hundred bytes: anything much larger is not one.
MAX_STATEMENT_CHARS = 4096


def _payload(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def enrolment_proof(private_key: Ed25519PrivateKey, at: str) -> dict[str, str]:
    """The key's proof that its holder enrols it."""
    jwk = jose.jwk_of(private_key.public_key())
    return jose.sign_flattened(private_key, _payload({"jwk": jwk, "at": at}),
                               {"typ": ENROLMENT_TYP})


def rotation(old_key: Ed25519PrivateKey, new_key: Ed25519PublicKey, at: str
             ) -> dict[str, str]:
    """The old key's hand-over to ``new_key``."""
    jwk = jose.jwk_of(new_key)
    return jose.sign_flattened(old_key, _payload(
        {"new_jwk": jwk, "new_kid": jose.thumbprint(jwk), "at": at}), {"typ": ROTATION_TYP})


def _opened(jws: Any, what: str, typ: str) -> tuple[dict[str, Any], str]:
    """(header, kid) of a statement checked for form, unverified."""
    if not isinstance(jws, Mapping) or set(jws) != JWS_MEMBERS:
        raise JoseError(f"{what}: must be a flattened JWS (exactly protected, payload, "
                        "signature)")
    if any(not isinstance(v, str) or len(v) > MAX_STATEMENT_CHARS for v in jws.values()):
        raise JoseError(f"{what}: members must be strings of at most "
                        f"{MAX_STATEMENT_CHARS} characters")
    try:
        header = jose.header_of(jws)
    except JoseError as exc:
        raise JoseError(f"{what}: {exc}") from None
    if header.get("typ") != typ:
        raise JoseError(f"{what}: typ must be {typ!r}, not {str(header.get('typ'))[:40]!r}")
    return header, str(header["kid"])


def _verified_payload(jws: Mapping[str, Any], key: Ed25519PublicKey, what: str
                      ) -> dict[str, Any]:
    try:
        raw = jose.verify_flattened(jws, key)
        doc = json.loads(raw.decode("utf-8"))
    except JoseError as exc:
        raise JoseError(f"{what}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JoseError(f"{what}: payload is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("at"), str):
        raise JoseError(f"{what}: payload must be an object with \"at\" (UTC text)")
    return doc


def _mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise JoseError("not a JSON object")
    return value


def check_proof(proof: Any, jwk: Mapping[str, Any]) -> None:
    """Raises JoseError (one line, starting "proof:") unless ``proof`` is an enrolment
    proof of the key ``jwk`` signed by that key."""
    public = jose.public_key_of_jwk(jwk)
    _, kid = _opened(proof, "proof", ENROLMENT_TYP)
    if kid != jose.kid_of(public):
        raise JoseError(f"proof: signed by key {kid[:64]}, not by the key enrolled "
                        f"({jose.kid_of(public)})")
    doc = _verified_payload(proof, public, "proof")
    try:
        named = jose.thumbprint(_mapping(doc.get("jwk")))
    except JoseError:
        raise JoseError("proof: payload's jwk is not an Ed25519 public JWK") from None
    if named != jose.kid_of(public):
        raise JoseError(f"proof: names key {named}, not the key enrolled")


@dataclass(frozen=True, slots=True)
class Rotation:
    """A rotation statement taken apart, not yet verified: ``old_kid`` picks the key."""

    jws: dict[str, str]
    old_kid: str
    new_kid: str


def open_rotation(jws: Any, new_jwk: Mapping[str, Any]) -> Rotation:
    """A rotation statement checked for form and for naming ``new_jwk``, unverified;
    JoseError (one line, starting "rotation:") otherwise."""
    new_kid = jose.kid_of(jose.public_key_of_jwk(new_jwk))
    _, old_kid = _opened(jws, "rotation", ROTATION_TYP)
    if old_kid == new_kid:
        raise JoseError("rotation: signed by the new key itself, not by the old one")
    return Rotation({k: str(jws[k]) for k in sorted(JWS_MEMBERS)}, old_kid, new_kid)


def verify_rotation(rot: Rotation, old_key: Ed25519PublicKey) -> str:
    """The rotation's time (its "at"), once ``old_key`` is shown to have signed it and
    it names the new key twice alike; JoseError (starting "rotation:") otherwise."""
    doc = _verified_payload(rot.jws, old_key, "rotation")
    try:
        named = jose.thumbprint(_mapping(doc.get("new_jwk")))
    except JoseError:
        raise JoseError("rotation: payload's new_jwk is not an Ed25519 public JWK") from None
    if named != rot.new_kid or doc.get("new_kid") != rot.new_kid:
        raise JoseError(f"rotation: hands over to key {named}, not to the key sent "
                        f"({rot.new_kid})")
    return str(doc["at"])


def text_of(jws: Mapping[str, str]) -> str:
    """A statement as stored (probe_keys.rotation_jws): compact JSON, sorted members."""
    return json.dumps(dict(jws), sort_keys=True, separators=(",", ":"))
