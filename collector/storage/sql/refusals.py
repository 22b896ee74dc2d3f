"""A store migration: attempts the measurement server refused, taken out of
the facts stored before the collector told them from the line's failures.

Until schema 7 an agent recorded a transfer the server turned away for capacity as a
failed attempt (failure_reason "http_status", HTTP 429, or 503 with the server's "server
busy" text), and the collector stored every failed attempt as a failed transfer fact: a
neighbour's measurement behind the same carrier-grade NAT address raised this line's
Allegato 2 failure rate (and a collector of schema 7 before this change stored
server_refused and ticket_refused attempts as failures too). The bodies are the master
copy, so the facts are derived again from them, by today's rule (compliance/facts.py
``is_refusal``), for exactly the sessions that can hold such an attempt: those with a
failed transfer fact. The others (most of a big database) are not read; of those read,
only a body that can hold a refusal (MAYBE_REFUSED) is decoded (validated in C,
collector/decode.py). Each session that had refusals gets its transfer facts written
again without them, and its refused count; each day it falls in gets its rollup rebuilt
from its sessions (storage/sql/facts.py ``rebuild_day``, as a deleted result's day is).

This changes figures a report may already have given (a line's failure rate, a day's
rollup), so the change is recorded, not only made: one log line per run (sessions and
attempts reclassified, days rebuilt; a warning when anything changed, so it is seen
without any logging set up) and one row per changed session in
``refusal_reclassifications`` (result, probe, start, attempts taken out of the failure
rate, the server that refused them, when), in the same transaction as the change, so an
analyst can list which sessions, lines and days changed and by how much. A row per
session, not per day: the session is what a report and a certificate cite.

One function for both backends, run inside the migration's transaction (SQLite: its
step; PostgreSQL: under the migration lock). Measured on SQLite: 20,000 sessions with
realistic bodies (4 streams of samples a transfer), a tenth of them with an old agent's
429 and as many with a failure of the line's, every day rebuilt: 0.7 s; the same
database with nothing left to reclassify: 0.04 s.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

import orjson

from agent.decoding import parse_result
from agent.schema import SessionResult, utc_now
from collector import unreadable
from collector.compliance import rollup
from collector.compliance.facts import of_result
from collector.decode import fast_result
from collector.storage import codec
from collector.storage.sql.base import Tx
from collector.storage.sql.facts import insert_transfer_facts, rebuild_day

log = logging.getLogger("bbprobe.collector")
# Sessions whose bodies are read at a time (the candidates' ids are held in memory:
# a few tens of bytes each, and only sessions with a failed attempt are candidates).
PAGE = 500
# A body can hold a refusal (facts.is_refusal) only if it holds one of these: a schema 7
# refusal's reason, an HTTP status 429, or an error text that begins as a bbprobe
# server's 503 did (facts.LEGACY_BUSY_503). Bodies are JSON as a collector wrote it
# (orjson or the standard library: ASCII text never escaped), so a body without any of
# them holds none and is not decoded (a timeout, a broken connection or another status
# costs a search).
MAYBE_REFUSED = re.compile(
    rb'"failure_reason"\s*:\s*"(?:server_refused|ticket_refused)"'
    rb'|"http_status"\s*:\s*429\b'
    rb'|"HTTP 503: server busy: ')


@dataclass(frozen=True, slots=True)
class Reclassified:
    """What a run changed: sessions whose facts were written again, attempts taken out
    of the failure rate, day rollups rebuilt."""

    sessions: int = 0
    attempts: int = 0
    days: int = 0


def reclassify(tx: Tx) -> Reclassified:
    """Re-derive the transfer facts of every stored session with a failed attempt, take
    out the attempts the server refused, and rebuild their days; record each changed
    session in refusal_reclassifications and log what changed. A body the current
    schema cannot read keeps its facts as they were."""
    dialect = tx.dialect
    candidates = [r[0] for r in tx.rows(
        "SELECT DISTINCT result_id FROM transfer_facts WHERE ok = 0 ORDER BY result_id")]
    migrated_at = utc_now()
    days: set[tuple[str, str]] = set()
    changed = attempts = 0
    for start in range(0, len(candidates), PAGE):
        clause, param = dialect.in_list("s.result_id", candidates[start:start + PAGE])
        for probe, started, result_id, valid, stored_refused, body, packed in tx.rows(
                "SELECT s.probe_name, s.started_at, s.result_id, s.valid, "
                "s.refused_attempts, r.body, r.body_packed FROM session_facts s "
                f"JOIN results r ON r.result_id = s.result_id WHERE {clause} "
                "ORDER BY s.result_id", (param,)):
            try:
                # The facts need no stream samples: a packed body is read without them.
                raw = codec.without_samples(bytes(packed)) if packed is not None \
                    else body.encode()
                if not MAYBE_REFUSED.search(raw):
                    continue
                facts = of_result(decode_body(raw), started)
            except (ValueError, TypeError):  # SchemaError, orjson's, CodecError
                continue
            # Attempts stored as failures that today's rule calls refusals (a session
            # stored with its refusals counted has none left to take out).
            taken = facts.refused_attempts - int(stored_refused)
            if taken <= 0:
                continue
            # Keyed and flagged as the stored session is (the body says the same); the
            # old rows found by the clustered key (no index holds result_id alone).
            tx.run("DELETE FROM transfer_facts WHERE probe_name = ? AND started_at = ? "
                   "AND result_id = ?", (probe, started, result_id))
            insert_transfer_facts(tx, replace(facts, valid=bool(valid)), probe)
            tx.run("UPDATE session_facts SET refused_attempts = ?, refused_server = ? "
                   "WHERE result_id = ?",
                   (facts.refused_attempts, facts.refused_server, result_id))
            tx.run("INSERT INTO refusal_reclassifications (result_id, probe_name, "
                   "started_at, attempts, refused_server, migrated_at) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   (result_id, probe, started, taken, facts.refused_server, migrated_at))
            changed += 1
            attempts += taken
            days.add((probe, rollup.day_of(started)))
    rebuilt = 0
    for probe, day in sorted(days):
        # A day an older release spelt otherwise ("999-06-01T...") is read by no report
        # (unreadable.py): left as it is.
        # This migration runs before the days had session_hours (SQLite's 25,
        # PostgreSQL's 15): it writes the columns of its own schema. No session's start
        # or validity changes here, so hours already stored (a rewound database) stay
        # right.
        if unreadable.canonical_time(day + rollup.DAY_START):
            rebuild_day(tx, probe, day, dialect.for_update, hours=False)
            rebuilt += 1
    done = Reclassified(changed, attempts, rebuilt)
    if changed:
        log.warning("storage migration (capacity refusals): %d stored session(s) had %d transfer "
                    "attempt(s) the measurement server refused counted as the line's "
                    "failures; reclassified as refusals (not in the failure rate), %d day "
                    "rollup(s) rebuilt; the sessions are listed in "
                    "refusal_reclassifications", done.sessions, done.attempts, done.days)
    else:
        log.info("storage migration (capacity refusals): of %d stored session(s) with a failed "
                 "attempt, none had a refusal of the measurement server counted as the "
                 "line's failure; nothing reclassified", len(candidates))
    return done


def decode_body(raw: bytes) -> SessionResult:
    """A stored body's result: validated in C (collector/decode.py), or by the schema's
    own decoder when that path declines it (an older form it reads differently)."""
    return fast_result(raw) or parse_result(orjson.loads(raw))
