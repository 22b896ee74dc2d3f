"""The live line on a terminal: ``agent/live.py``'s state drawn with rich on stderr.

The edge of the live view. The measurement code knows only ``live.Observer``; this module
holds the one state, swaps in each next state as events arrive (on the event loop), and
lets rich's refresh thread read it a few times a second. ``rich`` is imported only when a
terminal is there to draw on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from agent import live

# rich redraws on its own thread: four times a second follows the 100 ms reads closely
# enough for the eye and keeps the redraw's cost (and a slow terminal's) off the transfer.
REFRESH_PER_SECOND = 4


def wanted(*, as_json: bool, quiet: bool = False) -> bool:
    """Whether a command should draw the live line: never with ``--json`` or ``--quiet``
    (a script reads the output; a quiet run asked for nothing on stderr), and only when
    stderr is a terminal (else the plain progress lines are all there is)."""
    if as_json or quiet:
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty is not None and isatty())


@dataclass(frozen=True, slots=True)
class View:
    """What a command measures with: the observer to hand to the probes, and, while the
    line is drawn, ``say`` to print a progress line above it (None: print as usual)."""

    observe: live.Observer = live.ignore
    say: Callable[[str], None] | None = None


@contextmanager
def shown(enabled: bool) -> Iterator[View]:
    """While the block runs, a view whose events draw the live line on stderr; the line
    is erased at the end. Not ``enabled``, or a terminal rich will not drive (TERM dumb,
    TTY_COMPATIBLE=0): ``View()``, and nothing is drawn.

    Lines printed meanwhile must go through ``say``: click's ``echo(err=True)`` writes to
    the terminal beneath rich (it unwraps the stream rich puts in place of sys.stderr)
    and would print across the live line. Other writes to sys.stderr (warnings) are
    redirected through rich; stdout is left alone (the result is printed after)."""
    if not enabled:
        yield View()
        return
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console(stderr=True, highlight=False)
    if not console.is_terminal or console.is_dumb_terminal:
        yield View()
        return
    # One reference swapped whole (states are immutable): the refresh thread reads either
    # the old state or the new one, never a half-updated one.
    current = [live.LiveState()]

    def observe(event: live.LiveEvent) -> None:
        # A view must never cost a measurement: a fault in drawing freezes the line, and
        # the transfer, its record and its result go on untouched.
        try:
            current[0] = live.advance(current[0], event)
        except Exception:
            return

    def render() -> Text:
        return Text(live.format_line(current[0], time.monotonic()), no_wrap=True,
                    overflow="ellipsis")

    def say(line: str) -> None:
        console.print(Text(line))  # Text: printed as is, no markup or highlighting

    with Live(console=console, get_renderable=render, refresh_per_second=REFRESH_PER_SECOND,
              transient=True, redirect_stdout=False, redirect_stderr=True):
        yield View(observe, say)
