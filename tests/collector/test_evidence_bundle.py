"""Evidence bundles (collector/evidence/bundle.py, payload.py): the members, the issuer's
JWS, each session exactly as its probe signed it, the Merkle root, the inputs that
reproduce the certificate, VERIFY.txt's OpenSSL steps run as written, the zip route
with its auth, the CLI, and the strict payload reader's refusals."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import canonical, evidence, jose
from agent.decoding import parse_result
from agent.schema import SessionResult
from agent.spec import CAMPAIGN_RULES
from collector import keys
from collector.cli.main import main
from collector.compliance import certify, targets
from collector.compliance.facts import of_result
from collector.config import CollectorConfig, ServerConfig, StorageConfig
from collector.evidence import bundle
from collector.evidence import payload as P
from collector.evidence.instructions import SCRIPT_BEGIN, SCRIPT_END
from collector.fleet.probes import register_probe
from collector.intake import ingest
from collector.lines import (
    ContractVersion,
    LineMetadata,
    contract_from_dict,
    contract_to_dict,
    line_from_dict,
    line_to_dict,
)
from collector.reports import service
from collector.reports.text import certificate_dict
from collector.server.testing import RunningCollector, running_collector
from collector.storage.model import NewResult, ResultSignature
from tests.factories import session
from tests.httpclient import request

CONTRACT = LineMetadata(operator="BT Italia", download_min_kbps=2200, upload_min_kbps=150,
                        max_delay_ms=70, max_loss_ratio=0.01)
RECEIVED = "2026-11-21T12:00:00.000000Z"


def _collector_key() -> keys.SigningKey:
    private = Ed25519PrivateKey.generate()
    return keys.SigningKey(private, jose.kid_of(private.public_key()), "test")


def _numbered(probe: str, n: int) -> SessionResult:
    hour = 8 + n
    return dataclasses.replace(
        session(probe, started_at=f"2026-11-21T{hour:02d}:00:00.000000Z"), session_seq=n)


def _store(store: Any, result: SessionResult, probe_key: Ed25519PrivateKey | None,
           prev: str | None) -> str:
    """Store ``result`` as ingestion would, signed by ``probe_key`` (chained to
    ``prev``) or unsigned; the SHA-256 the next one names."""
    payload = canonical.canonical(result)
    accepted = ingest.parse_body(payload)
    assert accepted.body.encode() == payload
    signature = None
    if probe_key is not None:
        jws = evidence.sign_result(probe_key, payload, prev)
        signature = ResultSignature(jose.kid_of(probe_key.public_key()), jws["protected"],
                                    jws["signature"], prev, None, "verified")
    outcome = store.insert_results([NewResult(
        result.result_id, result.probe_id, result.schema_version, accepted.started_at,
        accepted.ended_at, RECEIVED, accepted.body, accepted.body_sha256, accepted.facts,
        session_seq=result.session_seq, signature=signature)])
    assert outcome == ["stored"]
    return evidence.sha256_hex(payload)


def _line(store: Any) -> tuple[Ed25519PrivateKey, list[SessionResult]]:
    """Probe p1 with a bound key: sessions 1-3 signed and chained, 4 unsigned."""
    register_probe(store, "p1", CONTRACT)
    probe_key = Ed25519PrivateKey.generate()
    kid = jose.kid_of(probe_key.public_key())
    store.bind_probe_key("p1", kid, json.dumps(jose.jwk_of(probe_key.public_key())),
                         "tofu", "2026-11-20T00:00:00.000000Z", "192.0.2.1")
    results = [_numbered("p1", n) for n in range(1, 5)]
    prev = None
    for r in results[:3]:
        prev = _store(store, r, probe_key, prev)
    _store(store, results[3], None, None)
    return probe_key, results


def _members(store: Any, key: keys.SigningKey) -> dict[str, bytes]:
    return bundle.certificate_members(store, key, "p1", None, None, "96in24h",
                                      "Europe/Rome", None, targets.load(""))


def _payload(members: dict[str, bytes], issuer: Any) -> P.Payload:
    jws = json.loads(members["certificate.json"])
    jose.verify_flattened(jws, issuer)
    assert jose.header_of(jws)["typ"] == evidence.CERTIFICATE_TYP
    return P.read_payload(P.loads(jose.b64url_decode(jws["payload"], "payload", 10**8)))


def test_certificate_bundle_members_signatures_and_root(store: Any) -> None:
    probe_key, results = _line(store)
    key = _collector_key()
    members = _members(store, key)
    probe_kid = jose.kid_of(probe_key.public_key())
    assert set(members) == {
        "certificate.json", "keys.json", "VERIFY.txt", f"keys/{key.kid}.pem",
        f"keys/{probe_kid}.pem", *(f"sessions/{r.result_id}.json" for r in results)}
    p = _payload(members, key.public)
    assert (p.kind, p.issuer, p.probe) == ("certificate", P.Issuer(key.kid, "collector"),
                                           "p1")
    assert [s.result_id for s in p.sessions] == [r.result_id for r in results]
    assert [(s.status, s.kid, s.session_seq) for s in p.sessions] == [
        ("verified", probe_kid, 1), ("verified", probe_kid, 2), ("verified", probe_kid, 3),
        ("unsigned", None, 4)]
    # Each session file is exactly what the probe signed, and hashes as listed.
    for entry, result in zip(p.sessions, results, strict=True):
        data = members[f"sessions/{entry.result_id}.json"]
        if entry.kid is None:
            assert data == canonical.canonical(result)
            assert evidence.sha256_hex(data) == entry.sha256
            continue
        signed = evidence.open_result(json.loads(data))
        evidence.verify(signed, probe_key.public_key())
        assert signed.payload == canonical.canonical(result)
        assert signed.sha256 == entry.sha256
    assert p.merkle_root == evidence.merkle_root(
        [evidence.leaf_data(r.result_id, evidence.sha256_hex(canonical.canonical(r)))
         for r in results])
    # The chain inside the bundle holds: no break but the unsigned last session after
    # signed ones (a downgrade, agent/evidence.py), which a verifier must see.
    links = []
    for entry in p.sessions:
        doc = json.loads(members[f"sessions/{entry.result_id}.json"])
        prev = evidence.open_result(doc).prev if evidence.is_jws(doc) else None
        links.append(evidence.Link(entry.session_seq or 0, entry.result_id, entry.sha256,
                                   prev, entry.kid is not None))
    assert [(b.kind, b.seq) for b in evidence.chain_breaks(links)] == [("downgrade", 4)]
    # Sealed ends: nothing stored before or after the period; the head is the last.
    assert (p.boundary, p.chain_head) == ((), P.ChainHead(4, results[3].result_id))
    # keys.json: a JWK Set of both keys, each matching its PEM.
    jwks = json.loads(members["keys.json"])["keys"]
    assert {k["kid"] for k in jwks} == {key.kid, probe_kid}
    for jwk in jwks:
        pem = members[f"keys/{jwk['kid']}.pem"].decode()
        assert jose.kid_of(jose.public_key_of_pem(pem)) == jwk["kid"]
        assert (jwk["use"], jwk["alg"]) == ("sig", "EdDSA")
    assert [(k.kid, k.probe, k.source) for k in p.keys] == [(probe_kid, "p1", "tofu")]


def test_the_payload_reproduces_the_certificate(store: Any) -> None:
    """The signed certificate is service.certificate's, and certify over the sessions'
    own payloads with the payload's inputs gives it again (what verify does)."""
    _line(store)
    key = _collector_key()
    members = _members(store, key)
    p = _payload(members, key.public)
    expected = certificate_dict(service.certificate(store, "p1", None, None, "96in24h",
                                                    "Europe/Rome"))
    assert p.certificate == json.loads(P.dumps(expected))
    assert p.inputs is not None
    assert p.inputs.line == CONTRACT
    assert [c.line for c in p.inputs.contracts] == [CONTRACT]
    facts = []
    for entry in p.sessions:
        doc = json.loads(members[f"sessions/{entry.result_id}.json"])
        raw = evidence.open_result(doc).payload if evidence.is_jws(doc) else \
            json.dumps(doc).encode()
        result = parse_result(json.loads(raw))
        facts.append(of_result(result, ingest.parse_body(raw).started_at))
    i = p.inputs
    again = certify.certify(p.probe, i.line, facts, CAMPAIGN_RULES[i.rule], i.timezone,
                            i.delay_basis, i.suppressed, i.family, i.contracts)
    assert json.loads(P.dumps(certificate_dict(again))) == p.certificate
    assert p.targets_sha256 == P.targets_sha256(P.targets_data(targets.load("")))


def _run_scripts(directory: Path) -> list[str]:
    text = (directory / "VERIFY.txt").read_text()
    scripts = re.findall(re.escape(SCRIPT_BEGIN) + r"\n(.*?)\n" + re.escape(SCRIPT_END),
                         text, re.S)
    outputs = []
    for script in scripts:
        done = subprocess.run(["sh", "-c", script], check=False, cwd=directory, capture_output=True,
                              text=True, timeout=30)
        outputs.append(done.stdout + done.stderr)
    return outputs


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_checks_signatures_as_verify_txt_says(store: Any, tmp_path: Path) -> None:
    _, results = _line(store)
    key = _collector_key()
    out = bundle.write_members(_members(store, key), tmp_path / "bundle")
    certificate_out, session_out = _run_scripts(out)
    assert "Signature Verified Successfully" in certificate_out
    assert "Signature Verified Successfully" in session_out
    # The session's payload hashes to the SHA-256 the certificate lists.
    listed = evidence.sha256_hex(canonical.canonical(results[0]))
    assert listed in session_out
    # A session changed after signing: OpenSSL says so.
    path = out / f"sessions/{results[0].result_id}.json"
    doc = json.loads(path.read_text())
    doc["payload"] = jose.b64url(canonical.canonical(results[0]).replace(b'"p1"', b'"p2"'))
    path.write_text(json.dumps(doc))
    assert "Signature Verified Successfully" not in _run_scripts(out)[1]


def test_session_bundle_is_signed_by_the_probe(tmp_path: Path) -> None:
    probe_key = _collector_key()  # any Ed25519 key with its kid: the probe's here
    jws_list = []
    prev = None
    results = [_numbered("p1", n) for n in (2, 1)]
    for r in results:
        payload = canonical.canonical(r)
        jws_list.append(evidence.sign_result(probe_key.private, payload, prev))
        prev = evidence.sha256_hex(payload)
    out = bundle.write_session_bundle(tmp_path / "ev", probe_key, jws_list)
    members = {str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*")
               if f.is_file()}
    p = _payload(members, probe_key.public)
    assert (p.kind, p.issuer.role, p.inputs, p.certificate) == ("session", "probe", None,
                                                               None)
    # Ordered by start: session_seq 1 first.
    assert [s.session_seq for s in p.sessions] == [1, 2]
    assert p.summary is not None
    assert p.summary[results[0].result_id] == dataclasses.asdict(results[0].summary)
    assert set(members) == {"certificate.json", "keys.json", "VERIFY.txt",
                            f"keys/{probe_key.kid}.pem",
                            *(f"sessions/{r.result_id}.json" for r in results)}
    # Not into a directory that holds something; not a session another key signed.
    with pytest.raises(bundle.BundleError, match="not an empty directory"):
        bundle.write_session_bundle(out, probe_key, jws_list)
    with pytest.raises(bundle.BundleError, match="session 1: signed by key"):
        bundle.session_members(_collector_key(), jws_list)


def test_zip_route_with_auth(tmp_path: Path) -> None:
    auth = dataclasses.replace(CollectorConfig(), server=dataclasses.replace(
        ServerConfig(), query_auth=True))
    with running_collector(tmp_path / "c", auth) as collector:
        _zip_route(collector)


def _zip_route(collector: RunningCollector) -> None:
    store = collector.open_store()
    try:
        _, results = _line(store)
    finally:
        store.close()
    token = collector.add_token("alice")
    url = collector.url + "/api/v1/probes/p1/certificate/evidence.zip?rule=96in24h"
    status, _, _ = request("GET", url)
    assert status == 401
    probe_token = collector.add_probe("p2")
    status, _, _ = request("GET", url, headers={"Authorization": f"Bearer {probe_token}"})
    assert status == 403
    status, body, headers = request("GET", url, headers={"Authorization": f"Bearer {token}"},
                                    raw=True)
    assert status == 200, body
    assert headers["content-type"].startswith("application/zip")
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        members = {name: z.read(name) for name in z.namelist()}
    assert {f"sessions/{r.result_id}.json" for r in results} <= set(members)
    jwks = json.loads(members["keys.json"])["keys"]
    issuer = json.loads(members["certificate.json"])
    kid = jose.header_of(issuer)["kid"]
    published = request("GET", collector.url + "/.well-known/bbprobe-keys.json")[1]
    assert kid in {k["kid"] for k in published["keys"]}
    p = _payload(members, jose.public_key_of_jwk(next(k for k in jwks if k["kid"] == kid)))
    assert len(p.sessions) == 4
    status, doc, _ = request("GET", collector.url + "/api/v1/probes/nobody/certificate/"
                             "evidence.zip", headers={"Authorization": f"Bearer {token}"})
    assert status == 404 and "nobody" in doc["error"]
    # The HTML certificate links to it and names the key.
    status, page, _ = request("GET", collector.url + "/api/v1/certificate?probe=p1&"
                              "format=html&rule=96in24h",
                              headers={"Authorization": f"Bearer {token}"}, raw=True)
    assert status == 200
    assert b"probes/p1/certificate/evidence.zip?rule=96in24h" in page
    assert kid.encode() in page


def test_cli_certify_writes_the_bundle(collector: RunningCollector, tmp_path: Path) -> None:
    store = collector.open_store()
    try:
        _line(store)
    finally:
        store.close()
    out = tmp_path / "ev"
    runner = CliRunner()
    done = runner.invoke(main, ["--db", str(collector.db_path), "certify", "--probe", "p1",
                                "--format", "json", "--evidence", str(out)])
    assert done.exit_code == 0, done.output
    assert (out / "certificate.json").is_file() and (out / "VERIFY.txt").is_file()
    assert len(list((out / "sessions").iterdir())) == 4
    again = runner.invoke(main, ["--db", str(collector.db_path), "certify", "--probe", "p1",
                                 "--evidence", str(out)])
    assert again.exit_code != 0
    assert "not an empty directory" in again.output
    assert "Traceback" not in again.output
    # The standalone HTML page names the key that signed the bundle, as the served one.
    kid = jose.header_of(json.loads((out / "certificate.json").read_text()))["kid"]
    page = tmp_path / "page.html"
    done = runner.invoke(main, ["--db", str(collector.db_path), "certify", "--probe", "p1",
                                "--format", "html", "-o", str(page)])
    assert done.exit_code == 0, done.output
    assert f"thumbprint (RFC 7638) <code>{kid}</code>" in page.read_text()


def test_cli_html_page_without_an_evidence_key(tmp_path: Path) -> None:
    """No evidence key in the state directory: the page names none, and makes none."""
    from collector.storage.sql.backends import open_store

    db = tmp_path / "c.sqlite3"
    store = open_store(StorageConfig(path=str(db)))
    try:
        _line(store)
    finally:
        store.close()
    page = tmp_path / "page.html"
    done = CliRunner().invoke(main, ["--db", str(db), "certify", "--probe", "p1",
                                     "--format", "html", "-o", str(page)])
    assert done.exit_code == 0, done.output
    text = page.read_text()
    assert "evidence bundle" in text and "thumbprint" not in text
    assert not (tmp_path / keys.EVIDENCE_KEY_FILE).exists()


# --- the strict reader ---------------------------------------------------------------------


def _good() -> dict[str, Any]:
    p = P.Payload(kind="certificate", issued_at="2026-01-01T00:00:00Z",
                  issuer=P.Issuer("a" * 43, "collector"), software_version="0.1.0",
                  probe="p1", period=P.Period(None, None),
                  sessions=(P.SessionEntry("id-1", "f" * 64, 3, None, "unsigned", True,
                                           None),),
                  merkle_root="0" * 64, chain=P.Chain(((1, 2, "gap", "g-1"),), ()),
                  keys=(), boundary=(P.BoundaryEntry("id-0", "e" * 64, 2, "before"),),
                  chain_head=P.ChainHead(9, "id-9"),
                  inputs=P.Inputs(CONTRACT, "96in24h", "Europe/Rome", "rtt", (), None, ()),
                  targets={"t": [1]}, targets_sha256=P.targets_sha256({"t": [1]}),
                  certificate={"verdict": "incomplete"})
    doc = P.to_dict(p)
    assert P.read_payload(doc) == p
    return doc


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["sessions"][0].update(session_seq="3"), r"payload\.sessions\[0\]\.session_seq"),
    (lambda d: d["sessions"][0].update(sha256="F" * 64), r"payload\.sessions\[0\]\.sha256"),
    (lambda d: d["sessions"][0].update(result_id="../x"), r"payload\.sessions\[0\]\.result_id"),
    (lambda d: d["sessions"][0].update(session_seq=2**60), r"session_seq: .* outside"),
    (lambda d: d["issuer"].update(role="anyone"), r"payload\.issuer\.role"),
    (lambda d: d.update(extra=1), r"payload\.extra: not a field"),
    (lambda d: d.pop("merkle_root"), r"payload\.merkle_root: missing"),
    (lambda d: d["targets"].update(t=[2]), r"payload\.targets_sha256"),
    (lambda d: d["inputs"]["line"].update(max_delay_ms=1e300), r"inputs\.line\.max_delay_ms"),
    (lambda d: d["chain"]["gaps"].append([5, 4, "x", None]), r"chain\.gaps\[1\]\[1\]"),
    (lambda d: d["chain"]["gaps"].append([5, 6, "x"]), r"chain\.gaps\[1\]: expected 4"),
    (lambda d: d["chain"]["gaps"][0].__setitem__(3, "../g"), r"chain\.gaps\[0\]\[3\]"),
    (lambda d: d.pop("boundary"), r"payload\.boundary: missing"),
    (lambda d: d.pop("chain_head"), r"payload\.chain_head: missing"),
    (lambda d: d["boundary"][0].update(position="inside"), r"boundary\[0\]\.position"),
    (lambda d: d["boundary"][0].update(session_seq=None), r"boundary\[0\]\.session_seq"),
    (lambda d: d["boundary"][0].update(result_id="id-1"), r"id-1 is a listed session"),
    (lambda d: d["boundary"].append(dict(d["boundary"][0], result_id="id-x")),
     r"payload\.boundary: two sessions before"),
    (lambda d: d["boundary"].extend([d["boundary"][0]] * 2), r"3 items, more than 2"),
    (lambda d: d["chain_head"].update(session_seq=0), r"chain_head\.session_seq"),
    (lambda d: d.update(chain_head=[9]), r"payload\.chain_head: expected an object"),
    (lambda d: d["certificate"].update(x=float("inf")), r"payload\.certificate\.x"),
    (lambda d: d.update(summary={}), r"payload\.summary: not part of a certificate"),
    (lambda d: d.update(sessions=[d["sessions"][0]] * 2), r"listed twice"),
])
def test_read_payload_names_the_field(change: Any, message: str) -> None:
    doc = _good()
    change(doc)
    with pytest.raises(P.PayloadError, match=message):
        P.read_payload(doc)


def test_loads_refuses_huge_numbers_and_nan() -> None:
    with pytest.raises(P.PayloadError, match="a number of 400 digits"):
        P.loads(b'{"a": ' + b"9" * 400 + b"}")
    with pytest.raises(P.PayloadError, match="NaN is not JSON"):
        P.loads(b'{"a": NaN}')
    with pytest.raises(P.PayloadError, match="not JSON"):
        P.loads(b'{"a": ')


def test_line_and_contract_round_trip_strictly() -> None:
    version = ContractVersion(2, "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "ops",
                              CONTRACT, retroactive=True)
    data = json.loads(json.dumps(contract_to_dict(version)))
    assert contract_from_dict(data) == version
    assert line_from_dict(line_to_dict(CONTRACT)) == CONTRACT
    with pytest.raises(ValueError, match=r"line\.offer: expected text"):
        line_from_dict({**line_to_dict(CONTRACT), "offer": 5})
    with pytest.raises(ValueError, match=r"contract\.valid_from: not a UTC time"):
        contract_from_dict({**data, "valid_from": "yesterday"})
    with pytest.raises(ValueError, match=r"line\.colour: not a line field"):
        line_from_dict({**line_to_dict(CONTRACT), "colour": "red"})


def test_a_family_certificate_lists_the_whole_chain(store: Any) -> None:
    """A dual-stack line's certificate is of one IP version, but its bundle lists every
    session of the period (the probe's chain runs through both), the other family's as
    not counted; certify over the family's sessions gives the signed certificate."""
    register_probe(store, "p1", CONTRACT)
    probe_key = Ed25519PrivateKey.generate()
    store.bind_probe_key("p1", jose.kid_of(probe_key.public_key()),
                         json.dumps(jose.jwk_of(probe_key.public_key())), "tofu",
                         "2026-11-20T00:00:00.000000Z", "192.0.2.1")
    prev = None
    results = []
    for n in range(1, 5):
        r = dataclasses.replace(_numbered("p1", n), address_family_requested="both",
                                address_family="ipv4" if n % 2 else "ipv6")
        results.append(r)
        prev = _store(store, r, probe_key, prev)
    key = _collector_key()
    members = bundle.certificate_members(store, key, "p1", None, None, "96in24h",
                                         "Europe/Rome", "ipv4", targets.load(""))
    p = _payload(members, key.public)
    assert [s.session_seq for s in p.sessions] == [1, 2, 3, 4]
    assert [s.reason for s in p.sessions if s.session_seq in (2, 4)] == [
        "not of this certificate's IP version (ipv4)"] * 2
    expected = certificate_dict(service.certificate(store, "p1", None, None, "96in24h",
                                                    "Europe/Rome", "ipv4"))
    assert p.certificate == json.loads(P.dumps(expected))
    assert p.inputs is not None and p.inputs.family == "ipv4"
    facts = [of_result(r, ingest.parse_body(canonical.canonical(r)).started_at)
             for r in results if r.address_family == p.inputs.family]
    again = certify.certify(p.probe, p.inputs.line, facts, CAMPAIGN_RULES[p.inputs.rule],
                            p.inputs.timezone, p.inputs.delay_basis, p.inputs.suppressed,
                            p.inputs.family, p.inputs.contracts)
    assert json.loads(P.dumps(certificate_dict(again))) == p.certificate


def test_the_chain_documents_gaps_and_deletions(store: Any) -> None:
    """A session an operator deleted and sessions a probe dropped (its gap record) are
    named in the payload's chain, so a verifier sees those holes explained."""
    _, results = _line(store)
    deleted = results[1]
    assert store.delete_result(deleted.result_id, "customer's request", RECEIVED, "ops")
    outcome = store.insert_gap("gap-1", "p1", RECEIVED, "spool full", 2,
                               "2026-11-21T13:00:00.000000Z", "2026-11-21T14:00:00.000000Z",
                               "e" * 64, [(5, 6)])
    assert outcome == "stored"
    later = _numbered("p1", 7)
    _store(store, later, None, None)
    key = _collector_key()
    p = _payload(_members(store, key), key.public)
    assert [s.session_seq for s in p.sessions] == [1, 3, 4, 7]
    assert p.chain.deletions == ((2, deleted.result_id, "customer's request"),)
    assert p.chain.gaps == ((5, 6, "dropped by the probe: spool full", "gap-1"),)


def test_gap_reasons_are_each_gap_records_own(store: Any) -> None:
    """On each backend: every range of every gap record with that record's reason,
    by probe; deletions are not gap records."""
    _, results = _line(store)
    register_probe(store, "p2", CONTRACT)
    assert store.delete_result(results[1].result_id, "poisoned", RECEIVED, "ops")
    for gap_id, probe, reason, ranges in (("g1", "p1", "spool_full", [(5, 6), (9, 9)]),
                                          ("g2", "p1", "disk_full", [(8, 8)]),
                                          ("g3", "p2", "spool_full", [(1, 1)])):
        assert store.insert_gap(gap_id, probe, RECEIVED, reason, 1,
                                "2026-11-21T13:00:00.000000Z",
                                "2026-11-21T14:00:00.000000Z", gap_id[-1] * 64,
                                ranges) == "stored"
    assert store.gap_seq_reasons(["p1"]) == {
        "p1": [(5, 6, "spool_full"), (9, 9, "spool_full"), (8, 8, "disk_full")]}
    assert store.gap_seq_reasons(None)["p2"] == [(1, 1, "spool_full")]
    key = _collector_key()
    for n in (7, 10):
        _store(store, _numbered("p1", n), None, None)
    p = _payload(_members(store, key), key.public)
    assert p.chain.gaps == ((5, 6, "dropped by the probe: spool_full", "g1"),
                            (8, 8, "dropped by the probe: disk_full", "g2"),
                            (9, 9, "dropped by the probe: spool_full", "g1"))


def test_a_swapped_in_sessions_key_is_in_the_bundle_not_bound(store: Any,
                                                               tmp_path: Path) -> None:
    """A session signed by another probe's key stored under p1: the bundle carries that
    key (PEM and JWK Set), payload.keys does not bind it to p1, and the verifier names
    it exactly."""
    from collector.evidence.verify import verify_bundle

    probe_key, _ = _line(store)
    register_probe(store, "p2", CONTRACT)
    other = Ed25519PrivateKey.generate()
    other_kid = jose.kid_of(other.public_key())
    store.bind_probe_key("p2", other_kid, json.dumps(jose.jwk_of(other.public_key())),
                         "tofu", "2026-11-20T00:00:00.000000Z", "192.0.2.2")
    _store(store, _numbered("p1", 5), other, None)
    key = _collector_key()
    members = _members(store, key)
    assert f"keys/{other_kid}.pem" in members
    assert other_kid in {k["kid"] for k in json.loads(members["keys.json"])["keys"]}
    p = _payload(members, key.public)
    assert [k.kid for k in p.keys] == [jose.kid_of(probe_key.public_key())]
    assert [s.kid for s in p.sessions if s.session_seq == 5] == [other_kid]
    report = verify_bundle(bundle.write_members(members, tmp_path / "b"))
    assert not report.ok
    assert report.first_failure is not None and other_kid in report.first_failure
    assert "does not bind" in report.first_failure

