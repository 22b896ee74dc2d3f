"""The probes' public keys (Ed25519, RFC 8032): enrolment by trust on first use through a
real collector (PUT /api/v1/probe/key), pinning, rotation and revocation by the CLI, the
JWK Set (GET /.well-known/bbprobe-keys.json), and the store's part on both backends."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import jose
from collector import keys
from collector.cli.main import main
from collector.config import CollectorConfig, StorageConfig
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector, running_collector
from collector.storage.model import ProbeKey
from collector.storage.sql.backends import open_store
from collector.storage.sql.copy import TABLES
from collector.storage.sql.migrate import copy_store
from collector.storage.store import Store
from tests.httpclient import request

ENROL = "/api/v1/probe/key"
JWKS = "/.well-known/bbprobe-keys.json"


def _jwk() -> dict[str, str]:
    return jose.jwk_of(Ed25519PrivateKey.generate().public_key())


def _put(c: RunningCollector, body: Any, token: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
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
    assert _put(collector, b" " * 5000, token)[0] == 413
    assert _put(collector, {"jwk": jwk}, None)[0] == 401
    assert _put(collector, {"jwk": jwk}, "bbp_nonsense")[0] == 401
    with closing(collector.open_store()) as store:
        (key,) = store.probe_keys("p1")
    assert (key.kid, key.source, key.status, key.first_seen_address) == (
        kid, "tofu", "current", "127.0.0.1")
    assert json.loads(key.jwk) == jwk


def test_pinned_then_a_different_key_is_refused(collector: RunningCollector,
                                                tmp_path: Path) -> None:
    public = Ed25519PrivateKey.generate().public_key()
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
    assert _bind(store, "p2", "k1")[0] == "taken"
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
    other = Ed25519PrivateKey.generate()
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
