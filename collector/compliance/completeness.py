"""Completeness of a probe's deliveries (reliability.md C8), pure.

Every spooled result carries the probe's session_seq (1, 2, 3...; schema v4) and every
gap record the sequence numbers of the results it stands for. So, per probe, a number
missing between two delivered ones is a session that was measured and never arrived:
either documented (a gap record names it: the spool had to drop it) or not (lost
somewhere, to be looked into).

Method: per probe, the delivered numbers in the scope, sorted. The holes between
consecutive delivered numbers are missing; each hole counts on the UTC day of the
delivered session after it (it was measured between the two). Numbers after the last
delivered one are not counted (they may still be on their way). A jump of more than
MAX_HOLE numbers is not a hole but a discontinuity (a counter that was reset or replaced),
counted apart. expected = delivered + missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

MAX_HOLE = 96 * 31  # a month of sessions at 96 a day


@dataclass(slots=True)
class DayCompleteness:
    probe: str
    day: str  # UTC date, YYYY-MM-DD
    delivered: int = 0
    documented: int = 0  # missing, and named by a gap record
    missing: list[int] = field(default_factory=list)  # missing and not documented
    discontinuities: int = 0

    @property
    def expected(self) -> int:
        return self.delivered + self.documented + len(self.missing)

    def to_dict(self) -> dict[str, object]:
        return {"probe": self.probe, "day": self.day, "delivered": self.delivered,
                "expected": self.expected, "documented": self.documented,
                "missing": len(self.missing), "missing_seqs": self.missing,
                "discontinuities": self.discontinuities}


def _documented(seq: int, ranges: Sequence[tuple[int, int]]) -> bool:
    return any(a <= seq <= b for a, b in ranges)


def completeness(rows: Iterable[tuple[str, int, str]],
                 gaps: Mapping[str, Iterable[tuple[int, int]]]) -> list[DayCompleteness]:
    """Per probe per UTC day, from (probe, session_seq, started_at) rows sorted by probe
    then seq, and each probe's gap-record ranges."""
    days: dict[tuple[str, str], DayCompleteness] = {}
    previous: tuple[str, int] | None = None
    for probe, seq, started_at in rows:
        day = started_at[:10]
        row = days.setdefault((probe, day), DayCompleteness(probe, day))
        if previous is not None and previous[0] == probe and seq == previous[1]:
            continue  # the same number twice (a re-spooled copy): one session
        row.delivered += 1
        if previous is not None and previous[0] == probe:
            hole = seq - previous[1] - 1
            if hole > MAX_HOLE:
                row.discontinuities += 1
            elif hole > 0:
                ranges = sorted(gaps.get(probe, ()))
                for missing in range(previous[1] + 1, seq):
                    if _documented(missing, ranges):
                        row.documented += 1
                    else:
                        row.missing.append(missing)
        previous = (probe, seq)
    return [days[k] for k in sorted(days)]


def format_text(rows: Sequence[DayCompleteness]) -> str:
    if not rows:
        return "no numbered results in scope (agents before schema v4 send none)\n"
    lines = ["probe  day  delivered/expected  documented  missing (not documented)"]
    for r in rows:
        shown = ", ".join(map(str, r.missing[:20])) + (" …" if len(r.missing) > 20 else "")
        extra = f"  discontinuities {r.discontinuities}" if r.discontinuities else ""
        lines.append(f"{r.probe}  {r.day}  {r.delivered}/{r.expected}  {r.documented}  "
                     f"{len(r.missing)}{f' ({shown})' if r.missing else ''}{extra}")
    return "\n".join(lines) + "\n"
