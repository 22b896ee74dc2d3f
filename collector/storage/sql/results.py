"""Results and gap records: stored once each (exactly-once, however often delivered),
read by scope, packed in place, deleted with an audit row; and the session numbers
completeness counts (reliability.md C8)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import orjson

from agent.decoding import parse_result
from collector import unreadable
from collector.compliance import rollup
from collector.storage import codec
from collector.storage.model import GapSignature, InsertOutcome, NewResult, StoredResult
from collector.storage.sql import partitions
from collector.storage.sql.base import SqlBase, Tx, readable
from collector.storage.sql.facts import add_to_day, insert_session_facts, rebuild_day
from collector.storage.sql.signatures import (
    insert_gap_signature,
    insert_signature,
    same_gap,
)


class ResultQueries(SqlBase):
    """The results, gaps and result_deletions tables."""

    def insert_results(self, items: Sequence[NewResult]) -> list[InsertOutcome]:
        """Store results and their facts once each, in one transaction (one fsync for a
        batch). Same id and content again: "duplicate" (nothing written); same id with
        other content: "conflict". Safe against the same result arriving at two
        collector processes at once: the second insert waits for the first's commit,
        then finds the row."""
        return self._transaction(lambda tx: self._insert_results(tx, items))

    def _insert_results(self, tx: Tx, items: Sequence[NewResult]) -> list[InsertOutcome]:
        outcomes: list[InsertOutcome] = ["duplicate"] * len(items)
        stored: list[tuple[int, NewResult]] = []
        # In result_id order: two processes inserting overlapping batches take the unique
        # keys in the same order and so cannot deadlock on them.
        for index, item in sorted(enumerate(items), key=lambda pair: pair[1].result_id):
            packed = item.packed
            # No conflict target: SQLite's only unique key here is result_id, and
            # PostgreSQL's partitioned results claims the id in result_ids (a trigger,
            # storage/sql/partitions.py), dropping the row when it is taken.
            added = tx.run(
                "INSERT INTO results (result_id, probe_name, schema_version, started_at, "
                "ended_at, received_at, body_sha256, body, body_packed, clock_skew_s, "
                "session_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (item.result_id, item.probe_name, item.schema_version, item.started_at,
                 item.ended_at, item.received_at, item.body_sha256,
                 "" if packed is not None else item.body, packed, item.clock_skew_s,
                 item.session_seq))
            if not added:
                row = tx.one("SELECT body_sha256, body, body_packed FROM results "
                             "WHERE result_id = ?", (item.result_id,))
                if row is None and self.dialect.name == "postgresql" and \
                        partitions.detached_result(tx, item.result_id):
                    # Its month's bodies were detached (retention): the id is kept so it
                    # is not stored again, but the row is out of reach and its hash cannot
                    # be compared: a duplicate, not a conflict the probe would dead-letter
                    # (docs/scaling.md, section 6; review 2, finding 3).
                    outcomes[index] = "duplicate"
                    continue
                # A packed row's hash is of today's canonical form: another hash is
                # other content. Only a row an older release stored as text is
                # compared by content (one parse of it, on this rare path).
                same = row is not None and (row[0] == item.body_sha256 or (
                    row[2] is None and _same_document(row[1], item.body)))
                outcomes[index] = "duplicate" if same else "conflict"
                if same and item.signature is not None:
                    # Review M6: an unsigned copy stored first (a spool edited, an
                    # older agent's resend) must not throw the genuine signature away.
                    insert_signature(tx, item, stored_sha256=row[0] if row else None)
                continue
            insert_session_facts(tx, item.facts, item.probe_name)
            insert_signature(tx, item)
            if self.outbox:
                tx.run("INSERT INTO influx_outbox (result_id, queued_at) VALUES (?, ?)",
                       (item.result_id, item.received_at))
            outcomes[index] = "stored"
            stored.append((index, item))
        # Day rows are locked in one order (probe, day) whatever the batch's order, so
        # two processes merging into the same days cannot deadlock. Sessions of one day
        # merge in the batch's order (stable sort, from arrival order).
        for _index, item in sorted(stored, key=lambda pair: (
                pair[1].probe_name, rollup.day_of(pair[1].facts.started_at), pair[0])):
            add_to_day(tx, item.probe_name, item.facts, self.dialect.for_update)
        return outcomes

    def insert_gap(self, gap_id: str, probe_name: str, received_at: str, reason: str,
                   dropped: int, first: str, last: str, body_sha256: str,
                   seq_ranges: Sequence[tuple[int, int]] = (),
                   signature: GapSignature | None = None) -> InsertOutcome:
        """Store a gap record once, with ``signature`` (the record whole: table
        gap_signatures). Same id and content again: "duplicate" (a signed copy of a
        record stored unsigned adds its signature); other content: "conflict"."""
        def work(tx: Tx) -> InsertOutcome:
            added = tx.run(
                "INSERT INTO gaps (gap_id, probe_name, received_at, reason, dropped, "
                "first_started_at, last_started_at, body_sha256, seq_ranges) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (gap_id) DO NOTHING",
                (gap_id, probe_name, received_at, reason, dropped, first, last, body_sha256,
                 json.dumps([list(r) for r in seq_ranges])))
            if added:
                if signature is not None:
                    insert_gap_signature(tx, gap_id, signature)
                return "stored"
            if same_gap(tx, gap_id, signature):
                return "duplicate"
            row = tx.one("SELECT body_sha256 FROM gaps WHERE gap_id = ?", (gap_id,))
            return "duplicate" if row is not None and row[0] == body_sha256 else "conflict"

        return self._transaction(work)

    def session_seqs(self, probes: Sequence[str] | None, since: str | None,
                     until: str | None) -> list[tuple[str, int, str]]:
        """(probe, session_seq, started_at) of every numbered result in scope."""
        where, params = self._scope(probes, since, until)
        return [(r[0], int(r[1]), r[2]) for r in self._read(
            "SELECT probe_name, session_seq, started_at, result_id FROM results "
            f"WHERE {where} AND session_seq IS NOT NULL ORDER BY probe_name, session_seq",
            params) if readable(r[3], r[2])]

    def seqs_before(self, probes: Sequence[str] | None, since: str | None) -> dict[str, int]:
        """Each probe's highest session_seq delivered before ``since`` (none: {})."""
        if since is None:
            return {}
        where, params = self._scope(probes, None, since)
        return {r[0]: int(r[1]) for r in self._read(
            f"SELECT probe_name, MAX(session_seq) FROM results WHERE {where} AND "
            "session_seq IS NOT NULL GROUP BY probe_name", params)}

    def gap_seq_ranges(self, probes: Sequence[str] | None) -> dict[str, list[tuple[int, int]]]:
        """Every gap record's dropped sequence numbers, by probe."""
        where, params = self._scope(probes, None, None)
        out: dict[str, list[tuple[int, int]]] = {}
        for probe, ranges in self._read(
                f"SELECT probe_name, seq_ranges FROM gaps WHERE {where} "
                "ORDER BY probe_name, first_started_at, gap_id", params):
            out.setdefault(probe, []).extend((int(a), int(b)) for a, b in json.loads(ranges))
        # Results an operator removed (`result delete`) are documented too, not missing.
        for probe, seq in self._read(
                f"SELECT probe_name, session_seq FROM result_deletions WHERE {where} "
                "AND session_seq IS NOT NULL ORDER BY probe_name, session_seq", params):
            out.setdefault(probe, []).append((int(seq), int(seq)))
        return out

    def gap_seq_reasons(self, probes: Sequence[str] | None
                        ) -> dict[str, list[tuple[int, int, str]]]:
        """Each gap record's dropped sequence ranges with the reason the probe gave
        (agent/spool.py: the spool full, the disk full...), by probe, one entry per
        range; recorded deletions are not gap records and are not here."""
        where, params = self._scope(probes, None, None)
        out: dict[str, list[tuple[int, int, str]]] = {}
        for probe, ranges, reason in self._read(
                f"SELECT probe_name, seq_ranges, reason FROM gaps WHERE {where} "
                "ORDER BY probe_name, first_started_at, gap_id", params):
            out.setdefault(probe, []).extend(
                (int(a), int(b), str(reason)) for a, b in json.loads(ranges))
        return out

    def signing_keys(self, kids: Sequence[str]) -> dict[str, str]:
        """The public JWK (JSON text, as bound) of each of ``kids`` any probe holds or
        held: what a stored signature names, whichever probe it is bound to."""
        if not kids:
            return {}
        clause, param = self.dialect.in_list("kid", sorted(set(kids)))
        return {kid: jwk for kid, jwk in self._read(
            f"SELECT kid, jwk FROM probe_keys WHERE {clause} ORDER BY kid, bound_from",
            [param])}

    GAP_KEYS = ("gap_id", "probe_id", "received_at", "reason", "dropped",
                "first_started_at", "last_started_at")

    def gaps(self, probes: Sequence[str] | None = None, since: str | None = None,
             until: str | None = None) -> list[dict[str, Any]]:
        """Gap records overlapping [since, until), oldest first: those that end at or
        after ``since`` and start before ``until``."""
        where, params = self._scope(probes, None, None)
        ends, after = self._scope(None, since, None, "last_started_at", named_only=True)
        starts, before = self._scope(None, None, until, "first_started_at", named_only=True)
        return [dict(zip(self.GAP_KEYS, r, strict=True)) for r in self._read(
            "SELECT gap_id, probe_name, received_at, reason, dropped, first_started_at, "
            f"last_started_at FROM gaps WHERE {where} AND {ends} AND {starts} "
            "ORDER BY first_started_at, gap_id", [*params, *after, *before])]

    def results(self, probes: Sequence[str] | None = None, since: str | None = None,
                until: str | None = None, limit: int | None = None,
                family: str | None = None) -> list[StoredResult]:
        """Results by start time, oldest first; ``since`` inclusive, ``until`` exclusive."""
        where, params = self._scope(probes, since, until, named_only=True, family=family,
                                    table="results")
        tail = ""
        if limit is not None:
            tail = " LIMIT ?"
            params.append(limit)
        return [_stored(row) for row in self._read(
            "SELECT result_id, probe_name, started_at, ended_at, received_at, body, "
            f"body_packed, clock_skew_s FROM results WHERE {where} "
            f"ORDER BY started_at, result_id{tail}", params)]

    def pack_text_bodies(self, after: str, limit: int) -> tuple[int, int, str | None]:
        """Pack up to ``limit`` bodies that rows stored before packing keep as text, in
        result id order after ``after``: (packed, left as text, the last id seen, or
        None when no row is left). A body the current schema cannot read stays text,
        as it was. The hash follows the body to its canonical form of today, so a
        resent result is a plain duplicate. The rows are read and packed outside any
        transaction; the write is one short transaction, and leaves alone a row that
        changed meanwhile."""
        rows = self._read("SELECT result_id, body, body_sha256 FROM results "
                          "WHERE result_id > ? AND body_packed IS NULL "
                          "ORDER BY result_id LIMIT ?", (after, limit))
        updates: list[tuple[bytes, str, str, str]] = []
        kept = 0
        for result_id, body, digest in rows:
            try:
                result = parse_result(orjson.loads(body))
                canonical = codec.canonical(result)
                stored = codec.pack(result)
            except (ValueError, TypeError):  # SchemaError, orjson's errors
                kept += 1
                continue
            updates.append((stored, hashlib.sha256(canonical).hexdigest(), result_id, digest))

        def work(tx: Tx) -> int:
            return sum(tx.run("UPDATE results SET body = '', body_packed = ?, "
                              "body_sha256 = ? WHERE result_id = ? AND body_sha256 = ? "
                              "AND body_packed IS NULL", u) for u in updates)

        packed = self._transaction(work) if updates else 0
        return packed, kept, (rows[-1][0] if rows else None)

    def result(self, result_id: str) -> StoredResult | None:
        rows = self._read(
            "SELECT result_id, probe_name, started_at, ended_at, received_at, body, "
            "body_packed, clock_skew_s FROM results WHERE result_id = ?", (result_id,))
        return _stored(rows[0]) if rows else None

    def delete_result(self, result_id: str, reason: str, deleted_at: str,
                      deleted_by: str) -> dict[str, Any] | None:
        """Remove a stored result with its facts and outbox entries, rebuild its day's
        rollup from the sessions left, and append who-what-why to result_deletions, in
        one transaction (an operator's way out of a poisoned row). None if no
        such result. Its session_seq counts as documented in completeness from then on
        (``gap_seq_ranges``): removed on purpose, not lost."""
        def work(tx: Tx) -> dict[str, Any] | None:
            row = tx.one("SELECT probe_name, started_at, body_sha256, session_seq FROM results "
                         f"WHERE result_id = ? {self.dialect.for_update}", (result_id,))
            if row is None:
                return None
            probe, started, digest, seq = row
            tx.run("INSERT INTO result_deletions (result_id, probe_name, started_at, "
                   "session_seq, body_sha256, deleted_at, deleted_by, reason) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (result_id, probe, started, seq, digest, deleted_at, deleted_by, reason))
            for table in ("transfer_facts", "session_facts", "influx_outbox",
                          "influx_dead_letters", "result_signatures", "results"):
                tx.run(f"DELETE FROM {table} WHERE result_id = ?", (result_id,))
            rebuild_day(tx, probe, rollup.day_of(started), self.dialect.for_update,
                        refill=unreadable.canonical_time(started))
            return {"result_id": result_id, "probe_id": probe, "started_at": started,
                    "session_seq": seq, "body_sha256": digest, "deleted_at": deleted_at,
                    "deleted_by": deleted_by, "reason": reason}
        return self._transaction(work)

    def result_deletions(self) -> list[dict[str, Any]]:
        """The audit of ``delete_result``, newest first."""
        return [{"result_id": r[0], "probe_id": r[1], "started_at": r[2],
                 "session_seq": r[3], "body_sha256": r[4], "deleted_at": r[5],
                 "deleted_by": r[6], "reason": r[7]}
                for r in self._read("SELECT result_id, probe_name, started_at, session_seq, "
                                    "body_sha256, deleted_at, deleted_by, reason "
                                    "FROM result_deletions ORDER BY id DESC")]

    def count_results(self) -> int:
        return self._count("SELECT COUNT(*) FROM results")


def result_body(text: str, packed: bytes | None) -> str:
    """A result's canonical JSON: packed or, for rows stored before packing, as text.
    A packed body that cannot be read is a CodecError (a StoreError: 503), never a wrong
    document."""
    if packed is None:
        return text
    return codec.unpack(bytes(packed)).decode()


def _stored(row: Sequence[Any]) -> StoredResult:
    return StoredResult(row[0], row[1], row[2], row[3], row[4], result_body(row[5], row[6]),
                        row[7])


def _same_document(stored: str, body: str) -> bool:
    """Whether a stored body is the same result as a canonical ``body`` whose hash
    differs: a row that an older release canonicalised its own way (sorted keys,
    ``1e-05``; storage/codec.py) is compared by content, so a result resent across the
    upgrade stays a duplicate, not a conflict."""
    try:
        return codec.canonical(parse_result(orjson.loads(stored))).decode() == body
    except (ValueError, TypeError):  # SchemaError, orjson's errors: not the same
        return False
