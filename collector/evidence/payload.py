"""The payload of an evidence bundle's ``certificate.json``: its writer and its strict
reader (pure).

A bundle (bundle.py) is a directory, or a zip with the same members, whose
``certificate.json`` is a flattened JWS (RFC 7515 §7.2.2) over this payload: what was
certified (or, for a probe's own session bundle, summarised), from which sessions (each
by result id and the SHA-256 of its canonical JSON, and their RFC 9162 Merkle root), with
every input ``certify`` was given besides the sessions, so a verifier holding only the
bundle recomputes the certificate and compares it field by field.

The payload is JSON (RFC 8259), UTF-8, keys sorted, no insignificant whitespace, no
NaN/Infinity: the same document always gives the same bytes.

FORMAT CHANGES OF ISSUE 27 PHASE 2 (review H1, H3; format_version stays 1: unreleased).
Helper B's verifier reads these; the writer is bundle.py.

- ``chain.gaps`` entries are ``[lo, hi, reason, gap_id]``: the dropped session_seq range
  [lo, hi] (1 <= lo <= hi), the reason text, and the id of the gap record that documents
  it (``gap_id``: a UUID text, RESULT_ID_RE; null when the stored id cannot name a
  file: no member then, so the hole is undocumented). One entry per dropped range that
  touches the span of the bundle's numbered sessions (listed and boundary), for each gap
  record; a record of several such ranges gives several entries with the same gap_id,
  sorted by (lo, hi). Each non-null gap_id has the member
  ``gaps/<gap_id>.json``: the gap record's JWS exactly as the probe signed it
  (flattened, protected typ "bbprobe-gap", agent.evidence.GAP_TYP), or, for an unsigned
  record, its canonical plain JSON (agent.canonical.canonical_gap). Only a gap file that
  verifies with a key bound to the probe (key_covers at its recorded_at) and whose
  dropped_seq_ranges hold [lo, hi] documents a hole; the listed [lo, hi, reason] is what
  the collector stored, the file is the probe's word.
  ``chain.deletions`` entries stay ``[seq, result_id, reason]`` (the collector's word:
  a documented hole, shown as a warning).
- ``boundary``: a list of at most two
  ``{"result_id", "sha256", "session_seq", "position": "before"|"after"}``: the probe's
  stored session just before the first listed one by session_seq (the highest seq below
  the lowest listed seq) and just after the last (the lowest seq above the highest
  listed), when they exist; at most one per position, never a listed session, seq >= 1.
  Each has the member ``boundary/<result_id>.json`` (exact JWS, or the canonical plain
  JSON of an unsigned row, like sessions/); ``sha256`` is the SHA-256 of the signed
  payload bytes (or of that canonical JSON). The certificate does not count them; the
  verifier checks their signatures and that the chain links across them (before ->
  first listed, last listed -> after), holes included. Empty list when none, and always
  empty in a session bundle.
- ``chain_head``: ``{"session_seq", "result_id"}`` of the probe's highest stored
  session_seq when the bundle was issued (ties: the highest result id), or null (no
  numbered session stored; always null in a session bundle). The verifier checks it is
  >= the highest listed seq, and, when it is above it, that a boundary "after" exists
  (the writer always gives one then). With no numbered listed session there is no
  boundary, and the head is only shown.
- ``sessions/<result_id>.json`` of an unsigned session holds its canonical JSON
  (storage/codec.py ``canonical`` of the parsed stored body, the bytes a probe would
  sign), and ``sha256`` is of those bytes, whatever serialisation an older release
  stored (review M5).
- ``sessions[].session_seq`` and the boundary's come from the stored results' seq
  column (the body's own session_seq, as ingested).

FORMAT CHANGES OF ISSUE 28 (format_version 2, additive). ``inputs.min_samples``: the
minimum-sample rule ([reports] min_samples) the certificate was computed with, and the
certificate carries each check's ``ci95`` and its ``min_samples``. A version 1 bundle
(made before) has none of the three, and still verifies (verify.py ``_as_made``). The
version moved so that a verifier of the previous release, whose strict reader refuses
the new field, says "this reader knows version 1 only" (upgrade) instead of naming a
field it has never heard of.

``read_payload`` is the verifier's way in: a bundle is hostile input, so every field is
type-checked with bounded sizes and numbers (nothing a JSON reader would turn into a
slow big integer or an infinity), and the first fault is one line naming the field
(``PayloadError``: "payload.sessions[3].sha256: ..."), never a traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from collector.evidence.fields import (
    MAX_DEPTH,
    MAX_FLOAT,
    MAX_INT,
    MAX_NODES,
    MAX_NUMBER_CHARS,
    MAX_TEXT,
    PayloadError,
    loads,
)
from collector.evidence.fields import array as _list
from collector.evidence.fields import boolean as _bool
from collector.evidence.fields import choice as _choice
from collector.evidence.fields import fixed as _tuple
from collector.evidence.fields import free as _free
from collector.evidence.fields import integer as _int
from collector.evidence.fields import kind_of as _kind
from collector.evidence.fields import match as _match
from collector.evidence.fields import number as _number
from collector.evidence.fields import obj as _object
from collector.evidence.fields import text as _text
from collector.evidence.fields import text_or_none as _text_or_none
from collector.evidence.fields import utc as _utc
from collector.evidence.fields import utc_or_none as _utc_or_none
from collector.lines import (
    ContractVersion,
    LineMetadata,
    contract_from_dict,
    contract_to_dict,
    line_from_dict,
    line_to_dict,
)

FORMAT = "bbprobe-evidence"
FORMAT_VERSION = 2
# Versions this reader verifies: 1 (issue 27) has no inputs.min_samples.
READABLE_VERSIONS = (1, 2)
Kind = Literal["certificate", "session"]
Role = Literal["collector", "probe"]
Status = Literal["verified", "unverified", "unsigned"]
KINDS = ("certificate", "session")
ROLES = ("collector", "probe")
STATUSES = ("verified", "unverified", "unsigned")
DELAY_BASES = ("rtt", "rtt_half")
FAMILIES = ("ipv4", "ipv6")

# Bounds. A bundle holds at most 10,000 members (the reader's, verify.py), so no more
# sessions than that; the rest is generous for any real campaign and small enough that
# a hostile payload costs little to refuse.
MAX_SESSIONS = 10_000
MAX_KEYS = 1_000
MAX_RANGES = 10_000  # chain gaps, deletions, suppression windows, contract versions

_SHA256 = re.compile(r"[0-9a-f]{64}")
# A kid is an RFC 7638 thumbprint: base64url of a SHA-256, 43 characters.
_KID = re.compile(r"[A-Za-z0-9_-]{43}")
_PROBE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A result id names a file (sessions/<id>.json): a UUID in any of its spellings, never a
# path (no '/', no leading '.').
RESULT_ID_RE = re.compile(r"[A-Za-z0-9{][A-Za-z0-9{}:._-]{0,79}")
_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,120}")
Position = Literal["before", "after"]
POSITIONS = ("before", "after")
__all__ = ["MAX_DEPTH", "MAX_FLOAT", "MAX_INT", "MAX_NODES", "MAX_NUMBER_CHARS",
           "MAX_TEXT", "PayloadError", "loads"]  # re-exported: fields.py holds them


@dataclass(frozen=True, slots=True)
class Issuer:
    kid: str
    role: Role


@dataclass(frozen=True, slots=True)
class Period:
    since: str | None
    until: str | None


@dataclass(frozen=True, slots=True)
class Inputs:
    """Everything ``certify`` was given besides the sessions (reports/service.py
    ``certificate``): with the sessions' facts these reproduce the certificate."""

    line: LineMetadata
    rule: str
    timezone: str
    delay_basis: Literal["rtt", "rtt_half"]
    suppressed: tuple[tuple[str, str, str], ...]
    family: str | None
    contracts: tuple[ContractVersion, ...]
    # The minimum-sample rule the certificate's intervals were marked by ([reports]
    # min_samples, issue 28). None: a bundle made before the rule existed, whose
    # certificate has no intervals (verify.py then recomputes with the default and
    # compares without the fields added since).
    min_samples: int | None = None


@dataclass(frozen=True, slots=True)
class SessionEntry:
    result_id: str
    sha256: str
    session_seq: int | None
    kid: str | None
    status: Status
    counted: bool
    reason: str | None


@dataclass(frozen=True, slots=True)
class Chain:
    """What documents the holes in the probe's chain over the period: gap records'
    (first seq, last seq, reason, gap id or None: the member gaps/<gap id>.json) and
    recorded deletions' (seq, result id, reason)."""

    gaps: tuple[tuple[int, int, str, str | None], ...] = ()
    deletions: tuple[tuple[int, str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class BoundaryEntry:
    """A session of the probe next to the listed ones by session_seq (not counted):
    the member boundary/<result_id>.json, so the chain's ends are checked too."""

    result_id: str
    sha256: str
    session_seq: int
    position: Position


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The probe's highest stored session_seq when the bundle was issued."""

    session_seq: int
    result_id: str


@dataclass(frozen=True, slots=True)
class KeyEntry:
    kid: str
    probe: str
    source: str
    bound_from: str | None
    bound_until: str | None
    revoked_at: str | None
    revoked_reason: str | None
    rotation: str | None  # the member keys/<kid>.rotation.json, when the key has one


@dataclass(frozen=True, slots=True)
class Payload:
    kind: Kind
    issued_at: str
    issuer: Issuer
    software_version: str
    probe: str
    period: Period
    sessions: tuple[SessionEntry, ...]
    merkle_root: str
    chain: Chain
    keys: tuple[KeyEntry, ...]
    # kind "certificate" only:
    inputs: Inputs | None = None
    targets: dict[str, Any] | None = None
    targets_sha256: str | None = None
    certificate: dict[str, Any] | None = None
    # kind "session" only: result id -> the session's summary figures.
    summary: dict[str, dict[str, float | None]] | None = None
    # The chain's ends (see the top of this module): empty / None in a session bundle.
    boundary: tuple[BoundaryEntry, ...] = ()
    chain_head: ChainHead | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION


# --- writing -------------------------------------------------------------------------------


def dumps(data: Any) -> bytes:
    """The one serialisation: UTF-8 JSON, keys sorted, compact, no NaN."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def targets_data(targets: Any) -> dict[str, Any]:
    """A targets table (compliance/targets.py Targets) as JSON data."""
    return cast(dict[str, Any], json.loads(dumps(dataclasses.asdict(targets))))


def targets_sha256(data: Mapping[str, Any]) -> str:
    return hashlib.sha256(dumps(data)).hexdigest()


def to_dict(p: Payload) -> dict[str, Any]:
    """The payload as JSON data (``dumps`` of it is what the issuer signs)."""
    doc: dict[str, Any] = {
        "format": p.format, "format_version": p.format_version, "kind": p.kind,
        "issued_at": p.issued_at,
        "issuer": {"kid": p.issuer.kid, "role": p.issuer.role},
        "software_version": p.software_version, "probe": p.probe,
        "period": {"since": p.period.since, "until": p.period.until},
        "sessions": [{"result_id": s.result_id, "sha256": s.sha256,
                      "session_seq": s.session_seq, "kid": s.kid, "status": s.status,
                      "counted": s.counted, "reason": s.reason} for s in p.sessions],
        "merkle_root": p.merkle_root,
        "chain": {"gaps": [list(g) for g in p.chain.gaps],
                  "deletions": [list(d) for d in p.chain.deletions]},
        "boundary": [{"result_id": b.result_id, "sha256": b.sha256,
                      "session_seq": b.session_seq, "position": b.position}
                     for b in p.boundary],
        "chain_head": None if p.chain_head is None else {
            "session_seq": p.chain_head.session_seq,
            "result_id": p.chain_head.result_id},
        "keys": [{"kid": k.kid, "probe": k.probe, "source": k.source,
                  "bound_from": k.bound_from, "bound_until": k.bound_until,
                  "revoked_at": k.revoked_at, "revoked_reason": k.revoked_reason,
                  "rotation": k.rotation} for k in p.keys],
    }
    if p.inputs is not None:
        i = p.inputs
        doc["inputs"] = {"line": line_to_dict(i.line), "rule": i.rule,
                         "timezone": i.timezone, "delay_basis": i.delay_basis,
                         "suppressed": [list(w) for w in i.suppressed],
                         "family": i.family,
                         "contracts": [contract_to_dict(c) for c in i.contracts]}
        if i.min_samples is not None:  # additive (issue 28): absent in older bundles
            doc["inputs"]["min_samples"] = i.min_samples
    for name in ("targets", "targets_sha256", "certificate", "summary"):
        value = getattr(p, name)
        if value is not None:
            doc[name] = value
    # The free-form members go through JSON once so the dict holds what a reader gets
    # back (lists, not tuples).
    return cast(dict[str, Any], json.loads(dumps(doc)))


def payload_bytes(p: Payload) -> bytes:
    return dumps(to_dict(p))


# --- reading -------------------------------------------------------------------------------


def read_payload(obj: Any) -> Payload:
    """The payload from JSON data (``loads``), every field checked; PayloadError naming
    the first field at fault."""
    doc = _object(obj, "payload", required=("format", "format_version", "kind", "issued_at",
                                            "issuer", "software_version", "probe",
                                            "period", "sessions", "merkle_root", "chain",
                                            "keys", "boundary", "chain_head"),
                  optional=("inputs", "targets", "targets_sha256", "certificate",
                            "summary"))
    if doc["format"] != FORMAT:
        raise PayloadError(f"payload.format: expected {FORMAT!r}")
    version = _int(doc["format_version"], "payload.format_version", 0, 1000)
    if version not in READABLE_VERSIONS:
        raise PayloadError(f"payload.format_version: this reader knows versions "
                           f"{', '.join(map(str, READABLE_VERSIONS))} only, not {version}")
    kind = _choice(doc["kind"], "payload.kind", KINDS)
    issuer = _object(doc["issuer"], "payload.issuer", required=("kid", "role"))
    period = _object(doc["period"], "payload.period", required=("since", "until"))
    chain = _object(doc["chain"], "payload.chain", required=("gaps", "deletions"))
    p = Payload(
        format_version=version,
        kind=cast(Kind, kind),
        issued_at=_utc(doc["issued_at"], "payload.issued_at"),
        issuer=Issuer(_kid(issuer["kid"], "payload.issuer.kid"),
                      cast(Role, _choice(issuer["role"], "payload.issuer.role", ROLES))),
        software_version=_text(doc["software_version"], "payload.software_version", 100),
        probe=_probe(doc["probe"], "payload.probe", kind),
        period=Period(_utc_or_none(period["since"], "payload.period.since"),
                      _utc_or_none(period["until"], "payload.period.until")),
        sessions=tuple(_session(s, f"payload.sessions[{n}]") for n, s in
                       enumerate(_list(doc["sessions"], "payload.sessions", MAX_SESSIONS))),
        merkle_root=_match(doc["merkle_root"], "payload.merkle_root", _SHA256,
                           "a lower-case hex SHA-256"),
        chain=Chain(
            gaps=tuple(_gap(g, f"payload.chain.gaps[{n}]") for n, g in
                       enumerate(_list(chain["gaps"], "payload.chain.gaps", MAX_RANGES))),
            deletions=tuple(_deletion(d, f"payload.chain.deletions[{n}]") for n, d in
                            enumerate(_list(chain["deletions"], "payload.chain.deletions",
                                            MAX_RANGES)))),
        keys=tuple(_key(k, f"payload.keys[{n}]", kind) for n, k in
                   enumerate(_list(doc["keys"], "payload.keys", MAX_KEYS))),
        boundary=tuple(_boundary(b, f"payload.boundary[{n}]") for n, b in
                       enumerate(_list(doc["boundary"], "payload.boundary", 2))),
        chain_head=_chain_head(doc["chain_head"], "payload.chain_head"),
    )
    ids = [s.result_id for s in p.sessions]
    if len(set(ids)) != len(ids):
        dup = next(i for n, i in enumerate(ids) if i in ids[:n])
        raise PayloadError(f"payload.sessions: result {dup} listed twice")
    _check_ends(p, set(ids))
    if kind == "certificate":
        for name in ("inputs", "targets", "targets_sha256", "certificate"):
            if name not in doc:
                raise PayloadError(f"payload.{name}: missing (kind certificate)")
        if "summary" in doc:
            raise PayloadError("payload.summary: not part of a certificate")
        targets = _free(doc["targets"], "payload.targets")
        digest = _match(doc["targets_sha256"], "payload.targets_sha256", _SHA256,
                        "a lower-case hex SHA-256")
        if targets_sha256(targets) != digest:
            raise PayloadError("payload.targets_sha256: not the SHA-256 of payload.targets")
        inputs = _inputs(doc["inputs"], "payload.inputs")
        if version == 1 and inputs.min_samples is not None:
            raise PayloadError("payload.inputs.min_samples: not part of format version 1")
        return dataclasses.replace(
            p, inputs=inputs, targets=targets,
            targets_sha256=digest, certificate=_free(doc["certificate"],
                                                     "payload.certificate"))
    for name in ("inputs", "targets", "targets_sha256", "certificate"):
        if name in doc:
            raise PayloadError(f"payload.{name}: not part of a session bundle")
    if "summary" not in doc:
        raise PayloadError("payload.summary: missing (kind session)")
    return dataclasses.replace(p, summary=_summary(doc["summary"], "payload.summary",
                                                   set(ids)))


def _kid(value: Any, where: str) -> str:
    return _match(value, where, _KID, "a key thumbprint (43 base64url characters)")


def _session(value: Any, where: str) -> SessionEntry:
    s = _object(value, where, required=("result_id", "sha256", "session_seq", "kid",
                                        "status", "counted", "reason"))
    return SessionEntry(
        result_id=_match(s["result_id"], f"{where}.result_id", RESULT_ID_RE, "a result id"),
        sha256=_match(s["sha256"], f"{where}.sha256", _SHA256, "a lower-case hex SHA-256"),
        session_seq=None if s["session_seq"] is None else _int(
            s["session_seq"], f"{where}.session_seq", 1, MAX_INT),
        kid=None if s["kid"] is None else _kid(s["kid"], f"{where}.kid"),
        status=cast(Status, _choice(s["status"], f"{where}.status", STATUSES)),
        counted=_bool(s["counted"], f"{where}.counted"),
        reason=_text_or_none(s["reason"], f"{where}.reason"))


def _gap(value: Any, where: str) -> tuple[int, int, str, str | None]:
    lo, hi, reason, gap_id = _tuple(value, where, 4)
    first = _int(lo, f"{where}[0]", 1, MAX_INT)
    last = _int(hi, f"{where}[1]", first, MAX_INT)
    return (first, last, _text(reason, f"{where}[2]"),
            None if gap_id is None else _match(gap_id, f"{where}[3]", RESULT_ID_RE,
                                               "a gap record id"))


def _boundary(value: Any, where: str) -> BoundaryEntry:
    b = _object(value, where, required=("result_id", "sha256", "session_seq", "position"))
    return BoundaryEntry(
        result_id=_match(b["result_id"], f"{where}.result_id", RESULT_ID_RE, "a result id"),
        sha256=_match(b["sha256"], f"{where}.sha256", _SHA256, "a lower-case hex SHA-256"),
        session_seq=_int(b["session_seq"], f"{where}.session_seq", 1, MAX_INT),
        position=cast(Position, _choice(b["position"], f"{where}.position", POSITIONS)))


def _chain_head(value: Any, where: str) -> ChainHead | None:
    if value is None:
        return None
    h = _object(value, where, required=("session_seq", "result_id"))
    return ChainHead(_int(h["session_seq"], f"{where}.session_seq", 1, MAX_INT),
                     _match(h["result_id"], f"{where}.result_id", RESULT_ID_RE,
                            "a result id"))


def _check_ends(p: Payload, listed: set[str]) -> None:
    """The form of the chain's ends (their meaning is the verifier's): one boundary
    session per side, never a listed one; none, and no head, in a session bundle."""
    positions = [b.position for b in p.boundary]
    if len(set(positions)) != len(positions):
        raise PayloadError(f"payload.boundary: two sessions {positions[0]} the listed ones")
    for n, b in enumerate(p.boundary):
        if b.result_id in listed:
            raise PayloadError(f"payload.boundary[{n}].result_id: {b.result_id} is a "
                               "listed session")
    if p.kind == "session" and (p.boundary or p.chain_head is not None):
        raise PayloadError("payload.boundary: not part of a session bundle" if p.boundary
                           else "payload.chain_head: not part of a session bundle")


def _deletion(value: Any, where: str) -> tuple[int, str, str]:
    seq, result_id, reason = _tuple(value, where, 3)
    return (_int(seq, f"{where}[0]", 1, MAX_INT),
            _match(result_id, f"{where}[1]", RESULT_ID_RE, "a result id"),
            _text(reason, f"{where}[2]"))


def _probe(value: Any, where: str, kind: str) -> str:
    # A probe's own session bundle may come from a probe not yet named (its results
    # then carry probe_id "", agent/spool.py).
    if kind == "session" and value == "":
        return ""
    return _match(value, where, _PROBE, "a probe name")


def _key(value: Any, where: str, kind: str) -> KeyEntry:
    k = _object(value, where, required=("kid", "probe", "source", "bound_from",
                                        "bound_until", "revoked_at", "revoked_reason",
                                        "rotation"))
    rotation = k["rotation"]
    return KeyEntry(
        kid=_kid(k["kid"], f"{where}.kid"),
        probe=_probe(k["probe"], f"{where}.probe", kind),
        source=_text(k["source"], f"{where}.source", 200),
        bound_from=_utc_or_none(k["bound_from"], f"{where}.bound_from"),
        bound_until=_utc_or_none(k["bound_until"], f"{where}.bound_until"),
        revoked_at=_utc_or_none(k["revoked_at"], f"{where}.revoked_at"),
        revoked_reason=_text_or_none(k["revoked_reason"], f"{where}.revoked_reason"),
        rotation=None if rotation is None else _match(
            rotation, f"{where}.rotation", _FILE, "a member file name"))


def _inputs(value: Any, where: str) -> Inputs:
    i = _object(value, where, required=("line", "rule", "timezone", "delay_basis",
                                        "suppressed", "family", "contracts"),
                # Added by issue 28; a bundle made before it has none.
                optional=("min_samples",))
    try:
        line = line_from_dict(i["line"], f"{where}.line")
        contracts = tuple(contract_from_dict(c, f"{where}.contracts[{n}]") for n, c in
                          enumerate(_list(i["contracts"], f"{where}.contracts",
                                          MAX_RANGES)))
    except PayloadError:
        raise
    except ValueError as exc:
        raise PayloadError(str(exc)) from None
    suppressed = []
    for n, w in enumerate(_list(i["suppressed"], f"{where}.suppressed", MAX_RANGES)):
        starts, ends, reason = _tuple(w, f"{where}.suppressed[{n}]", 3)
        suppressed.append((_utc(starts, f"{where}.suppressed[{n}][0]"),
                           _utc(ends, f"{where}.suppressed[{n}][1]"),
                           _text(reason, f"{where}.suppressed[{n}][2]")))
    family = i["family"]
    return Inputs(
        line=line, rule=_text(i["rule"], f"{where}.rule", 40),
        timezone=_text(i["timezone"], f"{where}.timezone", 80),
        delay_basis=cast(Literal["rtt", "rtt_half"],
                         _choice(i["delay_basis"], f"{where}.delay_basis", DELAY_BASES)),
        suppressed=tuple(suppressed),
        family=None if family is None else _choice(family, f"{where}.family", FAMILIES),
        contracts=contracts,
        # The bounds of config.py ReportsConfig.min_samples.
        min_samples=_int(i["min_samples"], f"{where}.min_samples", 1, 1_000_000)
        if "min_samples" in i else None)


def _summary(value: Any, where: str, ids: set[str]) -> dict[str, dict[str, float | None]]:
    if not isinstance(value, dict):
        raise PayloadError(f"{where}: expected an object, not {_kind(value)}")
    if len(value) > MAX_SESSIONS:
        raise PayloadError(f"{where}: {len(value)} sessions, more than {MAX_SESSIONS}")
    out: dict[str, dict[str, float | None]] = {}
    for result_id, figures in value.items():
        here = f"{where}.{str(result_id)[:80]}"
        if result_id not in ids:
            raise PayloadError(f"{here}: not a session of payload.sessions")
        if not isinstance(figures, dict) or len(figures) > 100:
            raise PayloadError(f"{here}: expected an object of at most 100 figures")
        row: dict[str, float | None] = {}
        for name, figure in figures.items():
            _text(name, f"{here} (a figure's name)", 80)
            row[name] = None if figure is None else _number(figure, f"{here}.{name}")
        out[result_id] = row
    missing = sorted(ids - set(out))
    if missing:
        raise PayloadError(f"{where}.{missing[0]}: missing")
    return out

