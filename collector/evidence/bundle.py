"""Evidence bundles (issue 27): a line's certificate, or a probe's own sessions, with
what anyone needs to check them offline.

A bundle is a set of members, written as a directory or served as a zip with the same
names:

- ``certificate.json``: a flattened JWS (RFC 7515 §7.2.2, EdDSA of RFC 8037), protected
  header typ ``bbprobe-certificate``, over the payload of payload.py, signed by the issuer
  (the collector's evidence key for a certificate; the probe's own key for a session
  bundle);
- ``sessions/<result_id>.json``: each session exactly as its probe signed it (the JWS
  rebuilt from storage, StoredSignature.jws), or its canonical JSON when unsigned;
- ``boundary/<result_id>.json``: the same for the probe's sessions just before and just
  after the listed ones by session_seq, not counted, so a verifier checks the chain's
  ends too (review H3; the payload names them and the probe's chain head);
- ``gaps/<gap_id>.json``: each gap record that documents a hole in that span, as the
  probe signed it (typ ``bbprobe-gap``) or its canonical JSON when unsigned (review H1);
- ``keys/<kid>.pem`` (SubjectPublicKeyInfo) for every key named: the issuer's, the probe's
  bindings, and any other key a listed or boundary session was signed with (only the
  probe's are listed in the payload's ``keys``, as bound to it), ``keys/<kid>.rotation.json``
  the rotation JWS that introduced a key, and ``keys.json`` the same keys as a JWK Set
  (RFC 7517 §5);
- ``VERIFY.txt``: how to check it, by ``bbprobe verify`` or by OpenSSL alone.

The certificate is the one reports/service.py ``certificate`` makes, computed once; the
store it reads is watched (``_Watched``) so the payload records every input ``certify``
was given, as read, and a verifier recomputes it from the sessions. A certificate bundle
lists every session of the period, of both IP versions when the certificate is of one:
the probe's chain runs through both, so a verifier can follow it; the other family's
sessions are listed as not counted.

Building the members reads the store (call it on the database thread); writing them is
the edge (``write_members``, ``bundle_zip``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__, evidence, jose
from agent.canonical import sha256_hex
from agent.decoding import parse_result
from agent.schedule import fills_band
from agent.schema import parse_utc, utc_now
from collector.compliance.facts import of_result
from collector.compliance.targets import Targets
from collector.compliance.uncertainty import DEFAULT_MIN_SAMPLES
from collector.errors import BadParameter
from collector.evidence import payload as P
from collector.evidence.instructions import verify_text
from collector.reports import service
from collector.reports.text import certificate_dict
from collector.scope import resolve_scope
from collector.storage import codec
from collector.storage.model import StoredSignature

CERTIFICATE = "certificate.json"
KEYS = "keys.json"
VERIFY = "VERIFY.txt"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed: the same bundle, the same zip bytes

Members = dict[str, bytes]


class BundleError(ValueError):
    """A bundle that cannot be made as asked; one line naming the cause."""


class Signer(Protocol):
    """An Ed25519 key with its RFC 7638 thumbprint (collector.keys.SigningKey, the
    agent's probekey.ProbeKey)."""

    @property
    def private(self) -> Ed25519PrivateKey: ...

    @property
    def kid(self) -> str: ...


class _Watched:
    """A store that keeps what ``service.certificate`` read from it: the line, its facts
    and its contract history are then the inputs the payload records, as used."""

    WATCHED = ("probe", "facts", "line_contracts")

    def __init__(self, store: Any) -> None:
        self._store = store
        self.seen: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in self.WATCHED:
            return attr

        def watched(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            self.seen[name] = out
            return out

        return watched


def certificate_members(store: Any, key: Signer, probe: str, since: str | None,
                        until: str | None, rule: str, timezone: str, family: str | None,
                        targets: Targets, issued_at: str | None = None,
                        min_samples: int = DEFAULT_MIN_SAMPLES) -> Members:
    """The members of a certificate bundle (reads the store: the database thread).
    BadParameter as service.certificate's, or for a period of more sessions than a
    bundle holds. ``min_samples``: [reports] min_samples, the rule the certificate's
    intervals are marked by; recorded in the inputs, so a verifier recomputes with it."""
    watched = _Watched(store)
    cert = service.certificate(cast(service.Certifiable, watched), probe, since, until,
                               rule, timezone, family, min_samples)
    where = resolve_scope([probe], since, until)
    stored = store.results([probe], where.since, where.until, P.MAX_SESSIONS + 1)
    if len(stored) > P.MAX_SESSIONS:
        raise BadParameter(f"since: more than {P.MAX_SESSIONS} sessions in the period, "
                           "more than a bundle holds; certify a shorter period",
                           field="since")
    # Every numbered session of the probe, by seq (ids, seqs and hashes only): the
    # listed sessions' neighbours seal the chain's ends, the highest is its head.
    links: list[evidence.Link] = store.chain_links(probe, None, None)
    seq_of = {link.result_id: link.seq for link in links}
    listed_ids = {r.result_id for r in stored}
    seqs = [seq_of[r.result_id] for r in stored if r.result_id in seq_of]
    ends = _neighbours(links, listed_ids, seqs)
    neighbours = [(position, store.result(link.result_id)) for position, link in ends]
    signatures: dict[str, StoredSignature] = store.result_signatures(
        [r.result_id for r in stored] + [n.result_id for _, n in neighbours if n])
    listed = {s.result_id: s for s in cert.sessions}
    members: Members = {}
    sessions: list[P.SessionEntry] = []
    for r in stored:
        member, digest, kid, status = _session_file(r.body, signatures.get(r.result_id))
        members[f"sessions/{r.result_id}.json"] = member
        line = listed.get(r.result_id)
        sessions.append(P.SessionEntry(
            r.result_id, digest, seq_of.get(r.result_id), kid, cast(P.Status, status),
            bool(line and line.counted), _why_not_counted(line, cert.family)))
    boundary: list[P.BoundaryEntry] = []
    for position, n in neighbours:
        if n is None or n.result_id not in seq_of:  # deleted meanwhile: no end to show
            continue
        member, digest, _, _ = _session_file(n.body, signatures.get(n.result_id))
        members[f"boundary/{n.result_id}.json"] = member
        boundary.append(P.BoundaryEntry(n.result_id, digest, seq_of[n.result_id],
                                        cast(P.Position, position)))
    head = max(links, key=lambda link: (link.seq, link.result_id), default=None)
    bound = store.probe_keys(probe)
    key_entries = [P.KeyEntry(k.kid, k.probe_name, k.source, k.bound_from, k.bound_until,
                              k.revoked_at, k.revoked_reason,
                              f"{k.kid}.rotation.json" if k.rotation_jws else None)
                   for k in bound]
    jwks = [_jwk(key.private.public_key())] + [json.loads(k.jwk) for k in bound]
    # A session signed by a key not bound to this probe (another probe's, swapped in)
    # gets its key too, so a verifier names that key exactly; payload.keys lists only
    # this probe's bindings, so the key is never taken for one of them.
    held = {k.kid for k in bound}
    chain, gap_kids = _chain(store, probe, seqs + [b.session_seq for b in boundary], members)
    others = store.signing_keys(sorted(({s.kid for s in signatures.values()} | gap_kids)
                                       - held))
    jwks += [json.loads(jwk) for _, jwk in sorted(others.items())]
    for k in bound:
        if k.rotation_jws:
            members[f"keys/{k.kid}.rotation.json"] = k.rotation_jws.encode("utf-8")
    line_read = watched.seen["probe"]
    targets_doc = P.targets_data(targets)
    payload = P.Payload(
        kind="certificate", issued_at=issued_at or utc_now(),
        issuer=P.Issuer(key.kid, "collector"), software_version=__version__, probe=probe,
        period=P.Period(where.since, where.until), sessions=tuple(sessions),
        merkle_root=_root(sessions),
        chain=chain,
        keys=tuple(key_entries), boundary=tuple(boundary),
        chain_head=None if head is None else P.ChainHead(head.seq, head.result_id),
        inputs=P.Inputs(
            line=line_read.line, rule=cert.rule.name, timezone=cert.timezone,
            delay_basis=cert.delay_basis,
            suppressed=tuple((w.starts_at, w.ends_at, w.reason) for w in cert.suppressions),
            family=cert.family,
            contracts=tuple(watched.seen.get("line_contracts", ())),
            min_samples=cert.min_samples),
        targets=targets_doc, targets_sha256=P.targets_sha256(targets_doc),
        certificate=cast(dict[str, Any], json.loads(P.dumps(certificate_dict(cert)))))
    return _finish(members, key, payload, jwks)


def _why_not_counted(line: Any, family: str | None) -> str | None:
    """Why a session of the period does not fill its band (None: it does)."""
    if line is None:
        return (f"not of this certificate's IP version ({family})" if family
                else "not part of this certificate")
    if line.counted:
        return None
    if not line.valid:
        return "invalid: " + (", ".join(line.invalid_codes) or "flagged by the probe")
    if line.suppressed_by is not None:
        return f"inside a suppression window: {line.suppressed_by}"
    return "does not fill its band (a failed direction, or no ping sent)"


def _session_file(body_text: str, sig: StoredSignature | None
                  ) -> tuple[bytes, str, str | None, str]:
    """A stored session as a bundle carries it: (member bytes, their SHA-256 as the
    verifier computes it, kid, status). A signed one is its JWS exactly as the probe
    signed it, hashed over the signed payload bytes. An unsigned one is its canonical
    JSON (storage/codec.py ``canonical``, the bytes a probe signs): a row stored by an
    older release may hold another serialisation of the same result (the standard
    library's), and the verifier hashes the canonical form of what it parses (review
    M5). A body that no longer parses is carried as stored: the verifier names it."""
    body = body_text.encode("utf-8")
    if sig is not None:
        digest = sha256_hex(sig.payload if sig.payload is not None else body)
        return P.dumps(sig.jws(body)), digest, sig.kid, sig.status
    try:
        member = codec.canonical(parse_result(json.loads(body)))
    except ValueError:
        member = body
    return member, sha256_hex(member), None, "unsigned"


def _neighbours(links: Sequence[evidence.Link], listed: set[str], seqs: Sequence[int]
                ) -> list[tuple[str, evidence.Link]]:
    """The probe's sessions just before the lowest listed seq and just after the highest
    (by session_seq; none when no listed session is numbered): the bundle carries them
    so its chain's ends are checked too (review H3)."""
    if not seqs:
        return []
    lo, hi = min(seqs), max(seqs)
    outside = [link for link in links if link.result_id not in listed]
    before = [link for link in outside if link.seq < lo]
    after = [link for link in outside if link.seq > hi]
    ends: list[tuple[str, evidence.Link]] = []
    if before:
        ends.append(("before", max(before, key=lambda link: (link.seq, link.result_id))))
    if after:
        ends.append(("after", min(after, key=lambda link: (link.seq, link.result_id))))
    return ends


def _chain(store: Any, probe: str, seqs: Sequence[int], members: Members
           ) -> tuple[P.Chain, set[str]]:
    """What documents holes in the chain between the bundle's lowest and highest
    numbered sessions (listed and boundary): gap records' dropped ranges, each with its
    record (the member gaps/<gap_id>.json: the probe's signed word, or its canonical
    JSON when unsigned; review H1), and recorded deletions (the collector's word); and
    the kids that signed those records (their keys go in the bundle)."""
    if not seqs:
        return P.Chain(), set()
    lo, hi = min(seqs), max(seqs)
    deletions = sorted((int(d["session_seq"]), str(d["result_id"]),
                        str(d["reason"])[:P.MAX_TEXT])
                       for d in store.result_deletions()
                       if d["probe_id"] == probe and d["session_seq"] is not None
                       and lo <= int(d["session_seq"]) <= hi)
    gaps: list[tuple[int, int, str, str | None]] = []
    kids: set[str] = set()
    for record in store.gap_evidence(probe):
        touching = [(a, b) for a, b in record.seq_ranges
                    if a <= hi and b >= lo and 1 <= a <= b <= P.MAX_INT]
        if not touching:
            continue
        # A gap id names a file: one that cannot is listed without one (undocumented).
        gap_id = record.gap_id if P.RESULT_ID_RE.fullmatch(record.gap_id) else None
        if gap_id is not None and record.jws is not None:
            members[f"gaps/{gap_id}.json"] = P.dumps(record.jws)
            # Stored as received and judged then: an unreadable header the verifier names.
            with contextlib.suppress(jose.JoseError):
                kids.add(str(jose.header_of(record.jws)["kid"]))
        elif gap_id is not None:
            members[f"gaps/{gap_id}.json"] = record.document
        # Each with the reason its gap record gives (bounded: the payload reader's).
        why = f"dropped by the probe: {record.reason}"[:P.MAX_TEXT]
        gaps.extend((a, b, why, gap_id) for a, b in touching)
    gaps.sort(key=lambda g: (g[0], g[1], g[2], g[3] or ""))
    return P.Chain(tuple(gaps[:P.MAX_RANGES]), tuple(deletions[:P.MAX_RANGES])), kids


def _root(sessions: Sequence[P.SessionEntry]) -> str:
    return evidence.merkle_root([evidence.leaf_data(s.result_id, s.sha256)
                                 for s in sessions])


def _jwk(public: Any) -> dict[str, str]:
    return jose.jwk_of(public)


def _finish(members: Members, key: Signer, payload: P.Payload,
            jwks: Sequence[Mapping[str, Any]]) -> Members:
    """Sign the payload, add the keys and VERIFY.txt."""
    jws = jose.sign_flattened(key.private, P.payload_bytes(payload),
                              {"typ": evidence.CERTIFICATE_TYP})
    members[CERTIFICATE] = P.dumps(jws)
    keys: dict[str, dict[str, str]] = {}
    for jwk in jwks:
        try:
            public = jose.public_key_of_jwk(jwk)
        except jose.JoseError:
            # A stored key that cannot be read is no key to check with: left out, so
            # the verifier names the sessions it signed as unverifiable.
            continue
        kid = jose.kid_of(public)
        if kid not in keys:
            keys[kid] = {**jose.jwk_of(public), "kid": kid, "use": "sig", "alg": "EdDSA"}
            members[f"keys/{kid}.pem"] = jose.pem_of(public).encode("ascii")
    members[KEYS] = json.dumps({"keys": list(keys.values())}, indent=2,
                               sort_keys=True).encode("ascii") + b"\n"
    example = next(((s.result_id, s.kid) for s in payload.sessions
                    if s.kid is not None and s.kid in keys), None)
    members[VERIFY] = verify_text(payload, example).encode("utf-8")
    return members


# --- a probe's own sessions (`bbprobe run --evidence DIR`) ----------------------------------


def session_members(probe_key: Signer, jws_list: Sequence[Mapping[str, Any]],
                    issued_at: str | None = None) -> Members:
    """The members of a session bundle: the probe's signed sessions, each checked
    against its key, summarised by the figures the probe reports, signed by the probe's
    key itself (kind "session": no collector, no certificate). BundleError if a session
    is not a result this key signed."""
    entries: list[tuple[Any, P.SessionEntry, dict[str, float | None]]] = []
    members: Members = {}
    probe = ""
    public = probe_key.private.public_key()
    for n, jws in enumerate(jws_list):
        try:
            signed = evidence.open_result(jws)
            if signed.kid != probe_key.kid:
                raise BundleError(f"signed by key {signed.kid}, not this probe's "
                                  f"({probe_key.kid})")
            evidence.verify(signed, public)
            result = parse_result(evidence.loads_payload(signed.payload))
        except (jose.JoseError, ValueError) as exc:
            raise BundleError(f"session {n + 1}: {exc}") from None
        if not P.RESULT_ID_RE.fullmatch(result.result_id):
            raise BundleError(f"session {n + 1}: result_id {result.result_id!r} cannot "
                              "name a file")
        probe = probe or result.probe_id
        facts = of_result(result, result.started_at)
        counted = fills_band(facts.valid, (t.direction for t in facts.transfers if t.ok),
                             facts.pings_sent)
        entry = P.SessionEntry(result.result_id, signed.sha256, result.session_seq,
                               signed.kid, "verified", counted,
                               None if counted else "does not fill its band (invalid, a "
                               "failed direction, or no ping sent)")
        members[f"sessions/{result.result_id}.json"] = P.dumps(signed.jws)
        entries.append((parse_utc(result.started_at), entry,
                        cast(dict[str, float | None], dataclasses.asdict(result.summary))))
    if not entries:
        raise BundleError("no signed session to put in the bundle")
    entries.sort(key=lambda e: (e[0], e[1].result_id))
    sessions = tuple(e[1] for e in entries)
    if len({s.result_id for s in sessions}) != len(sessions):
        raise BundleError("the same session twice")
    starts = [e[0] for e in entries]
    payload = P.Payload(
        kind="session", issued_at=issued_at or utc_now(),
        issuer=P.Issuer(probe_key.kid, "probe"), software_version=__version__,
        probe=probe, period=P.Period(min(starts).isoformat(), max(starts).isoformat()),
        sessions=sessions, merkle_root=_root(sessions), chain=P.Chain(),
        keys=(P.KeyEntry(probe_key.kid, probe, "the probe's own key", None, None, None,
                         None, None),),
        summary={e[1].result_id: e[2] for e in entries})
    return _finish(members, probe_key, payload, [_jwk(public)])


# --- the edge ------------------------------------------------------------------------------


def write_members(members: Mapping[str, bytes], out_dir: str | os.PathLike[str]) -> Path:
    """Write a bundle's members under ``out_dir`` (made if absent; refused if it holds
    anything: a bundle is never mixed with another's files). OSError/BundleError."""
    root = Path(out_dir)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise BundleError(f"{root}: exists and is not an empty directory")
    root.mkdir(parents=True, exist_ok=True)
    for name in sorted(members):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as f:
            f.write(members[name])
    return root


def bundle_zip(members: Mapping[str, bytes]) -> bytes:
    """The bundle as a zip (deflated, names sorted, fixed dates: the same members give
    the same bytes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, members[name])
    return out.getvalue()


def write_certificate_bundle(store: Any, key: Signer, probe: str, since: str | None,
                             until: str | None, rule: str, timezone: str,
                             family: str | None, out_dir: str | os.PathLike[str],
                             targets: Targets,
                             min_samples: int = DEFAULT_MIN_SAMPLES) -> Path:
    """Certify ``probe`` over [since, until) and write the bundle to ``out_dir``."""
    return write_members(certificate_members(store, key, probe, since, until, rule,
                                             timezone, family, targets,
                                             min_samples=min_samples), out_dir)


def write_session_bundle(out_dir: str | os.PathLike[str], probe_key: Signer,
                         jws_list: Sequence[Mapping[str, Any]]) -> Path:
    """A probe's signed sessions as a bundle in ``out_dir`` (``bbprobe run --evidence``)."""
    return write_members(session_members(probe_key, jws_list), out_dir)
