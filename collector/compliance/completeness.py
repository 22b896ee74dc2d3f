"""Completeness of a probe's deliveries (reliability.md C8), pure.

Every spooled result carries the probe's session_seq (1, 2, 3...; schema v4) and every
gap record the sequence numbers of the results it stands for. So, per probe, a number
missing between two delivered ones is a session that was measured and never arrived:
either documented (a gap record names it: the spool had to drop it) or not (lost
somewhere, to be looked into).

Method: per probe, the delivered numbers in the scope, sorted, preceded by the highest
number delivered before the scope (so a hole across its start is counted). The holes
between consecutive numbers are missing; each hole counts on the UTC day of the delivered
session after it (it was measured between the two). Numbers after the last delivered one
are not counted (they may still be on their way). Undocumented holes longer than
MAX_HOLE numbers are a discontinuity (a counter that was reset or replaced), counted
apart, not listed. Two results with one number (a counter rewound) are both delivered
sessions and counted as duplicates. expected = delivered + documented + missing.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.schema import merge_ranges

MAX_HOLE = 96 * 31  # a month of sessions at 96 a day
MAX_LISTED_RANGES = 100  # per day, in the output; the count is always whole


@dataclass(slots=True)
class DayCompleteness:
    probe: str
    day: str  # UTC date, YYYY-MM-DD
    delivered: int = 0
    documented: int = 0  # missing, and named by a gap record
    missing: int = 0  # missing and not documented
    missing_ranges: list[tuple[int, int]] = field(default_factory=list)  # the first ones
    discontinuities: int = 0
    duplicates: int = 0  # results sharing a number with another

    @property
    def expected(self) -> int:
        return self.delivered + self.documented + self.missing

    def to_dict(self) -> dict[str, object]:
        return {"probe": self.probe, "day": self.day, "delivered": self.delivered,
                "expected": self.expected, "documented": self.documented,
                "missing": self.missing,
                "missing_ranges": [list(r) for r in self.missing_ranges],
                "discontinuities": self.discontinuities, "duplicates": self.duplicates}


def _split(first: int, last: int, documented: list[tuple[int, int]]
           ) -> tuple[int, list[tuple[int, int]]]:
    """How many of [first, last] the (merged, sorted) ranges cover, and the rest as
    ranges. O(log n + ranges touched)."""
    covered, rest, cursor = 0, [], first
    i = max(0, bisect.bisect_right(documented, (first, first)) - 1)
    while i < len(documented) and documented[i][0] <= last:
        a, b = documented[i]
        if b >= cursor:
            lo, hi = max(a, cursor), min(b, last)
            if lo > cursor:
                rest.append((cursor, lo - 1))
            covered += hi - lo + 1
            cursor = hi + 1
        i += 1
    if cursor <= last:
        rest.append((cursor, last))
    return covered, rest


def completeness(rows: Iterable[tuple[str, int, str]],
                 gaps: Mapping[str, Iterable[tuple[int, int]]],
                 before: Mapping[str, int] | None = None) -> list[DayCompleteness]:
    """Per probe per UTC day, from (probe, session_seq, started_at) rows sorted by probe
    then seq, each probe's gap-record ranges, and the highest number each probe
    delivered before the scope."""
    days: dict[tuple[str, str], DayCompleteness] = {}
    merged = {probe: list(merge_ranges(ranges)) for probe, ranges in gaps.items()}
    probe_now: str | None = None
    previous: int | None = None
    for probe, seq, started_at in rows:
        if probe != probe_now:
            probe_now, previous = probe, (before or {}).get(probe)
        row = days.setdefault((probe, started_at[:10]), DayCompleteness(probe,
                                                                        started_at[:10]))
        row.delivered += 1
        if previous is not None and seq == previous:
            row.duplicates += 1
            continue
        if previous is not None and seq > previous + 1:
            covered, rest = _split(previous + 1, seq - 1, merged.get(probe, []))
            row.documented += covered
            undocumented = sum(b - a + 1 for a, b in rest)
            if undocumented > MAX_HOLE:
                row.discontinuities += 1
            else:
                row.missing += undocumented
                room = MAX_LISTED_RANGES - len(row.missing_ranges)
                row.missing_ranges.extend(rest[:max(0, room)])
        previous = seq
    return [days[k] for k in sorted(days)]


def format_text(rows: Sequence[DayCompleteness]) -> str:
    if not rows:
        return "no numbered results in scope (agents before schema v4 send none)\n"
    lines = ["probe  day  delivered/expected  documented  missing (not documented)"]
    for r in rows:
        shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in r.missing_ranges[:20])
        more = " …" if len(r.missing_ranges) > 20 else ""
        extra = "".join(f"  {name} {n}" for name, n in (
            ("discontinuities", r.discontinuities), ("duplicates", r.duplicates)) if n)
        lines.append(f"{r.probe}  {r.day}  {r.delivered}/{r.expected}  {r.documented}  "
                     f"{r.missing}{f' ({shown}{more})' if r.missing else ''}{extra}")
    return "\n".join(lines) + "\n"
