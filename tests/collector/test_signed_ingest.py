"""Signed results at ingest (issue 27, collector/intake/signed.py) through a real collector
on 127.0.0.1: verified, unverified (no key), unsigned (kept, or refused under
[evidence] require_signatures), and every refusal a 422 naming why: a signature that
does not verify, a revoked key, another key than the probe's, a malformed JWS; in a batch,
one bad item refused and the others stored. Then the keyring's cache and invalidation,
the config key, and the OpenAPI document."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import evidence, jose, keydocs, spec
from agent.canonical import canonical
from agent.schema import to_dict, utc_now
from collector.cli.main import main
from collector.config import CollectorConfig, EvidenceConfig, ServerConfig, parse
from collector.errors import ConfigError
from collector.intake import keyring, signed
from collector.intake.keyring import KeyRing
from collector.server.testing import RunningCollector, running_collector
from collector.storage.model import ProbeKey, StoredSignature
from collector.web.openapi import document
from tests.factories import session
from tests.httpclient import post_json, request

RESULTS = spec.RESULTS_PATH
BATCH = spec.RESULTS_PATH + "/batch"
ENROL = "/api/v1/probe/key"


_SEQS = itertools.count(1)


def _signed(key: Ed25519PrivateKey, probe_id: str = "p1", prev: str | None = None,
            seq: int | None = None, **kwargs: Any) -> tuple[dict[str, str], bytes]:
    """A session signed as the agent signs it, numbered (``seq``, else the next of a
    counter, as the spool numbers before signing): (the JWS, its payload)."""
    result = replace(session(probe_id, **kwargs),
                     session_seq=seq if seq is not None else next(_SEQS))
    payload = canonical(result)
    return evidence.sign_result(key, payload, prev), payload


def _enrol(c: RunningCollector, token: str, key: Ed25519PrivateKey) -> str:
    """Bind ``key`` to the token's probe by trust on first use (PUT /api/v1/probe/key),
    with its proof of possession, as the agent enrols."""
    jwk = jose.jwk_of(key.public_key())
    proof = keydocs.enrolment_proof(key, utc_now())
    status, data, _ = request("PUT", c.url + ENROL,
                              json.dumps({"jwk": jwk, "proof": proof}).encode(),
                              {"Content-Type": "application/json",
                               "Authorization": f"Bearer {token}"})
    assert status == 201, data
    return str(data["kid"])


def _kid(key: Ed25519PrivateKey) -> str:
    return jose.kid_of(key.public_key())


def _signatures(c: RunningCollector, *result_ids: str) -> dict[str, StoredSignature]:
    store = c.open_store()
    try:
        return store.result_signatures(list(result_ids))
    finally:
        store.close()


def _keys(c: RunningCollector, probe: str) -> list[ProbeKey]:
    store = c.open_store()
    try:
        return store.probe_keys(probe)
    finally:
        store.close()


def _body(c: RunningCollector, result_id: str) -> bytes:
    store = c.open_store()
    try:
        stored = store.result(result_id)
    finally:
        store.close()
    assert stored is not None
    return stored.body.encode()


def _metric(c: RunningCollector, status: str) -> float:
    code, raw, _ = request("GET", c.url + "/metrics", raw=True)
    assert code == 200
    found = re.search(rf'^bbprobe_collector_result_signatures_total\{{status="{status}"\}} '
                      r"(\S+)$", raw.decode(), re.M)
    assert found is not None
    return float(found.group(1))


def _cli(c: RunningCollector, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--db", str(c.db_path), *args],
                                catch_exceptions=False)
    return result.exit_code, result.stdout + result.stderr


def _result_id(payload: bytes) -> str:
    return str(json.loads(payload)["result_id"])


def test_verified_then_duplicate(collector: RunningCollector) -> None:
    """A result signed with the probe's key is stored verified, its JWS rebuilt exactly
    from storage; the same JWS again, or the same result unsigned, is a duplicate."""
    token = collector.add_probe("p1")
    key = Ed25519PrivateKey.generate()
    kid = _enrol(collector, token, key)
    jws, payload = _signed(key, prev="ab" * 32)
    rid = _result_id(payload)
    assert post_json(collector.url + RESULTS, jws, token) == (
        201, {"result_id": rid, "stored": True, "duplicate": False})
    sig = _signatures(collector, rid)[rid]
    assert (sig.kid, sig.status, sig.prev_sha256, sig.payload) == \
        (kid, "verified", "ab" * 32, None)
    assert _body(collector, rid) == payload
    assert sig.jws(_body(collector, rid)) == jws
    status, reply = post_json(collector.url + RESULTS, jws, token)
    assert (status, reply["duplicate"]) == (200, True)
    status, reply = post_json(collector.url + RESULTS, json.loads(payload), token)
    assert (status, reply["duplicate"]) == (200, True)
    assert collector.count_results() == 1
    assert _metric(collector, "verified") == 1.0


def test_unverified_without_a_key_then_verified_once_bound(
        collector: RunningCollector) -> None:
    """A probe with no key: its signed result is kept unverified; once its key is bound,
    the next one is verified at once (the enrolment drops the keyring's snapshot)."""
    token = collector.add_probe("p1")
    key = Ed25519PrivateKey.generate()
    jws, payload = _signed(key)
    status, _ = post_json(collector.url + RESULTS, jws, token)
    assert status == 201
    first = _result_id(payload)
    assert _signatures(collector, first)[first].status == "unverified"
    _enrol(collector, token, key)
    jws2, payload2 = _signed(key, prev=evidence.sha256_hex(payload))
    status, _ = post_json(collector.url + RESULTS, jws2, token)
    assert status == 201
    second = _result_id(payload2)
    assert _signatures(collector, second)[second].status == "verified"
    assert (_metric(collector, "unverified"), _metric(collector, "verified")) == (1.0, 1.0)


def test_unsigned_is_accepted_and_marked(collector: RunningCollector) -> None:
    """A plain result is stored as before, with no signature row, counted unsigned."""
    token = collector.add_probe("p1")
    doc = json.loads(canonical(session("p1")))
    status, _ = post_json(collector.url + RESULTS, doc, token)
    assert status == 201
    assert _signatures(collector, doc["result_id"]) == {}
    assert _metric(collector, "unsigned") == 1.0


def test_unsigned_refused_when_signatures_are_required(tmp_path: Path) -> None:
    """Under [evidence] require_signatures an unsigned result is a 422 naming the key,
    alone or in a batch; a signed one is stored."""
    base = CollectorConfig()
    cfg = replace(base, server=replace(base.server, query_auth=False),
                  evidence=EvidenceConfig(require_signatures=True))
    with running_collector(tmp_path, cfg) as c:
        token = c.add_probe("p1")
        plain = json.loads(canonical(session("p1")))
        assert post_json(c.url + RESULTS, plain, token) == (422, {
            "error": signed.UNSIGNED_REFUSED, "field": "signature", "code": "unsigned"})
        jws, _ = _signed(Ed25519PrivateKey.generate())
        status, reply = post_json(c.url + BATCH, {"results": [plain, jws]}, token)
        assert status == 200
        assert [(i["status"], i["error"], i.get("field")) for i in reply["items"]] == [
            (422, signed.UNSIGNED_REFUSED, "signature"), (201, None, None)]
        assert reply["items"][0]["result_id"] == plain["result_id"]
        assert c.count_results() == 1
        assert _metric(c, "refused") == 2.0


def test_bad_signature(collector: RunningCollector) -> None:
    """One sample changed in the payload after signing: 422, the signature does not
    verify with the probe's key; nothing stored."""
    token = collector.add_probe("p1")
    key = Ed25519PrivateKey.generate()
    kid = _enrol(collector, token, key)
    jws, payload = _signed(key)
    doc = json.loads(payload)
    doc["ping"]["samples"][0]["rtt_ms"] = 10.5
    tampered = {**jws, "payload": jose.b64url(json.dumps(doc).encode())}
    status, reply = post_json(collector.url + RESULTS, tampered, token)
    assert (status, reply["error"], reply["field"]) == (
        422, f"signature: does not verify with key {kid} of probe p1", "signature")
    assert collector.count_results() == 0
    assert _metric(collector, "refused") == 1.0


def test_revoked_key(collector: RunningCollector, tmp_path: Path) -> None:
    """A result signed with a key revoked since (the CLI, in this process): 422 naming
    the key, when and why, at once (the revocation drops the snapshot)."""
    token = collector.add_probe("p1")
    key = Ed25519PrivateKey.generate()
    kid = _enrol(collector, token, key)
    first, _ = _signed(key)
    assert post_json(collector.url + RESULTS, first, token)[0] == 201  # snapshot cached
    code, out = _cli(collector, "probe", "key", "revoke", "p1", kid, "--reason",
                     "device stolen")
    assert code == 0, out
    (revoked,) = _keys(collector, "p1")
    assert revoked.revoked_at is not None
    jws, _ = _signed(key)
    status, reply = post_json(collector.url + RESULTS, jws, token)
    assert (status, reply["error"], reply["field"]) == (
        422, f"signed with key {kid} of probe p1, revoked {revoked.revoked_at}: "
             "device stolen", "protected")
    assert collector.count_results() == 1


def test_another_key_than_the_probes(collector: RunningCollector) -> None:
    """Signed with a key not bound to this probe (another probe's): 422 naming both keys
    and how to bind it."""
    token = collector.add_probe("p1")
    other_token = collector.add_probe("p2")
    mine, theirs = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    my_kid = _enrol(collector, token, mine)
    _enrol(collector, other_token, theirs)
    jws, _ = _signed(theirs)
    status, reply = post_json(collector.url + RESULTS, jws, token)
    assert (status, reply["field"], reply["code"]) == (422, "protected", "unknown_key")
    assert reply["error"] == (
        f"signed with key {_kid(theirs)}, which is not a key of probe p1 (its key: "
        f"{my_kid}); bind it with `bbprobe-collector probe key set p1 FILE`, then "
        "`bbprobe dead-letter retry --all`")
    assert collector.count_results() == 0


def _with_header(jws: dict[str, str], **changes: Any) -> dict[str, str]:
    header = {**jose.header_of(jws), **changes}
    return {**jws, "protected": jose.b64url(json.dumps(header).encode())}


def _form_cases() -> list[tuple[str, Any, str]]:
    """(what, a malformed signed result, the field its 422 names)."""
    key = Ed25519PrivateKey.generate()
    jws, _ = _signed(key)
    not_result = evidence.sign_result(key, b'{"schema_version": 1}', None)
    return [
        ("an extra member", {**jws, "header": {}}, "header"),
        ("a member missing", {"payload": jws["payload"], "signature": jws["signature"]},
         "protected"),
        ("protected not base64url", {**jws, "protected": "*"}, "protected"),
        ("protected not a string", {**jws, "protected": 1}, "protected"),
        ("alg none", _with_header(jws, alg="none"), "protected"),
        ("no kid", _with_header(jws, kid=None), "protected"),
        ("another typ", _with_header(jws, typ="bbprobe-certificate"), "protected"),
        ("prev not a SHA-256", _with_header(jws, prev="xyz"), "protected"),
        ("payload padded", {**jws, "payload": jws["payload"] + "="}, "payload"),
        ("payload a list", {**jws, "payload": []}, "payload"),
        ("payload not JSON", evidence.sign_result(key, b"\xff{", None), "payload"),
        ("payload not a result", not_result, "result_id"),
        ("signature null", {**jws, "signature": None}, "signature"),
        ("signature too long", {**jws, "signature": "A" * 4096}, "signature"),
        ("payload for another probe", _signed(key, "p2")[0], "probe_id"),
    ]


@pytest.mark.parametrize(("what", "body", "field"), _form_cases(),
                         ids=[c[0] for c in _form_cases()])
def test_form_errors_are_422(collector: RunningCollector, what: str, body: Any,
                             field: str) -> None:
    """Every malformed JWS is refused with one line naming the field (403 for another
    probe's payload, as for a plain result), never a 5xx."""
    token = collector.add_probe("p1")
    status, reply = post_json(collector.url + RESULTS, body, token)
    assert status == (403 if field == "probe_id" else 422), (what, reply)
    assert reply["field"] == field, (what, reply)
    assert "\n" not in reply["error"] and len(reply["error"]) < 400
    if field in ("protected", "payload", "signature"):
        assert reply["error"].startswith(("jws:", f"{field}", "protected header:")), reply
    status, reply = post_json(collector.url + BATCH, {"results": [body]}, token)
    assert status == 200
    assert reply["items"][0]["status"] in (403, 422), (what, reply)
    assert collector.count_results() == 0


def test_batch_one_bad_item_the_others_stored(collector: RunningCollector) -> None:
    """A batch of signed and plain results with a bad signature in the middle: that one
    is refused (422), those before and after it stored, in one request."""
    token = collector.add_probe("p1")
    key = Ed25519PrivateKey.generate()
    kid = _enrol(collector, token, key)
    good1, p1 = _signed(key)
    bad, _ = _signed(key)
    bad = {**bad, "signature": _signed(key)[0]["signature"]}  # another result's signature
    good2, p2 = _signed(key, prev=evidence.sha256_hex(p1))
    plain = json.loads(canonical(session("p1")))
    status, reply = post_json(collector.url + BATCH,
                              {"results": [good1, bad, good2, plain]}, token)
    assert status == 200
    items = reply["items"]
    assert [i["status"] for i in items] == [201, 422, 201, 201]
    assert items[1]["error"] == f"signature: does not verify with key {kid} of probe p1"
    assert items[1]["field"] == "signature" and items[1]["result_id"] is not None
    assert "signature_refused" not in items[1]
    ids = [_result_id(p1), _result_id(p2), plain["result_id"]]
    assert [items[0]["result_id"], items[2]["result_id"], items[3]["result_id"]] == ids
    assert collector.count_results() == 3
    sigs = _signatures(collector, *ids)
    assert sorted(sigs) == sorted(ids[:2])
    assert sigs[ids[1]].prev_sha256 == evidence.sha256_hex(p1)
    # Again: the stored ones are duplicates, the bad one refused again.
    status, reply = post_json(collector.url + BATCH,
                              {"results": [good1, bad, good2, plain]}, token)
    assert [i["status"] for i in reply["items"]] == [200, 422, 200, 200]
    assert collector.count_results() == 3


def test_unnamed_payload_is_named_by_the_token(collector: RunningCollector) -> None:
    """A payload signed with probe_id "" (spooled before the probe knew its name) is
    stored as the token's probe's, the signed bytes kept so the JWS is rebuilt exactly."""
    token = collector.add_probe("p1")
    key = Ed25519PrivateKey.generate()
    _enrol(collector, token, key)
    jws, payload = _signed(key, probe_id="")
    rid = _result_id(payload)
    status, reply = post_json(collector.url + BATCH, {"results": [jws]}, token)
    assert (status, reply["items"][0]["status"]) == (200, 201), reply
    body = _body(collector, rid)
    assert json.loads(body)["probe_id"] == "p1"
    sig = _signatures(collector, rid)[rid]
    assert (sig.status, sig.payload) == ("verified", payload)
    assert sig.jws(body) == jws


# --- the keyring -----------------------------------------------------------------------


class _Keys:
    """A ProbeKeyStore stand-in counting its reads."""

    def __init__(self) -> None:
        self.reads = 0
        self.keys: list[ProbeKey] = []

    def probe_keys(self, name: str) -> list[ProbeKey]:
        self.reads += 1
        return list(self.keys)


def test_keyring_caches_for_at_most_max_age_and_drops_on_invalidate() -> None:
    """A snapshot serves for MAX_AGE_S, then is read again; invalidate(probe) or
    invalidate() drops it at once, and only the probe named."""
    now = [0.0]
    ring = KeyRing(clock=lambda: now[0])
    store = _Keys()
    assert ring.cached("kr-a") is None
    snap = ring.snapshot(store, "kr-a")  # type: ignore[arg-type]
    assert ring.snapshot(store, "kr-a") is snap and store.reads == 1  # type: ignore[arg-type]
    now[0] = keyring.MAX_AGE_S - 0.01
    assert ring.cached("kr-a") is snap
    now[0] = keyring.MAX_AGE_S
    assert ring.cached("kr-a") is None
    ring.snapshot(store, "kr-a")  # type: ignore[arg-type]
    ring.snapshot(store, "kr-b")  # type: ignore[arg-type]
    assert store.reads == 3
    keyring.invalidate("kr-a")
    assert ring.cached("kr-a") is None and ring.cached("kr-b") is not None
    keyring.invalidate()
    assert ring.cached("kr-b") is None


def test_keyring_is_bounded() -> None:
    """Beyond max_entries the oldest snapshot is dropped."""
    ring = KeyRing(max_entries=2)
    store = _Keys()
    for name in ("kb-1", "kb-2", "kb-3"):
        ring.snapshot(store, name)  # type: ignore[arg-type]
    assert ring.cached("kb-1") is None
    assert ring.cached("kb-2") is not None and ring.cached("kb-3") is not None


def test_keyring_change_during_a_read_is_not_kept() -> None:
    """A key change while the snapshot is being read makes that snapshot stale."""
    ring = KeyRing()

    class Racing(_Keys):
        def probe_keys(self, name: str) -> list[ProbeKey]:
            keyring.invalidate(name)  # bound meanwhile, by another thread
            return super().probe_keys(name)

    ring.snapshot(Racing(), "kr-race")  # type: ignore[arg-type]
    assert ring.cached("kr-race") is None


# --- configuration and the API document ------------------------------------------------


def test_require_signatures_config() -> None:
    """[evidence] require_signatures: false by default, a boolean, unknown keys refused."""
    assert parse({}).evidence.require_signatures is False
    assert parse({"evidence": {"require_signatures": True}}).evidence.require_signatures
    with pytest.raises(ConfigError, match=r"evidence\.require_signatures"):
        parse({"evidence": {"require_signatures": "yes"}})
    with pytest.raises(ConfigError, match=r"evidence\.require_signature: unknown key "
                                          r"\(did you mean evidence\.require_signatures\?\)"):
        parse({"evidence": {"require_signature": True}})
    assert isinstance(CollectorConfig().server, ServerConfig)


def test_openapi_describes_the_signed_result() -> None:
    """Both result routes take a plain or a signed result; Error may name bound_kid."""
    doc = document()
    schemas = doc["components"]["schemas"]
    assert schemas["SignedResult"]["required"] == ["protected", "payload", "signature"]
    assert "bound_kid" in schemas["Error"]["properties"]
    assert "bound_kid" not in schemas["Error"]["required"]
    single = doc["paths"][RESULTS]["post"]["requestBody"]["content"]["application/json"]
    batch = doc["paths"][BATCH]["post"]["requestBody"]["content"]["application/json"]
    signed_ref = {"$ref": "#/components/schemas/SignedResult"}
    assert signed_ref in single["schema"]["oneOf"]
    assert signed_ref in batch["schema"]["properties"]["results"]["items"]["oneOf"]



def test_a_signed_result_near_the_limit_is_stored_and_one_past_it_named(
        collector: RunningCollector) -> None:
    """A result is held to server.max_body_bytes (1 MiB here) by its own bytes, not by
    its signed form's (a third larger in base64url): a document the plain route would
    store is stored signed, alone and in a batch, and a payload past the limit is a 413
    that says so."""
    token = collector.add_probe("big")
    key = Ed25519PrivateKey.generate()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    rtts = [10.0 + (i % 97) / 7 for i in range(12500)]
    jws, payload = _signed(key, "big", rtts=rtts)
    wire = json.dumps(jws).encode()
    assert len(payload) < 1048576 < len(wire), (len(payload), len(wire))
    status, reply, _ = request("POST", collector.url + RESULTS, wire, headers)
    assert status == 201, reply
    jws2, _ = _signed(key, "big", rtts=rtts)
    status, reply, _ = request("POST", collector.url + BATCH,
                               json.dumps({"results": [jws2]}).encode(), headers)
    assert (status, reply["items"][0]["status"]) == (200, 201), reply
    # Just past the limit by its payload (and still inside the wire limit).
    extra = 1000
    while len(_signed(key, "big", rtts=rtts + rtts[:extra])[1]) <= 1048576:
        extra += 20
    huge, payload = _signed(key, "big", rtts=rtts + rtts[:extra])
    assert len(payload) > 1048576 and len(json.dumps(huge)) < signed.wire_limit(1048576)
    status, reply, _ = request("POST", collector.url + RESULTS,
                               json.dumps(huge).encode(), headers)
    assert status == 413 and "signed payload of" in reply["error"], reply


def test_the_listing_says_which_results_were_signed(collector: RunningCollector) -> None:
    """An analyst's listing (API, CLI, CSV) names each result's signature: verified,
    unverified (signed before the collector held the key) or unsigned (older agents)."""
    from collector.reports import service
    from collector.scope import resolve_scope

    token = collector.add_probe("p1")
    key = Ed25519PrivateKey.generate()
    early, early_payload = _signed(key, started_at="2026-11-21T08:00:00.000000Z")
    assert post_json(collector.url + RESULTS, early, token)[0] == 201
    _enrol(collector, token, key)
    late, late_payload = _signed(key, started_at="2026-11-21T09:00:00.000000Z")
    assert post_json(collector.url + RESULTS, late, token)[0] == 201
    plain = json.loads(json.dumps(to_dict(session("p1"))))
    assert post_json(collector.url + RESULTS, plain, token)[0] == 201
    store = collector.open_store()
    try:
        rows = service.listing(store, resolve_scope(["p1"], None, None))
    finally:
        store.close()
    marks = {r["result_id"]: r["signature"] for r in rows}
    assert marks == {_result_id(early_payload): "unverified",
                     _result_id(late_payload): "verified", plain["result_id"]: "unsigned"}


# --- review M1, M2, M6 ------------------------------------------------------------------


def _replace_key(c: RunningCollector, probe: str, key: Ed25519PrivateKey, at: str) -> None:
    """An admin's pin of ``key`` at ``at``: the probe's key before is bound until then."""
    store = c.open_store()
    try:
        outcome, _ = store.bind_probe_key(probe, _kid(key),
                                          json.dumps(jose.jwk_of(key.public_key())),
                                          "pinned", at, None, replace=True)
    finally:
        store.close()
    keyring.invalidate(probe)
    assert outcome == "enrolled"  # the new key bound, the old one until ``at``


def test_a_key_replaced_more_than_an_hour_before_the_session_ended_is_refused(
        collector: RunningCollector) -> None:
    """Review M1, the rule verify uses (agent.evidence.key_covers): a session of the old
    key that ended within the hour after it was replaced is accepted (a rotation during a
    session), one that ended later is refused, naming the key and when it was replaced."""
    token = collector.add_probe("p1")
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    kid = _enrol(collector, token, old)
    _replace_key(collector, "p1", new, "2026-11-21T10:00:00.000000Z")
    # The factory's sessions last a few seconds from started_at.
    within, _ = _signed(old, started_at="2026-11-21T10:30:00.000000Z")
    assert post_json(collector.url + RESULTS, within, token)[0] == 201
    late, _ = _signed(old, started_at="2026-11-21T11:30:00.000000Z")
    status, reply = post_json(collector.url + RESULTS, late, token)
    assert (status, reply["field"], reply.get("code")) == (422, "protected", "replaced_key")
    assert reply["error"] == (f"signed with key {kid} of probe p1, replaced at "
                              "2026-11-21T10:00:00.000000Z, more than an hour before the "
                              "session ended")
    fresh, _ = _signed(new, started_at="2026-11-21T11:30:00.000000Z")
    assert post_json(collector.url + RESULTS, fresh, token)[0] == 201


def test_a_signed_result_without_session_seq_is_refused(collector: RunningCollector) -> None:
    """Review M2: an unnumbered result has no place in the chain; signed, it is refused
    (422 on session_seq), alone or in a batch, while an unsigned one is still taken (an
    agent older than numbering)."""
    token = collector.add_probe("p1")
    key = Ed25519PrivateKey.generate()
    _enrol(collector, token, key)
    payload = canonical(session("p1"))
    assert json.loads(payload).get("session_seq") is None
    jws = evidence.sign_result(key, payload, None)
    status, reply = post_json(collector.url + RESULTS, jws, token)
    assert (status, reply["field"], reply["error"]) == (
        422, "session_seq", "a signed result must be numbered (session_seq)")
    status, reply = post_json(collector.url + BATCH, {"results": [jws]}, token)
    assert status == 200 and reply["items"][0]["status"] == 422
    assert reply["items"][0]["field"] == "session_seq"
    assert post_json(collector.url + RESULTS, json.loads(payload), token)[0] == 201


def test_a_duplicate_signed_copy_keeps_its_signature(collector: RunningCollector) -> None:
    """Review M6: the result stored unsigned first (a plain copy delivered before the
    signed one), then the genuine signed one: a duplicate, and its signature is stored
    now, verified, rebuilding the very JWS; a third copy changes nothing."""
    token = collector.add_probe("p1")
    key = Ed25519PrivateKey.generate()
    _enrol(collector, token, key)
    jws, payload = _signed(key)
    rid = _result_id(payload)
    assert post_json(collector.url + RESULTS, json.loads(payload), token)[0] == 201
    assert _signatures(collector, rid) == {}
    status, reply = post_json(collector.url + BATCH, {"results": [jws]}, token)
    assert (status, reply["items"][0]["status"]) == (200, 200)  # a duplicate
    sig = _signatures(collector, rid)[rid]
    assert sig.status == "verified" and sig.jws(_body(collector, rid)) == jws
    assert post_json(collector.url + RESULTS, jws, token)[0] == 200
    assert _signatures(collector, rid)[rid] == sig
