"""The SQLite migrations that rewrite data rather than schema: the facts of every stored
result derived from its body (migration 2, when the facts tables came), and the jitter
terms of every stored session from its raw RTTs (migration 15). Each runs inside its
migration's transaction; frozen as shipped, against the schema of its own version."""

from __future__ import annotations

import json
from dataclasses import replace

from agent.decoding import parse_result
from collector.compliance import rollup
from collector.compliance.facts import TransferFact, jitter_terms, of_result
from collector.storage.sql.base import Tx
from collector.storage.sql.facts import DAY_COLUMNS, day_rollup, day_values

# The facts tables as migration 2 made them: its backfill writes these columns only
# (the columns added later are filled by the migrations that add them).
_V2_SESSION = ("probe_name", "started_at", "result_id", "pings_sent", "pings_lost", "rtt_n",
               "rtt_mean_ms", "rtt_m2", "rtts_ms", "valid", "invalid_codes")
_V2_DAY = DAY_COLUMNS[:16]


def facts_from_bodies(tx: Tx) -> None:
    """Derive the facts of every stored result from its body (the master copy), against
    the schema of version 2 (frozen here: today's insert knows columns not there yet).
    Every attempt is a transfer fact, as then: migration 19 takes the ones the server
    refused out, with the columns it counts them in."""
    for started_at, body, probe in tx.rows("SELECT started_at, body, probe_name FROM results"):
        result = parse_result(json.loads(body))
        f = replace(of_result(result, started_at), refused_attempts=0, refused_server=None,
                    transfers=tuple(TransferFact(
                        a.direction, a.status == "ok",
                        a.throughput_bps / 1000 if a.status == "ok"
                        and a.throughput_bps is not None else None)
                        for a in result.transfers))
        tx.run(f"INSERT INTO session_facts ({', '.join(_V2_SESSION)}) "
               f"VALUES ({', '.join('?' * len(_V2_SESSION))})",
               (probe, f.started_at, f.result_id, f.pings_sent, f.pings_lost, f.rtt.n,
                f.rtt.mean, f.rtt.m2, json.dumps(f.rtts_ms, separators=(",", ":")),
                int(f.valid), " ".join(f.invalid_codes)))
        tx.many(
            "INSERT INTO transfer_facts (probe_name, started_at, result_id, seq, direction, "
            "ok, kbps, valid) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(probe, f.started_at, f.result_id, seq, t.direction, int(t.ok), t.kbps,
              int(f.valid)) for seq, t in enumerate(f.transfers)])
        day = rollup.day_of(f.started_at)
        row = tx.one(f"SELECT {', '.join(_V2_DAY)} FROM day_facts WHERE probe_name = ? "
                     "AND day = ?", (probe, day))
        merged = rollup.add_session(day_rollup((*row, 0, 0, "{}", None)) if row else
                                    rollup.DayRollup(probe, day), f)
        tx.run(f"INSERT OR REPLACE INTO day_facts ({', '.join(_V2_DAY)}) "
               f"VALUES ({', '.join('?' * len(_V2_DAY))})", day_values(merged)[:16])


PAGE = 5000


def jitter_from_rtts(tx: Tx) -> None:
    """Each stored session's jitter terms from its raw RTTs, a page at a time (memory
    stays bounded on a big database), then each day's sums over its valid sessions
    (integers: exact in any order)."""
    after = ("", "", "")
    while True:
        rows = tx.rows(
            "SELECT probe_name, started_at, result_id, rtts_ms FROM session_facts "
            "WHERE (probe_name, started_at, result_id) > (?, ?, ?) "
            "ORDER BY probe_name, started_at, result_id LIMIT ?", (*after, PAGE))
        if not rows:
            break
        tx.many("UPDATE session_facts SET jitter_sum_ns = ?, jitter_pairs = ? "
                "WHERE probe_name = ? AND started_at = ? AND result_id = ?",
                [(*jitter_terms(json.loads(rtts)), p, s, r) for p, s, r, rtts in rows])
        after = rows[-1][:3]
    tx.run(
        "UPDATE day_facts SET (jitter_sum_ns, jitter_pairs) = (SELECT "
        "COALESCE(SUM(jitter_sum_ns), 0), COALESCE(SUM(jitter_pairs), 0) FROM session_facts s "
        "WHERE s.probe_name = day_facts.probe_name AND s.valid = 1 "
        "AND s.started_at >= day_facts.day || 'T' "
        "AND s.started_at < day_facts.day || 'U')")
