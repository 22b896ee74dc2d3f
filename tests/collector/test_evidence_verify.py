"""verify_bundle (collector/evidence/verify.py) and the hostile bundle reader
(collector/evidence/archive.py): a good bundle passes every check in order; each way of
breaking one fails the right check with a reason that names it, never a traceback."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import stat
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import canonical, evidence, jose, stats, summary
from agent.schema import SCHEMA_VERSION, GapRecord, SessionResult, format_utc, parse_utc
from collector.cli.main import main as collector_cli
from collector.compliance.certify import certify
from collector.compliance.facts import of_result
from collector.evidence import archive, bundle
from collector.evidence import payload as P
from collector.evidence.bundle import bundle_zip, session_members, write_members
from collector.evidence.verify import Anchor, VerifyReport, exit_code, verify_bundle
from collector.lines import LineMetadata
from collector.reports.text import certificate_dict
from tests import factories

PROBE = "line-7"
LINE = LineMetadata(operator="Op", download_min_kbps=20_000.0, upload_min_kbps=5_000.0,
                    max_delay_ms=100.0, max_loss_ratio=0.05)
ORDER = ["bundle", "certificate form", "keys", "issuer signature", "issuer key",
         "sessions", "rotations", "chain", "merkle root", "session summaries",
         "certificate figures"]


@dataclass(frozen=True)
class Key:
    private: Ed25519PrivateKey

    @property
    def kid(self) -> str:
        return jose.kid_of(self.private.public_key())


def new_key() -> Key:
    return Key(Ed25519PrivateKey.generate())


def consistent(result: SessionResult) -> SessionResult:
    """The factory's session with every derived figure as its raw samples give it (the
    agent's own code), as a real agent's result is."""
    transfers = []
    for original in result.transfers:
        attempt = original
        if attempt.status == "ok":
            method = result.method.download if attempt.direction == "download" \
                else result.method.upload
            window = stats.window_throughput([list(s) for s in attempt.stream_samples],
                                             method.warmup_s)
            attempt = dataclasses.replace(attempt, throughput_bps=window.throughput_bps)
        transfers.append(attempt)
    return dataclasses.replace(result, transfers=tuple(transfers),
                               summary=summary.session_summary(
                                   result.ping.summary if result.ping else None, transfers))


def sessions(n: int, probe: str = PROBE, first_seq: int = 1) -> list[SessionResult]:
    out = []
    for i in range(n):
        started = f"2026-11-21T{10 + i:02d}:00:00.000000Z"
        r = factories.session(probe, started_at=started, transfers=[
            factories.attempt_with_samples("download", 50e6, streams=2, interval_s=0.5),
            factories.attempt_with_samples("upload", 10e6, streams=2, interval_s=0.5)],
            rtts=(10.0 + i, 11.0, None, 12.5))
        out.append(consistent(dataclasses.replace(r, session_seq=first_seq + i)))
    return out


def sign_chain(key: Key, results: Sequence[SessionResult],
               prev: str | None = None) -> list[dict[str, str]]:
    """Each result signed as the agent signs it, chained to the one before."""
    out = []
    for r in results:
        body = canonical.canonical(r)
        out.append(evidence.sign_result(key.private, body, prev))
        prev = evidence.sha256_hex(body)
    return out


def finish(members: dict[str, bytes], issuer: Key, doc: dict[str, Any],
           public_keys: Sequence[Any]) -> dict[str, bytes]:
    """Sign the payload ``doc`` (as is: a test may have broken it) and add the keys."""
    members["certificate.json"] = P.dumps(jose.sign_flattened(
        issuer.private, P.dumps(doc), {"typ": evidence.CERTIFICATE_TYP}))
    jwks = []
    for public in public_keys:
        kid = jose.kid_of(public)
        members[f"keys/{kid}.pem"] = jose.pem_of(public).encode()
        jwks.append({**jose.jwk_of(public), "kid": kid, "use": "sig", "alg": "EdDSA"})
    members["keys.json"] = json.dumps({"keys": jwks}).encode()
    return members


@dataclass
class Made:
    members: dict[str, bytes]
    doc: dict[str, Any]
    collector: Key
    probe_key: Key
    results: list[SessionResult]
    jws: list[dict[str, str]]


# The collector's own wording of why a session is not counted (bundle.py).
WHY_NOT_COUNTED = getattr(bundle, "why_not_counted", None) or bundle._why_not_counted


def gap_member(seqs: tuple[int, int], key: Key | None,
               probe: str = PROBE) -> tuple[str, bytes]:
    """A gap record dropping ``seqs`` (its id, its member): signed by ``key`` as the
    agent signs it, or plain when None."""
    gap = GapRecord(schema_version=SCHEMA_VERSION, gap_id=str(uuid.uuid4()),
                    probe_id=probe, recorded_at="2026-11-21T20:00:00.000000Z",
                    reason="spool_full", dropped=seqs[1] - seqs[0] + 1,
                    first_started_at="2026-11-21T12:00:00.000000Z",
                    last_started_at="2026-11-21T12:00:00.000000Z",
                    dropped_seq_ranges=(seqs,))
    body = canonical.canonical_gap(gap)
    return gap.gap_id, body if key is None else P.dumps(evidence.sign_gap(key.private, body))


def certificate_bundle(n: int = 4, *, probe_key: Key | None = None,
                       collector: Key | None = None,
                       results: list[SessionResult] | None = None,
                       jws: list[dict[str, str]] | None = None,
                       keys: list[dict[str, Any]] | None = None,
                       gaps: Sequence[tuple[int, int, str, str | None]] = (),
                       members: dict[str, bytes] | None = None,
                       deletions: Sequence[tuple[int, str, str]] = (),
                       boundary: Sequence[tuple[str, SessionResult, dict[str, str]]] = (),
                       head: tuple[int, str] | None = None,
                       family: str | None = None) -> Made:
    """A certificate bundle as the collector writes one (bundle.py), built without a
    store: the certificate recomputed here with certify and certificate_dict.
    ``members``: extra members (gap records); ``boundary``: (position, result, its JWS);
    ``head``: the chain head (seq, result id), by default the last listed session."""
    probe_key = probe_key or new_key()
    collector = collector or new_key()
    results = results if results is not None else sessions(n)
    jws = jws if jws is not None else sign_chain(probe_key, results)
    facts = [of_result(r, format_utc(parse_utc(r.started_at))) for r in results]
    cert = certify(PROBE, LINE, [f for f in facts
                                 if family is None or f.address_family == family],
                   timezone="Europe/Rome", family=family)
    lines = {s.result_id: s for s in cert.sessions}
    out = {f"sessions/{r.result_id}.json": P.dumps(j) for r, j in zip(results, jws,
                                                                      strict=True)}
    out.update(members or {})
    entries = tuple(P.SessionEntry(r.result_id, evidence.open_result(j).sha256,
                                   r.session_seq, probe_key.kid, "verified",
                                   bool(lines.get(r.result_id)
                                        and lines[r.result_id].counted),
                                   WHY_NOT_COUNTED(lines.get(r.result_id), family))
                    for r, j in zip(results, jws, strict=True))
    edges = []
    for position, r, j in boundary:
        out[f"boundary/{r.result_id}.json"] = P.dumps(j)
        edges.append(P.BoundaryEntry(r.result_id, evidence.open_result(j).sha256,
                                     r.session_seq or 0, cast(Any, position)))
    numbered = [r for r in results if r.session_seq is not None]
    if head is None and numbered:
        last = max(numbered, key=lambda r: r.session_seq or 0)
        head = (last.session_seq or 0, last.result_id)
    targets = {"name": "test targets"}
    payload = P.Payload(
        kind="certificate", issued_at="2026-11-22T00:00:00.000000Z",
        issuer=P.Issuer(collector.kid, "collector"), software_version="test",
        probe=PROBE, period=P.Period(None, None), sessions=entries,
        merkle_root=evidence.merkle_root([evidence.leaf_data(e.result_id, e.sha256)
                                          for e in entries]),
        chain=P.Chain(gaps=tuple(gaps), deletions=tuple(deletions)),
        keys=(P.KeyEntry(probe_key.kid, PROBE, "tofu", "2026-11-01T00:00:00.000000Z",
                         None, None, None, None),),
        inputs=P.Inputs(LINE, "96in24h", "Europe/Rome", "rtt", (), family, ()),
        targets=targets, targets_sha256=P.targets_sha256(targets),
        certificate=json.loads(P.dumps(certificate_dict(cert))),
        boundary=tuple(edges),
        chain_head=None if head is None else P.ChainHead(*head))
    doc = P.to_dict(payload)
    if keys is not None:
        doc["keys"] = keys
    finish(out, collector, doc, [collector.private.public_key(),
                                 probe_key.private.public_key()])
    return Made(out, doc, collector, probe_key, results, jws)


def resign(made: Made, change: Callable[[dict[str, Any]], None],
           issuer: Key | None = None, extra_keys: Sequence[Key] = ()) -> dict[str, bytes]:
    """The bundle with its payload changed by ``change`` and signed again (by the
    collector's own key unless ``issuer``): a collector that cheats, or a forger."""
    doc = json.loads(json.dumps(made.doc))
    change(doc)
    issuer = issuer or made.collector
    doc["issuer"]["kid"] = issuer.kid
    members = {k: v for k, v in made.members.items()
               if k.split("/")[0] in ("sessions", "gaps", "boundary")}
    keys = [issuer, made.probe_key, *extra_keys]
    publics = {k.kid: k.private.public_key() for k in keys}
    return finish(members, issuer, doc, list(publics.values()))


def write(tmp_path: Path, members: dict[str, bytes], name: str = "bundle") -> Path:
    return write_members(members, tmp_path / name)


def check(report: VerifyReport, name: str, *words: str) -> None:
    """The report fails, first at check ``name``, with every one of ``words``."""
    assert not report.ok, report
    failed = report.checks[-1]
    assert not failed.ok and failed.name == name, report.checks
    assert report.first_failure == f"{name}: {failed.detail}"
    for word in words:
        assert word in failed.detail, failed.detail
    assert "Traceback" not in failed.detail


def test_a_good_bundle_passes_every_check_in_order(tmp_path: Path) -> None:
    """Directory and zip alike: every check passes, in the contract's order."""
    made = certificate_bundle(4)
    for path in (write(tmp_path, made.members), tmp_path / "b.zip"):
        if path.suffix == ".zip":
            path.write_bytes(bundle_zip(made.members))
        report = verify_bundle(path)
        assert report.ok, report.first_failure
        assert [c.name for c in report.checks] == ORDER
        assert report.first_failure is None
        # Consistent, but nothing outside the bundle vouches for its issuer (H5).
        assert not report.anchored and report.issuer == made.collector.kid
        assert exit_code(report) == 3
        assert "not anchored" in report.checks[ORDER.index("issuer key")].detail


def test_a_trusted_issuer_passes_without_warning(tmp_path: Path) -> None:
    """Given the collector's kid, the issuer key check passes and warns of nothing."""
    made = certificate_bundle(2)
    report = verify_bundle(write(tmp_path, made.members), [made.collector.kid])
    assert report.ok and report.warnings == ()
    assert report.anchored and exit_code(report) == 0


def test_a_session_bundle_passes(tmp_path: Path) -> None:
    """A probe's own session bundle (bbprobe run --evidence) verifies, its summary
    figures checked instead of a certificate."""
    key = new_key()
    results = sessions(2)
    members = session_members(key, sign_chain(key, results))
    report = verify_bundle(write(tmp_path, members))
    assert report.ok, report.first_failure
    assert report.checks[-1].name == "session figures"


def test_a_summary_figure_edited_in_a_session_bundle_fails(tmp_path: Path) -> None:
    """A session bundle whose summary says another download speed than the session's
    samples give, even signed again by the probe, fails naming the figure."""
    key = new_key()
    results = sessions(1)
    members = session_members(key, sign_chain(key, results))
    doc = json.loads(jose.b64url_decode(json.loads(members["certificate.json"])["payload"],
                                        "payload", 10**7))
    doc["summary"][results[0].result_id]["download_bps"] = 99e6
    members = finish({k: v for k, v in members.items() if k.startswith("sessions/")},
                     key, doc, [key.private.public_key()])
    check(verify_bundle(write(tmp_path, members)), "session figures", "download_bps",
          results[0].result_id)


# --- tampering ------------------------------------------------------------------------------


def test_a_sample_changed_in_a_bundle_fails_its_signature(tmp_path: Path) -> None:
    """One RTT changed in a session's signed payload: that session's signature fails."""
    made = certificate_bundle(3)
    victim = made.results[1]
    j = dict(made.jws[1])
    body = json.loads(jose.b64url_decode(j["payload"], "p", 10**7))
    body["ping"]["samples"][0]["rtt_ms"] = 1.0
    j["payload"] = jose.b64url(json.dumps(body, separators=(",", ":")).encode())
    made.members[f"sessions/{victim.result_id}.json"] = P.dumps(j)
    check(verify_bundle(write(tmp_path, made.members)), "sessions", victim.result_id,
          "does not verify")


def test_a_sample_changed_and_resigned_by_another_key_fails(tmp_path: Path) -> None:
    """The changed session signed again by a key that is not the probe's: refused as a
    key the payload does not bind to the probe."""
    made = certificate_bundle(3)
    other = new_key()
    victim = made.results[0]
    forged = sign_chain(other, [dataclasses.replace(victim, agent_version="x")])[0]
    made.members[f"sessions/{victim.result_id}.json"] = P.dumps(forged)
    made.members[f"keys/{other.kid}.pem"] = jose.pem_of(other.private.public_key()).encode()
    check(verify_bundle(write(tmp_path, made.members)), "sessions", victim.result_id,
          other.kid)


def test_a_session_removed_from_the_middle_breaks_the_chain(tmp_path: Path) -> None:
    """A collector that drops a session and signs the certificate again: the chain
    names the session after the hole and its seq."""
    made = certificate_bundle(5)
    gone, after = made.results[2], made.results[3]
    made.members.pop(f"sessions/{gone.result_id}.json")

    def drop(doc: dict[str, Any]) -> None:
        doc["sessions"] = [s for s in doc["sessions"] if s["result_id"] != gone.result_id]
        doc["merkle_root"] = evidence.merkle_root(
            [evidence.leaf_data(s["result_id"], s["sha256"]) for s in doc["sessions"]])

    report = verify_bundle(write(tmp_path, resign(made, drop)))
    check(report, "chain", after.result_id, "session_seq 4", "missing")


def test_a_documented_hole_is_no_break(tmp_path: Path) -> None:
    """A gap record the probe signed, covering the hole, explains it: the chain passes,
    and a warning names the gap record (never folded into an ok line alone)."""
    probe_key = new_key()
    results = sessions(4)
    jws = sign_chain(probe_key, results)
    keep = [0, 1, 3]
    gap_id, member = gap_member((3, 3), probe_key)
    made = certificate_bundle(probe_key=probe_key, results=[results[i] for i in keep],
                              jws=[jws[i] for i in keep],
                              gaps=[(3, 3, "dropped", gap_id)],
                              members={f"gaps/{gap_id}.json": member})
    report = verify_bundle(write(tmp_path, made.members))
    assert report.ok, report.first_failure
    chain = next(c for c in report.checks if c.name == "chain")
    assert "1 documented" in chain.detail
    assert any(gap_id in w and "session_seq 3" in w and "signed gap record" in w
               for w in report.warnings), report.warnings


def test_a_session_of_another_probe_swapped_in_fails(tmp_path: Path) -> None:
    """Another probe's session (its own key, its own name) listed in place of one of
    ours: its key is not bound to this probe."""
    made = certificate_bundle(3)
    other_key = new_key()
    theirs = sessions(1, probe="line-9", first_seq=2)[0]
    theirs_jws = sign_chain(other_key, [theirs])[0]
    victim = made.results[1]
    made.members.pop(f"sessions/{victim.result_id}.json")
    made.members[f"sessions/{theirs.result_id}.json"] = P.dumps(theirs_jws)

    def swap(doc: dict[str, Any]) -> None:
        for s in doc["sessions"]:
            if s["result_id"] == victim.result_id:
                s.update(result_id=theirs.result_id, kid=other_key.kid,
                         sha256=evidence.open_result(theirs_jws).sha256)

    members = resign(made, swap, extra_keys=[other_key])
    check(verify_bundle(write(tmp_path, members)), "sessions", theirs.result_id,
          other_key.kid, "does not bind")


def test_a_certificate_figure_edited_fails_the_issuer_signature(tmp_path: Path) -> None:
    """A figure changed in certificate.json's payload without the collector's key: the
    issuer's signature fails."""
    made = certificate_bundle(2)
    jws = json.loads(made.members["certificate.json"])
    doc = json.loads(jose.b64url_decode(jws["payload"], "p", 10**7))
    doc["certificate"]["verdict"] = "no_breach" \
        if doc["certificate"]["verdict"] != "no_breach" else "breach"
    jws["payload"] = jose.b64url(P.dumps(doc))
    made.members["certificate.json"] = P.dumps(jws)
    check(verify_bundle(write(tmp_path, made.members)), "issuer signature",
          "does not verify")


def test_a_figure_edited_and_resigned_by_the_collector_fails_the_recomputation(
        tmp_path: Path) -> None:
    """Even the collector's own key cannot make a figure the samples do not give: the
    recomputation names the field."""
    made = certificate_bundle(2)

    def edit(doc: dict[str, Any]) -> None:
        doc["certificate"]["checks"][0]["observed"] = 123456.0

    check(verify_bundle(write(tmp_path, resign(made, edit))), "certificate figures",
          "certificate.checks[0].observed", "123456.0")


def test_a_figure_edited_and_resigned_by_another_key_fails_key_provenance(
        tmp_path: Path) -> None:
    """Signed again by a forger's key: against the collector's trusted key, the issuer
    key check fails naming the forger's kid."""
    made = certificate_bundle(2)
    forger = new_key()

    def edit(doc: dict[str, Any]) -> None:
        doc["certificate"]["checks"][0]["observed"] = 1.0

    members = resign(made, edit, issuer=forger)
    check(verify_bundle(write(tmp_path, members), [made.collector.kid]), "issuer key",
          forger.kid, "not a trusted key")


def test_a_key_replaced_fails(tmp_path: Path) -> None:
    """keys/<kid>.pem holding another Ed25519 key: the keys check names both."""
    made = certificate_bundle(2)
    other = new_key()
    made.members[f"keys/{made.probe_key.kid}.pem"] = jose.pem_of(
        other.private.public_key()).encode()
    check(verify_bundle(write(tmp_path, made.members)), "keys", made.probe_key.kid,
          other.kid, "replaced")


@pytest.mark.parametrize("kind", ["rsa", "p256"])
def test_a_key_of_another_algorithm_fails(tmp_path: Path, kind: str) -> None:
    """An RSA or P-256 public key where an Ed25519 one belongs: refused by name."""
    made = certificate_bundle(1)
    private = rsa.generate_private_key(65537, 2048) if kind == "rsa" \
        else ec.generate_private_key(ec.SECP256R1())
    made.members[f"keys/{made.probe_key.kid}.pem"] = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    check(verify_bundle(write(tmp_path, made.members)), "keys", "another kind of key")


def test_a_revoked_key_fails_before_and_warns_after(tmp_path: Path) -> None:
    """A key revoked before a session started fails it; revoked after, a warning names
    it."""
    for revoked_at, fails in (("2026-11-21T11:30:00.000000Z", True),
                              ("2026-12-01T00:00:00.000000Z", False)):
        probe_key = new_key()
        keys = [{"kid": probe_key.kid, "probe": PROBE, "source": "tofu",
                 "bound_from": None, "bound_until": None, "revoked_at": revoked_at,
                 "revoked_reason": "laptop stolen", "rotation": None}]
        made = certificate_bundle(3, probe_key=probe_key, keys=keys)
        report = verify_bundle(write(tmp_path, made.members, revoked_at[:10]))
        if fails:
            check(report, "sessions", made.results[2].result_id, "revoked", "stolen")
        else:
            assert report.ok, report.first_failure
            assert any("revoked" in w and "stolen" in w for w in report.warnings)


def test_a_key_retired_before_the_session_fails(tmp_path: Path) -> None:
    """A session signed by a key after the probe rotated away from it fails."""
    probe_key = new_key()
    keys = [{"kid": probe_key.kid, "probe": PROBE, "source": "tofu", "bound_from": None,
             "bound_until": "2026-11-21T09:30:00.000000Z", "revoked_at": None,
             "revoked_reason": None, "rotation": None}]
    made = certificate_bundle(2, probe_key=probe_key, keys=keys)
    # The first session ended (was signed) within the hour of grace after the key was
    # replaced (agent.evidence.key_covers, the rule ingest applies too); the second
    # more than an hour after.
    check(verify_bundle(write(tmp_path, made.members)), "sessions",
          made.results[1].result_id, "stopped being", "more than an hour")


def test_a_rotation_is_checked_with_the_old_key(tmp_path: Path) -> None:
    """A key introduced by a rotation JWS of the probe's previous key passes; one whose
    rotation another key signed fails."""
    old, new = new_key(), new_key()
    for signer, ok in ((old, True), (new_key(), False)):
        statement = jose.sign_flattened(signer.private, P.dumps(
            {"new_jwk": jose.jwk_of(new.private.public_key()), "new_kid": new.kid,
             "at": "2026-11-20T00:00:00.000000Z"}), {"typ": evidence.ROTATION_TYP})
        keys = [{"kid": old.kid, "probe": PROBE, "source": "tofu", "bound_from": None,
                 "bound_until": "2026-11-20T00:00:00.000000Z", "revoked_at": None,
                 "revoked_reason": None, "rotation": None},
                {"kid": new.kid, "probe": PROBE, "source": "rotation",
                 "bound_from": "2026-11-20T00:00:00.000000Z", "bound_until": None,
                 "revoked_at": None, "revoked_reason": None,
                 "rotation": f"{new.kid}.rotation.json"}]
        made = certificate_bundle(2, probe_key=new, keys=keys)
        members = dict(made.members)
        members[f"keys/{new.kid}.rotation.json"] = P.dumps(statement)
        doc = json.loads(json.dumps(made.doc))
        finish(members, made.collector, doc, [made.collector.private.public_key(),
                                              new.private.public_key(),
                                              old.private.public_key()])
        if signer is not old:
            members[f"keys/{signer.kid}.pem"] = jose.pem_of(
                signer.private.public_key()).encode()
        report = verify_bundle(write(tmp_path, members, f"r{ok}"))
        if ok:
            assert report.ok, report.first_failure
            assert "1 key rotations" in next(c.detail for c in report.checks
                                             if c.name == "rotations")
        else:
            check(report, "rotations", signer.kid, "not a key of probe")


def test_an_unlisted_session_file_fails(tmp_path: Path) -> None:
    """A session file the certificate does not list is refused by name."""
    made = certificate_bundle(1)
    made.members["sessions/extra.json"] = b"{}"
    check(verify_bundle(write(tmp_path, made.members)), "sessions", "sessions/extra.json")


# --- hostile bundles -----------------------------------------------------------------------


def test_a_truncated_certificate_fails_its_form(tmp_path: Path) -> None:
    made = certificate_bundle(1)
    made.members["certificate.json"] = made.members["certificate.json"][:50]
    check(verify_bundle(write(tmp_path, made.members)), "certificate form",
          "certificate.json", "not valid JSON")


def test_a_truncated_session_fails(tmp_path: Path) -> None:
    made = certificate_bundle(2)
    rid = made.results[1].result_id
    made.members[f"sessions/{rid}.json"] = made.members[f"sessions/{rid}.json"][:-30]
    check(verify_bundle(write(tmp_path, made.members)), "sessions", rid, "not valid JSON")


def test_a_truncated_zip_fails(tmp_path: Path) -> None:
    made = certificate_bundle(2)
    path = tmp_path / "b.zip"
    path.write_bytes(bundle_zip(made.members)[:-200])
    check(verify_bundle(path), "bundle", "not a zip archive")


@pytest.mark.parametrize(("field", "value", "words"), [
    ("session_seq", "3", ("payload.sessions[0].session_seq", "expected an integer")),
    ("session_seq", 10**30, ("payload.sessions[0].session_seq", "outside")),
    ("sha256", 7, ("payload.sessions[0].sha256", "expected text")),
    ("counted", "yes", ("payload.sessions[0].counted", "true or false")),
    ("result_id", "../../etc/passwd", ("payload.sessions[0].result_id", "not a result id")),
])
def test_wrong_types_in_the_payload_fail_its_form(tmp_path: Path, field: str, value: Any,
                                                  words: tuple[str, ...]) -> None:
    """A payload signed as is, with a field of the wrong type or a huge number: the
    form check names the field."""
    made = certificate_bundle(1)

    def change(doc: dict[str, Any]) -> None:
        doc["sessions"][0][field] = value

    check(verify_bundle(write(tmp_path, resign(made, change))), "certificate form", *words)


def test_a_huge_number_in_json_fails_cleanly(tmp_path: Path) -> None:
    """A 5000-digit number, and a float beyond range, in certificate.json: a named
    refusal, not a hang or a traceback."""
    for text in (b'{"payload":' + b"9" * 5000 + b"}", b'{"a":1e999}'):
        made = certificate_bundle(1)
        made.members["certificate.json"] = text
        check(verify_bundle(write(tmp_path, made.members, str(len(text)))),
              "certificate form", "certificate.json")


def test_a_huge_number_in_a_session_fails_cleanly(tmp_path: Path) -> None:
    """A session whose signed result holds a 400-digit RTT: the result is refused by
    field, as the collector refuses it."""
    made = certificate_bundle(1)
    r = made.results[0]
    body = canonical.canonical(r).replace(b'"rtt_ms":10.0', b'"rtt_ms":1' + b"0" * 400, 1)
    j = evidence.sign_result(made.probe_key.private, body, None)
    made.members[f"sessions/{r.result_id}.json"] = P.dumps(j)

    def relist(doc: dict[str, Any]) -> None:
        doc["sessions"][0]["sha256"] = evidence.sha256_hex(body)

    check(verify_bundle(write(tmp_path, resign(made, relist))), "sessions", r.result_id,
          "not a valid result")


def test_deep_nesting_and_duplicate_names_fail(tmp_path: Path) -> None:
    for text, word in ((b"[" * 100_000 + b"]" * 100_000, "nested"),
                       (b'{"protected":"a","protected":"b"}', "twice")):
        made = certificate_bundle(1)
        made.members["certificate.json"] = text
        check(verify_bundle(write(tmp_path, made.members, word)), "certificate form", word)


def zip_of(entries: Sequence[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for info, data in entries:
            z.writestr(info, data)
    return out.getvalue()


def test_a_zip_bomb_is_stopped_while_inflating(tmp_path: Path) -> None:
    """A member that inflates past 16 MiB (from 17 KiB): refused by name, before it is
    all in memory."""
    made = certificate_bundle(1)
    entries: list[tuple[zipfile.ZipInfo | str, bytes]] = list(made.members.items())
    rid = made.results[0].result_id
    entries = [(n, d) for n, d in entries if n != f"sessions/{rid}.json"]
    entries.append((f"sessions/{rid}.json", b" " * (archive.MAX_MEMBER_BYTES + 1)))
    path = tmp_path / "bomb.zip"
    path.write_bytes(zip_of(entries))
    assert path.stat().st_size < 200_000
    check(verify_bundle(path), "bundle", f"sessions/{rid}.json", "larger than")


def test_a_zip_bomb_with_a_lying_size_is_stopped(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A member whose headers declare a small size but inflates to more than the bound:
    the bytes inflated are counted, not the declared size (bounds lowered for speed)."""
    monkeypatch.setattr(archive, "MAX_MEMBER_BYTES", 1000)
    data = zip_of([("certificate.json", b"x" * 5000)])
    # Declare 10 bytes in the local and central headers (APPNOTE 4.3.7, 4.3.12).
    data = data.replace((5000).to_bytes(4, "little"), (10).to_bytes(4, "little"))
    path = tmp_path / "liar.zip"
    path.write_bytes(data)
    report = verify_bundle(path)
    assert not report.ok
    assert report.checks[-1].name in ("bundle", "certificate form")
    assert "certificate.json" in report.checks[-1].detail


def test_the_total_inflated_size_is_bounded(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "MAX_TOTAL_BYTES", 2000)
    made = certificate_bundle(3)
    path = tmp_path / "b.zip"
    path.write_bytes(bundle_zip(made.members))
    report = verify_bundle(path)
    assert not report.ok and "in all" in str(report.first_failure)


def test_too_many_members_are_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "many.zip"
    path.write_bytes(zip_of([(f"m{i}", b"") for i in range(archive.MAX_MEMBERS + 1)]))
    check(verify_bundle(path), "bundle", "more than 10000 members")


@pytest.mark.parametrize(("name", "word"), [
    ("../certificate.json", "traversal"), ("sessions/../../x.json", "traversal"),
    ("/etc/passwd", "absolute"), ("C:/x.json", "absolute"), ("a\\b.json", "plain"),
])
def test_path_traversal_in_a_zip_is_refused(tmp_path: Path, name: str, word: str) -> None:
    made = certificate_bundle(1)
    path = tmp_path / "evil.zip"
    path.write_bytes(zip_of([*made.members.items(), (name, b"{}")]))
    check(verify_bundle(path), "bundle", word)


def test_a_symlink_member_of_a_zip_is_refused(tmp_path: Path) -> None:
    made = certificate_bundle(1)
    link = zipfile.ZipInfo("keys/evil.pem")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    path = tmp_path / "link.zip"
    path.write_bytes(zip_of([*made.members.items(), (link, b"/etc/passwd")]))
    check(verify_bundle(path), "bundle", "symbolic link")


def test_a_symlink_or_fifo_in_a_directory_is_refused(tmp_path: Path) -> None:
    """A link in a bundle directory is never followed, a FIFO never opened."""
    made = certificate_bundle(1)
    root = write(tmp_path, made.members)
    rid = made.results[0].result_id
    session = root / "sessions" / f"{rid}.json"
    session.unlink()
    session.symlink_to("/etc/passwd")
    check(verify_bundle(root), "bundle", "symbolic link")
    session.unlink()
    os.mkfifo(session)
    check(verify_bundle(root), "bundle", "not a regular file")


def test_not_a_bundle_at_all(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    check(verify_bundle(tmp_path / "x.txt"), "bundle", "not a zip archive")
    check(verify_bundle(tmp_path / "missing"), "bundle", "No such file")
    (tmp_path / "empty").mkdir()
    check(verify_bundle(tmp_path / "empty"), "certificate form", "missing")


# --- the command ---------------------------------------------------------------------------


def test_the_cli_prints_a_line_per_check_and_exits_by_outcome(tmp_path: Path) -> None:
    """Exit 0 with every check ok; 1 naming the failed one; 2 for a missing path."""
    made = certificate_bundle(2)
    good = write(tmp_path, made.members)
    runner = CliRunner()
    res = runner.invoke(collector_cli, ["verify", str(good), "--trust", made.collector.kid])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [f"ok   {n}" for n in ORDER]
    assert lines[-1] == "verified: every check passed"
    made.members[f"keys/{made.probe_key.kid}.pem"] = jose.pem_of(
        new_key().private.public_key()).encode()
    bad = write(tmp_path, made.members, "bad")
    res = runner.invoke(collector_cli, ["verify", str(bad)])
    assert res.exit_code == 1
    assert "FAIL keys:" in res.output and "NOT verified: keys:" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(collector_cli, ["verify", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such file" in res.output
    res = runner.invoke(collector_cli, ["verify", str(good), "--trust", "not-a-kid"])
    assert res.exit_code == 2 and "--trust not-a-kid" in res.output


def test_the_cli_says_an_escaped_fault_in_one_line(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a fault escape verify_bundle, the command prints one line, exit 1."""
    from collector.cli import verify as cli_verify

    def broken(path: Any, trusted: Any = ()) -> VerifyReport:
        raise RuntimeError("a bug\nsecond line")

    monkeypatch.setattr(cli_verify, "verify_bundle", broken)
    res = CliRunner().invoke(collector_cli, ["verify", str(tmp_path)])
    assert res.exit_code == 1
    assert res.output.strip().endswith("cannot be checked: a bug")
    assert "Traceback" not in res.output and "second line" not in res.output


def test_an_unsigned_session_is_listed_and_checked_by_its_sha256(tmp_path: Path) -> None:
    """An older agent's unsigned session (before the agent signed): its canonical JSON,
    of the SHA-256 listed, takes part in the chain and the certificate, and a warning
    names it; a byte changed in it fails by name."""
    made = certificate_bundle(3)
    plain = made.results[0]
    body = canonical.canonical(plain)
    made.members[f"sessions/{plain.result_id}.json"] = body

    def unsign(doc: dict[str, Any]) -> None:
        for s in doc["sessions"]:
            if s["result_id"] == plain.result_id:
                s.update(kid=None, status="unsigned", sha256=evidence.sha256_hex(body))
        doc["merkle_root"] = evidence.merkle_root(
            [evidence.leaf_data(s["result_id"], s["sha256"]) for s in doc["sessions"]])

    members = resign(made, unsign)
    report = verify_bundle(write(tmp_path, members))
    assert report.ok, report.first_failure
    assert "2 signed" in report.checks[5].detail and "1 unsigned" in report.checks[5].detail
    assert any(plain.result_id in w and "unsigned" in w for w in report.warnings)
    members[f"sessions/{plain.result_id}.json"] = body.replace(b'"agent_version":"test"',
                                                               b'"agent_version":"tost"')
    check(verify_bundle(write(tmp_path, members, "changed")), "sessions", plain.result_id,
          "SHA-256")


def test_random_damage_is_always_a_clean_failure(tmp_path: Path) -> None:
    """Bytes flipped at random in each member and in the zip: every outcome is a report
    (a failed check with a one-line reason), never an exception."""
    import random

    rng = random.Random(27)
    made = certificate_bundle(2)
    zipped = bundle_zip(made.members)
    for n in range(60):
        members = dict(made.members)
        name = rng.choice(sorted(members))
        data = bytearray(members[name])
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        members[name] = bytes(data)
        report = verify_bundle(write(tmp_path, members, f"d{n}"))
        if not report.ok:
            assert "\n" not in str(report.first_failure)
        damaged = bytearray(zipped)
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        (tmp_path / f"z{n}.zip").write_bytes(bytes(damaged))
        verify_bundle(tmp_path / f"z{n}.zip")


def test_derived_figures_are_recomputed_and_older_rules_are_warned_of(
        tmp_path: Path) -> None:
    """A current result whose stored rate its samples do not give fails by field; a
    result of an older schema version (summarised by older rules) is not recomputed,
    with a warning."""
    probe_key = new_key()
    results = sessions(2)
    bad = results[1]
    first = bad.transfers[0]
    off = dataclasses.replace(first, throughput_bps=(first.throughput_bps or 0) + 1)
    results[1] = dataclasses.replace(bad, transfers=(off, *bad.transfers[1:]))
    made = certificate_bundle(probe_key=probe_key, results=results)
    check(verify_bundle(write(tmp_path, made.members)), "session summaries",
          bad.result_id, "transfers[0].throughput_bps")
    old = [dataclasses.replace(r, schema_version=6) for r in results]
    made = certificate_bundle(probe_key=probe_key, results=old)
    report = verify_bundle(write(tmp_path, made.members, "old"))
    assert report.ok, report.first_failure
    assert any("schema version < 7" in w for w in report.warnings)



def test_a_certificate_of_one_ip_version_is_recomputed_over_its_sessions(
        tmp_path: Path) -> None:
    """A dual-stack line's IPv4 certificate lists the IPv6 sessions too (the chain runs
    through both), not counted; verify recomputes it over the IPv4 ones only."""
    results = [dataclasses.replace(r, address_family_requested="both",
                                   address_family="ipv4" if n % 2 else "ipv6")
               for n, r in enumerate(sessions(4))]
    made = certificate_bundle(results=results, family="ipv4")
    assert len(made.doc["certificate"]["sessions"]) == 2
    report = verify_bundle(write(tmp_path, made.members))
    assert report.ok, report.first_failure
    assert "recomputed from 2 sessions" in report.checks[-1].detail


# --- review fixes: anchoring, signed gaps, downgrades, sealed ends (H1-H3, H5, M1-M2, M7) --


def forged(made: Made) -> tuple[dict[str, bytes], Key, Key]:
    """The whole bundle made again by a forger: every session re-signed (and edited: a
    faster line) with a probe key of their own, bound in payload.keys, and the
    certificate signed with a collector key of their own. Nothing in it is false to
    itself."""
    forger_probe, forger_collector = new_key(), new_key()
    faster = [consistent(dataclasses.replace(r, agent_version="forged"))
              for r in made.results]
    again = certificate_bundle(probe_key=forger_probe, collector=forger_collector,
                               results=faster)
    return again.members, forger_probe, forger_collector


def test_a_fully_forged_bundle_is_never_verified_without_an_anchor(tmp_path: Path) -> None:
    """T1/H5: a forged bundle, re-signed throughout with fresh keys, passes every
    consistency check: without --trust the command exits 3 ("not anchored", naming the
    forger's key), never 0; with the real collector's key, 1 at the issuer key check."""
    made = certificate_bundle(2)
    members, _, forger = forged(made)
    path = write(tmp_path, members)
    runner = CliRunner()
    res = runner.invoke(collector_cli, ["verify", str(path)])
    assert res.exit_code == 3, res.output
    last = res.output.splitlines()[-1]
    assert last.startswith(f"consistent, but issuer key {forger.kid} is not anchored")
    assert "/.well-known/bbprobe-keys.json" in last and f"--trust {forger.kid}" in last
    assert "verified: every check passed" not in res.output
    res = runner.invoke(collector_cli, ["verify", str(path), "--trust", made.collector.kid])
    assert res.exit_code == 1, res.output
    assert f"FAIL issuer key: certificate.json is signed by key {forger.kid}" in res.output
    # The probe's command answers the same.
    from agent.app.cli import main as agent_cli
    res = runner.invoke(agent_cli, ["verify", str(path)])
    assert res.exit_code == 3, res.output
    res = runner.invoke(agent_cli, ["verify", str(path), "--trust", made.collector.kid])
    assert res.exit_code == 1, res.output


def test_only_a_collector_key_anchors_a_certificate(tmp_path: Path) -> None:
    """M7: of a collector's JWK Set, only the entry it marks as the collector's anchors a
    certificate: a probe's key (marked probe) or an unmarked entry does not, even when
    it signed the bundle; a trust file inside the bundle is refused (usage, 2)."""
    made = certificate_bundle(2)
    members, forger_probe, forger = forged(made)
    path = write(tmp_path, members)

    def jwk_set(entries: Sequence[tuple[Key, str | None]]) -> Path:
        keys = []
        for key, holder in entries:
            jwk: dict[str, Any] = {**jose.jwk_of(key.private.public_key()), "kid": key.kid}
            if holder is not None:
                jwk["bbprobe"] = {"holder": holder}
            keys.append(jwk)
        out = tmp_path / f"jwks-{len(list(tmp_path.iterdir()))}.json"
        out.write_text(json.dumps({"keys": keys}))
        return out

    runner = CliRunner()
    # The forger got their collector key listed as a probe's key of the real collector.
    as_probe = jwk_set([(made.collector, "collector"), (forger, "probe")])
    res = runner.invoke(collector_cli, ["verify", str(path), "--trust", str(as_probe)])
    assert res.exit_code == 1, res.output
    assert "trusted as a probe's key, not a collector's" in res.output
    unmarked = jwk_set([(forger, None)])
    res = runner.invoke(collector_cli, ["verify", str(path), "--trust", str(unmarked)])
    assert res.exit_code == 3, res.output  # anchors nothing: not anchored
    res = runner.invoke(collector_cli, ["verify", str(path), "--trust",
                                        str(path / "keys.json")])
    assert res.exit_code == 2 and "inside the bundle" in res.output, res.output
    res = runner.invoke(collector_cli, ["verify", str(path), "--trust",
                                        str(path / "keys" / f"{forger.kid}.pem")])
    assert res.exit_code == 2 and "inside the bundle" in res.output, res.output
    # The real collector's published set anchors the real bundle.
    real = write(tmp_path, made.members, "real")
    good = jwk_set([(made.collector, "collector"), (made.probe_key, "probe")])
    res = runner.invoke(collector_cli, ["verify", str(real), "--trust", str(good)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == "verified: every check passed"
    # A probe key anchors the probe's own session bundle, never a certificate.
    report = verify_bundle(real, [Anchor(made.collector.kid, "probe")])
    assert not report.ok and "not a collector's" in str(report.first_failure)
    assert forger_probe.kid != forger.kid


def test_a_session_bundle_is_anchored_by_the_probe_key(tmp_path: Path) -> None:
    """A session bundle's issuer is the probe's key: --trust names it (exit 0); a JWK
    Set entry marked probe anchors it too; without, exit 3."""
    key = new_key()
    path = write(tmp_path, session_members(key, sign_chain(key, sessions(1))))
    assert exit_code(verify_bundle(path)) == 3
    from collector.evidence.verify import report_lines
    last = report_lines(verify_bundle(path))[-1]
    assert f"issuer key {key.kid} is not anchored" in last and "bbprobe key show" in last
    assert exit_code(verify_bundle(path, [key.kid])) == 0
    assert exit_code(verify_bundle(path, [Anchor(key.kid, "probe")])) == 0
    assert exit_code(verify_bundle(path, [Anchor(key.kid, "collector")])) == 1


def _hole(probe_key: Key, **kw: Any) -> Made:
    """Four sessions of which session_seq 3 is absent."""
    results = sessions(4)
    jws = sign_chain(probe_key, results)
    return certificate_bundle(probe_key=probe_key, results=[results[i] for i in (0, 1, 3)],
                              jws=[jws[i] for i in (0, 1, 3)], **kw)


def test_a_hole_documented_only_by_an_unsigned_gap_record_fails(tmp_path: Path) -> None:
    """H1: a gap record inserted in the database (unsigned: no probe key) cannot explain
    a hole next to signed sessions."""
    probe_key = new_key()
    gap_id, member = gap_member((3, 3), None)
    made = _hole(probe_key, gaps=[(3, 3, "spool_full", gap_id)],
                 members={f"gaps/{gap_id}.json": member})
    check(verify_bundle(write(tmp_path, made.members)), "chain",
          "documented only by an unsigned gap record", "session_seq 3")
    # Listed with no record at all (gap_id null): the same.
    made = _hole(probe_key, gaps=[(3, 3, "spool_full", None)])
    check(verify_bundle(write(tmp_path, made.members, "null")), "chain",
          "documented only by an unsigned gap record")


def test_a_gap_record_signed_by_another_key_or_not_covering_fails(tmp_path: Path) -> None:
    """H1: a gap record signed by a key that is not the probe's, or one of the probe's
    whose dropped ranges do not hold the hole, or a gap file not listed: each fails by
    name."""
    probe_key, other = new_key(), new_key()
    gap_id, member = gap_member((3, 3), other)
    made = _hole(probe_key, gaps=[(3, 3, "spool_full", gap_id)],
                 members={f"gaps/{gap_id}.json": member})
    made.members[f"keys/{other.kid}.pem"] = jose.pem_of(other.private.public_key()).encode()
    check(verify_bundle(write(tmp_path, made.members)), "chain", gap_id, other.kid,
          "does not bind")
    gap_id, member = gap_member((7, 7), probe_key)
    made = _hole(probe_key, gaps=[(3, 3, "spool_full", gap_id)],
                 members={f"gaps/{gap_id}.json": member})
    check(verify_bundle(write(tmp_path, made.members, "b")), "chain", gap_id,
          "not among the dropped ranges")
    made = _hole(probe_key, members={f"gaps/{gap_id}.json": member})
    check(verify_bundle(write(tmp_path, made.members, "c")), "chain", f"gaps/{gap_id}.json",
          "does not list")
    # A signed gap record edited after signing: its signature fails.
    gap_id, member = gap_member((3, 3), probe_key)
    doc = json.loads(member)
    doc["payload"] = jose.b64url(jose.b64url_decode(doc["payload"], "p", 10**6)
                                 .replace(b"spool_full", b"disk_full"))
    made = _hole(probe_key, gaps=[(3, 3, "spool_full", gap_id)],
                 members={f"gaps/{gap_id}.json": P.dumps(doc)})
    check(verify_bundle(write(tmp_path, made.members, "d")), "chain", gap_id,
          "does not verify")


def test_a_recorded_deletion_is_documented_with_a_warning(tmp_path: Path) -> None:
    """H1: an operator's recorded deletion documents the hole (the collector attests it
    in its signed certificate), with a warning naming seq, result id and reason."""
    probe_key = new_key()
    made = _hole(probe_key, deletions=[(3, "d3", "customer asked")])
    report = verify_bundle(write(tmp_path, made.members))
    assert report.ok, report.first_failure
    assert any("session_seq 3 (result d3): customer asked" in w and "deleted" in w
               for w in report.warnings), report.warnings


def test_a_stripped_signature_fails_as_a_downgrade(tmp_path: Path) -> None:
    """H2: a signed session turned into an unsigned one (its body edited, its
    signature row deleted) after a signed one: the chain fails as a downgrade, even
    with the collector's own key trusted."""
    made = certificate_bundle(3)
    victim = made.results[2]
    edited = consistent(dataclasses.replace(victim, agent_version="edited"))
    body = canonical.canonical(edited)

    def unsign(doc: dict[str, Any]) -> None:
        for s in doc["sessions"]:
            if s["result_id"] == victim.result_id:
                s.update(kid=None, status="unsigned", sha256=evidence.sha256_hex(body))
        doc["merkle_root"] = evidence.merkle_root(
            [evidence.leaf_data(s["result_id"], s["sha256"]) for s in doc["sessions"]])

    made.members[f"sessions/{victim.result_id}.json"] = body
    report = verify_bundle(write(tmp_path, resign(made, unsign)), [made.collector.kid])
    check(report, "chain", victim.result_id, "downgrade", "session_seq 3")


def test_a_signed_session_without_session_seq_fails(tmp_path: Path) -> None:
    """M2: a certificate bundle's signed session must be numbered."""
    probe_key = new_key()
    results = sessions(2)
    results[1] = dataclasses.replace(results[1], session_seq=None)
    made = certificate_bundle(probe_key=probe_key, results=results)
    check(verify_bundle(write(tmp_path, made.members)), "sessions", results[1].result_id,
          "not numbered")


def test_the_chain_ends_are_sealed_by_boundary_sessions(tmp_path: Path) -> None:
    """H3: the boundary sessions link across the period's ends; sessions removed at the
    tail show against the chain head, at the head against the boundary before."""
    probe_key = new_key()
    results = sessions(6)
    jws = sign_chain(probe_key, results)
    middle = results[1:5]

    def made(boundary: Sequence[tuple[str, int]], listed: Sequence[int],
             head: tuple[int, str] | None = None) -> Made:
        return certificate_bundle(
            probe_key=probe_key, results=[results[i] for i in listed],
            jws=[jws[i] for i in listed],
            boundary=[(pos, results[i], jws[i]) for pos, i in boundary], head=head)

    tail = (6, results[5].result_id)
    good = made([("before", 0), ("after", 5)], range(1, 5), tail)
    report = verify_bundle(write(tmp_path, good.members))
    assert report.ok, report.first_failure
    assert "2 boundary sessions" in report.checks[5].detail
    assert len(middle) == 4
    # The last listed session (seq 5) removed: the boundary after it (seq 6) names it.
    cut = made([("before", 0), ("after", 5)], range(1, 4), tail)
    check(verify_bundle(write(tmp_path, cut.members, "tail")), "chain",
          results[5].result_id, "session_seq 5", "missing")
    # The tail removed together with what follows it: the chain head says more exists.
    cut = made([("before", 0)], range(1, 4), tail)
    check(verify_bundle(write(tmp_path, cut.members, "head")), "chain", "chain_head",
          "not sealed")
    cut = made([("before", 0)], range(1, 4), (2, results[1].result_id))
    check(verify_bundle(write(tmp_path, cut.members, "low")), "chain", "chain_head",
          "below the last listed")
    # The first listed session removed: the boundary before names what follows.
    cut = made([("before", 0), ("after", 5)], range(2, 5), tail)
    check(verify_bundle(write(tmp_path, cut.members, "first")), "chain",
          results[2].result_id, "session_seq 3", "missing")
    # A boundary session replaced by one the probe did not sign in that place.
    other = sign_chain(probe_key, [results[5]], prev="0" * 64)[0]
    swapped = certificate_bundle(
        probe_key=probe_key, results=middle, jws=jws[1:5], head=tail,
        boundary=[("before", results[0], jws[0]), ("after", results[5], other)])
    check(verify_bundle(write(tmp_path, swapped.members, "swap")), "chain",
          results[5].result_id, "mismatch")
    # A boundary file edited after signing fails its signature.
    bad = dict(good.members)
    doc = json.loads(bad[f"boundary/{results[0].result_id}.json"])
    doc["signature"] = jose.b64url(bytes(64))
    bad[f"boundary/{results[0].result_id}.json"] = P.dumps(doc)
    check(verify_bundle(write(tmp_path, bad, "sig")), "sessions", "boundary session",
          results[0].result_id, "does not verify")


def test_a_key_bound_without_a_rotation_statement_is_warned_of(tmp_path: Path) -> None:
    """H3: a second key pinned to the probe (not introduced by its first key's rotation
    statement) passes, with a warning naming it: nothing the probe signed vouches for
    it."""
    first, pinned = new_key(), new_key()
    keys = [{"kid": first.kid, "probe": PROBE, "source": "tofu",
             "bound_from": "2026-11-01T00:00:00.000000Z",
             "bound_until": "2026-11-20T00:00:00.000000Z", "revoked_at": None,
             "revoked_reason": None, "rotation": None},
            {"kid": pinned.kid, "probe": PROBE, "source": "pin",
             "bound_from": "2026-11-20T00:00:00.000000Z", "bound_until": None,
             "revoked_at": None, "revoked_reason": None, "rotation": None}]
    made = certificate_bundle(2, probe_key=pinned, keys=keys)
    made.members[f"keys/{first.kid}.pem"] = jose.pem_of(first.private.public_key()).encode()
    doc = json.loads(json.dumps(made.doc))
    finish(made.members, made.collector, doc, [made.collector.private.public_key(),
                                               pinned.private.public_key(),
                                               first.private.public_key()])
    report = verify_bundle(write(tmp_path, made.members))
    assert report.ok, report.first_failure
    assert any(pinned.kid in w and "pin" in w and "rotation statement" in w
               for w in report.warnings), report.warnings
    assert not any(first.kid in w for w in report.warnings)


def test_listed_counted_reason_and_period_are_recomputed(tmp_path: Path) -> None:
    """L4: a session's listed reason, and a session outside payload.period, fail even
    when the collector's key signs them."""
    made = certificate_bundle(2)
    rid = made.results[0].result_id

    def reason(doc: dict[str, Any]) -> None:
        doc["sessions"][0]["reason"] = "a made-up reason"

    check(verify_bundle(write(tmp_path, resign(made, reason))), "certificate figures",
          rid, "a made-up reason")

    def period(doc: dict[str, Any]) -> None:
        doc["period"] = {"since": "2026-11-21T10:30:00.000000Z", "until": None}

    check(verify_bundle(write(tmp_path, resign(made, period), "p")), "sessions", rid,
          "outside the period")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_verify_txt_scripts_leave_the_bundle_untouched(tmp_path: Path) -> None:
    """L3, H5: VERIFY.txt's OpenSSL steps work in a temporary directory (the bundle is
    unchanged after them, even read-only), and step 0 says to compare the issuer's key
    and pass --trust."""
    import re
    import subprocess

    from collector.evidence.instructions import SCRIPT_BEGIN, SCRIPT_END

    key = new_key()
    path = write(tmp_path, session_members(key, sign_chain(key, sessions(1))))
    text = (path / "VERIFY.txt").read_text()
    assert "bbprobe verify --trust KEY DIR" in text and "0. The issuer's key" in text
    assert key.kid in text.split("0. The issuer's key")[1].split("1. Everything")[0]
    before = sorted(p.name for p in path.rglob("*"))
    for p in [path, *path.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        scripts = re.findall(re.escape(SCRIPT_BEGIN) + r"\n(.*?)\n" + re.escape(SCRIPT_END),
                             text, re.S)
        assert len(scripts) == 2
        for script in scripts:
            run = subprocess.run(["sh", "-e", "-c", script], check=False, cwd=path,
                                 capture_output=True, text=True, timeout=60)
            assert "Signature Verified Successfully" in run.stdout, run.stderr
    finally:
        for p in [path, *path.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert sorted(p.name for p in path.rglob("*")) == before


def test_an_old_unsigned_row_in_another_json_form_verifies(tmp_path: Path) -> None:
    """M5 (verify side): an unsigned session stored by an old release (standard-library
    JSON, spaces and all) is checked by the SHA-256 of its canonical form, whichever
    form the file holds; a changed figure still fails."""
    made = certificate_bundle(2)
    plain = made.results[0]
    body = canonical.canonical(plain)
    old_form = json.dumps(json.loads(body), indent=1).encode()
    assert old_form != body

    def unsign(doc: dict[str, Any]) -> None:
        doc["sessions"][0].update(kid=None, status="unsigned",
                                  sha256=evidence.sha256_hex(body))
        doc["merkle_root"] = evidence.merkle_root(
            [evidence.leaf_data(s["result_id"], s["sha256"]) for s in doc["sessions"]])

    members = resign(made, unsign)
    members[f"sessions/{plain.result_id}.json"] = old_form
    report = verify_bundle(write(tmp_path, members))
    assert report.ok, report.first_failure
    members[f"sessions/{plain.result_id}.json"] = old_form.replace(b'"test"', b'"tost"', 1)
    check(verify_bundle(write(tmp_path, members, "x")), "sessions", plain.result_id,
          "SHA-256")


def test_unsigned_sessions_are_named_up_to_a_bound(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """L2: each unsigned session is a warning naming it, up to a bound; the rest are
    counted in one more warning."""
    from collector.evidence import chaincheck

    monkeypatch.setattr(chaincheck, "MAX_NAMED", 1)
    made = certificate_bundle(3)
    bodies = {r.result_id: canonical.canonical(r) for r in made.results[:2]}
    for rid, body in bodies.items():
        made.members[f"sessions/{rid}.json"] = body

    def unsign(doc: dict[str, Any]) -> None:
        for s in doc["sessions"]:
            if s["result_id"] in bodies:
                s.update(kid=None, status="unsigned",
                         sha256=evidence.sha256_hex(bodies[s["result_id"]]))
        doc["merkle_root"] = evidence.merkle_root(
            [evidence.leaf_data(s["result_id"], s["sha256"]) for s in doc["sessions"]])

    report = verify_bundle(write(tmp_path, resign(made, unsign)))
    assert report.ok, report.first_failure
    named = [w for w in report.warnings if "is unsigned" in w]
    assert len(named) == 1 and made.results[0].result_id in named[0]
    assert any(w.startswith("... and 1 more unsigned sessions") for w in report.warnings)
