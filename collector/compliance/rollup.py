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

A store reads a scope page by page into a ``ScopeFold`` (memory bounded by a page, not
by the scope's samples): the same terms, each sum still correctly rounded
(``ExactSum``), the RTT's M2 about the grand mean on a second read when the parts are
too many to keep, and the speeds' order statistics selected exactly (selection.py).
The list path it replaced (every row in memory, one fold) is the reference it is tested
against, in tests/collector/test_selection.py.
"""

from __future__ import annotations

import json
import math
import sys
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import numpy as np

from agent.stats import Moments
from collector.compliance.evaluate import Observations
from collector.compliance.facts import SessionFacts
from collector.compliance.selection import Selector
from collector.compliance.speeds import SpeedList, Speeds, StoredSpeeds

DAY_START = "T00:00:00.000000Z"
# A day's session_hours before any valid session (DayRollup.session_hours).
ZERO_HOURS = ",".join(["0"] * 24)


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
    # The valid sessions that started in each UTC hour of the day, hour 00 first: 24
    # integers, comma-separated, as stored (a report's coverage reads them instead of
    # every session row: ``hour_counts``). None: not known (a row written before the
    # column existed, or holding a session whose start names no hour): a reader counts
    # that day's session rows instead.
    session_hours: str | None = ZERO_HOURS


# What evaluation reads of one session (a row of ``session_facts``), as the database
# gives it: pings_sent, pings_lost, rtt_n, rtt_mean_ms, rtt_m2, valid (0/1),
# invalid_codes (space-separated). Plain tuples: a scope may hold millions. (Its jitter
# terms, integers, are summed by the database: storage/sql/reports.py.)
SessionRow = tuple[int, int, int, float, float, int, str]
# One whole day (a row of ``day_facts``, storage/sql/facts.py DAY_FIGURES) as the
# database gives it: probe_name, day, sessions, pings_sent, pings_lost, rtt_n,
# rtt_mean_ms, rtt_m2, download_attempts, download_failed, upload_attempts,
# upload_failed, download_kbps, upload_kbps (packed float64; None when a later read
# leaves them), invalid_sessions, invalid_codes, jitter_sum_ns, jitter_pairs,
# refused_servers. Plain tuples, not DayRollups: a fleet's semester is millions of rows.
DayRow = tuple[str, str, int, int, int, int, float, float, int, int, int, int,
               bytes | None, bytes | None, int, str, int, int, str]
# One transfer attempt (a row of ``transfer_facts``): direction, ok (0/1), kbps or None,
# valid (0/1, the session's).
TransferRow = tuple[str, int, float | None, int]


def pack_speeds(values: Sequence[float]) -> bytes:
    """Per-test speeds as little-endian float64 (the day rollup's speed columns)."""
    packed = array("d", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def day_of(started_at: str) -> str:
    return started_at[:10]


def hour_counts(text: str | None) -> list[int] | None:
    """A day's stored ``session_hours`` as 24 counts (hour 00 first); None when not
    known (NULL, or not 24 integers: the day's session rows say instead)."""
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 24 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    return [int(p) for p in parts]


def _hour_of(started_at: str) -> int | None:
    """The UTC hour a session started in (its canonical start's HH), or None."""
    text = started_at[11:13]
    if started_at[10:11] != "T" or not (text.isascii() and text.isdigit()) or text > "23":
        return None
    return int(text)


def _one_more(hours: str | None, started_at: str) -> str | None:
    counts = hour_counts(hours)
    hour = _hour_of(started_at)
    if counts is None or hour is None:
        return None
    counts[hour] += 1
    return ",".join(map(str, counts))


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
        session_hours=_one_more(day.session_hours, facts.started_at),
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


# A scope with at most this many speeds in a direction keeps them in memory (a
# ``SpeedList``, as the list path built): 4 MiB of floats, one read of
# the rows, and the page's histogram shows every value. A probe's year at 96 sessions a
# day is 35,040 speeds a direction; a fleet's semester is millions, and is selected
# (selection.py) with memory that no longer grows with the samples.
IN_MEMORY = 1 << 17
# RTT parts (n, mean, M2 of a day or a session) kept for the second sum (GrandMoments)
# (24 bytes each: 48 MiB); beyond it, the M2 sum is taken on a second read instead.
PARTS_IN_MEMORY = 1 << 21


class ExactSum:
    """``math.fsum`` of terms given page by page, without holding them: each page is
    folded into a short list of floats whose exact sum is that of every term so far
    (each remainder is itself correctly rounded by fsum, down to zero), so the final
    ``math.fsum`` of that list is the correctly rounded sum of all the terms, the same
    float as ``math.fsum`` of them all at once."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[float] = []

    def add(self, terms: Iterable[float]) -> None:
        pending = [*terms, *self._parts]
        parts: list[float] = []
        # Each step takes the correctly rounded rest, which leaves a rest at least 2^52
        # times smaller (a multiple of 2^-1074, so it reaches zero): a few steps.
        while (rest := math.fsum(pending + [-p for p in parts])) != 0.0:
            parts.append(rest)
        self._parts = parts

    def total(self) -> float:
        return math.fsum(self._parts)


class GrandMoments:
    """The moments of (n, mean, M2) parts given page by page: the grand mean on the first
    read (a correctly rounded sum of n * mean, over n), then M2 about it (Chan et al.'s
    pairwise merge in closed form: the sum of each part's M2 + n * (mean - grand)^2,
    correctly rounded) on the second, unless the parts were few enough to keep."""

    __slots__ = ("_grand", "_keep", "_kept", "_m2", "_means", "_read", "n", "result")

    def __init__(self, keep: int = PARTS_IN_MEMORY) -> None:
        self.n = 0
        self._means = ExactSum()
        self._m2 = ExactSum()
        self._grand = 0.0
        self._kept: tuple[array[int], array[float], array[float]] | None = (
            array("q"), array("d"), array("d"))
        self._keep = keep
        self._read = 1
        self.result: Moments | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def feed(self, parts: Sequence[tuple[int, float, float]]) -> None:
        """Parts with n > 0."""
        if self._read == 1:
            self.n += sum(k for k, _, _ in parts)
            self._means.add([k * mean for k, mean, _ in parts])
            if self._kept is not None:
                ks, means, m2s = self._kept
                ks.extend(k for k, _, _ in parts)
                means.extend(mean for _, mean, _ in parts)
                m2s.extend(m2 for _, _, m2 in parts)
                if len(ks) > self._keep:
                    self._kept = None
        elif self.result is None:
            self._add_m2(parts)

    def _add_m2(self, parts: Iterable[tuple[int, float, float]]) -> None:
        grand = self._grand
        self._m2.add([part + k * (mean - grand) * (mean - grand) for k, mean, part in parts])

    def end_pass(self) -> bool:
        if self.result is not None:
            return True
        if self._read == 1:
            self._read = 2
            if not self.n:
                self.result = Moments()
                return True
            self._grand = self._means.total() / self.n
            if self._kept is None:
                return False
            # The terms of _add_m2, vectorised: the same IEEE operations in the same
            # order (k * d first, then * d, then + part), so the same floats.
            ks, means, m2s = (np.frombuffer(a, dtype=a.typecode) for a in self._kept)
            d = means - self._grand
            self._m2.add((m2s + ks.astype(np.float64) * d * d).tolist())
            self._kept = None
        self.result = Moments(self.n, self._grand, self._m2.total())
        return True


class ScopeFold:
    """A scope's rows folded into ``Observations`` page by page, over as many reads of
    the same rows (one snapshot) as needed: counts, refusals and the grand RTT mean on
    the first; the speeds' order statistics (``ranks(n)``, selection.py) and M2 about
    the grand mean on the next. The figures are those of the list path
    (tests/collector/test_selection.py) to the last digit: the same terms, each sum
    correctly rounded.

    Per read, the store gives each segment's rows in the order it would have read them
    whole: ``days`` (whole UTC days), then ``sessions``/``transfers`` of each session
    segment by name (the partial days at either end, or the whole scope), then
    ``extra`` speeds (customers' tests); ``wants`` says which a read still needs."""

    def __init__(self, obs: Observations, ranks: Callable[[int], Iterable[int]],
                 extra: Mapping[str, Sequence[float]] | None = None, *,
                 keep: int | None = None, parts: int | None = None) -> None:
        self.obs = obs
        self.first = True
        self._extra = extra or {}
        # Read when called (not when defined): tests lower them to force the passes.
        self._parts = PARTS_IN_MEMORY if parts is None else parts
        keep = IN_MEMORY if keep is None else keep
        self._speeds = {d: Selector(ranks, keep=keep) for d in ("download", "upload")}
        self._moments: dict[str, GrandMoments] = {}

    def wants(self, segment: str, speeds: bool = True) -> bool:
        """Whether this read needs ``segment``'s rows (its speeds too unless not
        ``speeds``)."""
        if self.first:
            return True
        moments = self._moments.get(segment)
        return (moments is not None and not moments.done) or (speeds and self.wants_speeds)

    @property
    def wants_speeds(self) -> bool:
        """Whether this read needs the speeds (a selection not done yet)."""
        return self.first or not all(s.done for s in self._speeds.values())

    def _segment(self, name: str) -> GrandMoments:
        if self.first:
            return self._moments.setdefault(name, GrandMoments(self._parts))
        return self._moments[name]

    def days(self, rows: Sequence[DayRow]) -> None:
        """A page of whole-day rows (valid sessions only: a rollup holds no invalid
        session's figures, only their count by reason), as plain tuples (DayRow): the
        columns are summed as the database gave them, one column at a time."""
        obs = self.obs
        moments = self._segment("days")
        if not rows:
            return
        (_, _, sessions, sent, lost, rtt_n, rtt_mean, rtt_m2, d_att, d_fail, u_att, u_fail,
         d_blobs, u_blobs, invalid, codes, jsum, jpairs, refused) = zip(*rows, strict=True)
        if self.first:
            obs.sessions += sum(sessions)
            obs.pings_sent += sum(sent)
            obs.pings_lost += sum(lost)
            obs.download_attempts += sum(d_att)
            obs.download_failed += sum(d_fail)
            obs.upload_attempts += sum(u_att)
            obs.upload_failed += sum(u_fail)
            obs.jitter_sum_ns += sum(jsum)
            obs.jitter_pairs += sum(jpairs)
            for servers in refused:
                if servers != "{}":
                    for server, count in json.loads(servers).items():
                        obs.add_refused(server, count)
            for count, reasons in zip(invalid, codes, strict=True):
                if count:
                    obs.invalid_sessions += count
                    for code, n in json.loads(reasons).items():
                        obs.invalid_reasons[code] = obs.invalid_reasons.get(code, 0) + n
        if not moments.done:
            moments.feed([part for part in zip(rtt_n, rtt_mean, rtt_m2, strict=True)
                          if part[0]])
        down, up = self._speeds["download"], self._speeds["upload"]
        if not down.done:
            blob = b"".join(b for b in d_blobs if b)
            if blob:
                down.feed(blob)
        if not up.done:
            blob = b"".join(b for b in u_blobs if b)
            if blob:
                up.feed(blob)

    def sessions(self, segment: str, rows: Iterable[SessionRow]) -> None:
        """A page of session rows of ``segment``: invalid sessions are counted by reason,
        and join the figures only when ``obs.invalid_included``."""
        obs = self.obs
        moments = self._segment(segment)
        included = obs.invalid_included
        counted: list[tuple[int, float, float]] = []
        if not self.first:
            if not moments.done:
                moments.feed([(n, mean, m2) for _, _, n, mean, m2, valid, _ in rows
                              if n and (valid or included)])
            return
        reasons = obs.invalid_reasons
        for sent, lost, n, mean, m2, valid, codes in rows:
            if not valid:
                obs.invalid_sessions += 1
                for code in set(codes.split()):
                    reasons[code] = reasons.get(code, 0) + 1
                if not included:
                    continue
            obs.sessions += 1
            obs.pings_sent += sent
            obs.pings_lost += lost
            if n:
                counted.append((n, mean, m2))
        moments.feed(counted)

    def transfers(self, rows: Iterable[TransferRow]) -> None:
        """A page of transfer rows (of any session segment, in the store's order)."""
        obs = self.obs
        included = obs.invalid_included
        speeds: dict[str, list[float]] = {"download": [], "upload": []}
        if self.first:
            attempts = {"download": 0, "upload": 0}
            failed = {"download": 0, "upload": 0}
            for direction, ok, kbps, valid in rows:
                if not (valid or included):
                    continue
                attempts[direction] += 1
                if not ok:
                    failed[direction] += 1
                elif kbps is not None:
                    speeds[direction].append(kbps)
            obs.download_attempts += attempts["download"]
            obs.download_failed += failed["download"]
            obs.upload_attempts += attempts["upload"]
            obs.upload_failed += failed["upload"]
        else:
            for direction, ok, kbps, valid in rows:
                if ok and kbps is not None and (valid or included):
                    speeds[direction].append(kbps)
        for direction, values in speeds.items():
            selector = self._speeds[direction]
            if values and not selector.done:
                selector.feed(np.array(values, dtype=np.float64))

    def end_pass(self) -> bool:
        """Close a read of every segment; True when nothing needs another."""
        for direction, values in self._extra.items():
            if values and not self._speeds[direction].done:
                self._speeds[direction].feed(np.array(values, dtype=np.float64))
        self.first = False
        done = [m.end_pass() for m in self._moments.values()]
        done += [s.end_pass() for s in self._speeds.values()]
        if not all(done):
            return False
        obs = self.obs
        for moments in self._moments.values():
            assert moments.result is not None
            obs.rtt = obs.rtt.merge(moments.result)
        obs.download_kbps = self._result("download")
        obs.upload_kbps = self._result("upload")
        return True

    def _result(self, direction: str) -> Speeds:
        selector = self._speeds[direction]
        if selector.kept_all:
            return SpeedList(selector.kept())
        selection = selector.result()
        return StoredSpeeds(selection.n, selection.ranked, selection.histogram.stand_ins)
