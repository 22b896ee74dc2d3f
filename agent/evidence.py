"""Signed results and each probe's hash chain, pure (issue 27).

A probe signs each result's canonical JSON (agent/canonical.py) as a JWS in the flattened
JSON serialization (RFC 7515 §7.2.2), ``alg`` EdDSA (RFC 8037), ``kid`` its key's RFC 7638
thumbprint, when the session ends and before the result is spooled. The protected header
also carries:

- ``typ`` ``bbprobe-result`` (RFC 7515 §4.1.9): what the payload is, so a signature over
  something else (a key rotation, a certificate) is never taken for a result;
- ``prev``: the SHA-256 (hex) of the canonical JSON of the previous result this probe
  signed (by ``session_seq``), or null for the first of its chain. The collector's
  ``body_sha256`` of that result is the same value, so a session deleted, reordered or
  replaced shows as a link that does not match (``chain_breaks``).

The chain is in the protected header rather than in the result document: it is signed
the same, and the result schema (and every older document's canonical form) is unchanged.

Certificate bundles list their sessions in a Merkle tree (RFC 9162 §2.1.1): leaf
``SHA-256(0x00 || "result_id:sha256hex")``, node ``SHA-256(0x01 || left || right)``,
split at the largest power of two below the count; the empty tree is SHA-256("").
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent import jose
from agent.canonical import sha256_hex
from agent.jose import JoseError

RESULT_TYP = "bbprobe-result"
ROTATION_TYP = "bbprobe-key-rotation"
CERTIFICATE_TYP = "bbprobe-certificate"
# A gap record's JWS (review H1): the probe's own word that results it dropped are gone,
# so only a gap it signed explains a hole in its chain.
GAP_TYP = "bbprobe-gap"
JWS_MEMBERS = frozenset({"protected", "payload", "signature"})
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def is_jws(doc: Any) -> bool:
    """A flattened JWS object (exactly its three members) rather than a plain result."""
    return isinstance(doc, Mapping) and set(doc) == JWS_MEMBERS


def sign_result(private_key: Ed25519PrivateKey, payload: bytes,
                prev_sha256: str | None) -> dict[str, str]:
    """The flattened JWS of a result's canonical JSON, chained to ``prev_sha256``."""
    if prev_sha256 is not None and not _SHA256_RE.fullmatch(prev_sha256):
        raise JoseError("prev: not a lower-case hex SHA-256")
    return jose.sign_flattened(private_key, payload,
                               {"typ": RESULT_TYP, "prev": prev_sha256})


@dataclass(frozen=True, slots=True)
class SignedResult:
    """A result's JWS taken apart, not yet verified: ``payload`` the signed bytes,
    ``sha256`` theirs (the link the next result names), ``prev`` the link it names."""

    jws: dict[str, str]
    kid: str
    prev: str | None
    payload: bytes
    sha256: str


def open_result(jws: Any) -> SignedResult:
    """A result's flattened JWS checked for form (exact members, alg EdDSA, a kid, typ
    ``bbprobe-result``, ``prev`` null or a SHA-256) and decoded, *unverified*: the kid
    picks the key, then ``verify``. JoseError with a one-line reason otherwise."""
    _check_members(jws)
    header = jose.header_of(jws)
    if header.get("typ") != RESULT_TYP:
        raise JoseError(f"protected header: typ must be {RESULT_TYP!r}, not "
                        f"{str(header.get('typ'))[:40]!r}")
    prev = header.get("prev")
    if prev is not None and not (isinstance(prev, str) and _SHA256_RE.fullmatch(prev)):
        raise JoseError("protected header: prev must be null or a lower-case hex SHA-256")
    payload = jose.b64url_decode(jws.get("payload"), "payload",
                                 (jose.MAX_PAYLOAD_BYTES * 4 + 2) // 3)
    jose.b64url_decode(jws.get("signature"), "signature", 128)
    return SignedResult(jws={k: str(jws[k]) for k in ("protected", "payload", "signature")},
                        kid=str(header["kid"]), prev=prev, payload=payload,
                        sha256=sha256_hex(payload))


def sign_gap(private_key: Ed25519PrivateKey, payload: bytes) -> dict[str, str]:
    """The flattened JWS of a gap record's canonical JSON (agent.canonical.canonical_gap),
    typ ``bbprobe-gap``; it names no previous link (a gap record is not in the chain: it
    documents a hole in it)."""
    return jose.sign_flattened(private_key, payload, {"typ": GAP_TYP})


def open_gap(jws: Any) -> SignedResult:
    """A gap record's flattened JWS checked for form (exact members, alg EdDSA, a kid,
    typ ``bbprobe-gap``) and decoded, *unverified* (``prev`` None); JoseError with a
    one-line reason otherwise."""
    _check_members(jws)
    header = jose.header_of(jws)
    if header.get("typ") != GAP_TYP:
        raise JoseError(f"protected header: typ must be {GAP_TYP!r}, not "
                        f"{str(header.get('typ'))[:40]!r}")
    payload = jose.b64url_decode(jws.get("payload"), "payload",
                                 (jose.MAX_PAYLOAD_BYTES * 4 + 2) // 3)
    jose.b64url_decode(jws.get("signature"), "signature", 128)
    return SignedResult(jws={k: str(jws[k]) for k in ("protected", "payload", "signature")},
                        kid=str(header["kid"]), prev=None, payload=payload,
                        sha256=sha256_hex(payload))


def _check_members(jws: Any) -> None:
    if not isinstance(jws, Mapping):
        raise JoseError(f"jws: not a JSON object ({type(jws).__name__})")
    if set(jws) != JWS_MEMBERS:
        extra = sorted(set(jws) - JWS_MEMBERS)
        raise JoseError(f"jws: members must be exactly protected, payload, signature"
                        f"{' (not ' + ', '.join(map(repr, extra[:3])) + ')' if extra else ''}")


def verify(signed: SignedResult, public_key: Ed25519PublicKey) -> None:
    """Raises JoseError unless ``public_key`` signed ``signed`` (``open_result`` checked
    its form and decoded its payload once; jose.verify_flattened would do both again,
    again)."""
    if not isinstance(public_key, Ed25519PublicKey):
        raise JoseError(f"not an Ed25519 public key ({type(public_key).__name__})")
    expected = jose.kid_of(public_key)
    if signed.kid != expected:
        raise JoseError(f"protected header: kid {signed.kid[:40]!r} is not the key's "
                        f"thumbprint {expected!r}")
    signature = jose.b64url_decode(signed.jws.get("signature"), "signature", 128)
    if len(signature) != jose.SIGNATURE_BYTES:
        raise JoseError(f"signature: must be {jose.SIGNATURE_BYTES} bytes, not "
                        f"{len(signature)}")
    try:
        public_key.verify(signature, jose.signing_input(signed.jws))
    except InvalidSignature:
        raise JoseError("signature: does not verify over the protected header and "
                        "payload (one of them, or the signature, was changed)") from None


def loads_payload(payload: bytes) -> Any:
    """The payload's JSON (any JSON value; the schema is the caller's to check)."""
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JoseError("payload: not JSON text") from None


# --- the chain -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Link:
    """One result in a probe's chain: its ``session_seq``, the SHA-256 of its canonical
    JSON, and the link it names (None: unsigned, or the first of a chain)."""

    seq: int
    result_id: str
    sha256: str
    prev: str | None
    signed: bool


BreakKind = Literal["mismatch", "missing", "downgrade", "documented", "restart"]


@dataclass(frozen=True, slots=True)
class Break:
    """Where a chain does not follow from one result to the next:

    - ``mismatch``: result ``seq`` names a previous result other than the one stored
      under ``seq - 1`` (replaced, reordered, or swapped in from elsewhere), or a second
      result holds the same ``seq``;
    - ``missing``: ``seq - 1`` (and maybe more) is absent with nothing to explain it;
    - ``downgrade``: an unsigned result after a signed one: an agent that signs does not
      stop (it advances its chain over the results it could not sign), so this is a
      signature stripped from a result, in a store or a spool;
    - ``documented``: absent, and a gap record (or a recorded deletion) covers it;
    - ``restart``: a signed result names no previous one although the result before it
      was signed too: the probe lost its chain state (a reinstall, a new state
      directory, a new token). The result is the probe's own signed word, so a restart
      hides nothing a third party did (what was before is still checked, and a hole in
      the numbers is still ``missing``); it is shown, not counted as a change. After
      an unsigned result it is the chain's start (an agent upgraded to signing).
    """

    kind: BreakKind
    seq: int
    result_id: str
    detail: str


# Kinds that show a change made after the probe signed (``undocumented``).
CHANGES: frozenset[str] = frozenset({"mismatch", "missing", "downgrade"})


def merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive integer ranges merged and sorted (adjacent ones joined). Pure."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(r for r in ranges if r[0] <= r[1]):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def covers(ranges: Sequence[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether ``merged`` ranges hold every integer of [lo, hi]: one bisection, whatever
    the span (a probe may name seq 10**12: the check must not walk it)."""
    i = bisect.bisect_right(ranges, (lo, 2**63)) - 1
    return i >= 0 and ranges[i][0] <= lo and hi <= ranges[i][1]


def chain_breaks(links: Iterable[Link], explained: Iterable[tuple[int, int]] = ()
                 ) -> list[Break]:
    """Every break in one probe's chain, by seq. ``explained``: inclusive seq ranges a gap
    record or a recorded deletion covers. Unsigned results take part as links (their
    sha256 can be named by the next signed one) but name none themselves. Time is
    O(n log n) in the links and ranges, whatever numbers they hold. Pure."""
    ordered = sorted(links, key=lambda link: (link.seq, link.result_id))
    ranges = merged(explained)
    out: list[Break] = []
    previous: Link | None = None
    for link in ordered:
        if previous is not None and previous.seq == link.seq:
            out.append(Break("mismatch", link.seq, link.result_id,
                             f"a second result with session_seq {link.seq} "
                             f"(the first is {previous.result_id})"))
            continue
        if previous is not None and previous.seq < link.seq - 1:
            lo, hi = previous.seq + 1, link.seq - 1
            span = f"session_seq {lo}" if lo == hi else f"session_seq {lo}-{hi}"
            if covers(ranges, lo, hi):
                out.append(Break("documented", link.seq, link.result_id,
                                 f"{span} absent, covered by a gap record or a "
                                 "recorded deletion"))
            elif link.signed or previous.signed:
                out.append(Break("missing", link.seq, link.result_id,
                                 f"{span} absent and not documented (deleted, or "
                                 "never delivered)"))
        elif previous is not None and link.signed:
            if link.prev is None:
                if previous.signed:
                    out.append(Break("restart", link.seq, link.result_id,
                                     "names no previous result (the probe's chain "
                                     "started again)"))
            elif link.prev != previous.sha256:
                out.append(Break("mismatch", link.seq, link.result_id,
                                 f"names previous SHA-256 {link.prev[:12]}…, but "
                                 f"session_seq {previous.seq} ({previous.result_id}) "
                                 f"is {previous.sha256[:12]}…"))
        if previous is not None and previous.signed and not link.signed:
            out.append(Break("downgrade", link.seq, link.result_id,
                             f"unsigned, after session_seq {previous.seq} "
                             f"({previous.result_id}) was signed"))
        previous = link
    return out


def undocumented(breaks: Iterable[Break]) -> list[Break]:
    """The breaks that show a change (``CHANGES``): not documented drops, not restarts."""
    return [b for b in breaks if b.kind in CHANGES]


# --- keys over time ---------------------------------------------------------------------------

# How long after its key was replaced a session may end and still be the key's: the agent
# loads its key when a session starts (a rotation during it leaves the session to the old
# key), and a session lasts at most a few minutes (agent/budget.py); an hour is ample.
# Past that, a result signed by a replaced key is refused at ingest and fails a bundle
# alike (one rule: ``key_covers``).
ROTATION_GRACE_S = 3600.0


def key_covers(bound_until: datetime | None, ended_at: datetime) -> bool:
    """Whether a key bound until ``bound_until`` (None: still bound) may have signed a
    session that ended at ``ended_at``. Pure."""
    return bound_until is None or \
        ended_at <= bound_until + timedelta(seconds=ROTATION_GRACE_S)


# --- the Merkle tree (RFC 9162 §2.1.1) -------------------------------------------------------


def leaf_data(result_id: str, sha256: str) -> bytes:
    return f"{result_id}:{sha256}".encode()


def merkle_root(leaves: Sequence[bytes]) -> str:
    """MTH(D[n]) of RFC 9162 §2.1.1 over the leaves' data, as hex."""
    return _mth(list(leaves)).hex()


def _mth(leaves: list[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()
