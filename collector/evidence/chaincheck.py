"""The sessions, key rotations and hash chain of an evidence bundle, checked (issue 27,
design 7; verify.py runs these as its steps 6-8).

- ``sessions``: each listed session's file (and each boundary session's: the probe's
  session just before and just after those listed, which seal the chain's ends) is a
  JWS by a key the payload binds to the probe over the session's time (the one rule of
  agent/evidence.py ``key_covers``), that verifies, of the SHA-256 listed, whose result
  is the one named; or, unsigned, the canonical JSON of the SHA-256 listed (a warning
  names it: nothing but the collector vouches for it). A signed session of a
  certificate bundle must be numbered (``session_seq``): an unnumbered one would stand
  outside the chain.
- ``rotations``: each rotation statement verifies with the probe's previous key; a key
  bound after the probe's first one without such a statement (a pin, or first use) is
  named in a warning: nothing the probe signed vouches that it is the probe's.
- ``chain``: the links of the listed and boundary sessions (``chain_breaks``); a hole
  counts as documented only by a gap record (gaps/<gap_id>.json) the probe signed with
  a key bound to it when it recorded the gap, whose dropped ranges cover the hole. A
  hole documented by an unsigned gap record fails; one documented by a recorded
  deletion is the collector's word (attested by its signature on the certificate) and
  a warning names it. The payload's ``chain_head`` (the probe's highest stored
  session_seq at issue time) must not be below the last session listed, and must be
  reached: by the last listed session itself, or by the boundary session after it.

Each session is taken apart once: what later checks need (its link, its facts, its
summary figures) is kept, and its summaries are recomputed at once by the caller's
``inspect`` (verify.py), so memory grows with the session count, not the body sizes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import evidence, jose
from agent.decoding import parse_gap
from agent.jose import JoseError
from agent.schema import GapRecord, SessionResult, parse_utc
from collector.errors import ApiError
from collector.evidence.archive import Bundle, loads_bounded
from collector.evidence.payload import KeyEntry, Payload

# A chain whose sessions jump by more than this many session_seq numbers is refused (a
# campaign has about a hundred sessions a day).
MAX_SEQ_JUMP = 1_000_000
# Warnings name at most this many unsigned sessions (an older agent's campaign may be a
# thousand of them); the rest are counted.
MAX_NAMED = 20


class Failure(ValueError):
    """A check that does not hold; one line naming what."""


@dataclass(frozen=True, slots=True)
class Anchor:
    """A key the verifier trusts as an issuer: ``role`` "collector" or "probe" when a
    JWK Set said whose it is, None when the user named the key (taken as they say)."""

    kid: str
    role: str | None = None


@dataclass(slots=True)
class Session:
    """What later checks keep of a session: its link, facts (certificate bundles) and
    summary figures (session bundles); never the result itself."""

    result_id: str
    seq: int | None
    sha256: str
    prev: str | None
    signed: bool
    facts: Any = None
    summary: dict[str, Any] | None = None


@dataclass(slots=True)
class State:
    bundle: Bundle
    anchors: tuple[Anchor, ...]
    inspect: Callable[[State, str, SessionResult], None]
    jws: dict[str, Any] = field(default_factory=dict)
    payload: Payload | None = None
    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    sessions: list[Session] = field(default_factory=list)
    boundary: list[tuple[str, Session]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary_fault: str | None = None
    older: int = 0

    @property
    def p(self) -> Payload:
        assert self.payload is not None
        return self.payload


def line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]


def bindings(p: Payload, kid: str) -> list[KeyEntry]:
    return [k for k in p.keys if k.kid == kid and k.probe == p.probe]


# --- sessions ------------------------------------------------------------------------------


def boundary_entries(p: Payload) -> tuple[Any, ...]:
    return tuple(getattr(p, "boundary", None) or ())


def sessions(state: State) -> str:
    p = state.p
    listed = {f"sessions/{s.result_id}.json" for s in p.sessions}
    bounds = {f"boundary/{b.result_id}.json" for b in boundary_entries(p)}
    for name in state.bundle.names():
        if (name.startswith("sessions/") and name not in listed) or \
                (name.startswith("boundary/") and name not in bounds):
            raise Failure(f"{name}: a session file the certificate does not list")
    unsigned: list[str] = []
    for entry in p.sessions:
        where = f"session {entry.result_id}"
        try:
            s = _session(state, f"sessions/{entry.result_id}.json", entry.result_id,
                         entry.sha256, entry.session_seq, entry.kid, entry.status, where,
                         keep=True)
        except Failure:
            raise
        except (ValueError, ApiError) as exc:
            raise Failure(f"{where}: {line(exc)}") from None
        state.sessions.append(s)
        if not s.signed:
            unsigned.append(entry.result_id)
    for b in boundary_entries(p):
        where = f"boundary session {b.result_id} ({b.position})"
        try:
            s = _session(state, f"boundary/{b.result_id}.json", b.result_id, b.sha256,
                         b.session_seq, None, None, where, keep=False)
        except Failure:
            raise
        except (ValueError, ApiError) as exc:
            raise Failure(f"{where}: {line(exc)}") from None
        state.boundary.append((b.position, s))
    for rid in unsigned[:MAX_NAMED]:
        state.warnings.append(f"session {rid} is unsigned: only the collector vouches for "
                              "its content (its SHA-256 is in the signed certificate)")
    if len(unsigned) > MAX_NAMED:
        state.warnings.append(f"... and {len(unsigned) - MAX_NAMED} more unsigned sessions "
                              "(sessions[].status in certificate.json names each)")
    signed = len(p.sessions) - len(unsigned)
    shown = f"; {len(state.boundary)} boundary sessions" if state.boundary else ""
    return (f"{len(p.sessions)} sessions: {signed} signed, each verified with a key of "
            f"probe {p.probe}; {len(unsigned)} unsigned; every SHA-256 as listed{shown}")


def _session(state: State, name: str, rid: str, sha_listed: str, seq_listed: int | None,
             kid_listed: str | None, status: str | None, where: str, keep: bool
             ) -> Session:
    """One session file checked (``status`` None: a boundary session, signed or not as
    its file is)."""
    from collector.intake.ingest import parse_body

    p = state.p
    raw = state.bundle.read(name)
    doc = loads_bounded(raw, name)
    is_signed = evidence.is_jws(doc) if status is None else status != "unsigned"
    kid: str | None = None
    signed_sha: str | None = None
    if not is_signed:
        if evidence.is_jws(doc) or kid_listed is not None:
            raise Failure(f"{where}: listed as unsigned, but {name} is signed")
        body, prev = raw, None
    else:
        if not evidence.is_jws(doc):
            raise Failure(f"{where}: listed as signed ({status}), but {name} is not a JWS")
        opened = evidence.open_result(doc)
        kid = opened.kid
        if kid_listed is not None and opened.kid != kid_listed:
            raise Failure(f"{where}: signed with key {opened.kid}, but listed with key "
                          f"{kid_listed}")
        if not bindings(p, opened.kid):
            raise Failure(f"{where}: signed with key {opened.kid}, which payload.keys "
                          f"does not bind to probe {p.probe}")
        try:
            evidence.verify(opened, state.keys[opened.kid])
        except JoseError as exc:
            raise Failure(f"{where}: {exc} (key {opened.kid})") from None
        body, prev, signed_sha = opened.payload, opened.prev, opened.sha256
    try:
        accepted = parse_body(body, pack=False)
    except ApiError as exc:
        at = f"{exc.field}: " if exc.field and exc.field not in exc.message else ""
        raise Failure(f"{where}: not a valid result ({at}{exc.message})") from None
    # Unsigned: the canonical form's SHA-256 (parse_body), whatever form a release
    # stored it in; signed: the SHA-256 of the bytes the probe signed.
    sha = signed_sha if signed_sha is not None else accepted.body_sha256
    if sha != sha_listed:
        raise Failure(f"{where}: SHA-256 {sha[:16]}…, but the certificate lists "
                      f"{sha_listed[:16]}…")
    result = accepted.result
    if result.result_id != rid:
        raise Failure(f"{where}: {name} holds result {result.result_id[:80]}")
    if result.probe_id not in (p.probe, ""):
        raise Failure(f"{where}: a result of probe {result.probe_id[:64]!r}, not of "
                      f"{p.probe}")
    if result.session_seq != seq_listed:
        raise Failure(f"{where}: session_seq {result.session_seq}, but the certificate "
                      f"lists {seq_listed}")
    if is_signed and result.session_seq is None and p.kind == "certificate":
        raise Failure(f"{where}: signed but not numbered (no session_seq): a signed "
                      "result must be numbered, or it stands outside the chain")
    if kid is not None:
        key_in_force(state, kid, where, parse_utc(result.started_at),
                     parse_utc(result.ended_at), "the session started", "session ended")
    if keep:
        state.inspect(state, rid, result)
    return Session(rid, result.session_seq, sha, prev, is_signed,
                   facts=accepted.facts if keep and p.kind == "certificate" else None,
                   summary=_figures(result) if keep and p.kind == "session" else None)


def _figures(result: SessionResult) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(result.summary)


def key_in_force(state: State, kid: str, where: str, started: Any, ended: Any,
                 start_word: str, end_word: str) -> None:
    """The key was the probe's when the thing was signed (at ``ended``: the agent signs a
    session when it ends, a gap record when it records it; ``key_covers``), and not
    revoked before ``started``. The start of a binding is not checked: a probe enrols
    its key at first contact, after signing what it measured before (trust on first
    use; a later key bound so is named by the ``rotations`` check)."""
    found = bindings(state.p, kid)
    for k in found:
        if k.revoked_at is not None:
            revoked = parse_utc(k.revoked_at)
            why = f" ({k.revoked_reason[:200]})" if k.revoked_reason else ""
            if revoked <= started:
                raise Failure(f"{where}: signed with key {kid}, revoked at "
                              f"{k.revoked_at}{why}, before {start_word}")
            state.warnings.append(f"{where}: key {kid} was revoked at {k.revoked_at}"
                                  f"{why}, after it")
    if not any(evidence.key_covers(None if k.bound_until is None
                                   else parse_utc(k.bound_until), ended) for k in found):
        until = max(str(k.bound_until) for k in found)
        raise Failure(f"{where}: signed with key {kid}, which stopped being probe "
                      f"{state.p.probe}'s at {until}, more than an hour before the "
                      f"{end_word}")


# --- rotations and key provenance ----------------------------------------------------------


def rotations(state: State) -> str:
    p = state.p
    done = 0
    for k in p.keys:
        if k.rotation is None:
            continue
        name = k.rotation if "/" in k.rotation else f"keys/{k.rotation}"
        doc = state.bundle.read_json(name)
        header = jose.header_of(doc)
        if header.get("typ") != evidence.ROTATION_TYP:
            raise Failure(f"{name}: typ must be {evidence.ROTATION_TYP!r}")
        old = str(header["kid"])
        if old not in state.keys:
            raise Failure(f"{name}: signed by key {old}, which the bundle does not hold")
        if not any(e.kid == old and e.probe == k.probe for e in p.keys):
            raise Failure(f"{name}: signed by key {old}, which is not a key of probe "
                          f"{k.probe}")
        try:
            body = evidence.loads_payload(jose.verify_flattened(doc, state.keys[old]))
        except JoseError as exc:
            raise Failure(f"{name}: {exc} (old key {old})") from None
        if not isinstance(body, dict) or not isinstance(body.get("new_jwk"), dict):
            raise Failure(f"{name}: the payload holds no new_jwk")
        if body.get("new_kid") != k.kid or jose.thumbprint(body["new_jwk"]) != k.kid:
            raise Failure(f"{name}: introduces key {str(body.get('new_kid'))[:60]}, not "
                          f"{k.kid}")
        done += 1
    unvouched = provenance(p)
    for k in unvouched:
        when = k.bound_from or "an unknown time"
        state.warnings.append(
            f"key {k.kid} of probe {p.probe} was bound at {when} by {k.source}, "
            "not by a rotation statement of the key before it: "
            "nothing the probe signed says it is the probe's (sessions it signed rest on "
            "the collector's word)")
    return (f"{done} key rotations, each signed by the probe's previous key"
            + (f"; {len(unvouched)} later key(s) bound without one (warning)"
               if unvouched else ""))


def provenance(p: Payload) -> list[KeyEntry]:
    """The probe's keys bound after its first one without a rotation statement. Pure."""
    mine = sorted((k for k in p.keys if k.probe == p.probe),
                  key=lambda k: (k.bound_from or "", k.kid))
    first = mine[0].kid if mine else None
    return [k for k in mine if k.kid != first and k.rotation is None]


# --- gap records ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GapEntry:
    lo: int
    hi: int
    reason: str
    gap_id: str | None
    signed_by: str | None  # the kid of a gap record that verified; None: unsigned


def gaps(state: State) -> list[GapEntry]:
    """The payload's gap entries, each with its gap record checked: a signed record
    verifies with a key of the probe in force when it was recorded, names itself, is the
    probe's, and its dropped ranges hold the entry's; an unsigned one is read as
    well-formed (it documents nothing the probe vouches for)."""
    p = state.p
    out: list[GapEntry] = []
    files: dict[str, tuple[str | None, GapRecord]] = {}
    named: set[str] = set()
    for n, item in enumerate(p.chain.gaps):
        lo, hi, reason = int(item[0]), int(item[1]), str(item[2])
        gap_id = item[3] if len(item) > 3 else None
        where = f"payload.chain.gaps[{n}]"
        if gap_id is None:
            out.append(GapEntry(lo, hi, reason, None, None))
            continue
        named.add(f"gaps/{gap_id}.json")
        if gap_id not in files:
            files[gap_id] = _gap_file(state, gap_id)
        kid, record = files[gap_id]
        ranges = evidence.merged(record.dropped_seq_ranges)
        if not evidence.covers(ranges, lo, hi):
            raise Failure(f"{where}: session_seq {lo}-{hi} is not among the dropped "
                          f"ranges of gap record {gap_id}")
        out.append(GapEntry(lo, hi, reason, gap_id, kid))
    for name in state.bundle.names():
        if name.startswith("gaps/") and name not in named:
            raise Failure(f"{name}: a gap record the certificate does not list")
    return out


def _gap_file(state: State, gap_id: str) -> tuple[str | None, GapRecord]:
    p = state.p
    name = f"gaps/{gap_id}.json"
    where = f"gap record {gap_id}"
    doc = state.bundle.read_json(name)
    kid: str | None = None
    if evidence.is_jws(doc):
        try:
            opened = evidence.open_gap(doc)
        except JoseError as exc:
            raise Failure(f"{name}: {exc}") from None
        kid = opened.kid
        if not bindings(p, kid) or kid not in state.keys:
            raise Failure(f"{where}: signed with key {kid}, which payload.keys does not "
                          f"bind to probe {p.probe}")
        try:
            evidence.verify(opened, state.keys[kid])
        except JoseError as exc:
            raise Failure(f"{where}: {exc} (key {kid})") from None
        data = loads_bounded(opened.payload, name)
    else:
        data = doc
    try:
        record = parse_gap(data)
    except ValueError as exc:
        raise Failure(f"{where}: not a gap record ({line(exc)})") from None
    if record.gap_id != gap_id:
        raise Failure(f"{where}: {name} holds gap record {record.gap_id[:80]}")
    if record.probe_id not in (p.probe, ""):
        raise Failure(f"{where}: a gap record of probe {record.probe_id[:64]!r}, not of "
                      f"{p.probe}")
    if kid is not None:
        at = parse_utc(record.recorded_at)
        key_in_force(state, kid, where, at, at, "it was recorded", "gap was recorded")
    return kid, record


# --- the chain -----------------------------------------------------------------------------


def chain(state: State) -> str:
    p = state.p
    entries = gaps(state)
    listed = [s for s in state.sessions if s.seq is not None]
    links = [evidence.Link(s.seq, s.result_id, s.sha256, s.prev, s.signed)
             for s in listed if s.seq is not None]
    first = min((s.seq for s in listed if s.seq is not None), default=None)
    last = max((s.seq for s in listed if s.seq is not None), default=None)
    after: Session | None = None
    for position, s in state.boundary:
        if s.seq is None:
            raise Failure(f"boundary session {s.result_id}: not numbered (no session_seq)")
        if first is None or last is None:
            raise Failure(f"boundary session {s.result_id}: the bundle lists no numbered "
                          "session for it to border")
        if (position == "before" and s.seq >= first) or \
                (position == "after" and s.seq <= last):
            raise Failure(f"boundary session {s.result_id} ({position}): session_seq "
                          f"{s.seq} is not {position} the listed {first}-{last}")
        if position == "after":
            after = s
        links.append(evidence.Link(s.seq, s.result_id, s.sha256, s.prev, s.signed))
    seqs = sorted(link.seq for link in links)
    for a, b in itertools.pairwise(seqs):
        if b - a > MAX_SEQ_JUMP:
            raise Failure(f"session_seq jumps from {a} to {b}, more than {MAX_SEQ_JUMP} "
                          "sessions absent")
    signed_gaps = evidence.merged((g.lo, g.hi) for g in entries if g.signed_by)
    unsigned_gaps = evidence.merged((g.lo, g.hi) for g in entries if not g.signed_by)
    deletions = evidence.merged((seq, seq) for seq, _, _ in p.chain.deletions)
    breaks = evidence.chain_breaks(links, [*signed_gaps, *deletions])
    holes = _holes(links)
    for brk in breaks:
        lo, hi = holes.get((brk.seq, brk.result_id), (brk.seq, brk.seq))
        if brk.kind == "missing" and evidence.covers(
                evidence.merged([*signed_gaps, *deletions, *unsigned_gaps]), lo, hi):
            raise Failure(f"session {brk.result_id} (session_seq {brk.seq}): missing "
                          f"(documented only by an unsigned gap record): {_span(lo, hi)} "
                          "absent, and nothing the probe signed says it dropped them")
        if brk.kind in evidence.CHANGES:
            raise Failure(f"session {brk.result_id} (session_seq {brk.seq}): {brk.kind}: "
                          f"{brk.detail}")
    documented = [brk for brk in breaks if brk.kind == "documented"]
    for brk in documented:
        lo, hi = holes.get((brk.seq, brk.result_id), (brk.seq, brk.seq))
        state.warnings.append(_documented(p, entries, signed_gaps, lo, hi))
    for brk in breaks:
        if brk.kind == "restart":
            state.warnings.append(f"session {brk.result_id} (session_seq {brk.seq}) "
                                  f"{brk.detail}")
    _head(state, listed, last, after)
    if first is not None and not any(pos == "before" for pos, _ in state.boundary):
        s = next(s for s in listed if s.seq == first)
        if s.prev is not None:
            state.warnings.append(
                f"session {s.result_id} (session_seq {first}) names a previous result, "
                "but the bundle holds no earlier session of the probe: the collector "
                "stores none (deleted, or never delivered), so the chain's start is not "
                "checked")
    return (f"{len(links)} links follow"
            + (f" (with {len(state.boundary)} boundary sessions)" if state.boundary else "")
            + (f"; {len(documented)} documented gaps (warnings)" if documented else ""))


def _holes(links: Sequence[evidence.Link]) -> dict[tuple[int, str], tuple[int, int]]:
    """For each link after a hole, the hole's [lo, hi] (chain_breaks' own order)."""
    ordered = sorted(links, key=lambda link: (link.seq, link.result_id))
    return {(b.seq, b.result_id): (a.seq + 1, b.seq - 1)
            for a, b in itertools.pairwise(ordered) if a.seq < b.seq - 1}


def _span(lo: int, hi: int) -> str:
    return f"session_seq {lo}" if lo == hi else f"session_seq {lo}-{hi}"


def _documented(p: Payload, entries: Iterable[GapEntry],
                signed_gaps: Sequence[tuple[int, int]], lo: int, hi: int) -> str:
    """The warning naming what documents the hole [lo, hi]."""
    if evidence.covers(signed_gaps, lo, hi):
        ids = sorted({f"{g.gap_id} ({g.reason[:120]})" for g in entries
                      if g.signed_by and g.lo <= hi and g.hi >= lo})
        return (f"{_span(lo, hi)} absent: dropped by the probe, says its signed gap "
                f"record {', '.join(ids)}")
    named = [f"session_seq {seq} (result {rid}): {reason[:200]}"
             for seq, rid, reason in p.chain.deletions if lo <= seq <= hi]
    return (f"{_span(lo, hi)} absent: deleted at the collector (its word, not the "
            f"probe's): {'; '.join(named)}")


def _head(state: State, listed: Sequence[Session], last: int | None,
          after: Session | None) -> None:
    """The probe's chain head at issue time is reached by the sessions the bundle
    holds: the last listed, or the boundary session after it."""
    head = getattr(state.p, "chain_head", None)
    if head is None or last is None:
        return
    seq, rid = int(head.session_seq), str(head.result_id)
    if seq < last:
        raise Failure(f"payload.chain_head: session_seq {seq}, below the last listed "
                      f"session's {last}")
    if after is None:
        tail = next(s for s in listed if s.seq == last)
        if seq != last or rid != tail.result_id:
            raise Failure(f"payload.chain_head: the probe's last session was session_seq "
                          f"{seq} ({rid}), after the last listed ({last}, "
                          f"{tail.result_id}), but the bundle holds no session after it "
                          "(boundary 'after'): its end is not sealed")
    elif after.seq is not None and seq < after.seq:
        raise Failure(f"payload.chain_head: session_seq {seq}, below the boundary session "
                      f"after the period ({after.seq})")
