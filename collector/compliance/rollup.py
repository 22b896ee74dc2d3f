"""Rollup arithmetic: sessions merged into per-probe UTC days, and the rows of a scope
folded into the evaluator's ``Observations`` (pure; every store uses it, so both
backends give the same figures to the last digit).

A day rollup holds the valid sessions of one probe's UTC day: counts, the RTT moments
merged exactly (Chan et al., ``agent.stats.Moments``), and every per-test speed as
packed float64 (percentiles need the values: Allegato 2 gives the 5th and 95th
percentile of the per-test speeds, so nothing coarser may stand in for them). Invalid
sessions are counted by reason only. Attempts the measurement server refused
(facts.is_refusal) are counted per server, for every session, valid or not: they are a
fact about the server, not about the line or the probe's surroundings.

Sums over many rows use ``math.fsum`` (correctly rounded): the result does not depend
on the order a database returns the rows in.
"""

from __future__ import annotations

import json
import math
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from agent.stats import Moments
from collector.compliance.evaluate import Observations
from collector.compliance.facts import SessionFacts

DAY_START = "T00:00:00.000000Z"


@dataclass(frozen=True, slots=True)
class DayRollup:
    """One probe's UTC day of sessions (a row of ``day_facts``)."""

    probe_name: str
    day: str  # YYYY-MM-DD
    sessions: int = 0
    pings_sent: int = 0
    pings_lost: int = 0
    rtt: Moments = field(default_factory=Moments)
    download_attempts: int = 0
    download_failed: int = 0
    upload_attempts: int = 0
    upload_failed: int = 0
    download_kbps: bytes = b""
    upload_kbps: bytes = b""
    invalid_sessions: int = 0
    invalid_codes: str = "{}"  # JSON {code: sessions with it}, keys sorted
    # Jitter terms of the valid sessions (facts.jitter_terms), summed.
    jitter_sum_ns: int = 0
    jitter_pairs: int = 0
    # Attempts the measurement server refused, of every session: JSON {server: count},
    # keys sorted.
    refused_servers: str = "{}"


# What evaluation reads of one session (a row of ``session_facts``), as the database
# gives it: pings_sent, pings_lost, rtt_n, rtt_mean_ms, rtt_m2, valid (0/1),
# invalid_codes (space-separated). Plain tuples: a scope may hold millions. (Its jitter
# terms, integers, are summed by the database: storage/sql/reports.py.)
SessionRow = tuple[int, int, int, float, float, int, str]
# One transfer attempt (a row of ``transfer_facts``): direction, ok (0/1), kbps or None,
# valid (0/1, the session's).
TransferRow = tuple[str, int, float | None, int]


def pack_speeds(values: Sequence[float]) -> bytes:
    """Per-test speeds as little-endian float64 (the day rollup's speed columns)."""
    packed = array("d", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def unpack_speeds(blob: bytes) -> list[float]:
    packed = array("d")
    packed.frombytes(blob)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tolist()


def day_of(started_at: str) -> str:
    return started_at[:10]


def add_refused(counts: str, server: str | None, attempts: int) -> str:
    """``counts`` (JSON {server: attempts}) with ``attempts`` more refused by ``server``."""
    if not attempts:
        return counts
    merged = json.loads(counts)
    key = server or ""
    merged[key] = merged.get(key, 0) + attempts
    return json.dumps(merged, sort_keys=True)


def add_session(day: DayRollup, facts: SessionFacts) -> DayRollup:
    """The day with one more session merged in (sessions are merged in arrival order)."""
    if facts.refused_attempts:
        day = replace(day, refused_servers=add_refused(
            day.refused_servers, facts.refused_server, facts.refused_attempts))
    if not facts.valid:
        codes = json.loads(day.invalid_codes)
        # Sessions per reason (a reason given twice in one session is one session).
        for code in set(facts.invalid_codes):
            codes[code] = codes.get(code, 0) + 1
        return replace(day, invalid_sessions=day.invalid_sessions + 1,
                       invalid_codes=json.dumps(codes, sort_keys=True))
    down = [t for t in facts.transfers if t.direction == "download"]
    up = [t for t in facts.transfers if t.direction == "upload"]
    return replace(
        day,
        sessions=day.sessions + 1,
        pings_sent=day.pings_sent + facts.pings_sent,
        pings_lost=day.pings_lost + facts.pings_lost,
        rtt=day.rtt.merge(facts.rtt),
        download_attempts=day.download_attempts + len(down),
        download_failed=day.download_failed + sum(not t.ok for t in down),
        upload_attempts=day.upload_attempts + len(up),
        upload_failed=day.upload_failed + sum(not t.ok for t in up),
        download_kbps=day.download_kbps + pack_speeds(
            [t.kbps for t in down if t.ok and t.kbps is not None]),
        upload_kbps=day.upload_kbps + pack_speeds(
            [t.kbps for t in up if t.ok and t.kbps is not None]),
        jitter_sum_ns=day.jitter_sum_ns + facts.jitter_sum_ns,
        jitter_pairs=day.jitter_pairs + facts.jitter_pairs,
    )


def whole_days(since: str | None, until: str | None) -> tuple[str | None, str | None] | None:
    """The UTC days entirely inside [since, until) as day-start timestamps (None: open
    end), or None when no whole day fits."""
    lo = since
    if since is not None and not since.endswith(DAY_START):
        nxt = datetime.strptime(since[:10], "%Y-%m-%d") + timedelta(days=1)
        lo = nxt.strftime("%Y-%m-%d") + DAY_START
    hi = None if until is None else until[:10] + DAY_START
    if lo is not None and hi is not None and lo >= hi:
        return None
    return lo, hi


def grand_moments(parts: Iterable[Moments]) -> Moments:
    """The moments of many parts at once: the grand mean, then M2 about it (Chan's
    pairwise formula in closed form), each a correctly rounded sum."""
    return _grand([(m.n, m.mean, m.m2) for m in parts if m.n])


def _grand(rows: list[tuple[int, float, float]]) -> Moments:
    n = sum(r[0] for r in rows)
    if not n:
        return Moments()
    grand = math.fsum(k * mean for k, mean, _ in rows) / n
    m2 = math.fsum(part + k * (mean - grand) * (mean - grand) for k, mean, part in rows)
    return Moments(n, grand, m2)


def observe_days(obs: Observations, days: Iterable[DayRollup]) -> None:
    """Fold whole-day rollups into ``obs`` (valid sessions only: a rollup holds no
    invalid session's figures)."""
    rows = list(days)
    obs.sessions += sum(d.sessions for d in rows)
    obs.pings_sent += sum(d.pings_sent for d in rows)
    obs.pings_lost += sum(d.pings_lost for d in rows)
    obs.download_attempts += sum(d.download_attempts for d in rows)
    obs.download_failed += sum(d.download_failed for d in rows)
    obs.upload_attempts += sum(d.upload_attempts for d in rows)
    obs.upload_failed += sum(d.upload_failed for d in rows)
    obs.rtt = obs.rtt.merge(grand_moments(d.rtt for d in rows))
    obs.jitter_sum_ns += sum(d.jitter_sum_ns for d in rows)
    obs.jitter_pairs += sum(d.jitter_pairs for d in rows)
    obs.download_kbps += unpack_speeds(b"".join(d.download_kbps for d in rows))
    obs.upload_kbps += unpack_speeds(b"".join(d.upload_kbps for d in rows))
    for d in rows:
        if d.refused_servers != "{}":
            for server, count in json.loads(d.refused_servers).items():
                obs.add_refused(server, count)
        if d.invalid_sessions:
            obs.invalid_sessions += d.invalid_sessions
            for code, count in json.loads(d.invalid_codes).items():
                obs.invalid_reasons[code] = obs.invalid_reasons.get(code, 0) + count


def observe_sessions(obs: Observations, sessions: Iterable[SessionRow],
                     transfers: Iterable[TransferRow]) -> None:
    """Fold session rows into ``obs``: invalid sessions are counted by reason, and join
    the figures only when ``obs.invalid_included``. (Tight loops over tuples: this is
    the path of a scope read without the day rollup, millions of rows.)"""
    included = obs.invalid_included
    reasons = obs.invalid_reasons
    counted: list[tuple[int, float, float]] = []
    sessions_n = sent_n = lost_n = invalid_n = 0
    for sent, lost, n, mean, m2, valid, codes in sessions:
        if not valid:
            invalid_n += 1
            for code in set(codes.split()):
                reasons[code] = reasons.get(code, 0) + 1
            if not included:
                continue
        sessions_n += 1
        sent_n += sent
        lost_n += lost
        if n:
            counted.append((n, mean, m2))
    obs.sessions += sessions_n
    obs.pings_sent += sent_n
    obs.pings_lost += lost_n
    obs.invalid_sessions += invalid_n
    obs.rtt = obs.rtt.merge(_grand(counted))
    down, up = obs.download_kbps, obs.upload_kbps
    attempts = {"download": 0, "upload": 0}
    failed = {"download": 0, "upload": 0}
    for direction, ok, kbps, valid in transfers:
        if not (valid or included):
            continue
        attempts[direction] += 1
        if not ok:
            failed[direction] += 1
        elif kbps is not None:
            (down if direction == "download" else up).append(kbps)
    obs.download_attempts += attempts["download"]
    obs.download_failed += failed["download"]
    obs.upload_attempts += attempts["upload"]
    obs.upload_failed += failed["upload"]
