"""A store migration (issue 24): attempts the measurement server refused, taken out of
the facts stored before the collector told them from the line's failures.

Until schema 7 an agent recorded a transfer the server turned away for capacity as a
failed attempt (failure_reason "http_status", HTTP 429 or 503), and the collector
stored every failed attempt as a failed transfer fact: a neighbour's measurement behind
the same carrier-grade NAT address raised this line's Allegato 2 failure rate (and a
collector of schema 7 before this change stored server_refused and ticket_refused
attempts as failures too). The bodies are the master copy, so the facts are derived
again from them, by today's rule (compliance/facts.py ``is_refusal``), for exactly the
sessions that can hold such an attempt: those with a failed transfer fact. The others
(most of a big database) are not read; of those read, only a body that names a
refusal's reason is decoded (validated in C, collector/decode.py). Each session that
had refusals gets its transfer facts written again without them, and its refused
count; each day it falls in gets its rollup rebuilt from its sessions (storage/sql.py
``rebuild_day``, as a deleted result's day is).

One function for both backends, run inside the migration's transaction (SQLite: its
step; PostgreSQL: under the migration lock). Measured on SQLite: 20,000 sessions with
realistic bodies (4 streams of samples a transfer), a tenth of them with an old agent's
429 and as many with a failure of the line's, every day rebuilt: 0.7 s; the same
database with nothing left to reclassify: 0.04 s.
"""

from __future__ import annotations

import re
from dataclasses import replace

import orjson

from agent.schema import SessionResult, parse_result
from collector import unreadable
from collector.compliance import rollup
from collector.compliance.facts import of_result
from collector.decode import fast_result
from collector.storage import codec
from collector.storage.sql import Dialect, Tx, insert_transfer_facts, rebuild_day

# Sessions whose bodies are read at a time (the candidates' ids are held in memory:
# a few tens of bytes each, and only sessions with a failed attempt are candidates).
PAGE = 500
# A body can hold a refusal (facts.is_refusal) only if an attempt's failure_reason is
# one of these. Bodies are JSON as a collector wrote it (orjson or the standard
# library: ASCII letters never escaped), so a body without the text holds none and is
# not decoded (a failure that is a timeout or a broken connection costs a search).
MAYBE_REFUSED = re.compile(
    rb'"failure_reason"\s*:\s*"(?:http_status|server_refused|ticket_refused)"')


def reclassify(tx: Tx, dialect: Dialect) -> int:
    """Re-derive the transfer facts of every stored session with a failed attempt, take
    out the attempts the server refused, and rebuild their days; the number of sessions
    changed. A body the current schema cannot read keeps its facts as they were."""
    candidates = [r[0] for r in tx.rows(
        "SELECT DISTINCT result_id FROM transfer_facts WHERE ok = 0 ORDER BY result_id")]
    days: set[tuple[str, str]] = set()
    changed = 0
    for start in range(0, len(candidates), PAGE):
        clause, param = dialect.in_list("s.result_id", candidates[start:start + PAGE])
        for probe, started, result_id, valid, body, packed in tx.rows(
                "SELECT s.probe_name, s.started_at, s.result_id, s.valid, r.body, "
                "r.body_packed FROM session_facts s JOIN results r "
                f"ON r.result_id = s.result_id WHERE {clause} ORDER BY s.result_id",
                (param,)):
            try:
                # The facts need no stream samples: a packed body is read without them.
                raw = codec.without_samples(bytes(packed)) if packed is not None \
                    else body.encode()
                if not MAYBE_REFUSED.search(raw):
                    continue
                facts = of_result(decode_body(raw), started)
            except (ValueError, TypeError):  # SchemaError, orjson's, CodecError
                continue
            if not facts.refused_attempts:
                continue
            # Keyed and flagged as the stored session is (the body says the same); the
            # old rows found by the clustered key (no index holds result_id alone).
            tx.run("DELETE FROM transfer_facts WHERE probe_name = ? AND started_at = ? "
                   "AND result_id = ?", (probe, started, result_id))
            insert_transfer_facts(tx, replace(facts, valid=bool(valid)), probe)
            tx.run("UPDATE session_facts SET refused_attempts = ?, refused_server = ? "
                   "WHERE result_id = ?",
                   (facts.refused_attempts, facts.refused_server, result_id))
            changed += 1
            days.add((probe, rollup.day_of(started)))
    for probe, day in sorted(days):
        # A day an older release spelt otherwise ("999-06-01T...") is read by no report
        # (unreadable.py): left as it is.
        if unreadable.canonical_time(day + rollup.DAY_START):
            rebuild_day(tx, probe, day, dialect.for_update)
    return changed


def decode_body(raw: bytes) -> SessionResult:
    """A stored body's result: validated in C (collector/decode.py), or by the schema's
    own decoder when that path declines it (an older form it reads differently)."""
    return fast_result(raw) or parse_result(orjson.loads(raw))
