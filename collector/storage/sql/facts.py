"""The facts tables as rows: a session's facts and transfers written and read back, and
each probe's UTC-day rollup merged or rebuilt from them (the arithmetic is
collector/compliance/rollup.py's; this module only moves its values in and out of rows).
Shared by the results (insert, delete), the reports (read) and the migrations
(storage/refusals.py, storage/sqlite_backfill.py)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

from agent.stats import Moments
from collector.compliance import rollup
from collector.compliance.facts import SessionFacts, TransferFact
from collector.compliance.rollup import DayRollup
from collector.storage.sql.base import Tx, readable

DAY_COLUMNS = ("probe_name", "day", "sessions", "pings_sent", "pings_lost", "rtt_n",
               "rtt_mean_ms", "rtt_m2", "download_attempts", "download_failed",
               "upload_attempts", "upload_failed", "download_kbps", "upload_kbps",
               "invalid_sessions", "invalid_codes", "jitter_sum_ns", "jitter_pairs",
               "refused_servers", "session_hours")
# What a report folds of a day row (rollup.DayRow): every column but session_hours,
# which only the coverage reads (reports.py coverage_hours).
DAY_FIGURES = DAY_COLUMNS[:-1]
# The day row's columns before session_hours (SQLite migration 25, PostgreSQL's 15): what
# a migration that runs before those writes (storage/refusals.py, rebuilding days).
_BEFORE_HOURS = DAY_COLUMNS[:-1]


def insert_session_facts(tx: Tx, facts: SessionFacts, probe: str) -> None:
    rtt = facts.rtt
    tx.run(
        "INSERT INTO session_facts (probe_name, started_at, result_id, pings_sent, "
        "pings_lost, rtt_n, rtt_mean_ms, rtt_m2, rtts_ms, valid, invalid_codes, "
        "jitter_sum_ns, jitter_pairs, address_family, dual_stack, refused_attempts, "
        "refused_server) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (probe, facts.started_at, facts.result_id, facts.pings_sent, facts.pings_lost,
         rtt.n, rtt.mean, rtt.m2, json.dumps(facts.rtts_ms, separators=(",", ":")),
         int(facts.valid), " ".join(facts.invalid_codes), facts.jitter_sum_ns,
         facts.jitter_pairs, facts.address_family, int(facts.dual_stack),
         facts.refused_attempts, facts.refused_server))
    insert_transfer_facts(tx, facts, probe)


def insert_transfer_facts(tx: Tx, facts: SessionFacts, probe: str) -> None:
    tx.many(
        "INSERT INTO transfer_facts (probe_name, started_at, result_id, seq, direction, "
        "ok, kbps, valid) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(probe, facts.started_at, facts.result_id, seq, t.direction, int(t.ok), t.kbps,
          int(facts.valid)) for seq, t in enumerate(facts.transfers)])


# What a SessionFacts is read from (``session_facts_of``), in this order.
SESSION_FACT_COLUMNS = ("probe_name", "started_at", "result_id", "pings_sent", "pings_lost",
                        "rtt_n", "rtt_mean_ms", "rtt_m2", "rtts_ms", "valid",
                        "invalid_codes", "jitter_sum_ns", "jitter_pairs", "address_family",
                        "dual_stack", "refused_attempts", "refused_server")


def session_facts_of(row: Sequence[Any], transfers: Sequence[TransferFact]) -> SessionFacts:
    (probe, started, rid, sent, lost, n, mean, m2, rtts, valid, codes, jsum, jpairs, fam,
     dual, refused, server) = row
    return SessionFacts(result_id=rid, probe_id=probe, started_at=started,
                        pings_sent=sent, pings_lost=lost, rtt=Moments(n, mean, m2),
                        rtts_ms=tuple(json.loads(rtts)), transfers=tuple(transfers),
                        valid=bool(valid), invalid_codes=tuple(codes.split()),
                        jitter_sum_ns=int(jsum), jitter_pairs=int(jpairs),
                        address_family=fam, dual_stack=bool(dual),
                        refused_attempts=int(refused), refused_server=server)


def facts_where(tx: Tx, where: str, params: Sequence[Any], t_where: str,
                t_params: Sequence[Any]) -> list[SessionFacts]:
    """The facts of the sessions ``where`` selects (their transfers: ``t_where``), by
    start time; a row no reader can interpret is left out (unreadable.py)."""
    transfer_rows = tx.rows(
        f"SELECT result_id, direction, ok, kbps FROM transfer_facts WHERE {t_where} "
        "ORDER BY result_id, seq", t_params)
    session_rows = tx.rows(
        f"SELECT {', '.join(SESSION_FACT_COLUMNS)} FROM session_facts WHERE {where} "
        "ORDER BY started_at, result_id", params)
    transfers: dict[str, list[TransferFact]] = {}
    for result_id, direction, ok, kbps in transfer_rows:
        transfers.setdefault(result_id, []).append(TransferFact(direction, bool(ok), kbps))
    return [session_facts_of(row, transfers.get(row[2], ())) for row in session_rows
            if readable(row[2], row[1])]


def rebuild_day(tx: Tx, probe: str, day: str, for_update: str, refill: bool = True,
                hours: bool = True) -> None:
    """One probe's day rollup again from its sessions' facts, merged in their stored
    order (a merged sum cannot give one session back exactly: the speeds are a sorted
    list, the moments Welford's): after a result is deleted, or its facts re-derived.
    The row is emptied first, not deleted: that locks it (PostgreSQL), and a concurrent
    add_to_day that already found it finds it still. ``refill`` False: emptied only (a
    day an older release spelt otherwise, which no reader interprets). ``hours`` False:
    session_hours left as it is, for a migration that runs before the column exists
    (_BEFORE_HOURS)."""
    tx.run("UPDATE day_facts SET sessions = 0, pings_sent = 0, pings_lost = 0, "
           "rtt_n = 0, rtt_mean_ms = 0, rtt_m2 = 0, download_attempts = 0, "
           "download_failed = 0, upload_attempts = 0, upload_failed = 0, "
           "download_kbps = ?, upload_kbps = ?, invalid_sessions = 0, "
           "invalid_codes = '{}', jitter_sum_ns = 0, jitter_pairs = 0, "
           f"refused_servers = '{{}}'{', session_hours = ?' if hours else ''} "
           "WHERE probe_name = ? AND day = ?",
           (b"", b"", *((rollup.ZERO_HOURS,) if hours else ()), probe, day))
    if not refill:
        return
    lo = day + rollup.DAY_START
    hi = (date.fromisoformat(day) + timedelta(days=1)).isoformat() + rollup.DAY_START
    where = "probe_name = ? AND started_at >= ? AND started_at < ?"
    merged = DayRollup(probe, day)
    # In memory, as add_to_day would one at a time (its reads give back what it wrote:
    # integers, IEEE doubles and bytes), without a round trip per session. Every
    # session of the day is read, so its hours are known again (a row from before the
    # column held NULL).
    for facts in facts_where(tx, where, (probe, lo, hi), where, (probe, lo, hi)):
        merged = rollup.add_session(merged, facts)
    _put_day(tx, merged, hours=hours)


def add_to_day(tx: Tx, probe: str, facts: SessionFacts, for_update: str = "") -> None:
    """Merge one session into its probe's UTC-day rollup (same transaction as the
    facts): read the row under a lock, merge in Python (compliance/rollup.py), write it
    back. A row whose session_hours is NULL (written before the column) stays NULL: its
    earlier sessions' hours are not known from it."""
    day = rollup.day_of(facts.started_at)
    _empty_day(tx, probe, day)
    row = tx.one(f"SELECT {', '.join(DAY_COLUMNS)} FROM day_facts "
                 f"WHERE probe_name = ? AND day = ? {for_update}", (probe, day))
    assert row is not None
    _put_day(tx, rollup.add_session(day_rollup(row), facts), exists=True)


def _empty_day(tx: Tx, probe: str, day: str, hours: bool = True) -> None:
    """An empty row if there is none, so there is a row to lock even for a day's first
    session (its hours known: none yet)."""
    columns = DAY_COLUMNS if hours else _BEFORE_HOURS
    tx.run(f"INSERT INTO day_facts ({', '.join(columns)}) "
           "VALUES (?, ?, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ?, ?, 0, '{}', 0, 0, '{}'"
           f"{', ?' if hours else ''}) ON CONFLICT (probe_name, day) DO NOTHING",
           (probe, day, b"", b"", *((rollup.ZERO_HOURS,) if hours else ())))


def _put_day(tx: Tx, merged: DayRollup, exists: bool = False, hours: bool = True) -> None:
    if not exists:
        _empty_day(tx, merged.probe_name, merged.day, hours)
    values = day_values(merged)[2:]
    tx.run("UPDATE day_facts SET sessions = ?, pings_sent = ?, pings_lost = ?, "
           "rtt_n = ?, rtt_mean_ms = ?, rtt_m2 = ?, download_attempts = ?, "
           "download_failed = ?, upload_attempts = ?, upload_failed = ?, "
           "download_kbps = ?, upload_kbps = ?, invalid_sessions = ?, invalid_codes = ?, "
           "jitter_sum_ns = ?, jitter_pairs = ?, refused_servers = ?"
           f"{', session_hours = ?' if hours else ''} WHERE probe_name = ? AND day = ?",
           (*(values if hours else values[:-1]), merged.probe_name, merged.day))


def day_rollup(row: Sequence[Any]) -> DayRollup:
    (probe, day, sessions, sent, lost, n, mean, m2, d_att, d_fail, u_att, u_fail, d_blob,
     u_blob, invalid, codes, jsum, jpairs, refused, hours) = row
    return DayRollup(probe, day, int(sessions), int(sent), int(lost),
                     Moments(int(n), float(mean), float(m2)), int(d_att), int(d_fail),
                     int(u_att), int(u_fail), bytes(d_blob), bytes(u_blob), int(invalid),
                     codes, int(jsum), int(jpairs), refused, hours)


def day_values(d: DayRollup) -> tuple[Any, ...]:
    return (d.probe_name, d.day, d.sessions, d.pings_sent, d.pings_lost, d.rtt.n,
            d.rtt.mean, d.rtt.m2, d.download_attempts, d.download_failed, d.upload_attempts,
            d.upload_failed, d.download_kbps, d.upload_kbps, d.invalid_sessions,
            d.invalid_codes, d.jitter_sum_ns, d.jitter_pairs, d.refused_servers,
            d.session_hours)
