"""Evidence bundles after the review of issue 27 (collector/evidence/bundle.py,
payload.py, the zip route): the chain's ends sealed by the sessions next to the listed
ones and the probe's chain head (H3), gap records carried as the probe signed them (H1),
old unsigned rows carried in canonical form (M5), and the zip route's bound on builds
at once, across the collector's processes (L7)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import canonical, evidence, jose
from agent.schema import SessionResult
from collector.compliance import targets
from collector.config import CollectorConfig
from collector.evidence import bundle
from collector.evidence import payload as P
from collector.fleet.probes import register_probe
from collector.intake import ingest
from collector.reports import service
from collector.reports.text import certificate_dict
from collector.server.testing import running_collector
from collector.storage.model import NewResult
from tests.collector.test_evidence_bundle import (
    CONTRACT,
    RECEIVED,
    _collector_key,
    _line,
    _members,
    _numbered,
    _payload,
    _store,
)
from tests.httpclient import request


def _chain_of(store: Any, n: int) -> tuple[Ed25519PrivateKey, list[SessionResult]]:
    """Probe p1 with a bound key and sessions 1..n, each signed and chained."""
    register_probe(store, "p1", CONTRACT)
    probe_key = Ed25519PrivateKey.generate()
    store.bind_probe_key("p1", jose.kid_of(probe_key.public_key()),
                         json.dumps(jose.jwk_of(probe_key.public_key())), "tofu",
                         "2026-11-20T00:00:00.000000Z", "192.0.2.1")
    results = [_numbered("p1", k) for k in range(1, n + 1)]
    prev = None
    for r in results:
        prev = _store(store, r, probe_key, prev)
    return probe_key, results


def test_the_chain_ends_are_sealed(store: Any) -> None:
    """A period in the middle of a campaign: the bundle carries the sessions just before
    and just after it (boundary/), signed as stored, linking to the first and from the
    last listed ones, and the probe's chain head; none of them counted."""
    probe_key, results = _chain_of(store, 6)
    key = _collector_key()
    # Sessions 3 and 4 start at 11:00 and 12:00.
    members = bundle.certificate_members(store, key, "p1", "2026-11-21T11:00:00Z",
                                         "2026-11-21T13:00:00Z", "96in24h", "Europe/Rome",
                                         None, targets.load(""))
    p = _payload(members, key.public)
    assert [s.session_seq for s in p.sessions] == [3, 4]
    before, after = results[1], results[4]
    assert p.boundary == (
        P.BoundaryEntry(before.result_id, evidence.sha256_hex(canonical.canonical(before)),
                        2, "before"),
        P.BoundaryEntry(after.result_id, evidence.sha256_hex(canonical.canonical(after)),
                        5, "after"))
    assert p.chain_head == P.ChainHead(6, results[5].result_id)
    signed = {}
    for b in p.boundary:
        doc = json.loads(members[f"boundary/{b.result_id}.json"])
        signed[b.position] = evidence.open_result(doc)
        evidence.verify(signed[b.position], probe_key.public_key())
        assert signed[b.position].sha256 == b.sha256
    first = evidence.open_result(json.loads(members[f"sessions/{results[2].result_id}.json"]))
    assert first.prev == p.boundary[0].sha256  # before -> first listed
    assert signed["after"].prev == p.sessions[-1].sha256  # last listed -> after
    # Not counted, not in the Merkle root, not session files.
    assert f"sessions/{before.result_id}.json" not in members
    assert p.merkle_root == evidence.merkle_root(
        [evidence.leaf_data(s.result_id, s.sha256) for s in p.sessions])
    expected = service.certificate(store, "p1", "2026-11-21T11:00:00Z",
                                   "2026-11-21T13:00:00Z", "96in24h", "Europe/Rome")
    assert [s.result_id for s in expected.sessions] == [r.result_id for r in results[2:4]]
    assert p.certificate == json.loads(P.dumps(certificate_dict(expected)))


def test_a_hole_next_to_an_end_is_documented_with_its_gap_record(store: Any) -> None:
    """Sessions 2..3 dropped by the probe, before the period: the gap between the
    boundary (1) and the first listed (4) is in chain.gaps, with its signed record."""
    from agent.canonical import canonical_gap
    from agent.schema import GapRecord
    from collector.storage.model import GapSignature

    register_probe(store, "p1", CONTRACT)
    probe_key = Ed25519PrivateKey.generate()
    kid = jose.kid_of(probe_key.public_key())
    store.bind_probe_key("p1", kid, json.dumps(jose.jwk_of(probe_key.public_key())),
                         "tofu", "2026-11-20T00:00:00.000000Z", "192.0.2.1")
    prev = None
    for n in (1, 4, 5):
        prev = _store(store, _numbered("p1", n), probe_key, prev)
    signed_gap = GapRecord(4, "0b7e7c4e-58a3-4b8e-9f1a-1d2c3b4a5f60", "p1",
                           "2026-11-21T12:30:00.000000Z", "spool_full", 2,
                           "2026-11-21T10:00:00.000000Z", "2026-11-21T11:00:00.000000Z",
                           ((2, 3),))
    doc = canonical_gap(signed_gap)
    jws = evidence.sign_gap(probe_key, doc)
    assert store.insert_gap(signed_gap.gap_id, "p1", RECEIVED, "spool_full", 2,
                            signed_gap.first_started_at, signed_gap.last_started_at,
                            evidence.sha256_hex(doc), [(2, 3)],
                            GapSignature(doc, signed_gap.recorded_at, "verified", kid,
                                         jws["protected"], jws["signature"])) == "stored"
    # An unsigned one far away (seq 40): outside the bundle's span, not carried.
    assert store.insert_gap("g-far", "p1", RECEIVED, "too_old", 1,
                            "2026-11-21T20:00:00.000000Z", "2026-11-21T20:00:00.000000Z",
                            "d" * 64, [(40, 40)]) == "stored"
    key = _collector_key()
    members = bundle.certificate_members(store, key, "p1", "2026-11-21T12:00:00Z", None,
                                         "96in24h", "Europe/Rome", None, targets.load(""))
    p = _payload(members, key.public)
    assert [s.session_seq for s in p.sessions] == [4, 5]
    assert [(b.session_seq, b.position) for b in p.boundary] == [(1, "before")]
    assert p.chain.gaps == ((2, 3, "dropped by the probe: spool_full", signed_gap.gap_id),)
    carried = json.loads(members[f"gaps/{signed_gap.gap_id}.json"])
    assert carried == jws  # exactly as the probe signed it
    assert jose.verify_flattened(carried, probe_key.public_key()) == doc
    assert "gaps/g-far.json" not in members


def test_an_unsigned_gap_record_travels_as_its_canonical_json(store: Any) -> None:
    _line(store)
    assert store.insert_gap("gap-u", "p1", RECEIVED, "disk_full", 1,
                            "2026-11-21T13:00:00.000000Z", "2026-11-21T13:00:00.000000Z",
                            "e" * 64, [(5, 5)]) == "stored"
    _store(store, _numbered("p1", 6), None, None)
    key = _collector_key()
    members = _members(store, key)
    p = _payload(members, key.public)
    assert p.chain.gaps == ((5, 5, "dropped by the probe: disk_full", "gap-u"),)
    (record,) = [g for g in store.gap_evidence("p1") if g.gap_id == "gap-u"]
    assert record.jws is None
    assert members["gaps/gap-u.json"] == record.document
    assert json.loads(record.document)["dropped_seq_ranges"] == [[5, 5]]


def test_an_old_unsigned_row_is_carried_in_canonical_form(store: Any) -> None:
    """Review M5: a row an older release stored as standard-library JSON text (another
    serialisation of the same result): the bundle carries the canonical bytes and lists
    their SHA-256, the one a verifier computes from what it parses."""
    register_probe(store, "p1", CONTRACT)
    result = _numbered("p1", 1)
    canonical_bytes = canonical.canonical(result)
    old_text = json.dumps(json.loads(canonical_bytes))  # ", " and ": " separators
    assert old_text.encode() != canonical_bytes
    accepted = ingest.parse_body(canonical_bytes)
    assert store.insert_results([NewResult(
        result.result_id, "p1", result.schema_version, accepted.started_at,
        accepted.ended_at, RECEIVED, old_text, evidence.sha256_hex(old_text.encode()),
        accepted.facts, session_seq=1)]) == ["stored"]
    assert store.result(result.result_id).body == old_text  # kept as the old text
    key = _collector_key()
    members = _members(store, key)
    p = _payload(members, key.public)
    (entry,) = p.sessions
    assert members[f"sessions/{result.result_id}.json"] == canonical_bytes
    assert entry.sha256 == evidence.sha256_hex(canonical_bytes)
    assert (entry.status, entry.kid) == ("unsigned", None)


def test_a_session_bundle_has_no_chain_ends() -> None:
    doc = P.to_dict(P.Payload(
        kind="session", issued_at="2026-01-01T00:00:00Z",
        issuer=P.Issuer("a" * 43, "probe"), software_version="0.1.0", probe="p1",
        period=P.Period(None, None),
        sessions=(P.SessionEntry("id-1", "f" * 64, 3, "a" * 43, "verified", True, None),),
        merkle_root="0" * 64, chain=P.Chain(), keys=(), summary={"id-1": {"rtt": 1.0}}))
    assert (doc["boundary"], doc["chain_head"]) == ([], None)
    assert P.read_payload(doc).kind == "session"
    with pytest.raises(P.PayloadError, match=r"payload\.chain_head: not part of a session"):
        P.read_payload({**doc, "chain_head": {"session_seq": 3, "result_id": "id-1"}})
    with pytest.raises(P.PayloadError, match=r"payload\.boundary: not part of a session"):
        P.read_payload({**doc, "boundary": [{"result_id": "id-0", "sha256": "e" * 64,
                                             "session_seq": 2, "position": "before"}]})


def test_zip_route_builds_two_bundles_at_most(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Review L7: a third bundle asked while two are being built is a 503 with
    Retry-After, at once; once they are done, it is built."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from collector.web import analyst_routes

    started, release = threading.Semaphore(0), threading.Event()
    real = targets.load

    def slow(path: str) -> Any:
        # The route reads the targets table first, off the loop, once admitted.
        started.release()
        assert release.wait(30)
        return real(path)

    with running_collector(tmp_path / "c", CollectorConfig()) as collector:
        store = collector.open_store()
        try:
            _line(store)
        finally:
            store.close()
        token = collector.add_token("alice")
        url = collector.url + "/api/v1/probes/p1/certificate/evidence.zip?rule=96in24h"
        headers = {"Authorization": f"Bearer {token}"}
        monkeypatch.setattr(analyst_routes.targets_mod, "load", slow)
        with ThreadPoolExecutor(2) as pool:
            first = [pool.submit(request, "GET", url, None, headers, raw=True)
                     for _ in range(analyst_routes.EVIDENCE_BUILDS_MAX)]
            for _ in first:
                assert started.acquire(timeout=30)  # both admitted, both under way
            status, body, got = request("GET", url, None, headers)
            assert status == 503, body
            assert got["retry-after"] == str(analyst_routes.EVIDENCE_RETRY_AFTER_S)
            assert "as many as this collector builds at once" in body["error"]
            release.set()
            assert [f.result()[0] for f in first] == [200, 200]
        monkeypatch.setattr(analyst_routes.targets_mod, "load", real)
        assert request("GET", url, None, headers, raw=True)[0] == 200


def test_zip_route_slots_are_shared_by_the_collectors_processes(tmp_path: Path) -> None:
    """The bound holds across `serve --workers`: builds in other processes hold the
    slot files' locks (held here by the test, as another process would), so this
    process builds none until one is freed."""
    import fcntl
    import os

    from collector.web import analyst_routes

    with running_collector(tmp_path / "c", CollectorConfig()) as collector:
        store = collector.open_store()
        try:
            _line(store)
        finally:
            store.close()
        url = collector.url + "/api/v1/probes/p1/certificate/evidence.zip?rule=96in24h"
        headers = {"Authorization": f"Bearer {collector.add_token('alice')}"}
        held = []
        for n in range(analyst_routes.EVIDENCE_BUILDS_MAX):
            path = collector.db_path.parent / analyst_routes.BUILD_SLOT_FILE.format(n=n)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(fd)
        try:
            status, body, got = request("GET", url, None, headers)
            assert (status, got["retry-after"]) == (503, "30"), body
            os.close(held.pop())  # one build elsewhere is done
            assert request("GET", url, None, headers, raw=True)[0] == 200
            # Its slot was given back: the next is built too, not refused.
            assert request("GET", url, None, headers, raw=True)[0] == 200
        finally:
            for fd in held:
                os.close(fd)
