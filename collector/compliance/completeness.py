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

Signed results (issue 27) also chain: each names the SHA-256 of the one before it
(agent/evidence.py). Per probe, the chain of the results in scope is checked with
``agent.evidence.chain_breaks`` against the same documented numbers (gap records and
recorded deletions), and each break that documents nothing (a result replaced, reordered,
swapped in, absent unexplained, or a chain started again) is listed on the day of the
result where it shows, by seq and result id. The chain is checked within the scope: its
first result is compared with nothing before it (a wider scope checks that link).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.evidence import Break, Link, chain_breaks, undocumented
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
    signed: int = 0  # delivered results that carry the probe's signature
    broken: int = 0  # chain breaks no gap record or deletion documents
    breaks: list[Break] = field(default_factory=list)  # the first ones

    @property
    def expected(self) -> int:
        return self.delivered + self.documented + self.missing

    def to_dict(self) -> dict[str, object]:
        return {"probe": self.probe, "day": self.day, "delivered": self.delivered,
                "expected": self.expected, "documented": self.documented,
                "missing": self.missing,
                "missing_ranges": [list(r) for r in self.missing_ranges],
                "discontinuities": self.discontinuities, "duplicates": self.duplicates,
                "chain": {"signed": self.signed, "breaks": self.broken,
                          "listed": [break_dict(b) for b in self.breaks]}}


def break_dict(b: Break) -> dict[str, object]:
    return {"kind": b.kind, "seq": b.seq, "result_id": b.result_id, "detail": b.detail}


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
                 before: Mapping[str, int] | None = None,
                 links: Mapping[str, Sequence[Link]] | None = None
                 ) -> list[DayCompleteness]:
    """Per probe per UTC day, from (probe, session_seq, started_at) rows sorted by probe
    then seq, each probe's gap-record ranges (and recorded deletions), the highest
    number each probe delivered before the scope, and each probe's chain links in the
    scope (storage ``chain_links``; None: chains not checked)."""
    days: dict[tuple[str, str], DayCompleteness] = {}
    merged = {probe: list(merge_ranges(ranges)) for probe, ranges in gaps.items()}
    day_of: dict[tuple[str, int], str] = {}  # (probe, seq): the day its first result started
    probe_now: str | None = None
    previous: int | None = None
    for probe, seq, started_at in rows:
        if probe != probe_now:
            probe_now, previous = probe, (before or {}).get(probe)
        row = days.setdefault((probe, started_at[:10]), DayCompleteness(probe,
                                                                        started_at[:10]))
        row.delivered += 1
        day_of.setdefault((probe, seq), row.day)
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
    for probe, chain in (links or {}).items():
        _add_chain(days, day_of, probe, chain, merged.get(probe, []))
    return [days[k] for k in sorted(days)]


def _add_chain(days: Mapping[tuple[str, str], DayCompleteness],
               day_of: Mapping[tuple[str, int], str], probe: str, chain: Sequence[Link],
               explained: Sequence[tuple[int, int]]) -> None:
    """Count a probe's signed results and list its undocumented chain breaks on the day
    of the result each shows at (a link whose number is not among the rows, read apart,
    has no day and is left out). A probe that signed nothing in scope has no chain (its
    repeated numbers are duplicates above, not breaks)."""
    if not any(link.signed for link in chain):
        return
    for link in chain:
        day = day_of.get((probe, link.seq))
        if link.signed and day is not None:
            days[(probe, day)].signed += 1
    for b in undocumented(chain_breaks(chain, explained)):
        day = day_of.get((probe, b.seq))
        if day is None:
            continue
        row = days[(probe, day)]
        row.broken += 1
        if len(row.breaks) < MAX_LISTED_RANGES:
            row.breaks.append(b)


def chain_summaries(rows: Sequence[DayCompleteness]) -> list[dict[str, object]]:
    """Per probe with a signed result: "N signed of M" delivered, and its breaks."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = out.setdefault(r.probe, {"probe": r.probe, "signed": 0, "delivered": 0,
                                         "breaks": 0, "listed": []})
        entry["signed"] += r.signed
        entry["delivered"] += r.delivered
        entry["breaks"] += r.broken
        entry["listed"].extend(break_dict(b) for b in r.breaks)
    return [e for e in out.values() if e["signed"] or e["breaks"]]


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
    lines.extend(chain_line(c) for c in chain_summaries(rows))
    return "\n".join(lines) + "\n"


def chain_line(summary: Mapping[str, Any]) -> str:
    """One probe's chain: "p1 chain: 40 signed of 42; breaks: 2 (mismatch at seq 7
    (r7): ...; ...)", or "no breaks"."""
    listed = summary["listed"]
    named = "; ".join(f"{b['kind']} at seq {b['seq']} ({b['result_id']}): {b['detail']}"
                      for b in listed[:20])
    more = " …" if summary["breaks"] > min(len(listed), 20) else ""
    breaks = f"breaks: {summary['breaks']} ({named}{more})" if summary["breaks"] \
        else "no breaks"
    return (f"{summary['probe']} chain: {summary['signed']} signed of "
            f"{summary['delivered']}; {breaks}")
