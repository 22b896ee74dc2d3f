"""Rollup arithmetic: sessions merged into per-probe UTC days, and the rows of a scope
folded into the evaluator's ``Observations`` (pure; every store uses it, so both
backends give the same figures to the last digit).

A day rollup holds the valid sessions of one probe's UTC day: counts, the RTT moments
merged exactly (Chan et al., ``agent.stats.Moments``), and every per-test speed as
packed float64 (percentiles need the values: Allegato 2 gives the 5th and 95th
percentile of the per-test speeds, so nothing coarser may stand in for them). Invalid
sessions are counted by reason only.

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
    invalid_codes: str = "{}"  # JSON {code: count}, keys sorted


@dataclass(frozen=True, slots=True)
class SessionRow:
    """What evaluation reads of one session (a row of ``session_facts``)."""

    pings_sent: int
    pings_lost: int
    rtt: Moments
    valid: bool
    invalid_codes: str  # space-separated


@dataclass(frozen=True, slots=True)
class TransferRow:
    """One transfer attempt of a session (a row of ``transfer_facts``)."""

    direction: str
    ok: bool
    kbps: float | None
    valid: bool


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


def add_session(day: DayRollup, facts: SessionFacts) -> DayRollup:
    """The day with one more session merged in (sessions are merged in arrival order)."""
    if not facts.valid:
        codes = json.loads(day.invalid_codes)
        for code in facts.invalid_codes:
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
    rows = [m for m in parts if m.n]
    n = sum(m.n for m in rows)
    if not n:
        return Moments()
    grand = math.fsum(m.n * m.mean for m in rows) / n
    m2 = math.fsum(m.m2 + m.n * (m.mean - grand) * (m.mean - grand) for m in rows)
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
    obs.download_kbps += unpack_speeds(b"".join(d.download_kbps for d in rows))
    obs.upload_kbps += unpack_speeds(b"".join(d.upload_kbps for d in rows))
    for d in rows:
        if d.invalid_sessions:
            obs.invalid_sessions += d.invalid_sessions
            for code, count in json.loads(d.invalid_codes).items():
                obs.invalid_reasons[code] = obs.invalid_reasons.get(code, 0) + count


def observe_sessions(obs: Observations, sessions: Iterable[SessionRow],
                     transfers: Iterable[TransferRow]) -> None:
    """Fold session rows into ``obs``: invalid sessions are counted by reason, and join
    the figures only when ``obs.invalid_included``."""
    counted: list[Moments] = []
    for s in sessions:
        if not s.valid:
            obs.invalid_sessions += 1
            for code in s.invalid_codes.split():
                obs.invalid_reasons[code] = obs.invalid_reasons.get(code, 0) + 1
            if not obs.invalid_included:
                continue
        obs.sessions += 1
        obs.pings_sent += s.pings_sent
        obs.pings_lost += s.pings_lost
        counted.append(s.rtt)
    obs.rtt = obs.rtt.merge(grand_moments(counted))
    for t in transfers:
        if not (t.valid or obs.invalid_included):
            continue
        if t.direction == "download":
            obs.download_attempts += 1
            obs.download_failed += not t.ok
            if t.ok and t.kbps is not None:
                obs.download_kbps.append(t.kbps)
        else:
            obs.upload_attempts += 1
            obs.upload_failed += not t.ok
            if t.ok and t.kbps is not None:
                obs.upload_kbps.append(t.kbps)
