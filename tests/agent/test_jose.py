"""agent/jose.py: RFC 8037 Appendix A's vectors, round trips, refusals, tamper, and an
independent check of our signatures with openssl."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import jose
from agent.jose import JoseError

# RFC 8037 Appendix A.1/A.2 (the key of RFC 8032 §7.1 test 1), A.3 (its thumbprint),
# A.4 (the JWS of "Example of Ed25519 signing", compact; here its three parts).
RFC_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
RFC_PROTECTED = "eyJhbGciOiJFZERTQSJ9"
RFC_PAYLOAD = "RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc"
RFC_SIGNATURE = ("hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7"
                 "sVvpAr_MuM0KAg")


def rfc_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(jose.b64url_decode(RFC_D, "d", 64))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- RFC 8037 Appendix A ---------------------------------------------------------------

def test_rfc8037_a2_public_jwk() -> None:
    assert jose.jwk_of(rfc_key().public_key()) == {"kty": "OKP", "crv": "Ed25519",
                                                   "x": RFC_X}


def test_rfc8037_a3_thumbprint() -> None:
    assert jose.thumbprint({"kty": "OKP", "crv": "Ed25519", "x": RFC_X}) == RFC_THUMBPRINT
    # Members other than the required ones do not count (RFC 7638 §3.3), nor their order.
    assert jose.thumbprint({"x": RFC_X, "use": "sig", "kid": "whatever", "crv": "Ed25519",
                            "kty": "OKP"}) == RFC_THUMBPRINT
    assert jose.kid_of(rfc_key().public_key()) == RFC_THUMBPRINT


def test_rfc8037_a4_signature_is_reproduced_exactly() -> None:
    # Ed25519 is deterministic (RFC 8032 §5.1.6): the same key and input, the same bytes.
    jws = jose.sign_with_protected(rfc_key(), b'{"alg":"EdDSA"}',
                                   b"Example of Ed25519 signing")
    assert jws == {"protected": RFC_PROTECTED, "payload": RFC_PAYLOAD,
                   "signature": RFC_SIGNATURE}


def test_rfc8037_a5_verification() -> None:
    jws = {"protected": RFC_PROTECTED, "payload": RFC_PAYLOAD, "signature": RFC_SIGNATURE}
    public = jose.public_key_of_jwk({"kty": "OKP", "crv": "Ed25519", "x": RFC_X})
    assert jose.verify_flattened(jws, public, require_kid=False) == \
        b"Example of Ed25519 signing"
    # Our own format requires a kid (RFC 7515 §4.1.4): the RFC's header has none.
    with pytest.raises(JoseError, match="no kid"):
        jose.verify_flattened(jws, public)


# --- round trips ----------------------------------------------------------------------

def test_jwk_and_pem_round_trip() -> None:
    public = Ed25519PrivateKey.generate().public_key()
    assert jose.jwk_of(jose.public_key_of_jwk(jose.jwk_of(public))) == jose.jwk_of(public)
    pem = jose.pem_of(public)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert jose.jwk_of(jose.public_key_of_pem(pem)) == jose.jwk_of(public)


def test_sign_and_verify_flattened() -> None:
    private = Ed25519PrivateKey.generate()
    payload = json.dumps({"result_id": "r1", "rtt_ms": [1.5, 2.25]}).encode()
    jws = jose.sign_flattened(private, payload, {"typ": "bbprobe-result+jws"})
    assert set(jws) == {"protected", "payload", "signature"}  # RFC 7515 §7.2.2
    header = jose.header_of(jws)
    assert header == {"alg": "EdDSA", "kid": jose.kid_of(private.public_key()),
                      "typ": "bbprobe-result+jws"}
    assert jose.verify_flattened(jws, private.public_key()) == payload
    # JSON in, JSON out: the JWS survives a trip through a document.
    assert jose.verify_flattened(json.loads(json.dumps(jws)), private.public_key()) == \
        payload
    assert jose.verify_flattened(jose.sign_flattened(private, b""), private.public_key()) \
        == b""


def test_signer_sets_alg_and_kid_itself() -> None:
    private = Ed25519PrivateKey.generate()
    for name in ("alg", "kid", "crit", "b64", "jwk"):
        with pytest.raises(JoseError, match=f"header: '{name}'"):
            jose.sign_flattened(private, b"x", {name: "HS256"})
    with pytest.raises(JoseError, match="header: not JSON"):
        jose.sign_flattened(private, b"x", {"n": float("nan")})


# --- refusals -------------------------------------------------------------------------

@pytest.mark.parametrize(("jwk", "reason"), [
    ({"kty": "RSA", "n": "AQAB", "e": "AQAB"}, "kty must be 'OKP'"),
    ({"kty": "OKP", "crv": "Ed448", "x": RFC_X}, "crv must be 'Ed25519'"),
    ({"kty": "OKP", "crv": "X25519", "x": RFC_X}, "crv must be 'Ed25519'"),
    ({"kty": "EC", "crv": "P-256", "x": RFC_X, "y": RFC_X}, "kty must be 'OKP'"),
    ({"kty": "OKP", "crv": "Ed25519"}, "x: not a string"),
    ({"kty": "OKP", "crv": "Ed25519", "x": 5}, "x: not a string"),
    ({"kty": "OKP", "crv": "Ed25519", "x": RFC_X + "="}, "not base64url"),
    ({"kty": "OKP", "crv": "Ed25519", "x": RFC_X.replace("_", "/")}, "not base64url"),
    ({"kty": "OKP", "crv": "Ed25519", "x": " " + RFC_X}, "not base64url"),
    ({"kty": "OKP", "crv": "Ed25519", "x": RFC_X[:-1] + "p"}, "not canonical"),
    ({"kty": "OKP", "crv": "Ed25519", "x": b64(bytes(31))}, "x must be 32 bytes, not 31"),
    ({"kty": "OKP", "crv": "Ed25519", "x": b64(bytes(33))}, "x must be 32 bytes, not 33"),
    ({"kty": "OKP", "crv": "Ed25519", "x": "A" * 100_000}, "longer than"),
    ({"kty": "OKP", "crv": "Ed25519", "x": RFC_X, "d": RFC_D}, "private key"),
    ({**{f"m{i}": "v" for i in range(40)}, "kty": "OKP"}, "more than 32 members"),
    ({"kty": "OKP", "crv": "Ed25519", "x": RFC_X, "pad": "z" * 5000}, "'pad' is longer"),
    ([1, 2], "not a JSON object"),
    ("OKP", "not a JSON object"),
    (None, "not a JSON object"),
])
def test_a_jwk_of_anything_else_is_refused(jwk: object, reason: str) -> None:
    with pytest.raises(JoseError, match=reason) as caught:
        jose.public_key_of_jwk(jwk)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(JoseError):
        jose.thumbprint(jwk)  # type: ignore[arg-type]


def test_a_pem_of_another_kind_is_refused() -> None:
    from cryptography.hazmat.primitives import serialization

    def pem(key: Any) -> str:
        return str(key.public_bytes(serialization.Encoding.PEM,
                                    serialization.PublicFormat.SubjectPublicKeyInfo
                                    ).decode())

    with pytest.raises(JoseError, match="another kind of key"):
        jose.public_key_of_pem(pem(generate_private_key(SECP256R1()).public_key()))
    with pytest.raises(JoseError, match="another kind of key"):
        jose.public_key_of_pem(pem(Ed448PrivateKey.generate().public_key()))
    with pytest.raises(JoseError, match="not a PEM public key"):
        jose.public_key_of_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(JoseError, match="longer than"):
        jose.public_key_of_pem("A" * 10_000_000)
    with pytest.raises(JoseError, match="not a string"):
        jose.public_key_of_pem(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(JoseError, match="not an Ed25519 public key"):
        jose.jwk_of(Ed448PrivateKey.generate().public_key())  # type: ignore[arg-type]
    with pytest.raises(JoseError, match="not an Ed25519 private key"):
        jose.sign_flattened(Ed448PrivateKey.generate(), b"x")  # type: ignore[arg-type]


# --- tamper ---------------------------------------------------------------------------

@pytest.fixture()
def signed() -> tuple[Ed25519PrivateKey, dict[str, str]]:
    private = Ed25519PrivateKey.generate()
    return private, jose.sign_flattened(private, b'{"download_bps":100000000}')


def _header(jws: dict[str, str], **changes: object) -> dict[str, str]:
    header = json.loads(base64.urlsafe_b64decode(jws["protected"] + "=="))
    header.update(changes)
    return {**jws, "protected": b64(json.dumps(header).encode())}


def test_a_changed_payload_does_not_verify(signed: tuple[Ed25519PrivateKey, dict[str, str]]
                                           ) -> None:
    private, jws = signed
    forged = {**jws, "payload": b64(b'{"download_bps":900000000}')}
    with pytest.raises(JoseError, match=r"^signature: does not verify"):
        jose.verify_flattened(forged, private.public_key())
    with pytest.raises(JoseError, match=r"^payload: not base64url"):
        jose.verify_flattened({**jws, "payload": jws["payload"] + "!"}, private.public_key())
    with pytest.raises(JoseError, match=r"^payload: not a string"):
        jose.verify_flattened({**jws, "payload": None}, private.public_key())


def test_a_changed_header_is_named(signed: tuple[Ed25519PrivateKey, dict[str, str]]
                                   ) -> None:
    private, jws = signed
    public = private.public_key()
    with pytest.raises(JoseError, match=r"^protected header: alg must be 'EdDSA'"):
        jose.verify_flattened(_header(jws, alg="none"), public)
    with pytest.raises(JoseError, match=r"^protected header: alg must be 'EdDSA'"):
        jose.verify_flattened(_header(jws, alg="HS256"), public)
    with pytest.raises(JoseError, match=r"^protected header: kid .* is not the key's"):
        jose.verify_flattened(_header(jws, kid=RFC_THUMBPRINT), public)
    with pytest.raises(JoseError, match=r"^protected header: crit"):
        jose.verify_flattened(_header(jws, crit=["exp"]), public)
    with pytest.raises(JoseError, match=r"^protected header: crit/b64"):
        jose.verify_flattened(_header(jws, b64=False), public)
    # A well-formed change the checks allow still breaks the signature.
    with pytest.raises(JoseError, match=r"^signature: does not verify"):
        jose.verify_flattened(_header(jws, typ="other"), public)
    with pytest.raises(JoseError, match=r"^protected header: not JSON"):
        jose.verify_flattened({**jws, "protected": b64(b"{not json")}, public)
    duplicated = b'{"alg":"EdDSA","kid":"%s","alg":"none"}' % jose.kid_of(public).encode()
    with pytest.raises(JoseError, match=r"^protected header: member 'alg' appears twice"):
        jose.verify_flattened({**jws, "protected": b64(duplicated)}, public)
    with pytest.raises(JoseError, match=r"^protected header: not a JSON object"):
        jose.verify_flattened({**jws, "protected": b64(b"[1]")}, public)
    with pytest.raises(JoseError, match=r"^protected header: longer than"):
        jose.verify_flattened({**jws, "protected": "A" * 100_000}, public)
    with pytest.raises(JoseError, match=r"^jws: an unprotected header"):
        jose.verify_flattened({**jws, "header": {"alg": "none"}}, public)


def test_a_changed_signature_does_not_verify(
        signed: tuple[Ed25519PrivateKey, dict[str, str]]) -> None:
    private, jws = signed
    public = private.public_key()
    raw = bytearray(base64.urlsafe_b64decode(jws["signature"] + "=="))
    raw[10] ^= 1
    with pytest.raises(JoseError, match=r"^signature: does not verify"):
        jose.verify_flattened({**jws, "signature": b64(bytes(raw))}, public)
    with pytest.raises(JoseError, match=r"^signature: must be 64 bytes, not 63"):
        jose.verify_flattened({**jws, "signature": b64(bytes(raw[:63]))}, public)
    with pytest.raises(JoseError, match=r"^signature: longer than"):
        jose.verify_flattened({**jws, "signature": "A" * 5000}, public)
    with pytest.raises(JoseError, match=r"^signature: not a string"):
        jose.verify_flattened({k: v for k, v in jws.items() if k != "signature"}, public)


def test_signing_input_is_ascii_only() -> None:
    with pytest.raises(JoseError, match="ASCII"):
        jose.signing_input({"protected": "é", "payload": ""})
    with pytest.raises(JoseError, match="must be strings"):
        jose.signing_input({"protected": 1, "payload": ""})


def test_another_key_does_not_verify(signed: tuple[Ed25519PrivateKey, dict[str, str]]
                                     ) -> None:
    _, jws = signed
    with pytest.raises(JoseError, match="is not the key's thumbprint"):
        jose.verify_flattened(jws, Ed25519PrivateKey.generate().public_key())
    with pytest.raises(JoseError, match="not a JSON object"):
        jose.verify_flattened([jws], Ed25519PrivateKey.generate().public_key())  # type: ignore[arg-type]
    with pytest.raises(JoseError, match="general serialization"):
        jose.verify_flattened({"signatures": [jws]}, Ed25519PrivateKey.generate().public_key())


# --- an independent check: openssl ---------------------------------------------------

def _openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is missing under CI=true (it is installed there)")
        pytest.skip("openssl is not installed: the independent check of our signatures "
                    "with `openssl pkeyutl -verify -rawin` cannot run")
    version = subprocess.run([found, "version"], capture_output=True, text=True,
                             check=False).stdout
    if not version.startswith("OpenSSL 3"):
        pytest.skip(f"openssl 3 is needed for pkeyutl -rawin with Ed25519, not {version!r}")
    return found


def test_openssl_verifies_what_sign_flattened_signs(tmp_path: Path) -> None:
    openssl = _openssl()
    private = Ed25519PrivateKey.generate()
    jws = jose.sign_flattened(private, b'{"result_id":"r-openssl","rtt_ms":[12.5]}',
                              {"typ": "bbprobe-result+jws"})
    (tmp_path / "pub.pem").write_text(jose.pem_of(private.public_key()))
    (tmp_path / "signing-input").write_bytes(jose.signing_input(jws))
    (tmp_path / "sig.bin").write_bytes(jose.b64url_decode(jws["signature"], "sig", 128))

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [openssl, "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin",
             "-in", "signing-input", "-sigfile", "sig.bin"],
            cwd=tmp_path, capture_output=True, text=True, check=False, timeout=30)

    done = verify()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Signature Verified Successfully" in done.stdout
    # And openssl refuses a changed input: the check is not vacuous.
    (tmp_path / "signing-input").write_bytes(jose.signing_input(jws) + b"x")
    assert verify().returncode != 0


def test_openssl_reads_our_pem_as_the_rfc_key(tmp_path: Path) -> None:
    openssl = _openssl()
    (tmp_path / "pub.pem").write_text(jose.pem_of(rfc_key().public_key()))
    done = subprocess.run([openssl, "pkey", "-pubin", "-in", "pub.pem", "-text", "-noout"],
                          cwd=tmp_path, capture_output=True, text=True, check=False,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    hex_x = jose.b64url_decode(RFC_X, "x", 64).hex()
    assert hex_x in "".join(done.stdout.split()).replace(":", "")


def test_junk_is_always_a_one_line_jose_error() -> None:
    """Whatever a JWS or a JWK holds, the answer is a JoseError, never another
    exception (a verifier must never print a traceback)."""
    import random

    rng = random.Random(8037)
    private = Ed25519PrivateKey.generate()
    good = jose.sign_flattened(private, b'{"a":1}')
    values: list[object] = [None, 1, 1.5, True, [], {}, "", "A", "=", "é", "\x00",
                            "A" * 5, 10**400, {"alg": "EdDSA"}, RFC_X, RFC_SIGNATURE]
    for _ in range(2000):
        jws: dict[str, object] = dict(good)
        for member in rng.sample(["protected", "payload", "signature", "header",
                                  "signatures"], rng.randint(1, 2)):
            if rng.random() < 0.5 and isinstance(jws.get(member), str):
                text = str(jws[member])
                at = rng.randrange(len(text) + 1)
                jws[member] = text[:at] + rng.choice("A_-=.é+/ ") + text[at + 1:]
            else:
                jws[member] = rng.choice(values)
        try:
            jose.verify_flattened(jws, private.public_key())
        except JoseError as exc:
            assert "\n" not in str(exc)
        jwk: dict[str, object] = {"kty": "OKP", "crv": "Ed25519", "x": RFC_X}
        jwk[rng.choice(["kty", "crv", "x", "d"])] = rng.choice(values)
        try:
            jose.public_key_of_jwk(jwk)
            jose.thumbprint(jwk)
        except JoseError as exc:
            assert "\n" not in str(exc)


P25519 = 2**255 - 19


@pytest.mark.parametrize(("name", "raw"), [
    ("the identity", b"\x01" + bytes(31)),
    ("zero, a point of order 4", bytes(32)),
    ("p - 1, a point of order 2", (P25519 - 1).to_bytes(32, "little")),
    ("p + 1, the identity spelt non-canonically", (P25519 + 1).to_bytes(32, "little")),
    ("an order-8 point", bytes.fromhex(
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")),
])
def test_a_key_anyone_could_sign_for_is_refused(name: str, raw: bytes) -> None:
    """Keys of small order or non-canonical encodings verify signatures made without any
    private key (with the identity, R = identity and S = 0 verify over every message):
    refused as JWK and as PEM, so no such key is ever bound or trusted."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    jwk = {"kty": "OKP", "crv": "Ed25519", "x": jose.b64url(raw)}
    with pytest.raises(jose.JoseError, match="not a sound Ed25519 public key"):
        jose.public_key_of_jwk(jwk)
    try:  # OpenSSL takes most of them; the PEM path must refuse them too
        pem = jose.pem_of(Ed25519PublicKey.from_public_bytes(raw))
    except (ValueError, jose.JoseError):
        return
    with pytest.raises(jose.JoseError, match="not a sound Ed25519 public key"):
        jose.public_key_of_pem(pem)


def test_sound_keys_pass_the_curve_check() -> None:
    """Generated keys and RFC 8037's example key are sound: the check refuses only what
    it must."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent import edwards

    for _ in range(20):
        raw = Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert edwards.unsound(raw) is None
    assert edwards.unsound(bytes.fromhex(
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")) is None


def test_b64url_decode_accepts_exactly_the_canonical_unpadded_alphabet() -> None:
    """The C path (binascii strict mode over the mapped alphabet) refuses what the
    definition refuses: padding, '+' '/', white space, non-ASCII, a length of 4k+1, and
    non-zero unused bits in the last character; and reads every canonical string back."""
    import os

    for n in range(0, 40):
        data = os.urandom(n)
        assert jose.b64url_decode(jose.b64url(data), "x", 100) == data
    for bad in ("QQ==", "a+bc", "a/bc", "ab c", "ab\n", "abcé", "abcde", "QR", "QUF"):
        with pytest.raises(jose.JoseError):
            jose.b64url_decode(bad, "x", 100)
    assert jose.b64url_decode("QQ", "x", 100) == b"A"
