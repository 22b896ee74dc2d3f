"""Rows a reader cannot interpret: skipped, counted, named, never fatal.

One probe's stored row (a result dated 0999 by an older release, a health report the
reader cannot parse, an instruction rule that no longer validates) must never make a
read about every other probe fail: the alerter's tick, a scrape, the fleet view and a
report go on for the rest. Each reader that meets such a row calls ``skipped``: the row
is left out of that read, a warning names the table and the row (once per row and
process, so a poisoned row read every 15 s does not flood the log), and
``bbprobe_collector_unreadable_rows_total{table}`` counts it in every ``Metrics`` that
listens (collector/metrics.py registers itself).

A canonical timestamp is checked here too: every time the collector stores is written
by agent.schema.format_utc, four-digit year, microseconds, ``Z``; anything else in a
time column is a row from before that rule (or from outside the collector).
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Callable

log = logging.getLogger("bbprobe.collector")

# The tables readers name (a bounded label set for the metric).
TABLES = ("results", "health", "instructions", "suppressions", "alerts", "probes")

_CANONICAL = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")

_lock = threading.Lock()
# Weak: a Metrics (one per application; tests make many) that is gone stops listening.
_listeners: list[weakref.WeakMethod[Callable[[str], None]]] = []
_logged: set[tuple[str, str]] = set()
# Distinct rows named in the log per process before it stops naming new ones.
LOG_LIMIT = 1000


def canonical_time(text: object) -> bool:
    """True for a timestamp in the collector's stored form (see the module docstring)."""
    return isinstance(text, str) and _CANONICAL.fullmatch(text) is not None \
        and text >= "2000"


def listen(method: Callable[[str], None]) -> None:
    """Call the bound ``method(table)`` for every row skipped from now on, for as long
    as its object lives."""
    with _lock:
        _listeners.append(weakref.WeakMethod(method))


def skipped(table: str, row: str, why: BaseException | str) -> None:
    """A reader left ``row`` of ``table`` out because it could not interpret it."""
    table = table if table in TABLES else "other"
    reason = why if isinstance(why, str) else f"{type(why).__name__}: {why}"
    with _lock:
        _listeners[:] = [ref for ref in _listeners if ref() is not None]
        listeners = [fn for ref in _listeners if (fn := ref()) is not None]
        first = (table, row) not in _logged and len(_logged) < LOG_LIMIT
        if first:
            _logged.add((table, row))
    if first:
        # %r: the row's key may hold anything a writer sent; repr keeps it one line.
        log.warning("unreadable row in %s skipped: %r: %s", table, row[:200],
                    reason.splitlines()[0][:300] if reason else "")
    for fn in listeners:
        fn(table)
