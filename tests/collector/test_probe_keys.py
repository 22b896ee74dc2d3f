"""The probes' public keys (Ed25519, RFC 8032): enrolment by trust on first use through a
real collector (PUT /api/v1/probe/key), pinning, rotation and revocation by the CLI, the
JWK Set (GET /.well-known/bbprobe-keys.json), and the store's part on both backends."""

from __future__ import annotations

import itertools
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import jose, keydocs
from collector import keys
from collector.cli.main import main
from collector.config import CollectorConfig, StorageConfig
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector, running_collector
from collector.storage.model import ProbeKey
from collector.storage.sql import probe_keys as sql_probe_keys
from collector.storage.sql.backends import open_store
from collector.storage.sql.copy import TABLES
from collector.storage.sql.migrate import copy_store
from collector.storage.store import Store
from collector.web import keys_routes
from tests.httpclient import request

ENROL = "/api/v1/probe/key"
JWKS = "/.well-known/bbprobe-keys.json"


# The private half of every key a test made, by kid: ``_put`` proves possession of the
# key it sends (the collector requires it, review M4) unless the body says otherwise.
_PRIVATE: dict[str, Ed25519PrivateKey] = {}


def _key() -> Ed25519PrivateKey:
    private = Ed25519PrivateKey.generate()
    _PRIVATE[jose.kid_of(private.public_key())] = private
    return private


def _jwk() -> dict[str, str]:
    return jose.jwk_of(_key().public_key())


def _with_proof(body: Any) -> Any:
    """``body`` with the proof of possession of its jwk, when the test holds the key and
    the body has none (a body with "proof": None is sent without one)."""
    if not isinstance(body, dict) or "proof" in body or not isinstance(body.get("jwk"), dict):
        return {k: v for k, v in body.items() if v is not None} \
            if isinstance(body, dict) else body
    try:
        private = _PRIVATE.get(jose.thumbprint(body["jwk"]))
    except jose.JoseError:
        private = None
    if private is None:
        return body
    return {**body, "proof": keydocs.enrolment_proof(private, "2026-12-07T12:00:00Z")}


def _put(c: RunningCollector, body: Any, token: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    raw = body if isinstance(body, bytes) else json.dumps(_with_proof(body)).encode()
    status, data, _ = request("PUT", c.url + ENROL, raw, headers)
    return status, data


def _cli(c: RunningCollector, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--db", str(c.db_path), *args],
                                catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _jwks(c: RunningCollector) -> tuple[dict[str, Any], dict[str, str]]:
    status, raw, headers = request("GET", c.url + JWKS, raw=True)
    assert status == 200, raw
    return json.loads(raw), headers


def _probe_entries(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k["kid"]: k for k in doc["keys"] if k["bbprobe"]["holder"] == "probe"}


def test_trust_on_first_use(collector: RunningCollector) -> None:
    token = collector.add_probe("p1")
    jwk = _jwk()
    kid = jose.thumbprint(jwk)
    assert _put(collector, {"jwk": jwk}, token) == (201, {"kid": kid, "status": "enrolled"})
    assert _put(collector, {"jwk": jwk}, token) == (200, {"kid": kid, "status": "known"})
    other = _jwk()
    status, data = _put(collector, {"jwk": other}, token)
    assert status == 409 and data["field"] == "jwk" and kid in data["error"]
    assert data["bound_kid"] == kid  # the key in the way, as a member
    assert "\n" not in data["error"]
    # Not an Ed25519 public JWK: one line each, 422.
    for bad in ({"jwk": {"kty": "RSA", "n": "x", "e": "AQAB"}},
                {"jwk": {**other, "x": "AAAA"}},
                {"jwk": {**other, "d": other["x"]}},
                {"jwk": "x"}, {"key": other}, [1]):
        status, data = _put(collector, bad, token)
        assert status == 422, (bad, data)
        assert "\n" not in data["error"]
    assert _put(collector, b"{", token)[0] == 400
    assert _put(collector, b" " * (keys_routes.MAX_REQUEST_BYTES + 1), token)[0] == 413
    assert _put(collector, {"jwk": jwk}, None)[0] == 401
    assert _put(collector, {"jwk": jwk}, "bbp_nonsense")[0] == 401
    with closing(collector.open_store()) as store:
        (key,) = store.probe_keys("p1")
    assert (key.kid, key.source, key.status, key.first_seen_address) == (
        kid, "tofu", "current", "127.0.0.1")
    assert json.loads(key.jwk) == jwk


def test_pinned_then_a_different_key_is_refused(collector: RunningCollector,
                                                tmp_path: Path) -> None:
    public = _key().public_key()
    pem = tmp_path / "p1.pem"
    pem.write_text(jose.pem_of(public))
    code, out, err = _cli(collector, "probe", "add", "p1", "--key", str(pem))
    assert code == 0, err
    token = out.strip()
    kid = jose.kid_of(public)
    assert f"key {kid} pinned" in err
    status, data = _put(collector, {"jwk": _jwk()}, token)
    assert status == 409 and kid in data["error"]
    assert _put(collector, {"jwk": jose.jwk_of(public)}, token) == (
        200, {"kid": kid, "status": "known"})
    code, out, _ = _cli(collector, "probe", "key", "list", "p1")
    assert code == 0 and out.startswith(f"{kid}  current  pinned  ")
    # A bad key file registers nothing.
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    code, _, err = _cli(collector, "probe", "add", "p2", "--key", str(bad))
    assert code != 0 and "bad.pem" in err and "\n" not in err.strip()
    assert _cli(collector, "probe", "key", "list", "p2")[0] != 0


def test_jwk_set_rotation_and_revocation(collector: RunningCollector,
                                         tmp_path: Path) -> None:
    token = collector.add_probe("p1")
    collector.add_probe("p2")
    first = _jwk()
    assert _put(collector, {"jwk": first}, token)[0] == 201
    # Rotation by an admin: a JWK file this time; the old key stays, as past.
    second = _jwk()
    (tmp_path / "k.jwk").write_text(json.dumps(second))
    code, out, err = _cli(collector, "probe", "key", "set", "p1", str(tmp_path / "k.jwk"))
    assert code == 0, err
    assert f"key {jose.thumbprint(first)} is now past" in out
    assert _put(collector, {"jwk": first}, token)[0] == 409
    # p2's key pinned, then revoked.
    third = _jwk()
    (tmp_path / "p2.jwk").write_text(json.dumps(third))
    assert _cli(collector, "probe", "key", "set", "p2", str(tmp_path / "p2.jwk"))[0] == 0
    code, out, err = _cli(collector, "probe", "key", "revoke", "p2",
                          jose.thumbprint(third), "--reason", "device stolen")
    assert code == 0, err
    code, _, err = _cli(collector, "probe", "key", "revoke", "p2",
                        jose.thumbprint(third), "--reason", "again")
    assert code != 0 and "revoked already" in err
    assert _cli(collector, "probe", "key", "revoke", "p2", "nokid", "--reason", "x")[0] != 0
    # The same key is never bound again, to this probe or another.
    code, _, err = _cli(collector, "probe", "key", "set", "p1", str(tmp_path / "p2.jwk"))
    assert code != 0 and "never bound again" in err

    doc, headers = _jwks(collector)
    assert headers["content-type"].startswith("application/jwk-set+json")
    assert "max-age=" in headers["cache-control"]
    own = [k for k in doc["keys"] if k["bbprobe"]["holder"] == "collector"]
    assert len(own) == 1 and own[0]["use"] == "sig" and own[0]["alg"] == "EdDSA"
    assert own[0]["kid"] == jose.thumbprint(own[0])
    entries = _probe_entries(doc)
    states = {kid: (e["bbprobe"]["probe"], e["bbprobe"]["status"], e["bbprobe"]["source"])
              for kid, e in entries.items()}
    assert states == {jose.thumbprint(first): ("p1", "past", "tofu"),
                      jose.thumbprint(second): ("p1", "current", "pinned"),
                      jose.thumbprint(third): ("p2", "revoked", "pinned")}
    past = entries[jose.thumbprint(first)]["bbprobe"]
    assert past["until"] == entries[jose.thumbprint(second)]["bbprobe"]["since"]
    assert entries[jose.thumbprint(second)]["bbprobe"]["until"] is None
    assert entries[jose.thumbprint(third)]["bbprobe"]["revoked_reason"] == "device stolen"
    for e in entries.values():  # each member a usable JWK
        jose.public_key_of_jwk(e)
    # The collector's key is the evidence key, in its own file beside the database.
    assert (collector.db_path.parent / "evidence-signing-key.pem").exists()

    code, out, _ = _cli(collector, "probe", "key", "list", "p1")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith(f"{jose.thumbprint(first)}  past  tofu  ")
    assert "first seen from 127.0.0.1" in lines[0]
    code, out, _ = _cli(collector, "probe", "key", "list", "p2", "--format", "json")
    (row,) = json.loads(out)["keys"]
    assert row["status"] == "revoked" and row["revoked_reason"] == "device stolen"
    # First use is over for a probe whose key was revoked: an admin pins the next.
    status, data = _put(collector, {"jwk": _jwk()}, collector.add_probe("p3"))
    assert status == 201
    with closing(collector.open_store()) as store:
        assert store.revoke_probe_key("p3", data["kid"], "2026-12-07T00:00:00.000000Z", "t")
    code, out, _ = _cli(collector, "probe", "rotate", "p3")
    status, data = _put(collector, {"jwk": _jwk()}, out.strip())
    assert status == 409 and "pins" in data["error"]


# --- the store, both backends -----------------------------------------------------------

AT = "2026-12-07T10:00:00.000000Z"
LATER = "2026-12-07T11:00:00.000000Z"


def _add(store: Store, name: str) -> None:
    register_probe(store, name, LineMetadata())


def _bind(store: Store, name: str, kid: str, at: str = AT, replace: bool = False
          ) -> tuple[str, ProbeKey | None]:
    return store.bind_probe_key(name, kid, f'{{"kid":"{kid}"}}',
                                "pinned" if replace else "tofu", at,
                                None if replace else "192.0.2.1", replace=replace)


def test_store_binding_history(store: Store) -> None:
    _add(store, "p1")
    _add(store, "p2")
    assert _bind(store, "nobody", "k0")[0] == "no_probe"
    outcome, key = _bind(store, "p1", "k1")
    assert outcome == "enrolled" and key is not None and key.status == "current"
    assert _bind(store, "p1", "k1")[0] == "known"
    outcome, key = _bind(store, "p1", "k2")
    assert outcome == "bound" and key is not None and key.kid == "k1"
    assert _bind(store, "p1", "k2", LATER, replace=True)[0] == "enrolled"
    assert _bind(store, "p1", "k1", LATER, replace=True)[0] == "taken"
    keys = store.probe_keys("p1")
    assert [(k.kid, k.status, k.source, k.bound_from, k.bound_until,
             k.first_seen_address) for k in keys] == [
        ("k1", "past", "tofu", AT, LATER, "192.0.2.1"),
        ("k2", "current", "pinned", LATER, None, None)]
    assert not store.revoke_probe_key("p2", "k2", LATER, "not p2's")
    assert store.revoke_probe_key("p1", "k2", LATER, "leaked")
    assert not store.revoke_probe_key("p1", "k2", LATER, "twice")
    (k2,) = [k for k in store.probe_keys("p1") if k.kid == "k2"]
    assert (k2.status, k2.bound_until, k2.revoked_reason) == ("revoked", LATER, "leaked")
    assert _bind(store, "p1", "k3")[0] == "closed"
    assert _bind(store, "p1", "k3", LATER, replace=True)[0] == "enrolled"
    assert _bind(store, "p2", "k4")[0] == "enrolled"
    every = store.all_probe_keys(10)
    assert [(k.probe_name, k.kid) for k in every] == [
        ("p1", "k1"), ("p1", "k2"), ("p1", "k3"), ("p2", "k4")]
    assert len(store.all_probe_keys(2)) == 2
    assert store.count("probe_keys") == 4
    assert len(store.dump("probe_keys", None, 10)) == 4


def test_store_migrate_copies_the_keys(tmp_path: Path, store: Store) -> None:
    """`store migrate`: every table of the schema is in the copy's list, and the keys
    come across as they are (into either backend)."""
    path = tmp_path / "source.sqlite3"
    source = open_store(StorageConfig(path=str(path)))
    try:
        with closing(sqlite3.connect(path)) as db:
            tables = {r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                "'sqlite_%'")}
        assert tables == set(TABLES)
        _add(source, "p1")
        _bind(source, "p1", "k1")
        _bind(source, "p1", "k2", LATER, replace=True)
        assert source.revoke_probe_key("p1", "k1", LATER, "old")
        copy_store(source, store)
        assert store.probe_keys("p1") == source.probe_keys("p1")
    finally:
        source.close()


def test_the_evidence_key_is_its_own(tmp_path: Path) -> None:
    """The evidence key: the systemd credential when the unit loads one, else a file of
    its own beside the database (never the ticket key)."""
    cfg = replace(CollectorConfig(), storage=replace(
        CollectorConfig().storage, path=str(tmp_path / "db" / "c.sqlite3")))
    made = keys.evidence_signing_key(cfg, {})
    assert (tmp_path / "db" / keys.EVIDENCE_KEY_FILE).exists()
    assert keys.evidence_signing_key(cfg, {}).kid == made.kid  # read back, not made again
    assert keys.ticket_signing_key(cfg, {}).kid != made.kid
    creds = tmp_path / "creds"
    creds.mkdir()
    other = _key()
    (creds / keys.EVIDENCE_KEY_CREDENTIAL).write_bytes(other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    loaded = keys.evidence_signing_key(cfg, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert loaded.kid == jose.kid_of(other.public_key())
    assert "credential" in loaded.source
    # A unit that loads other credentials but not this one: the file.
    assert keys.evidence_signing_key(
        cfg, {"CREDENTIALS_DIRECTORY": str(tmp_path / "db")}).kid == made.kid


def test_the_jwk_set_needs_no_token(tmp_path: Path) -> None:
    """Public keys are public: the set answers without a token where queries need one."""
    with running_collector(tmp_path, CollectorConfig()) as c:
        assert request("GET", c.url + "/api/v1/results")[0] == 401
        doc, _ = _jwks(c)
        assert [k["bbprobe"] for k in doc["keys"]] == [{"holder": "collector"}]


# --- proof of possession, rotation, one key on several probes -----------------------------

def _statement_body(old: Ed25519PrivateKey, new: Ed25519PrivateKey) -> dict[str, Any]:
    return {"jwk": jose.jwk_of(new.public_key()),
            "proof": keydocs.enrolment_proof(new, "2026-12-07T12:00:00Z"),
            "rotation": keydocs.rotation(old, new.public_key(), "2026-12-07T12:00:00Z")}


def test_enrolment_requires_a_proof(collector: RunningCollector) -> None:
    """Review M4: a probe with no key cannot take another probe's published public key
    on first use: without the private key it has no proof, and the PUT needs one."""
    t1, t2 = collector.add_probe("p1"), collector.add_probe("p2")
    victim = _key()
    published = jose.jwk_of(victim.public_key())
    assert _put(collector, {"jwk": published}, t1)[0] == 201  # p1's own, with its proof
    doc, _ = _jwks(collector)
    assert jose.kid_of(victim.public_key()) in _probe_entries(doc)  # public to anyone
    status, data = _put(collector, {"jwk": published, "proof": None}, t2)
    assert (status, data["field"]) == (422, "proof"), data
    assert data["error"].startswith("proof: required") and "\n" not in data["error"]
    # A proof made by the forger's own key does not prove possession of p1's.
    forger = _key()
    status, data = _put(collector, {"jwk": published,
                                    "proof": keydocs.enrolment_proof(forger, "t")}, t2)
    assert (status, data["field"]) == (422, "proof"), data
    with closing(collector.open_store()) as store:
        assert store.probe_keys("p2") == []
    # A rotation without a proof too: the new key's possession is shown either way.
    new = _key()
    body = {**_statement_body(victim, new), "proof": None}
    status, data = _put(collector, body, t1)
    assert (status, data["field"]) == (422, "proof"), data
    # With the new key's proof the same rotation goes through (an admin's pin, `probe
    # key set`, needs none: test_pinned_then_a_different_key_is_refused).
    assert _put(collector, _statement_body(victim, new), t1)[0] == 201


def test_enrolment_proof_is_checked_when_sent(collector: RunningCollector) -> None:
    token = collector.add_probe("p1")
    key, other = _key(), _key()
    jwk = jose.jwk_of(key.public_key())
    # A proof by another key, a proof with another key's signature, a malformed one.
    forged = {**keydocs.enrolment_proof(key, "t"),
              "signature": keydocs.enrolment_proof(other, "t")["signature"]}
    for bad in (keydocs.enrolment_proof(other, "t"), forged, {"protected": "x"}, "proof"):
        status, data = _put(collector, {"jwk": jwk, "proof": bad}, token)
        assert (status, data["field"]) == (422, "proof"), data
        assert data["error"].startswith("proof: ") and "\n" not in data["error"]
    with closing(collector.open_store()) as store:
        assert store.probe_keys("p1") == []  # nothing bound by a bad proof
    status, data = _put(collector, {"jwk": jwk, "proof": keydocs.enrolment_proof(key, "t")},
                        token)
    assert (status, data) == (201, {"kid": jose.kid_of(key.public_key()),
                                    "status": "enrolled"})
    # Unknown members are still refused.
    assert _put(collector, {"jwk": jwk, "extra": 1}, token)[0] == 422


def test_rotation_signed_by_the_current_key(collector: RunningCollector) -> None:
    token = collector.add_probe("p1")
    a, b = _key(), _key()
    kid_a, kid_b = jose.kid_of(a.public_key()), jose.kid_of(b.public_key())
    assert _put(collector, {"jwk": jose.jwk_of(a.public_key())}, token)[0] == 201
    body = _statement_body(a, b)
    assert _put(collector, body, token) == (
        201, {"kid": kid_b, "status": "rotated", "previous_kid": kid_a})
    # Asked again (the agent crashed before replacing its key file): known.
    assert _put(collector, _statement_body(a, b), token) == (
        200, {"kid": kid_b, "status": "known"})
    with closing(collector.open_store()) as store:
        old, new = store.probe_keys("p1")
    assert (old.kid, old.status, new.kid, new.status, new.source) == (
        kid_a, "past", kid_b, "current", "rotation")
    assert old.bound_until == new.bound_from
    assert new.rotation_jws is not None
    kept = json.loads(new.rotation_jws)
    assert kept == body["rotation"]  # the statement as the probe signed it
    keydocs.verify_rotation(keydocs.open_rotation(kept, body["jwk"]), a.public_key())
    doc, _ = _jwks(collector)
    assert _probe_entries(doc)[kid_b]["bbprobe"]["rotation"] == body["rotation"]
    # The past key cannot rotate again: 409 naming the current key.
    c = _key()
    status, data = _put(collector, _statement_body(a, c), token)
    assert (status, data["bound_kid"]) == (409, kid_b) and kid_a in data["error"]


def test_rotation_by_a_wrong_key_is_refused(collector: RunningCollector) -> None:
    token = collector.add_probe("p1")
    a, b, stranger = (_key() for _ in range(3))
    kid_a = jose.kid_of(a.public_key())
    assert _put(collector, {"jwk": jose.jwk_of(a.public_key())}, token)[0] == 201
    # Signed by a key that is not p1's.
    status, data = _put(collector, _statement_body(stranger, b), token)
    assert (status, data["field"]) == (422, "rotation")
    assert f"which is not a key of probe p1 (its key: {kid_a})" in data["error"]
    # The right kid in the header, another key's signature: does not verify.
    body = _statement_body(a, b)
    body["rotation"]["signature"] = _statement_body(stranger, b)["rotation"]["signature"]
    status, data = _put(collector, body, token)
    assert (status, data["field"]) == (422, "rotation") and "signature" in data["error"]
    # A statement handing over to another key than the one sent.
    body = _statement_body(a, b)
    body["jwk"] = jose.jwk_of(stranger.public_key())
    body["proof"] = keydocs.enrolment_proof(stranger, "t")
    status, data = _put(collector, body, token)
    assert (status, data["field"]) == (422, "rotation") and "hands over" in data["error"]
    # Signed by a revoked key: named revoked, with when and why.
    with closing(collector.open_store()) as store:
        assert store.revoke_probe_key("p1", kid_a, "2026-12-07T13:00:00.000000Z", "lost")
    status, data = _put(collector, _statement_body(a, b), token)
    assert status == 422 and "revoked 2026-12-07T13:00:00.000000Z: lost" in data["error"]
    with closing(collector.open_store()) as store:
        assert [k.kid for k in store.probe_keys("p1")] == [kid_a]  # nothing bound


def test_one_key_on_several_probes(collector: RunningCollector) -> None:
    """A technician's laptop measuring two lines of one collector, a token each: each
    line's probe takes the laptop's key on first use; the JWK Set lists both bindings;
    a rotation through one line moves both; a revoked key is named and bound nowhere."""
    t1, t2 = collector.add_probe("line-a"), collector.add_probe("line-b")
    laptop = _key()
    kid = jose.kid_of(laptop.public_key())
    body = {"jwk": jose.jwk_of(laptop.public_key()),
            "proof": keydocs.enrolment_proof(laptop, "t")}
    assert _put(collector, body, t1) == (201, {"kid": kid, "status": "enrolled"})
    assert _put(collector, body, t2) == (201, {"kid": kid, "status": "enrolled"})
    doc, _ = _jwks(collector)
    members = [k for k in doc["keys"] if k["kid"] == kid]
    assert sorted(m["bbprobe"]["probe"] for m in members) == ["line-a", "line-b"]
    assert {m["bbprobe"]["status"] for m in members} == {"current"}
    new = _key()
    new_kid = jose.kid_of(new.public_key())
    assert _put(collector, _statement_body(laptop, new), t1)[0] == 201
    with closing(collector.open_store()) as store:
        for line in ("line-a", "line-b"):
            assert [(k.kid, k.status) for k in store.probe_keys(line)] == [
                (kid, "past"), (new_kid, "current")]
    assert _put(collector, _statement_body(laptop, new), t2)[1]["status"] == "known"
    code, out, _ = _cli(collector, "probe", "key", "list", "line-b")
    assert code == 0 and out.splitlines()[1].startswith(f"{new_kid}  current  rotation  ")
    # Revoked on one line: the CLI names the other binding; the key is bound nowhere
    # new, and the 409 names it.
    code, out, err = _cli(collector, "probe", "key", "revoke", "line-a", new_kid,
                          "--reason", "laptop stolen")
    assert code == 0, err
    assert "also bound to 'line-b'" in out
    t3 = collector.add_probe("line-c")
    status, data = _put(collector, {"jwk": jose.jwk_of(new.public_key())}, t3)
    assert (status, data["bound_kid"]) == (409, new_kid)
    assert "revoked on probe 'line-a'" in data["error"] and "laptop stolen" in data["error"]


def _rot(store: Store, name: str, old: str, new: str, at: str = LATER) -> tuple[str, Any]:
    return store.rotate_probe_key(name, old, new, f'{{"kid":"{new}"}}', at, "192.0.2.9",
                                  f'{{"by":"{old}"}}')


def test_store_rotation_and_shared_keys(store: Store) -> None:
    for name in ("p1", "p2", "p3"):
        _add(store, name)
    assert _bind(store, "p1", "k1")[0] == "enrolled"
    assert _bind(store, "p2", "k1")[0] == "enrolled"  # the same device on another line
    assert _bind(store, "p3", "k9")[0] == "enrolled"
    assert _rot(store, "nobody", "k1", "k2")[0] == "no_probe"
    outcome, key = _rot(store, "p1", "k9", "k2")
    assert outcome == "stale" and key is not None and key.kid == "k1"
    assert _rot(store, "p1", "k1", "k1")[0] == "known"
    outcome, key = _rot(store, "p1", "k1", "k2")
    assert outcome == "rotated" and key is not None
    assert (key.source, key.rotation_jws) == ("rotation", '{"by":"k1"}')
    assert _rot(store, "p1", "k1", "k2")[0] == "known"
    for name in ("p1", "p2"):  # both lines moved together
        assert [(k.kid, k.status, k.bound_until) for k in store.probe_keys(name)] == [
            ("k1", "past", LATER), ("k2", "current", None)]
    assert store.probe_keys("p3")[0].status == "current"  # another device: untouched
    assert _rot(store, "p1", "k2", "k1")[0] == "taken"  # a key of its past
    assert store.revoke_probe_key("p3", "k9", LATER, "lost")
    assert _rot(store, "p1", "k2", "k9")[0] == "taken"  # revoked elsewhere
    assert _bind(store, "p1", "k9", LATER, replace=True)[0] == "taken"


def test_concurrent_first_contacts_never_fail(store: Store) -> None:
    """Eight first contacts of one probe at the same instant (PostgreSQL's connection
    pool runs them at once): one key is bound, the others are told which, none fails."""
    _add(store, "p1")
    _add(store, "p2")
    workers = max(1, min(8, getattr(store, "concurrency", 1)))

    def first_contact(i: int) -> str:
        return _bind(store, "p1" if i % 2 else "p2", f"k{i % 4}")[0]

    with ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(first_contact, range(16)))
    assert sorted(set(outcomes)) == ["bound", "enrolled", "known"]
    assert outcomes.count("enrolled") == 2  # one per probe
    assert {k.status for k in store.all_probe_keys(10)} == {"current"}
    assert len(store.all_probe_keys(10)) == 2


def test_a_bind_that_loses_a_race_is_answered_not_failed(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read saw no key, but another transaction's committed in between (the unique
    index says so at the insert): the binding runs again and answers from the winner's
    row, never an integrity error (a 500)."""
    _add(store, "p1")
    assert _bind(store, "p1", "k1")[0] == "enrolled"
    real = sql_probe_keys._held
    calls: list[int] = []

    def stale_once(tx: Any, probes: Any, kids: Any) -> list[ProbeKey]:
        calls.append(1)
        return [] if len(calls) == 1 else real(tx, probes, kids)

    monkeypatch.setattr(sql_probe_keys, "_held", stale_once)
    outcome, key = _bind(store, "p1", "k1")
    assert outcome == "known" and key is not None and key.kid == "k1"
    assert len(calls) == 2
    calls.clear()
    outcome, key = _bind(store, "p1", "k2")  # the index on the current key, this time
    assert outcome == "bound" and key is not None and key.kid == "k1"


def test_rotations_stop_at_the_history_cap(store: Store, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """A probe rotating without end would push every other probe's keys out of the
    public JWK Set (JWKS_MAX_KEYS): its own rotations stop at MAX_ROTATED_KEYS keys (409
    naming its current key), and another probe's keys are untouched. Both backends."""
    from collector.fleet import probe_keys

    monkeypatch.setattr(probe_keys, "MAX_ROTATED_KEYS", 3)
    _add(store, "hostile")
    _add(store, "other")
    keys_ = [_key() for _ in range(4)]
    probe_keys.bind(store, "other", _key().public_key(), "tofu", AT)
    probe_keys.bind(store, "hostile", keys_[0].public_key(), "tofu", AT)
    for old, new in itertools.pairwise(keys_[:3]):
        fresh, _ = probe_keys.rotate(store, "hostile", new.public_key(),
                                     keydocs.rotation(old, new.public_key(), AT), AT)
        assert fresh
    with pytest.raises(probe_keys.KeyConflict, match="3 keys in its history") as refused:
        probe_keys.rotate(store, "hostile", keys_[3].public_key(),
                          keydocs.rotation(keys_[2], keys_[3].public_key(), AT), AT)
    assert refused.value.bound_kid == jose.kid_of(keys_[2].public_key())
    assert len(store.probe_keys("hostile")) == 3 and len(store.probe_keys("other")) == 1
