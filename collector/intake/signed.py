"""Signed results at ingest, pure (issue 27): a probe sends a result as the flattened JWS
(RFC 7515 §7.2.2) it signed when the session ended (agent/evidence.py), in place of the
plain document, as a single result's body or a batch item.

What a delivery is, is found without slowing the plain results: a valid plain result
takes the fast path (collector/decode.py) as before; only what that path does not accept
is read as JSON, and then an object with any of the JWS members ("protected", "payload",
"signature": no result field has those names) is taken for a signed result. Its form is
checked (``open_result``), its payload parsed as a result (ingest.parse_body, named by
the token's probe when it says probe_id ""), and only then is its signature judged
against the probe's keys (``judge``, with a keyring snapshot):

- the probe has no key at all: accepted "unverified" (it can be once a key is bound);
- the kid is a key of the probe, not revoked, and bound when the session ended (or
  replaced at most an hour before: agent.evidence.key_covers, the rule bundles are
  verified by): verified, or 422 if it does not verify;
- the kid is a revoked key of the probe, one replaced longer before, or not one of its
  keys: 422 saying so.

A signed result must be numbered (session_seq): without a place in the chain it could be
dropped without a trace (422). A signed gap record (typ "bbprobe-gap", ``open_gap_item``,
``judge_gap``) is judged the same way, its key covering the time it was recorded.

A plain result is "unsigned": accepted, unless ``[evidence] require_signatures``. Every
refusal is a 422 with a one-line message naming the field ("protected", "payload",
"signature"); the agent sets such a result aside with that reason (agent/delivery.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from agent import evidence
from agent.evidence import JWS_MEMBERS, SignedResult
from agent.jose import JoseError
from agent.schema import parse_utc
from collector.errors import ApiError
from collector.intake import ingest
from collector.intake.ingest import Accepted
from collector.intake.keyring import KeySnapshot
from collector.storage.model import GapSignature, ResultSignature

Status = Literal["verified", "unverified", "unsigned", "refused"]

UNSIGNED_REFUSED = ("unsigned result refused: this collector requires signed results "
                    "([evidence] require_signatures)")

NOT_NUMBERED = "a signed result must be numbered (session_seq)"

_KID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

# A signed result is its payload in base64url (4/3 of its bytes) with a header and a
# signature around it: held to the single-result limit by its payload, it may arrive as
# this much (server.max_body_bytes stays the limit of what is stored).
JWS_OVERHEAD_BYTES = 16 * 1024


def wire_limit(max_body_bytes: int) -> int:
    """The most bytes one result may take on the wire: its signed form's."""
    return max_body_bytes * 4 // 3 + 3 + JWS_OVERHEAD_BYTES


def check_size(decoded: Accepted | Signed, wire_bytes: int, max_body_bytes: int,
               where: str = "") -> None:
    """413 when the result itself (a plain document, or a signed one's payload) is over
    the single-result limit, whatever it took on the wire."""
    size = len(decoded.opened.payload) if isinstance(decoded, Signed) else wire_bytes
    if size > max_body_bytes:
        what = "signed payload of " if isinstance(decoded, Signed) else ""
        raise ApiError(413, f"{where}{what}{size} bytes exceed the {max_body_bytes}-byte "
                       "limit of one result", field=where.rstrip(": ") or None)


@dataclass(frozen=True, slots=True)
class Signed:
    """A signed result taken apart and parsed, its signature not yet judged."""

    accepted: Accepted
    opened: SignedResult


def looks_signed(data: Any) -> bool:
    """Whether a JSON value is meant as a signed result (see the module docstring)."""
    return isinstance(data, dict) and not JWS_MEMBERS.isdisjoint(data)


def parse_item(raw: bytes, probe: str) -> Accepted | Signed:
    """One result's bytes, plain or signed; 400/422 naming the fault."""
    fast = ingest.fast_accept(raw)
    if fast is not None:
        return fast
    return accept_item(ingest.parse_json(raw), probe)


def accept_item(data: Any, probe: str) -> Accepted | Signed:
    """One result's decoded JSON, plain or signed; 422 naming the field."""
    if looks_signed(data):
        return open_item(data, probe)
    return ingest.accept(data)


def open_item(data: Mapping[str, Any], probe: str) -> Signed:
    """A signed result checked for form and its payload parsed (named ``probe`` if it
    names none), unverified. 422 naming "protected", "payload" or "signature", or the
    payload's own field."""
    try:
        opened = evidence.open_result(data)
    except JoseError as exc:
        raise ApiError(422, str(exc), field=_form_field(str(exc), data),
                       code="malformed_signature") from None
    try:
        accepted = ingest.parse_body(opened.payload, name_as=probe)
    except ApiError as exc:
        if exc.status != 400:
            raise
        # The JWS itself was JSON: a payload that is not is the JWS's fault (422).
        why = exc.message.removeprefix("body is ").removeprefix("body ")
        raise ApiError(422, f"payload: {why}", field="payload") from None
    if accepted.result.session_seq is None:
        # Review M2: an unnumbered result has no place in the chain, so a signed one
        # could be dropped without a trace; every signing agent numbers its results.
        raise ApiError(422, NOT_NUMBERED, field="session_seq", code="not_numbered")
    return Signed(accepted, opened)


def _form_field(message: str, data: Mapping[str, Any]) -> str:
    """The JWS member a form fault is in (open_result's messages start with it)."""
    for member in ("payload", "signature"):
        if message.startswith(member):
            return member
    if message.startswith("jws"):  # the members themselves: the first missing or extra
        missing = sorted(JWS_MEMBERS - set(data))
        extra = sorted(str(k) for k in set(data) - JWS_MEMBERS)
        return (missing or extra or ["protected"])[0][:64]
    return "protected"


def judge(item: Signed, keys: KeySnapshot) -> ResultSignature:
    """The signature of ``item`` judged against its probe's keys (the module docstring
    says how), as stored with the result; 422 naming why it is refused."""
    opened = item.opened
    status = judge_key(opened, keys, parse_utc(item.accepted.ended_at), "the session ended")
    # The signed bytes are kept only when they are not the stored body (a payload named
    # here): the JWS is rebuilt from the body otherwise (storage/model.py).
    same = opened.sha256 == item.accepted.body_sha256
    return ResultSignature(kid=opened.kid, protected=opened.jws["protected"],
                           signature=opened.jws["signature"], prev_sha256=opened.prev,
                           payload=None if same else opened.payload, status=status)


def judge_key(opened: SignedResult, keys: KeySnapshot, at: datetime, event: str
              ) -> Literal["verified", "unverified"]:
    """``opened``'s signature judged against its probe's keys, for a document whose key
    must have been the probe's at ``at`` (when ``event``: the session ended, the gap
    record was recorded): "verified", "unverified" (the probe has no key), or 422 naming
    why it is refused. A key replaced more than ``ROTATION_GRACE_S`` before ``at`` is
    refused (agent.evidence.key_covers: the rule bundles are verified by)."""
    probe, kid = keys.probe, opened.kid
    if not keys.keys:
        return "unverified"
    key = keys.key(kid)
    if key is None:
        current = keys.current()
        its = current.kid if current is not None else "none bound"
        raise ApiError(422, f"signed with key {_shown(kid)}, which is not a key of "
                       f"probe {probe} (its key: {its}); bind it with "
                       f"`bbprobe-collector probe key set {probe} FILE`, then "
                       "`bbprobe dead-letter retry --all`", field="protected",
                       code="unknown_key")
    if key.revoked_at is not None:
        reason = " ".join((key.revoked_reason or "no reason given").split())
        raise ApiError(422, f"signed with key {kid} of probe {probe}, revoked "
                       f"{key.revoked_at}: {reason}", field="protected",
                       code="revoked_key")
    if not evidence.key_covers(_moment(key.bound_until), at):
        raise ApiError(422, f"signed with key {kid} of probe {probe}, replaced at "
                       f"{key.bound_until}, more than an hour before {event}",
                       field="protected", code="replaced_key")
    public = keys.public.get(kid)
    try:
        if public is None:  # a stored key that does not parse verifies nothing
            raise JoseError("key unreadable")
        evidence.verify(opened, public)
    except JoseError:
        raise ApiError(422, f"signature: does not verify with key {kid} of probe "
                       f"{probe}", field="signature", code="bad_signature") from None
    return "verified"


def _moment(text: str | None) -> datetime | None:
    return None if text is None else parse_utc(text)


def open_gap_item(data: Mapping[str, Any]) -> tuple[SignedResult, Any]:
    """A signed gap record checked for form, and its payload's JSON (the record, still
    to be validated: agent.decoding.parse_gap), unverified; 422 naming the member."""
    try:
        opened = evidence.open_gap(data)
        return opened, evidence.loads_payload(opened.payload)
    except JoseError as exc:
        raise ApiError(422, str(exc), field=_form_field(str(exc), data),
                       code="malformed_signature") from None


def judge_gap(opened: SignedResult, recorded_at: str, keys: KeySnapshot) -> GapSignature:
    """A signed gap record's signature judged as a result's (``judge_key``), its probe's
    key covering the time it was recorded; as stored with the record (its payload
    kept as signed)."""
    status = judge_key(opened, keys, parse_utc(recorded_at), "the gap record was recorded")
    return GapSignature(payload=opened.payload, recorded_at=recorded_at, status=status,
                        kid=opened.kid, protected=opened.jws["protected"],
                        signature=opened.jws["signature"])


def check_unsigned(require_signatures: bool) -> None:
    """A plain result: refused (422) when this collector requires signed results."""
    if require_signatures:
        raise ApiError(422, UNSIGNED_REFUSED, field="signature", code="unsigned")


def status_of(signature: ResultSignature | None) -> Status:
    return "unsigned" if signature is None else signature.status


def _shown(kid: str) -> str:
    """A kid as a message shows it: a thumbprint as is, anything else quoted and cut
    (it is the sender's text: one line, bounded)."""
    return kid if _KID_RE.fullmatch(kid) else repr(kid[:64])
