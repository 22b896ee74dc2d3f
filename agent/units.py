"""How the agent writes a figure for a person, one way for each quantity, and how long its
lines may be. Pure.

Every place that prints (the session summary, the progress lines, the live line,
``bbprobe status``) goes through here, so one speed reads the same everywhere:

- Speed in Mbit/s (decimal megabits, as MisuraInternet and the operators' contracts state
  them) with two decimals: a contract's minimum upload of 150 kbit/s reads 0.15, where one
  decimal would read 0.1. No thousands separator: "21,347.24" reads as about 21 in
  Italian, where "," is the decimal mark.
- Latency in ms with two decimals: 10 µs steps, finer than any broadband figure is judged
  at (Allegato 2 states delays in whole ms), and a loopback or LAN round trip still reads
  above 0.00.
- A ratio as a percentage with one decimal (loss, failure, cross traffic).
- A figure that was not measured is an em dash, never 0.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

# Output fits a 100-column terminal (and an 80-column one with few wraps): wider lines
# wrap at the terminal's edge in the middle of a figure, or are cut in a pager.
WIDTH = 100
MISSING = "—"


def mbit(bps: float | None) -> str:
    """A speed in bit/s as Mbit/s, without the unit: ``93.41``."""
    return MISSING if bps is None else f"{bps / 1e6:.2f}"


def speed(bps: float | None) -> str:
    """A speed in bit/s as ``93.41 Mbit/s`` (a missing one: the dash alone)."""
    return MISSING if bps is None else f"{mbit(bps)} Mbit/s"


def msec(ms: float | None) -> str:
    """A latency in ms, without the unit: ``14.27``."""
    return MISSING if ms is None else f"{ms:.2f}"


def latency(ms: float | None) -> str:
    """A latency in ms as ``14.27 ms`` (a missing one: the dash alone)."""
    return MISSING if ms is None else f"{msec(ms)} ms"


def delta(ms: float) -> str:
    """A latency difference, signed: ``+3.10 ms``."""
    return f"{ms:+.2f} ms"


def percent(ratio: float | None) -> str:
    """A ratio (0-1) as ``0.5 %``."""
    return MISSING if ratio is None else f"{ratio * 100:.1f} %"


def fit(lines: Iterable[str], width: int = WIDTH) -> list[str]:
    """``lines`` wrapped at spaces to ``width`` columns, each continuation indented four
    columns past its line's own indent. A word longer than a line (a URL, an id, a path)
    is never cut, so it can still be copied whole; it is the only thing that may pass
    ``width``."""
    out: list[str] = []
    for line in lines:
        if len(line) <= width:
            out.append(line)
            continue
        indent = " " * (len(line) - len(line.lstrip(" ")))
        out += textwrap.wrap(line, width, initial_indent="", subsequent_indent=indent + "    ",
                             break_long_words=False, break_on_hyphens=False,
                             drop_whitespace=True) or [line]
    return out
