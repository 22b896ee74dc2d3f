"""JOSE for Ed25519 keys, pure: JWKs (RFC 8037 §2), JWK thumbprints (RFC 7638), PEM
(SubjectPublicKeyInfo, RFC 8410) and JWS in the flattened JSON serialization (RFC 7515
§7.2.2) with ``alg`` EdDSA (RFC 8037 §3.1) and ``kid`` the signing key's thumbprint.

Only Ed25519 (RFC 8032) is accepted: any other ``kty``, ``crv`` or ``alg`` is refused, never
guessed at, so a key or a signature of another algorithm cannot be slipped in. Every input
is bounded in size before it is decoded, and every failure is a ``JoseError`` (a
ValueError) with a one-line reason that names what failed (the payload, the protected
header or the signature, when a JWS does not verify).

The crypto itself is PyCA ``cryptography`` (OpenSSL underneath); this module only does
the encodings around it. Ed25519 signatures are deterministic (RFC 8032 §5.1.6): the same
key and signing input give the same signature, which the tests check against RFC 8037
Appendix A.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent import edwards

ALGORITHM = "EdDSA"  # RFC 8037 §3.1
KEY_TYPE = "OKP"  # RFC 8037 §2
CURVE = "Ed25519"
PUBLIC_KEY_BYTES = 32  # RFC 8032 §5.1.5
SIGNATURE_BYTES = 64  # RFC 8032 §5.1.6

# Bounds, well above any honest input: a JWK is under 200 bytes, a PEM public key about
# 113; a protected header here a few hundred. A payload (a result document) may be large,
# but not without limit.
MAX_JWK_MEMBERS = 32
MAX_MEMBER_CHARS = 1024
MAX_PEM_CHARS = 4096
MAX_HEADER_CHARS = 8192
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024



class JoseError(ValueError):
    """A key, a JWK or a JWS that is malformed, of another algorithm, or does not
    verify; the message is one line and says which."""


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: Any, what: str, max_chars: int) -> bytes:
    """The bytes of a base64url string without padding (RFC 7515 §2); JoseError naming
    ``what`` for anything else (padding, other alphabets, white space, too long, and
    non-zero unused bits in the last character: two strings, one value).

    Checked in C (binascii's strict mode over the alphabet mapped to the standard one):
    a result's payload is some 100 KB, and ingest reads one per result."""
    if not isinstance(text, str):
        raise JoseError(f"{what}: not a string")
    if len(text) > max_chars:
        raise JoseError(f"{what}: longer than {max_chars} characters")
    if len(text) % 4 == 1 or not text.isascii() or "+" in text or "/" in text \
            or "=" in text:
        raise JoseError(f"{what}: not base64url without padding")
    try:
        data = binascii.a2b_base64((text + "=" * (-len(text) % 4)).translate(_TO_STANDARD),
                                   strict_mode=True)
    except (binascii.Error, ValueError):
        raise JoseError(f"{what}: not base64url without padding") from None
    tail = len(text) % 4
    if tail and _B64URL_VALUE[text[-1]] & (0x0F if tail == 2 else 0x03):
        raise JoseError(f"{what}: not canonical base64url")
    return data


_TO_STANDARD = str.maketrans("-_", "+/")
_B64URL_VALUE = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}


def _public_raw(public_key: Ed25519PublicKey) -> bytes:
    if not isinstance(public_key, Ed25519PublicKey):
        raise JoseError(f"not an Ed25519 public key ({type(public_key).__name__})")
    return public_key.public_bytes(serialization.Encoding.Raw,
                                   serialization.PublicFormat.Raw)


def jwk_of(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The public key as a JWK (RFC 8037 §2): kty OKP, crv Ed25519, x its 32 bytes."""
    return {"kty": KEY_TYPE, "crv": CURVE, "x": b64url(_public_raw(public_key))}


def _checked_jwk(jwk: Any) -> tuple[bytes, str]:
    """(the raw public key, x) of an Ed25519 public JWK; JoseError otherwise."""
    if not isinstance(jwk, Mapping):
        raise JoseError(f"jwk: not a JSON object ({type(jwk).__name__})")
    if len(jwk) > MAX_JWK_MEMBERS:
        raise JoseError(f"jwk: more than {MAX_JWK_MEMBERS} members")
    for name, value in jwk.items():
        if not isinstance(name, str) or len(name) > 64:
            raise JoseError("jwk: a member name is not a short string")
        if isinstance(value, str) and len(value) > MAX_MEMBER_CHARS:
            raise JoseError(f"jwk: member {name!r} is longer than {MAX_MEMBER_CHARS} "
                            "characters")
    kty = jwk.get("kty")
    if kty != KEY_TYPE:
        raise JoseError(f"jwk: kty must be {KEY_TYPE!r} (RFC 8037), not {_shown(kty)}")
    crv = jwk.get("crv")
    if crv != CURVE:
        raise JoseError(f"jwk: crv must be {CURVE!r}, not {_shown(crv)}")
    if "d" in jwk:
        raise JoseError("jwk: holds a private key (member 'd'); send the public key only")
    x = jwk.get("x")
    raw = b64url_decode(x, "jwk: x", MAX_MEMBER_CHARS)
    if len(raw) != PUBLIC_KEY_BYTES:
        raise JoseError(f"jwk: x must be {PUBLIC_KEY_BYTES} bytes, not {len(raw)}")
    why = edwards.unsound(raw)
    if why is not None:
        raise JoseError(f"jwk: x is not a sound Ed25519 public key: {why}")
    assert isinstance(x, str)
    return raw, x


def public_key_of_jwk(jwk: Mapping[str, Any]) -> Ed25519PublicKey:
    """The Ed25519 public key of a JWK (RFC 8037 §2); JoseError for anything else."""
    raw, _ = _checked_jwk(jwk)
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise JoseError(f"jwk: x is not an Ed25519 public key ({_first_line(exc)})"
                        ) from None


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 §3: SHA-256 of the JWK's required members (crv, kty, x for OKP, RFC 8037
    §2) in lexicographic order with no white space; base64url without padding."""
    _, x = _checked_jwk(jwk)
    canonical = json.dumps({"crv": CURVE, "kty": KEY_TYPE, "x": x},
                           separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def kid_of(public_key: Ed25519PublicKey) -> str:
    """The public key's RFC 7638 thumbprint, the ``kid`` of what it signs."""
    return _kid_of_raw(_public_raw(public_key))


@functools.lru_cache(maxsize=4096)
def _kid_of_raw(raw: bytes) -> str:
    """Worked out once per key (with its curve check): a collector checks thousands of
    results signed by one key, and a verifier a campaign of them."""
    return thumbprint({"kty": KEY_TYPE, "crv": CURVE, "x": b64url(raw)})


def pem_of(public_key: Ed25519PublicKey) -> str:
    """The public key as PEM (SubjectPublicKeyInfo, RFC 8410), what ``openssl pkey
    -pubin`` reads."""
    _public_raw(public_key)
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo
                                   ).decode("ascii")


def public_key_of_pem(text: str) -> Ed25519PublicKey:
    """The Ed25519 public key of a PEM SubjectPublicKeyInfo; JoseError otherwise."""
    if not isinstance(text, str):
        raise JoseError(f"pem: not a string ({type(text).__name__})")
    if len(text) > MAX_PEM_CHARS:
        raise JoseError(f"pem: longer than {MAX_PEM_CHARS} characters, not a public key")
    try:
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm) as exc:
        raise JoseError(f"pem: not a PEM public key ({_first_line(exc)})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise JoseError(f"pem: holds another kind of key ({type(key).__name__}), not "
                        "an Ed25519 one")
    why = edwards.unsound(key.public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw))
    if why is not None:
        raise JoseError(f"pem: not a sound Ed25519 public key: {why}")
    return key


def sign_flattened(private_key: Ed25519PrivateKey, payload: bytes,
                   extra_header: Mapping[str, Any] | None = None) -> dict[str, str]:
    """A JWS of ``payload`` in the flattened JSON serialization (RFC 7515 §7.2.2): the
    protected header holds alg EdDSA, kid the key's thumbprint, and ``extra_header``'s
    members (which may not replace alg or kid). Signed over ASCII(BASE64URL(protected)
    || '.' || BASE64URL(payload)) (RFC 7515 §5.1)."""
    if not isinstance(private_key, Ed25519PrivateKey):
        raise JoseError(f"not an Ed25519 private key ({type(private_key).__name__})")
    header: dict[str, Any] = {"alg": ALGORITHM,
                              "kid": kid_of(private_key.public_key())}
    for name, value in (extra_header or {}).items():
        if name in ("alg", "kid", "crit", "b64", "jwk", "jku", "x5u", "x5c"):
            raise JoseError(f"header: {name!r} is set by the signer or not supported")
        header[name] = value
    try:
        protected = json.dumps(header, separators=(",", ":"), sort_keys=True,
                               ensure_ascii=True, allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise JoseError(f"header: not JSON ({_first_line(exc)})") from None
    return sign_with_protected(private_key, protected, payload)


def sign_with_protected(private_key: Ed25519PrivateKey, protected: bytes, payload: bytes
                        ) -> dict[str, str]:
    """The flattened JWS of ``payload`` under exactly the protected header bytes given
    (RFC 7515 §5.1): the primitive under ``sign_flattened``, public so that published
    examples (RFC 8037 Appendix A.4, whose header has no kid) can be reproduced."""
    if not isinstance(private_key, Ed25519PrivateKey):
        raise JoseError(f"not an Ed25519 private key ({type(private_key).__name__})")
    if not isinstance(payload, bytes) or not isinstance(protected, bytes):
        raise JoseError("payload and protected header must be bytes")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise JoseError(f"payload: larger than {MAX_PAYLOAD_BYTES} bytes")
    encoded_header = b64url(protected)
    if len(encoded_header) > MAX_HEADER_CHARS:
        raise JoseError(f"header: longer than {MAX_HEADER_CHARS} characters")
    encoded = b64url(payload)
    signature = private_key.sign(f"{encoded_header}.{encoded}".encode("ascii"))
    return {"payload": encoded, "protected": encoded_header,
            "signature": b64url(signature)}


def header_of(jws: Mapping[str, Any], *, require_kid: bool = True) -> dict[str, Any]:
    """The decoded protected header of a flattened JWS, checked for alg EdDSA and (unless
    ``require_kid`` is false) a kid, unverified: to pick the key (by ``kid``) before
    ``verify_flattened``."""
    if not isinstance(jws, Mapping):
        raise JoseError(f"jws: not a JSON object ({type(jws).__name__})")
    raw = b64url_decode(jws.get("protected"), "protected header", MAX_HEADER_CHARS)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_members)
    except _DuplicateMember as exc:
        # RFC 7515 §5.2 step 4: a JWS with duplicate header names is rejected (else two
        # readers may each see another alg).
        raise JoseError(f"protected header: member {exc.args[0]!r} appears twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JoseError("protected header: not JSON") from None
    if not isinstance(header, dict):
        raise JoseError("protected header: not a JSON object")
    if header.get("alg") != ALGORITHM:
        raise JoseError(f"protected header: alg must be {ALGORITHM!r} (RFC 8037), not "
                        f"{_shown(header.get('alg'))}")
    if "crit" in header or header.get("b64", True) is not True:
        raise JoseError("protected header: crit/b64 extensions are not supported "
                        "(RFC 7515 §4.1.11, RFC 7797)")
    kid = header.get("kid")
    if (require_kid or kid is not None) and (
            not isinstance(kid, str) or not kid or len(kid) > MAX_MEMBER_CHARS):
        raise JoseError("protected header: no kid (RFC 7515 §4.1.4)")
    return header


def verify_flattened(jws: Mapping[str, Any], public_key: Ed25519PublicKey, *,
                     require_kid: bool = True) -> bytes:
    """The payload of a flattened JWS (RFC 7515 §7.2.2) signed by ``public_key``; a
    JoseError naming the part that fails otherwise: the protected header (malformed,
    another alg, a kid that is not the key's thumbprint), the payload or the signature
    (malformed), or the signature not verifying (RFC 7515 §5.2). A well-formed change to
    any of the three shows only as the signature not verifying: Ed25519 cannot say which
    part was changed. ``require_kid`` false accepts a header without kid (published
    examples); a kid present must still be the key's."""
    if not isinstance(jws, Mapping):
        raise JoseError(f"jws: not a JSON object ({type(jws).__name__})")
    if "signatures" in jws:
        raise JoseError("jws: the general serialization is not supported; flattened only")
    if "header" in jws:
        raise JoseError("jws: an unprotected header is not supported")
    header = header_of(jws, require_kid=require_kid)
    expected = kid_of(public_key)
    if "kid" in header and header["kid"] != expected:
        raise JoseError(f"protected header: kid {_shown(header['kid'])} is not the key's "
                        f"thumbprint {expected!r}")
    payload = b64url_decode(jws.get("payload"), "payload",
                            (MAX_PAYLOAD_BYTES * 4 + 2) // 3)
    signature = b64url_decode(jws.get("signature"), "signature", 128)
    if len(signature) != SIGNATURE_BYTES:
        raise JoseError(f"signature: must be {SIGNATURE_BYTES} bytes, not "
                        f"{len(signature)}")
    signing_input = f"{jws['protected']}.{jws['payload']}".encode("ascii")
    try:
        public_key.verify(signature, signing_input)
    except InvalidSignature:
        raise JoseError("signature: does not verify over the protected header and "
                        "payload (one of them, or the signature, was changed)") from None
    return payload


def signing_input(jws: Mapping[str, Any]) -> bytes:
    """ASCII(protected '.' payload) (RFC 7515 §5.1), the bytes the signature covers: what
    ``openssl pkeyutl -verify -rawin -in`` is given."""
    protected, payload = jws.get("protected"), jws.get("payload")
    if not isinstance(protected, str) or not isinstance(payload, str):
        raise JoseError("jws: protected and payload must be strings")
    try:
        return f"{protected}.{payload}".encode("ascii")
    except UnicodeEncodeError:
        raise JoseError("jws: protected and payload must be base64url (ASCII)") from None


class _DuplicateMember(Exception):
    pass


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, value in pairs:
        if name in found:
            raise _DuplicateMember(name)
        found[name] = value
    return found


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
