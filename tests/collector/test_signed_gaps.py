"""Signed gap records (issue 27, review H1): a probe signs each gap record's canonical
JSON; the collector stores every record whole (table gap_signatures: the JWS parts when
signed) and gives it back exactly to evidence bundles (``gap_evidence``), on both
backends; a copy between backends carries them. Then the gap route through a real
collector: a signed record judged as a signed result is (no key: unverified; another
probe's, a replaced or revoked key, a bad signature: 422 naming it), a plain one kept
"unsigned", a signed copy of a plain one adds its signature."""

from __future__ import annotations

import json
from contextlib import closing
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import jose, keydocs
from agent.canonical import canonical_gap
from agent.evidence import open_gap, sign_gap, sign_result
from agent.schema import GapRecord, to_dict, utc_now
from collector.config import StorageConfig
from collector.intake import keyring
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector
from collector.storage.model import GapEvidence, GapSignature, GapStatus
from collector.storage.sql.backends import open_store
from collector.storage.sql.migrate import copy_store
from collector.storage.store import Store
from tests.httpclient import post_json, request

KEY = Ed25519PrivateKey.generate()
KID = jose.kid_of(KEY.public_key())
RECEIVED = "2026-11-22T00:00:00.000000Z"
RECORDED = "2026-11-21T23:00:00.000000Z"


def gap(gap_id: str = "3f1e0c1a-0000-4000-8000-000000000001", probe: str = "p1",
        ranges: tuple[tuple[int, int], ...] = ((3, 4),)) -> GapRecord:
    return GapRecord(schema_version=4, gap_id=gap_id, probe_id=probe, recorded_at=RECORDED,
                     reason="spool_full", dropped=2,
                     first_started_at="2026-11-21T01:00:00.000000Z",
                     last_started_at="2026-11-21T02:00:00.000000Z",
                     dropped_seq_ranges=ranges)


def signature(record: GapRecord, signed: bool = True,
              status: GapStatus = "verified") -> tuple[GapSignature, dict[str, str] | None]:
    payload = canonical_gap(record)
    if not signed:
        return GapSignature(payload, record.recorded_at, "unsigned"), None
    jws = sign_gap(KEY, payload)
    opened = open_gap(jws)
    return GapSignature(payload, record.recorded_at, status, opened.kid,
                        jws["protected"], jws["signature"]), jws


def insert(store: Store, record: GapRecord, sig: GapSignature | None,
           digest: str = "d1") -> str:
    return store.insert_gap(record.gap_id, record.probe_id, RECEIVED, record.reason,
                            record.dropped, record.first_started_at,
                            record.last_started_at, digest, record.dropped_seq_ranges,
                            signature=sig)


def _probe(store: Store, name: str = "p1") -> None:
    store.add_probe(name, f"digest-{name}", "2026-11-01T00:00:00.000000Z", LineMetadata())


def test_a_signed_gap_is_kept_whole_and_its_jws_rebuilt_exactly(store: Store) -> None:
    _probe(store)
    record = gap()
    sig, jws = signature(record)
    assert insert(store, record, sig) == "stored"
    [got] = store.gap_evidence("p1")
    assert got.jws == jws
    assert (got.gap_id, got.seq_ranges, got.reason, got.recorded_at, got.status) == \
        (record.gap_id, ((3, 4),), "spool_full", RECORDED, "verified")
    assert got.document == canonical_gap(record)
    assert store.gap_evidence("p2") == []


def test_an_unsigned_gap_is_kept_as_canonical_json(store: Store) -> None:
    _probe(store)
    record = gap()
    sig, _ = signature(record, signed=False)
    assert insert(store, record, sig) == "stored"
    [got] = store.gap_evidence("p1")
    assert (got.jws, got.status, got.document) == (None, "unsigned", canonical_gap(record))


def test_a_gap_stored_before_gaps_were_kept_whole_is_rebuilt(store: Store) -> None:
    """No gap_signatures row (stored by an older release, or by a caller giving no
    signature): rebuilt from its columns, recorded_at the time it was received."""
    _probe(store)
    record = gap()
    assert insert(store, record, None) == "stored"
    [got] = store.gap_evidence("p1")
    assert (got.jws, got.status, got.recorded_at) == (None, "unsigned", RECEIVED)
    rebuilt = GapRecord(4, record.gap_id, "p1", RECEIVED, "spool_full", 2,
                        record.first_started_at, record.last_started_at, ((3, 4),))
    assert got.document == canonical_gap(rebuilt)


def test_a_signed_copy_of_a_gap_stored_unsigned_adds_its_signature(store: Store) -> None:
    """Like results (review M6): a record first delivered plain, then signed, is a
    duplicate that keeps the signature; another document under the id is a conflict;
    the signed one sent again changes nothing."""
    _probe(store)
    record = gap()
    plain, _ = signature(record, signed=False)
    signed, jws = signature(record)
    assert insert(store, record, plain, digest="raw") == "stored"
    assert insert(store, record, signed, digest="payload") == "duplicate"
    [got] = store.gap_evidence("p1")
    assert (got.jws, got.status) == (jws, "verified")
    other, _ = signature(gap(ranges=((3, 5),)))
    assert insert(store, record, other, digest="other") == "conflict"
    assert insert(store, record, signed, digest="payload") == "duplicate"
    assert store.gap_evidence("p1")[0].jws == jws


def test_copy_carries_the_gap_records_whole(tmp_path: Path, store: Store) -> None:
    with closing(open_store(StorageConfig(path=str(tmp_path / "source.sqlite3")))) as source:
        _probe(source)
        one, two = gap(), gap("3f1e0c1a-0000-4000-8000-000000000002", ranges=((9, 9),))
        assert insert(source, one, signature(one)[0]) == "stored"
        assert insert(source, two, signature(two, signed=False)[0]) == "stored"
        copy_store(source, store)
        assert store.gap_evidence("p1") == source.gap_evidence("p1")
        assert [g.status for g in store.gap_evidence("p1")] == ["verified", "unsigned"]


# --- the gap route -----------------------------------------------------------------------

GAPS = "/api/v1/gaps"


def _enrol(c: RunningCollector, token: str, key: Ed25519PrivateKey) -> None:
    jwk = jose.jwk_of(key.public_key())
    proof = keydocs.enrolment_proof(key, utc_now())
    status, data, _ = request("PUT", c.url + "/api/v1/probe/key",
                              json.dumps({"jwk": jwk, "proof": proof}).encode(),
                              {"Content-Type": "application/json",
                               "Authorization": f"Bearer {token}"})
    assert status == 201, data


def _evidence(c: RunningCollector, probe: str = "p1") -> list[GapEvidence]:
    with closing(c.open_store()) as store:
        return list(store.gap_evidence(probe))


def _jws(record: GapRecord, key: Ed25519PrivateKey = KEY) -> dict[str, str]:
    return sign_gap(key, canonical_gap(record))


def _now_gap(gap_id: str = "3f1e0c1a-0000-4000-8000-0000000000a1", probe: str = "p1",
             recorded_at: str | None = None) -> GapRecord:
    return replace(gap(gap_id, probe), recorded_at=recorded_at or utc_now())


def test_a_signed_gap_of_a_probe_without_a_key_is_kept_unverified(
        collector: RunningCollector) -> None:
    token = collector.add_probe("p1")
    record = _now_gap()
    jws = _jws(record)
    assert post_json(collector.url + GAPS, jws, token) == (
        201, {"gap_id": record.gap_id, "stored": True, "signature": "unverified"})
    [kept] = _evidence(collector)
    assert (kept.status, kept.jws, kept.document) == ("unverified", jws,
                                                      canonical_gap(record))
    assert post_json(collector.url + GAPS, jws, token)[0] == 200  # a duplicate


def test_a_signed_gap_verifies_with_the_probes_key_or_is_refused(
        collector: RunningCollector) -> None:
    """Verified with the probe's key; a record edited after signing, another key, a key
    of the probe replaced more than an hour before the record was recorded: each a 422
    naming why, nothing stored."""
    token = collector.add_probe("p1")
    _enrol(collector, token, KEY)
    record = _now_gap()
    jws = _jws(record)
    assert post_json(collector.url + GAPS, jws, token)[1]["signature"] == "verified"

    edited = _now_gap("3f1e0c1a-0000-4000-8000-0000000000a2")
    forged = dict(_jws(edited))
    forged["payload"] = jose.b64url(canonical_gap(replace(edited, dropped=1)))
    status, reply = post_json(collector.url + GAPS, forged, token)
    assert (status, reply["field"]) == (422, "signature")
    assert reply["error"] == f"signature: does not verify with key {KID} of probe p1"

    stranger = Ed25519PrivateKey.generate()
    status, reply = post_json(collector.url + GAPS, _jws(edited, stranger), token)
    assert (status, reply["field"]) == (422, "protected")
    assert "which is not a key of probe p1" in reply["error"]

    new = Ed25519PrivateKey.generate()
    with closing(collector.open_store()) as store:
        outcome, _ = store.bind_probe_key(
            "p1", jose.kid_of(new.public_key()), json.dumps(jose.jwk_of(new.public_key())),
            "pinned", "2026-11-21T00:00:00.000000Z", None, replace=True)
    assert outcome == "enrolled"
    keyring.invalidate("p1")
    status, reply = post_json(collector.url + GAPS, _jws(edited), token)
    assert (status, reply["field"]) == (422, "protected")
    assert reply["error"].startswith(f"signed with key {KID} of probe p1, replaced at "
                                     "2026-11-21T00:00:00.000000Z, more than an hour "
                                     "before the gap record was recorded")
    assert [g.gap_id for g in _evidence(collector)] == [record.gap_id]


def test_a_signed_gap_of_a_result_type_or_malformed_is_422(
        collector: RunningCollector) -> None:
    """A result's JWS is not a gap record's (typ), a JWS with a member missing is
    malformed: 422 naming the member, nothing stored."""
    token = collector.add_probe("p1")
    record = _now_gap()
    wrong = sign_result(KEY, canonical_gap(record), None)
    status, reply = post_json(collector.url + GAPS, wrong, token)
    assert (status, reply["field"]) == (422, "protected") and "bbprobe-gap" in reply["error"]
    status, reply = post_json(collector.url + GAPS,
                              {k: v for k, v in _jws(record).items() if k != "signature"},
                              token)
    assert (status, reply["field"]) == (422, "signature")
    assert _evidence(collector) == []


def test_an_unnamed_signed_gap_is_named_by_the_token_and_kept_as_signed(
        collector: RunningCollector) -> None:
    token = collector.add_probe("p1")
    _enrol(collector, token, KEY)
    record = _now_gap(probe="")
    jws = _jws(record)
    assert post_json(collector.url + GAPS, jws, token)[1]["signature"] == "verified"
    [kept] = _evidence(collector)
    assert kept.jws == jws and json.loads(kept.document)["probe_id"] == ""


def test_a_plain_gap_is_unsigned_then_its_signed_copy_adds_the_signature(
        collector: RunningCollector) -> None:
    token = collector.add_probe("p1")
    _enrol(collector, token, KEY)
    record = _now_gap()
    assert post_json(collector.url + GAPS, to_dict(record), token)[1]["signature"] == \
        "unsigned"
    [kept] = _evidence(collector)
    assert (kept.status, kept.jws) == ("unsigned", None)
    jws = _jws(record)
    status, reply = post_json(collector.url + GAPS, jws, token)
    assert (status, reply["stored"]) == (200, False)
    [kept] = _evidence(collector)
    assert (kept.status, kept.jws) == ("verified", jws)
