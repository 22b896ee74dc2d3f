"""Verifying an evidence bundle offline (issue 27, design 7): ``verify_bundle(path)``.

A bundle is checked with nothing but itself (and, if given, the issuer keys the verifier
trusts), in this order, stopping at the first check that fails and naming it exactly
(which member, which session, which field):

1. ``bundle``: the directory or zip opens under the reader's bounds (archive.py);
2. ``certificate form``: certificate.json is a flattened JWS (RFC 7515 §7.2.2) of typ
   ``bbprobe-certificate`` whose payload reads strictly (payload.py ``read_payload``),
   its kid the payload's issuer, its issuer's role the kind's (a collector certifies, a
   probe summarises its own sessions);
3. ``keys``: every keys/<kid>.pem and every key of keys.json is the Ed25519 key whose RFC
   7638 thumbprint is its kid (a key replaced shows here), and every key the payload
   names is there;
4. ``issuer signature``: certificate.json verifies with the issuer's key;
5. ``issuer key``: the issuer is a key the verifier trusts for its role, when told
   which (a collector's key for a certificate, never a probe's; --trust). Without one the
   bundle vouches for its own issuer, and a forger re-signing everything with a key of
   their own passes every other check: the report is then not ``anchored`` and the
   commands exit 3 ("consistent, but not anchored"), never 0;
6-8. ``sessions``, ``rotations``, ``chain``: chaincheck.py (each session's signature by
   a key of the probe in force, the boundary sessions that seal the chain's ends, each
   key rotation, the key provenance warning, the hash chain with the probe's signed gap
   records, the chain head);
9. ``merkle root``: RFC 9162 §2.1.1 over the listed sessions;
10. ``session summaries``: each session's summaries recomputed from its raw samples with
    the agent's own pure code (agent/summary.py, agent/stats.py);
11. ``certificate figures`` (kind certificate): ``certify`` over the sessions' facts (as
    the collector takes them at ingest) and the payload's inputs, rendered as the
    collector renders it (reports/text.py ``certificate_dict``), compared field by field
    (a certificate signed before issue 28 without the fields added since, ``_as_made``);
    ``session figures`` (kind session): the payload's summary against step 10; and
    each session's listed counted/reason against the recomputed certificate's, its start
    inside payload.period.

Exit codes (``exit_code``): 0 every check passed and the issuer is anchored, 3 every
check passed but the issuer is not anchored, 1 a check failed (2, usage, is the
commands'). Unsigned sessions, documented holes, deletions, restarts and keys bound
without a rotation statement are warnings that name them, never folded into an "ok".

Whatever the bundle holds, the answer is a report, never a traceback: every reader here
raises one-line ValueErrors (ArchiveError, JoseError, PayloadError, SchemaError).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent import evidence, jose, summary
from agent.jose import JoseError
from agent.schema import PingTest, SessionResult, parse_utc
from collector.errors import ApiError
from collector.evidence import chaincheck
from collector.evidence import payload as payload_mod
from collector.evidence.archive import loads_bounded, open_bundle
from collector.evidence.chaincheck import Anchor, Failure, State, bindings, line

__all__ = ["EXIT_NOT_ANCHORED", "Anchor", "Check", "Failure", "VerifyReport",
           "exit_code", "report_lines", "verify_bundle"]

CERTIFICATE = "certificate.json"
KEYS_JSON = "keys.json"
MAX_JWKS = 1_000
# The schema version since which a result's derived figures follow the rules of today's
# agent/summary.py and agent/probes/transfer.py (v7: failure ratios of the line's
# attempts only, refused ones left out). An older result was summarised by older rules:
# its figures are not recomputed (a warning says so). Raise it when those rules change.
SUMMARY_RULES_SINCE = 7
# Exit codes of `bbprobe verify` and `bbprobe-collector verify`: 0 every check passed and
# the issuer's key is anchored (--trust), 1 a check failed, 2 usage, 3 every check passed
# but nothing outside the bundle vouches for its issuer (a forger re-signing everything
# with a key of their own gets exactly that far).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_ANCHORED = 0, 1, 2, 3
WELL_KNOWN = "/.well-known/bbprobe-keys.json"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """``ok`` only when every check passed; ``first_failure``: "check: detail";
    ``anchored``: the issuer's key is one the verifier trusts (``--trust``), not only the
    bundle's own; ``issuer``: its kid, once read."""

    ok: bool
    checks: tuple[Check, ...]
    first_failure: str | None
    warnings: tuple[str, ...]
    anchored: bool = False
    issuer: str | None = None
    issuer_role: str | None = None


def exit_code(report: VerifyReport) -> int:
    """0 verified and anchored, 3 consistent but not anchored, 1 a check failed."""
    if not report.ok:
        return EXIT_FAILED
    return EXIT_OK if report.anchored else EXIT_NOT_ANCHORED


def verify_bundle(path: str | os.PathLike[str], trusted: Iterable[str | Anchor] = ()
                  ) -> VerifyReport:
    """Every check of the module docstring over the bundle at ``path`` (a directory or a
    zip). ``trusted``: the issuer keys the verifier trusts (a kid: taken for whatever
    role the bundle's issuer has; an Anchor with a role: only for that role); empty:
    the bundle is checked for consistency only, and the report is not ``anchored``."""
    anchors = tuple(a if isinstance(a, Anchor) else Anchor(a) for a in trusted)
    checks: list[Check] = []
    warnings: list[str] = []
    current = "bundle"
    state: State | None = None
    try:
        with open_bundle(path) as bundle:
            checks.append(Check("bundle", True, f"{len(bundle.names())} members"))
            state = State(bundle, anchors, _inspect)
            warnings = state.warnings
            for current, step in _steps(state):
                checks.append(Check(current, True, step(state)))
    except (ValueError, ApiError) as exc:  # ArchiveError, JoseError, PayloadError, ...
        checks.append(Check(current, False, line(exc)))
    except (TypeError, KeyError, IndexError, AttributeError, ArithmeticError,
            RecursionError, MemoryError, OSError) as exc:
        # A bundle must never crash the verifier: name the check it stopped in.
        checks.append(Check(current, False, f"cannot be checked ({type(exc).__name__}: "
                                            f"{line(exc)})"))
    failed = next((c for c in checks if not c.ok), None)
    issuer = state.payload.issuer if state is not None and state.payload else None
    return VerifyReport(ok=failed is None, checks=tuple(checks),
                        first_failure=None if failed is None
                        else f"{failed.name}: {failed.detail}",
                        warnings=tuple(warnings),
                        anchored=failed is None and state is not None
                        and _anchor_of(state) is not None,
                        issuer=None if issuer is None else issuer.kid,
                        issuer_role=None if issuer is None else issuer.role)


def _steps(state: State) -> Iterable[tuple[str, Callable[[State], str]]]:
    yield "certificate form", _form
    yield "keys", _keys
    yield "issuer signature", _issuer_signature
    yield "issuer key", _issuer_key
    yield "sessions", chaincheck.sessions
    yield "rotations", chaincheck.rotations
    yield "chain", chaincheck.chain
    yield "merkle root", _merkle
    yield "session summaries", _summaries
    if state.p.kind == "certificate":
        yield "certificate figures", _certificate_figures
    else:
        yield "session figures", _session_figures


# --- 2-5: the certificate, the keys, the issuer -------------------------------------------


def _form(state: State) -> str:
    doc = state.bundle.read_json(CERTIFICATE)
    if not evidence.is_jws(doc):
        raise Failure(f"{CERTIFICATE}: not a flattened JWS (exactly the members "
                      "protected, payload, signature)")
    header = jose.header_of(doc)
    if header.get("typ") != evidence.CERTIFICATE_TYP:
        raise Failure(f"{CERTIFICATE}: protected header typ must be "
                      f"{evidence.CERTIFICATE_TYP!r}, not {str(header.get('typ'))[:40]!r}")
    raw = jose.b64url_decode(doc["payload"], "payload",
                             (jose.MAX_PAYLOAD_BYTES * 4 + 2) // 3)
    loads_bounded(raw, f"{CERTIFICATE} payload")  # duplicate names, depth, NaN
    p = payload_mod.read_payload(payload_mod.loads(raw))
    if header["kid"] != p.issuer.kid:
        raise Failure(f"{CERTIFICATE}: signed by key {header['kid']}, but the payload "
                      f"names issuer {p.issuer.kid}")
    role = "collector" if p.kind == "certificate" else "probe"
    if p.issuer.role != role:
        raise Failure(f"payload.issuer.role: a {p.kind} bundle is issued by a {role}, "
                      f"not a {p.issuer.role}")
    state.jws, state.payload = doc, p
    return (f"kind {p.kind}, probe {p.probe}, {len(p.sessions)} sessions, issued "
            f"{p.issued_at} by {p.issuer.role} key {p.issuer.kid}")


def _keys(state: State) -> str:
    bundle = state.bundle
    for name in bundle.names():
        if name.startswith("keys/") and name.endswith(".pem"):
            kid = name[len("keys/"):-len(".pem")]
            key = jose.public_key_of_pem(bundle.read_text(name))
            actual = jose.kid_of(key)
            if actual != kid:
                raise Failure(f"{name}: holds key {actual}, not {kid} (a key replaced)")
            state.keys[kid] = key
    jwks = bundle.read_json(KEYS_JSON)
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise Failure(f"{KEYS_JSON}: not a JWK Set (an object with a 'keys' array)")
    if len(jwks["keys"]) > MAX_JWKS:
        raise Failure(f"{KEYS_JSON}: more than {MAX_JWKS} keys")
    for n, jwk in enumerate(jwks["keys"]):
        if not isinstance(jwk, dict):
            raise Failure(f"{KEYS_JSON}: keys[{n}] is not an object")
        kid = jose.thumbprint(jwk)
        if jwk.get("kid") != kid:
            raise Failure(f"{KEYS_JSON}: keys[{n}] has kid {str(jwk.get('kid'))[:60]!r}, "
                          f"but its thumbprint is {kid} (a key replaced)")
        if kid not in state.keys:
            raise Failure(f"{KEYS_JSON}: key {kid} has no keys/{kid}.pem")
    listed = {jwk["kid"] for jwk in jwks["keys"]}
    p = state.p
    # A session's key that payload.keys does not bind fails that session, by name.
    needed = {p.issuer.kid, *(k.kid for k in p.keys)}
    for kid in sorted(needed):
        if kid not in state.keys:
            raise Failure(f"keys/{kid}.pem: missing (the payload names key {kid})")
        if kid not in listed:
            raise Failure(f"{KEYS_JSON}: key {kid} is missing (the payload names it)")
    return f"{len(state.keys)} Ed25519 keys, each PEM and JWK its thumbprint"


def _issuer_signature(state: State) -> str:
    kid = state.p.issuer.kid
    try:
        jose.verify_flattened(state.jws, state.keys[kid])
    except JoseError as exc:
        raise Failure(f"{CERTIFICATE}: {exc} (key {kid})") from None
    if state.p.kind == "session" and not bindings(state.p, kid):
        raise Failure(f"{CERTIFICATE}: the issuer key {kid} is not a key of probe "
                      f"{state.p.probe} in payload.keys")
    return f"{CERTIFICATE} verifies with key {kid}"


def _anchor_of(state: State) -> Anchor | None:
    """The verifier's anchor that vouches for the issuer: its kid, for the issuer's
    role. A collector's JWK Set marks its own key (role collector) apart from its probes'
    (role probe): a probe's key never anchors a certificate, which only a collector
    issues (M7)."""
    p = state.p
    return next((a for a in state.anchors
                 if a.kid == p.issuer.kid and a.role in (None, p.issuer.role)), None)


def _issuer_key(state: State) -> str:
    kid, role = state.p.issuer.kid, state.p.issuer.role
    if not state.anchors:
        return (f"key {kid} is the bundle's own: not anchored (compare it with the "
                f"{role}'s published key and pass --trust {kid})")
    if _anchor_of(state) is not None:
        return f"key {kid} is a trusted {role} key"
    wrong = [a for a in state.anchors if a.kid == kid]
    if wrong:
        raise Failure(f"{CERTIFICATE} is signed by key {kid}, which is trusted as a "
                      f"{wrong[0].role}'s key, not a {role}'s: a {wrong[0].role} key "
                      f"does not anchor a {state.p.kind} bundle")
    shown = ", ".join(sorted({a.kid for a in state.anchors})[:5])
    raise Failure(f"{CERTIFICATE} is signed by key {kid}, which is not a trusted key "
                  f"(trusted: {shown})")


# --- 9-11: the Merkle root and the figures ------------------------------------------------


def _merkle(state: State) -> str:
    p = state.p
    root = evidence.merkle_root([evidence.leaf_data(s.result_id, s.sha256)
                                 for s in p.sessions])
    if root != p.merkle_root:
        raise Failure(f"the sessions listed give {root}, the certificate says "
                      f"{p.merkle_root}")
    return f"{root} over {len(p.sessions)} sessions"


# --- 10-11: the figures --------------------------------------------------------------------


def _inspect(state: State, rid: str, result: SessionResult) -> None:
    """What is checked of a listed session's result while it is at hand (chaincheck
    keeps only its link and facts): its summaries recomputed from its raw samples (the
    first fault kept for the "session summaries" step), and that it started inside the
    period the certificate names."""
    p = state.p
    if result.schema_version < SUMMARY_RULES_SINCE:
        state.older += 1
    elif state.summary_fault is None:
        where = _recomputed_differs(result)
        if where is not None:
            state.summary_fault = f"session {rid}: {where}"
    if p.kind == "certificate":
        started = parse_utc(result.started_at)
        since, until = p.period.since, p.period.until
        if (since is not None and started < parse_utc(since)) or \
                (until is not None and started >= parse_utc(until)):
            raise Failure(f"session {rid}: started at {result.started_at}, outside the "
                          f"period certified (payload.period {since} to {until})")


def _summaries(state: State) -> str:
    if state.summary_fault is not None:
        raise Failure(state.summary_fault)
    older = state.older
    if older:
        state.warnings.append(
            f"{older} session(s) of schema version < {SUMMARY_RULES_SINCE}: their "
            "summaries were computed by an older agent's rules and are not recomputed "
            "(the certificate is still recomputed from their per-test rates and RTTs)")
    return (f"{len(state.sessions) - older} sessions: rates, ping statistics and "
            "summaries recomputed from the raw samples agree"
            + (f"; {older} of older schema versions not recomputed" if older else ""))


def _recomputed_differs(r: SessionResult) -> str | None:
    """Where a result's derived figures differ from those its raw samples give with the
    agent's own code (agent/probes/transfer.py ``conclude``, agent/summary.py), or
    None."""
    from agent import stats

    for n, a in enumerate(r.transfers):
        if a.status != "ok":
            continue
        method = r.method.download if a.direction == "download" else r.method.upload
        streams = [list(s) for s in a.stream_samples]
        window = (stats.window_throughput(streams, method.warmup_s)
                  if method.mode == "duration" else stats.whole_transfer(streams))
        if window.throughput_bps != a.throughput_bps:
            return (f"transfers[{n}].throughput_bps: the result says {a.throughput_bps}, "
                    f"its samples give {window.throughput_bps}")
    trains: list[tuple[str, PingTest | None]] = [
        ("ping", r.ping), ("ping_download", r.ping_download), ("ping_upload", r.ping_upload)]
    for name, test in trains:
        if test is None:
            continue
        again = summary.ping_summary(test.samples)
        if again == test.summary:  # the usual case, at dataclass speed
            continue
        where = _first_difference(dataclasses.asdict(test.summary),
                                  dataclasses.asdict(again), f"{name}.summary")
        if where is not None:
            return where
    mine = summary.session_summary(
        r.ping.summary if r.ping else None, r.transfers,
        r.ping_download.summary if r.ping_download else None,
        r.ping_upload.summary if r.ping_upload else None)
    if mine == r.summary:
        return None
    return _first_difference(dataclasses.asdict(r.summary), dataclasses.asdict(mine),
                             "summary")


def _certificate_figures(state: State) -> str:
    from zoneinfo import ZoneInfo

    from agent.spec import CAMPAIGN_RULES
    from collector.compliance.certify import certify
    from collector.compliance.uncertainty import DEFAULT_MIN_SAMPLES
    from collector.reports.text import certificate_dict

    p = state.p
    inputs = p.inputs
    assert inputs is not None and p.certificate is not None
    rule = CAMPAIGN_RULES.get(inputs.rule)
    if rule is None:
        raise Failure(f"payload.inputs.rule: unknown campaign rule {inputs.rule[:40]!r}")
    try:
        ZoneInfo(inputs.timezone)
    except (ValueError, KeyError, OSError):
        raise Failure(f"payload.inputs.timezone: unknown time zone "
                      f"{inputs.timezone[:80]!r}") from None
    # A certificate of one IP version lists the other's sessions too (the chain runs
    # through both) but is computed over its own, as the store's facts(family=) gives
    # them (a session of unknown family matches neither).
    facts = [s.facts for s in state.sessions
             if inputs.family is None or s.facts.address_family == inputs.family]
    # The rule the certificate's intervals were marked by, as recorded; a bundle made
    # before issue 28 records none, and its certificate has no intervals to mark.
    min_samples = DEFAULT_MIN_SAMPLES if inputs.min_samples is None else inputs.min_samples
    cert = certify(p.probe, inputs.line, facts, rule,
                   inputs.timezone, inputs.delay_basis, inputs.suppressed, inputs.family,
                   inputs.contracts, min_samples)
    mine = _as_made(payload_mod.loads(payload_mod.dumps(certificate_dict(cert))),
                    p.certificate)
    where = _first_difference(p.certificate, mine, "certificate")
    if where is not None:
        raise Failure(where)
    why = _why_not_counted()
    lines = {s.result_id: s for s in cert.sessions}
    for entry in p.sessions:
        got = lines.get(entry.result_id)
        counted = bool(got and got.counted)
        if counted != entry.counted:
            raise Failure(f"session {entry.result_id}: listed as "
                          f"{'counted' if entry.counted else 'not counted'}, the "
                          "recomputed certificate says otherwise")
        reason = why(got, cert.family)
        if reason != entry.reason:
            raise Failure(f"session {entry.result_id}: listed with reason "
                          f"{_shown(entry.reason)}, the recomputed certificate gives "
                          f"{_shown(reason)}")
    return (f"verdict {cert.verdict} and every figure recomputed from {len(facts)} "
            "sessions agree")


# The certificate's fields added by issue 28: its ``min_samples`` and each check's
# ``ci95``. Always added together, so ``min_samples`` alone tells the document's age.
ADDED_BY_ISSUE_28 = ("min_samples", "ci95")


def _as_made(mine: Any, signed: Any) -> Any:
    """The recomputed certificate as the release that signed ``signed`` wrote it.

    The certificate's schema is additive: a document never carries fields added after
    it was made, and a field added later changes none made before (the intervals are
    shown beside the figures and never change a verdict, uncertainty.py). So a
    certificate signed before issue 28 (no ``min_samples``, no ``ci95``) is compared
    without those fields, and every field it does carry must still agree; one that
    carries ``min_samples`` is compared whole, so a ``ci95`` removed or edited fails."""
    if not isinstance(mine, dict) or not isinstance(signed, dict) \
            or ADDED_BY_ISSUE_28[0] in signed:
        return mine
    older = {k: v for k, v in mine.items() if k != "min_samples"}
    checks = older.get("checks")
    if isinstance(checks, list):
        older["checks"] = [{k: v for k, v in c.items() if k != "ci95"}
                           if isinstance(c, dict) else c for c in checks]
    return older


def _session_figures(state: State) -> str:
    figures = state.p.summary or {}
    for s in state.sessions:
        given = figures.get(s.result_id, {})
        mine = s.summary or {}
        for name, value in given.items():
            if name not in mine:
                raise Failure(f"payload.summary.{s.result_id}.{name}: not a figure "
                              "of a session's summary")
            if not _same(value, mine[name]):
                raise Failure(f"payload.summary.{s.result_id}.{name}: the bundle "
                              f"says {value}, the session gives {mine[name]}")
    return f"the figures of {len(state.sessions)} sessions agree"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or (isinstance(a, float) and isinstance(b, float)
                          and math.isnan(a) and math.isnan(b))
    return bool(a == b) and type(a) is type(b)


def _first_difference(signed: Any, mine: Any, path: str) -> str | None:
    """The first path where ``signed`` (what the bundle says) differs from ``mine``
    (what the samples give), with both values; None if they agree. Iterative."""
    stack: list[tuple[Any, Any, str]] = [(signed, mine, path)]
    while stack:
        a, b, where = stack.pop()
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            extra = sorted(set(map(str, a)) ^ set(map(str, b)))
            if extra:
                side = "the bundle has" if extra[0] in a else "the recomputation has"
                return f"{where}.{extra[0]}: only {side} it"
            stack.extend((a[k], b[k], f"{where}.{k}") for k in sorted(a, reverse=True))
        elif isinstance(a, Sequence) and isinstance(b, Sequence) \
                and not isinstance(a, str) and not isinstance(b, str):
            if len(a) != len(b):
                return f"{where}: {len(a)} items in the bundle, {len(b)} recomputed"
            stack.extend((x, y, f"{where}[{n}]")
                         for n, (x, y) in reversed(list(enumerate(zip(a, b, strict=True)))))
        elif not _same(a, b):
            return f"{where}: the bundle says {_shown(a)}, the samples give {_shown(b)}"
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _why_not_counted() -> Callable[[Any, str | None], str | None]:
    """The collector's own wording of why a session is not counted (bundle.py), so the
    reason each session is listed with is recomputed, not taken on the bundle's word."""
    from collector.evidence import bundle

    found: Callable[[Any, str | None], str | None] = getattr(
        bundle, "why_not_counted", None) or bundle._why_not_counted
    return found


def report_lines(report: VerifyReport) -> list[str]:
    """What ``bbprobe verify`` and ``bbprobe-collector verify`` print: a line per check,
    the warnings, and the outcome (pure; the caller makes it safe for a terminal)."""
    out = [f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in report.checks]
    out += [f"warning: {w}" for w in report.warnings]
    if not report.ok:
        out.append(f"NOT verified: {report.first_failure}")
    elif report.anchored:
        out.append("verified: every check passed")
    else:
        published = (f"the collector's published key (GET {WELL_KNOWN})"
                     if report.issuer_role != "probe"
                     else "the probe's key (`bbprobe key show` on the probe)")
        out.append(f"consistent, but issuer key {report.issuer} is not anchored: compare "
                   f"it with {published} and pass --trust {report.issuer}")
    return out
