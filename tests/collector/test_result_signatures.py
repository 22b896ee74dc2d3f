"""Signed results in storage (issue 27, design 4): each stored result's JWS parts in
result_signatures, written with the result and never on a duplicate, read back so the
JWS is rebuilt exactly; each probe's hash chain read as links; the table carried by a
copy between backends and gone with a deleted result; a signature stripped in the store
shown as a downgrade (review H2); and migration 24 / PostgreSQL 13 (one key bound to
several probes, the rotation JWS, gap_signatures), from the version before with key rows
(review T3), safe to run again."""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import jose
from agent.evidence import Link, chain_breaks, open_result, sign_result, undocumented, verify
from agent.schema import SessionResult
from collector.config import StorageConfig
from collector.intake import ingest
from collector.lines import LineMetadata
from collector.storage.model import (
    GapSignature,
    NewResult,
    ResultSignature,
    SignatureStatus,
)
from collector.storage.sql.backends import open_store
from collector.storage.sql.base import Tx
from collector.storage.sql.migrate import copy_store
from collector.storage.sql.signatures import pack_payload, unpack_payload
from collector.storage.sql.sqlite import DIALECT
from collector.storage.sql.sqlite_migrations import MIGRATIONS
from collector.storage.store import Store
from tests.factories import canonical_json, session

KEY = Ed25519PrivateKey.generate()
KID = jose.kid_of(KEY.public_key())
RECEIVED = "2026-11-22T00:00:00.000000Z"


def _result(seq: int | None, probe: str = "p1", hour: int = 0) -> SessionResult:
    result = session(probe, started_at=f"2026-11-21T{hour:02d}:00:00.000000Z")
    return replace(result, session_seq=seq)


def _new(result: SessionResult, prev: str | None = None, *, signed: bool = True,
         payload: bytes | None = None, status: SignatureStatus = "verified"
         ) -> tuple[NewResult, dict[str, str] | None]:
    """A NewResult as ingest makes it, signed over its canonical JSON (or over
    ``payload``, the bytes a probe signed before it knew its name), and its JWS."""
    accepted = ingest.parse_body(canonical_json(result).encode())
    signature, jws = None, None
    if signed:
        signed_bytes = payload if payload is not None else accepted.body.encode()
        jws = sign_result(KEY, signed_bytes, prev)
        opened = open_result(jws)
        signature = ResultSignature(opened.kid, jws["protected"], jws["signature"],
                                    opened.prev, payload, status)
    item = NewResult(result_id=result.result_id, probe_name=result.probe_id,
                     schema_version=result.schema_version, started_at=accepted.started_at,
                     ended_at=accepted.ended_at, received_at=RECEIVED, body=accepted.body,
                     body_sha256=accepted.body_sha256, facts=accepted.facts,
                     session_seq=result.session_seq, packed=accepted.packed,
                     signature=signature)
    return item, jws


def _probe(store: Store, name: str = "p1") -> None:
    store.add_probe(name, f"digest-{name}", "2026-11-01T00:00:00.000000Z", LineMetadata())


def test_a_signature_is_stored_with_its_result_and_rebuilds_the_jws(store: Store) -> None:
    """Stored with the result: the JWS rebuilt from the row and the stored body is the
    one signed, byte for byte, and verifies; an unsigned result has no row; a resent
    result (a duplicate) and another content under the same id (a conflict) change
    nothing."""
    _probe(store)
    signed, jws = _new(_result(1))
    plain, _ = _new(_result(2, hour=1), signed=False)
    assert store.insert_results([signed, plain]) == ["stored", "stored"]
    got = store.result_signatures([signed.result_id, plain.result_id, "nope"])
    assert set(got) == {signed.result_id}
    sig = got[signed.result_id]
    assert (sig.kid, sig.prev_sha256, sig.payload, sig.status) == (KID, None, None,
                                                                    "verified")
    stored = store.result(signed.result_id)
    assert stored is not None
    rebuilt = sig.jws(stored.body.encode())
    assert rebuilt == jws
    verify(open_result(rebuilt), KEY.public_key())
    # Resent with another signature (the same result): a duplicate, the first kept.
    assert signed.signature is not None
    again = replace(signed, signature=replace(signed.signature, status="unverified",
                                              signature="A" * 86))
    assert store.insert_results([again]) == ["duplicate"]
    assert store.result_signatures([signed.result_id])[signed.result_id] == sig
    # Other content under the unsigned one's id: a conflict, and no signature row.
    other, _ = _new(replace(_result(2, hour=1), result_id=plain.result_id,
                            session_seq=9))
    assert store.insert_results([other]) == ["conflict"]
    assert store.result_signatures([plain.result_id]) == {}
    assert store.result_signatures([]) == {}


def test_a_payload_other_than_the_body_is_kept_compressed(store: Store) -> None:
    """A result spooled before the probe knew its name (probe_id ""), named by the
    collector: the signed bytes are kept (zstd) and given back as they were, so the JWS
    rebuilds; and the chain link is theirs, not the renamed body's."""
    _probe(store)
    unnamed = replace(_result(1), probe_id="")
    payload = canonical_json(unnamed).encode()
    item, jws = _new(_result(1), payload=payload, status="unverified")
    assert item.body.encode() != payload
    assert store.insert_results([item]) == ["stored"]
    sig = store.result_signatures([item.result_id])[item.result_id]
    assert sig.payload == payload and sig.status == "unverified"
    stored = store.result(item.result_id)
    assert stored is not None and sig.jws(stored.body.encode()) == jws
    (link,) = store.chain_links("p1", None, None)
    assert link.sha256 == hashlib.sha256(payload).hexdigest() != item.body_sha256


def test_chain_links_follow_session_seq(store: Store) -> None:
    """Links by session_seq: each signed one names its predecessor's SHA-256, an
    unsigned one is a link that names nothing, a result without a number has no place;
    another probe's and out-of-scope results are not in it. chain_breaks finds the
    unsigned link after a signed one (a downgrade) and the swapped link."""
    _probe(store)
    _probe(store, "p2")
    first, _ = _new(_result(1, hour=1))
    second, _ = _new(_result(2, hour=2), prev=first.body_sha256)
    third, _ = _new(_result(3, hour=3), signed=False)
    # Names a hash that is not the third's: a replaced predecessor.
    fourth, _ = _new(_result(4, hour=4), prev="0" * 64)
    unnumbered, _ = _new(_result(None, hour=5))
    elsewhere, _ = _new(_result(1, probe="p2", hour=1))
    assert store.insert_results([fourth, third, second, first, unnumbered, elsewhere]) \
        == ["stored"] * 6
    links = store.chain_links("p1", None, None)
    assert links == [
        Link(1, first.result_id, first.body_sha256, None, True),
        Link(2, second.result_id, second.body_sha256, first.body_sha256, True),
        Link(3, third.result_id, third.body_sha256, None, False),
        Link(4, fourth.result_id, fourth.body_sha256, "0" * 64, True),
    ]
    assert [(b.kind, b.seq, b.result_id) for b in chain_breaks(links)] == [
        ("downgrade", 3, third.result_id), ("mismatch", 4, fourth.result_id)]
    # [since, until) on started_at.
    assert [k.seq for k in store.chain_links("p1", "2026-11-21T02:00:00.000000Z",
                                             "2026-11-21T04:00:00.000000Z")] == [2, 3]
    assert [k.result_id for k in store.chain_links("p2", None, None)] == \
        [elsewhere.result_id]
    assert store.chain_links("nobody", None, None) == []


def test_a_deleted_result_takes_its_signature_with_it(store: Store) -> None:
    """`result delete` removes the signature row too (it references the result), and
    the chain then shows the deletion as documented, not missing."""
    _probe(store)
    items = []
    prev = None
    for seq in (1, 2, 3):
        item, _ = _new(_result(seq, hour=seq), prev=prev)
        items.append(item)
        prev = item.body_sha256
    assert store.insert_results(items) == ["stored"] * 3
    assert store.delete_result(items[1].result_id, "poisoned", RECEIVED, "ops") is not None
    assert set(store.result_signatures([i.result_id for i in items])) == \
        {items[0].result_id, items[2].result_id}
    links = store.chain_links("p1", None, None)
    (hole,) = chain_breaks(links, store.gap_seq_ranges(["p1"])["p1"])
    assert (hole.kind, hole.seq) == ("documented", 3)
    assert chain_breaks(links)[0].kind == "missing"


def test_copy_carries_the_signatures(tmp_path: Path, store: Store) -> None:
    """`store migrate` copies result_signatures as they are, into either backend, the
    compressed payload included; and a key bound to two probes."""
    source = open_store(StorageConfig(path=str(tmp_path / "source.sqlite3")))
    try:
        _probe(source)
        _probe(source, "p2")
        payload = canonical_json(replace(_result(2, hour=2), probe_id="")).encode()
        one, _ = _new(_result(1, hour=1))
        two, _ = _new(_result(2, hour=2), prev=one.body_sha256, payload=payload)
        assert source.insert_results([one, two]) == ["stored", "stored"]
        for name in ("p1", "p2"):
            outcome, _key = source.bind_probe_key(name, KID, '{"kid":"k"}', "tofu", RECEIVED,
                                                  None)
            assert outcome == "enrolled"
        copy_store(source, store)
        ids = [one.result_id, two.result_id]
        assert store.result_signatures(ids) == source.result_signatures(ids)
        assert store.result_signatures(ids)[two.result_id].payload == payload
        assert store.chain_links("p1", None, None) == source.chain_links("p1", None, None)
        assert [k.probe_name for k in store.all_probe_keys(10)] == ["p1", "p2"]
    finally:
        source.close()


def test_a_damaged_payload_is_an_error_not_other_bytes() -> None:
    from collector.storage.codec import CodecError

    packed = pack_payload(b'{"a": 1}')
    assert unpack_payload(packed) == b'{"a": 1}'
    damaged = packed[:-6] + bytes(6)
    with pytest.raises(CodecError, match="corrupt"):
        unpack_payload(damaged)


def _upgrade_from_23(path: Path) -> None:
    """A SQLite file at schema 23 (keys unique by kid), holding two probes and a key."""
    with closing(sqlite3.connect(path)) as db:
        for step in MIGRATIONS[:23]:
            if callable(step):
                step(Tx(db, DIALECT))
            else:
                db.executescript(step)
        for name in ("p1", "p2"):
            db.execute("INSERT INTO probes (name, token_sha256, created_at) VALUES "
                       "(?, ?, '2026-01-01T00:00:00.000000Z')", (name, f"d-{name}"))
        db.execute("INSERT INTO probe_keys (probe_name, kid, jwk, source, first_seen_at, "
                   "bound_from) VALUES ('p1', 'k1', '{}', 'tofu', 'a', 'a')")
        db.execute("PRAGMA user_version = 23")
        db.commit()


def test_migration_24_keys_probe_keys_by_probe_and_kid(tmp_path: Path) -> None:
    """Upgraded from 23: the key row kept, rotation_jws NULL; one kid may now be bound
    to two probes (not twice to one; one current key per probe still); the 'rotation'
    source allowed; run again (a rewound database), nothing changes."""
    path = tmp_path / "old.sqlite3"
    _upgrade_from_23(path)
    with closing(open_store(StorageConfig(path=str(path)))) as store:
        assert store.schema_version == len(MIGRATIONS) == 25
        assert [(k.probe_name, k.kid) for k in store.probe_keys("p1")] == [("p1", "k1")]
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA foreign_keys=ON")
        assert db.execute("SELECT rotation_jws FROM probe_keys").fetchall() == [(None,)]
        db.execute("INSERT INTO probe_keys (probe_name, kid, jwk, source, first_seen_at, "
                   "bound_from, rotation_jws) VALUES ('p2', 'k1', '{}', 'rotation', 'b', "
                   "'b', '{\"protected\":\"x\"}')")
        with pytest.raises(sqlite3.IntegrityError):  # (probe, kid) once
            db.execute("INSERT INTO probe_keys (probe_name, kid, jwk, source, "
                       "first_seen_at, bound_from, bound_until) "
                       "VALUES ('p1', 'k1', '{}', 'tofu', 'c', 'c', 'd')")
        with pytest.raises(sqlite3.IntegrityError):  # one current key per probe
            db.execute("INSERT INTO probe_keys (probe_name, kid, jwk, source, "
                       "first_seen_at, bound_from) VALUES ('p1', 'k2', '{}', 'tofu', 'c', "
                       "'c')")
        with pytest.raises(sqlite3.IntegrityError):  # a source nobody knows
            db.execute("INSERT INTO probe_keys (probe_name, kid, jwk, source, "
                       "first_seen_at, bound_from, bound_until) "
                       "VALUES ('p1', 'k3', '{}', 'guess', 'c', 'c', 'd')")
        with pytest.raises(sqlite3.IntegrityError):  # signatures reference results
            db.execute("INSERT INTO result_signatures VALUES ('nope', 'k1', 'p', 's', "
                       "NULL, NULL, 'verified', 'r')")
        with pytest.raises(sqlite3.IntegrityError):  # and gap records theirs
            db.execute("INSERT INTO gap_signatures VALUES ('nope', NULL, NULL, NULL, "
                       "x'00', 'r', 'unsigned')")
        db.commit()
        db.execute("PRAGMA user_version = 23")
        db.commit()
    with closing(open_store(StorageConfig(path=str(path)))) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert [(k.probe_name, k.kid, k.source) for k in store.all_probe_keys(10)] == \
            [("p1", "k1", "tofu"), ("p2", "k1", "rotation")]
    with closing(sqlite3.connect(path)) as db:
        indexes = {r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = "
            "'probe_keys'")}
        assert {"probe_keys_probe", "probe_keys_current", "probe_keys_kid"} <= indexes


def test_the_migration_runs_again_on_either_backend(storage: StorageConfig) -> None:
    """A database rewound to the version before (a repair, a test) upgrades again with
    its signatures and keys as they were (SQLite's 24, PostgreSQL's 13)."""
    store = open_store(storage)
    try:
        _probe(store)
        _probe(store, "p2")
        item, jws = _new(_result(1))
        assert store.insert_results([item]) == ["stored"]
        for name in ("p1", "p2"):
            assert store.bind_probe_key(name, KID, "{}", "tofu", RECEIVED, None)[0] == \
                "enrolled"
        assert store.insert_gap("g1", "p1", RECEIVED, "spool_full", 1, RECEIVED, RECEIVED,
                                "d", [(7, 7)], signature=GapSignature(
                                    b'{"gap_id":"g1"}', RECEIVED, "unsigned")) == "stored"
        gaps = store.gap_evidence("p1")
        latest = store.schema_version
    finally:
        store.close()
    if storage.backend == "postgresql":
        import psycopg

        with psycopg.connect(storage.url, autocommit=True) as conn:
            conn.execute("UPDATE bbprobe_schema SET version = %s", (latest - 1,))
    else:
        with closing(sqlite3.connect(storage.path)) as db:
            db.execute(f"PRAGMA user_version = {latest - 1}")
            db.commit()
    with closing(open_store(storage)) as again:
        assert again.schema_version == latest
        sig = again.result_signatures([item.result_id])[item.result_id]
        stored = again.result(item.result_id)
        assert stored is not None and sig.jws(stored.body.encode()) == jws
        assert [(k.probe_name, k.kid) for k in again.all_probe_keys(10)] == \
            [("p1", KID), ("p2", KID)]
        assert again.gap_evidence("p1") == gaps and gaps[0].document == b'{"gap_id":"g1"}'


def test_a_signature_stripped_in_the_store_shows_as_a_downgrade(store: Store) -> None:
    """Review H2: someone with database access deletes the signature row of the last
    signed session (and could then edit its body): the chain still shows it, as an
    unsigned link after a signed one, which chain_breaks counts as a change."""
    _probe(store)
    first, _ = _new(_result(1, hour=1))
    second, _ = _new(_result(2, hour=2), prev=first.body_sha256)
    third, _ = _new(_result(3, hour=3), prev=second.body_sha256)
    assert store.insert_results([first, second, third]) == ["stored"] * 3
    assert chain_breaks(store.chain_links("p1", None, None)) == []
    sql: Any = store  # the attacker's write, through the store's own transaction
    sql._transaction(lambda tx: tx.run(
        "DELETE FROM result_signatures WHERE result_id = ?", (third.result_id,)))
    links = store.chain_links("p1", None, None)
    assert [link.signed for link in links] == [True, True, False]
    breaks = chain_breaks(links)
    assert [(b.kind, b.seq, b.result_id) for b in breaks] == \
        [("downgrade", 3, third.result_id)]
    assert undocumented(breaks) == breaks


def test_postgresql_migration_13_upgrades_a_version_12_database(pg_url: str) -> None:
    """Review T3: a PostgreSQL database at version 12 (keys unique by kid) holding key
    rows upgrades to 13: the rows kept, rotation_jws NULL, the primary key now (probe,
    kid) and the source check allowing 'rotation' (so the constraint names migration 13
    drops are the ones 12 made: no second primary key, no stale check), the signature
    tables made with their foreign keys; and run again, nothing changes."""
    import psycopg

    from collector.storage.sql.postgres import DIALECT as PG_DIALECT
    from collector.storage.sql.postgres_migrations import MIGRATIONS as PG
    from collector.storage.sql.postgres_migrations import ddl

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bbprobe_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO bbprobe_schema VALUES (12)")
        for step in PG[:12]:
            if callable(step):  # as collector/storage/sql/postgres.py runs them
                step(Tx(conn, PG_DIALECT))
                continue
            for statement in ddl(step).split(";"):
                if statement.strip():
                    conn.execute(statement.encode())
        for name in ("p1", "p2"):
            conn.execute("INSERT INTO probes (name, token_sha256, created_at) VALUES "
                         "(%s, %s, '2026-01-01T00:00:00.000000Z')", (name, f"d-{name}"))
        conn.execute("INSERT INTO probe_keys (probe_name, kid, jwk, source, first_seen_at, "
                     "bound_from, bound_until) VALUES ('p1', 'k0', '{}', 'tofu', 'a', 'a', "
                     "'b')")
        conn.execute("INSERT INTO probe_keys (probe_name, kid, jwk, source, first_seen_at, "
                     "bound_from) VALUES ('p1', 'k1', '{}', 'pinned', 'b', 'b')")
    storage = StorageConfig(backend="postgresql", url=pg_url, pool_size=2)
    with closing(open_store(storage)) as store:
        assert store.schema_version == len(PG) >= 13
        assert [(k.kid, k.source, k.rotation_jws) for k in store.probe_keys("p1")] == \
            [("k0", "tofu", None), ("k1", "pinned", None)]
        # One kid on two probes, introduced by a rotation: allowed now.
        assert store.bind_probe_key("p2", "k1", "{}", "tofu", RECEIVED, None)[0] == \
            "enrolled"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        constraints: dict[str, str] = dict(conn.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'probe_keys'::regclass AND contype IN ('p', 'c')").fetchall())
        assert constraints["probe_keys_pkey"] == "PRIMARY KEY (probe_name, kid)"
        assert "rotation" in constraints["probe_keys_source_check"]
        assert len(constraints) == 2, constraints
        with pytest.raises(psycopg.errors.UniqueViolation):  # (probe, kid) once
            conn.execute("INSERT INTO probe_keys (probe_name, kid, jwk, source, "
                         "first_seen_at, bound_from, bound_until) "
                         "VALUES ('p1', 'k0', '{}', 'tofu', 'c', 'c', 'd')")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO probe_keys (probe_name, kid, jwk, source, "
                         "first_seen_at, bound_from, bound_until) "
                         "VALUES ('p1', 'k3', '{}', 'guess', 'c', 'c', 'd')")
        for table, row in (("result_signatures", "('nope', 'k1', 'p', 's', NULL, NULL, "
                                                 "'verified', 'r')"),
                           ("gap_signatures", "('nope', NULL, NULL, NULL, '\\x00', 'r', "
                                              "'unsigned')")):
            with pytest.raises(psycopg.errors.ForeignKeyViolation):
                conn.execute(f"INSERT INTO {table} VALUES {row}")
        conn.execute("UPDATE bbprobe_schema SET version = 12")
    with closing(open_store(storage)) as again:
        assert again.schema_version == len(PG)
        assert [(k.probe_name, k.kid) for k in again.all_probe_keys(10)] == \
            [("p1", "k0"), ("p1", "k1"), ("p2", "k1")]
