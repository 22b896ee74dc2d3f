"""What a spool file holds, and the chain state beside it (issue 27). Pure.

A spooled result is written one of two ways, and both stay readable forever:

- plain: the result document itself (JSON), as every bbprobe before signing wrote it;
- signed: the flattened JWS (RFC 7515 §7.2.2) of the result's canonical JSON
  (agent/canonical.py), made by ``agent.evidence.sign_result`` once the spool has given the
  result its ``session_seq``: exactly the members ``protected``, ``payload`` and
  ``signature``. It is sent to the collector unchanged: re-encoding the result would
  break the signature.

Every reader of a spool file (delivery, ``bbprobe status``, the gap record an eviction
writes, the session counter's seed) goes through ``result_of`` (``document_of`` for a
file that may be either kind): the document a file stands for, whichever way it was
written.

Gap records are signed the same way when there is a key (``gap_text``): the flattened
JWS of the record's canonical JSON (agent.canonical.canonical_gap), typ ``bbprobe-gap``
(``agent.evidence.sign_gap``), so only the probe's own word can document a hole in its
chain (a record a database editor inserts verifies with no key of the probe). A pending
record merged with a later drop is a new record, signed again; an older spool's plain
records stay readable (``gap_of``).

The chain (agent/evidence.py): each signed result names, in its protected header, the
SHA-256 of the canonical JSON of the previous result spooled for the same identity. The
spool keeps that link per identity next to the session counter, as ``{"seq": n,
"sha256": hex, "collector_url": .., "probe_id": ..}`` (``ChainState``); a missing or
unreadable state starts a new chain (``prev`` null), which the collector shows as a
restart, never as a forgery. A new identity of the same collector and probe (a token
replaced) goes on from the old one's (``inherited``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import evidence, jose
from agent.canonical import canonical_gap
from agent.schema import GapRecord, to_dict

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# What a signed file adds to the base64url of its payload: the members' names and
# punctuation (45 bytes), the protected header (alg, kid, typ, prev: under 250 bytes as
# base64url) and the Ed25519 signature (86). An upper bound, for the spool's room check.
_JWS_OVERHEAD = 512


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def loads(raw: bytes) -> Any:
    """A spool file's JSON (strict: no NaN or Infinity, which the collector refuses for
    the whole batch). ``ValueError`` saying what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None


def result_of(data: Any) -> Any:
    """The result document a spool file's JSON stands for: a signed file's payload (its
    form checked, ``agent.evidence.open_result``; the signature is the collector's to
    check), else the JSON itself. ``ValueError`` (JoseError is one) for a JWS that is not
    one of a result."""
    if not evidence.is_jws(data):
        return data
    signed = evidence.open_result(data)
    return loads(signed.payload)


def gap_of(data: Any) -> Any:
    """The gap record a gap file's JSON stands for: a signed file's payload (form checked,
    ``agent.evidence.open_gap``), else the JSON itself. ``ValueError`` as ``result_of``."""
    if not evidence.is_jws(data):
        return data
    return loads(evidence.open_gap(data).payload)


def document_of(data: Any) -> Any:
    """The document a spool file of either kind stands for (its JWS's typ says which).
    ``ValueError`` as ``result_of``."""
    if evidence.is_jws(data) and jose.header_of(data).get("typ") == evidence.GAP_TYP:
        return gap_of(data)
    return result_of(data)


def gap_text(private_key: Ed25519PrivateKey | None, gap: GapRecord) -> tuple[str, str | None]:
    """A gap file's text: the record's JWS when there is a key, else its JSON as before;
    and why it is plain although there is a key (None: signed, or no key). A record that
    cannot be signed is still written: a hole it documents is never left silent."""
    if private_key is not None:
        try:
            jws = evidence.sign_gap(private_key, canonical_gap(gap))
            return json.dumps(jws, separators=(",", ":"), allow_nan=False), None
        except (jose.JoseError, ValueError, TypeError) as exc:
            why: str | None = f"gap record {gap.gap_id} not signed: {exc}"
    else:
        why = None
    return json.dumps(to_dict(gap), separators=(",", ":")), why


def parse_spooled(raw: bytes, name_id: str, id_key: str = "result_id") -> dict[str, Any]:
    """A spooled document as JSON data, checked as far as sending it needs: what the
    collector would refuse for the whole batch (not UTF-8, not JSON, NaN, not an object,
    a JWS whose form is wrong) and what the reply is matched by (``id_key`` of the
    result, plain or signed, equal to the id in the file name, a ``probe_id`` that is a
    string, possibly empty). Returns the file's JSON as it is (a JWS stays a JWS: it is
    sent unchanged). Raises ``ValueError`` saying what is wrong. The schema itself is the
    collector's to judge, one result at a time."""
    data = loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    what = "signed gap record" if id_key == "gap_id" else "signed result"
    try:
        doc = gap_of(data) if id_key == "gap_id" else result_of(data)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what}: the payload is not a JSON object")
    if doc.get(id_key) != name_id:
        raise ValueError(f"{id_key} {doc.get(id_key)!r} is not the {name_id!r} in its file "
                         "name")
    if not isinstance(doc.get("probe_id", ""), str):
        raise ValueError("probe_id is not a string")
    return data


def unnamed(data: dict[str, Any]) -> bool:
    """A plain result spooled before the probe's name was known: delivery names it.
    A signed one is sent as signed, and the collector names it by the token's probe."""
    return not evidence.is_jws(data) and not data.get("probe_id")


def signed_text(private_key: Ed25519PrivateKey, payload: bytes, prev: str | None) -> str:
    """A signed spool file's text: the result's JWS, chained to ``prev``. JoseError."""
    return json.dumps(evidence.sign_result(private_key, payload, prev),
                      separators=(",", ":"), allow_nan=False)


def signed_size(payload_bytes: int) -> int:
    """At most the size of the signed file of a payload of ``payload_bytes``."""
    return 4 * ((payload_bytes + 2) // 3) + _JWS_OVERHEAD


@dataclass(frozen=True, slots=True)
class ChainState:
    """The last result spooled for an identity: its session_seq and the SHA-256 of its
    canonical JSON (the ``prev`` the next one names); and whose chain it is, the
    collector URL and probe name (None in a state written before they were kept), so
    a new token for the same probe at the same collector carries it on (review M3)."""

    seq: int
    sha256: str
    collector_url: str | None = None
    probe_id: str | None = None

    def to_json(self) -> str:
        doc: dict[str, Any] = {"seq": self.seq, "sha256": self.sha256}
        if self.collector_url is not None and self.probe_id:
            doc.update(collector_url=self.collector_url, probe_id=self.probe_id)
        return json.dumps(doc, sort_keys=True)

    @staticmethod
    def parse(raw: bytes) -> ChainState | None:
        """A chain file's contents; None when unreadable (the next result starts a new
        chain: a visible restart rather than a link to something never signed)."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(data, dict):
            return None
        seq, sha = data.get("seq"), data.get("sha256")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1 or \
                not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
            return None
        url, probe = data.get("collector_url"), data.get("probe_id")
        return ChainState(seq, sha, url if isinstance(url, str) else None,
                          probe if isinstance(probe, str) and probe else None)


def inherited(candidates: Iterable[tuple[ChainState | None, int | None]],
              collector_url: str, probe_id: str) -> tuple[int, ChainState] | None:
    """Of other identities' (chain state, counter) pairs, the one a new identity of the
    same collector URL and probe name goes on from (its highest number: the counter, or
    the chain's seq when the counter is lower or lost), with that number. Pure."""
    best: tuple[int, ChainState] | None = None
    for state, counter in candidates:
        if state is None or state.collector_url != collector_url or \
                state.probe_id != probe_id:
            continue
        seq = max(state.seq, counter or 0)
        if best is None or seq > best[0]:
            best = (seq, state)
    return best
