"""The one place where foreign text becomes safe text, per output kind.

Text a writer supplied (a probe's health report, an admin's metadata, an anonymous
client's browser result) reaches HTML pages, CSV files, terminals, Prometheus labels
and JSON bodies. Each output has its own hazard, and each gets one function here, used
by every formatter of that kind, so that a new formatter cannot forget one:

- ``unicode``: a lone surrogate (which Python's JSON reader makes of ``"\\ud800"``)
  cannot be encoded as UTF-8, and one in a health report made every fleet page a 500.
  Replaced by U+FFFD wherever text leaves the process.
- ``terminal``: control characters (an ANSI escape sequence in a ``last_error``) never
  reach an administrator's terminal raw; each becomes ``?``.
- ``csv_cell``: no control characters, and text that a spreadsheet would run as a
  formula (``= + - @``, OWASP "CSV Injection") behind a ``'``.
- ``html``: escaped, quotes included (the value may sit in an attribute).
- ``prom_label``: the text format's three escapes (backslash, quote, newline).
- ``json_safe`` / ``dumps``: JSON whose every string is valid Unicode.

Pure functions over plain data; the input side (refusing such text before it is
stored) is ingest.lone_surrogate and the schema's checks.
"""

from __future__ import annotations

import html as _html
import json
from typing import Any

from agent.decoding import encodes
from agent.schema import ACTING_RANGES

# A text cell starting with one of these is a formula to a spreadsheet (OWASP "CSV
# Injection"): metadata an admin typed, or a probe's, must not run as =HYPERLINK(...).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
REPLACEMENT = "\ufffd"


def unicode(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (valid Unicode)."""
    if encodes(text):
        return text
    return "".join(REPLACEMENT if "\ud800" <= c <= "\udfff" else c for c in text)


def terminal(text: str) -> str:
    """Valid Unicode with every character that acts on a terminal (control characters,
    an escape sequence's ESC, line and paragraph separators, bidirectional controls)
    replaced by ``?``; what only shows (a no-break space, accents) stays."""
    return unicode(text).translate(_ACTS)


# What a terminal acts on rather than shows (agent.schema.ACTING_RANGES, the same set the
# collector refuses in labels): each becomes "?". Lone surrogates are U+FFFD already.
_ACTS = {c: "?" for a, b in ACTING_RANGES if a < 0xD800 for c in range(a, b + 1)}
_ACTS_IN_BLOCK = {c: r for c, r in _ACTS.items() if c not in (0x09, 0x0A)}


def text_block(text: str) -> str:
    """Lines for a terminal: what ``terminal`` replaces that acts on one, with new lines
    and tabs kept (a table, a report; str.translate: a whole report at C speed). Every
    command's output passes here (collector/cli/common.py, echo)."""
    return unicode(text).translate(_ACTS_IN_BLOCK)


def csv_cell(value: Any) -> Any:
    """A CSV cell: numbers as they are, None empty, text printable and formula-safe."""
    if value is None:
        return ""
    if not isinstance(value, str):
        return value
    value = terminal(value)
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def html(text: Any) -> str:
    """Text for HTML content or a quoted attribute."""
    return _html.escape(unicode(str(text)), quote=True)


def prom_label(text: str) -> str:
    """A Prometheus label value (text format 0.0.4): valid Unicode, escaped."""
    return unicode(text).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def json_safe(data: Any) -> Any:
    """``data`` with every string (and key) made valid Unicode; iterative, since a
    stored document may be nested deeply."""
    if isinstance(data, str):
        return unicode(data)
    if not isinstance(data, dict | list | tuple):
        return data
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(data, root, 0)]
    while stack:
        value, parent, slot = stack.pop()
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            parent[slot] = out
            for key, item in value.items():
                safe_key = unicode(key) if isinstance(key, str) else key
                out[safe_key] = None
                stack.append((item, out, safe_key))
        elif isinstance(value, list | tuple):
            items: list[Any] = [None] * len(value)
            parent[slot] = items
            stack.extend((item, items, i) for i, item in enumerate(value))
        else:
            parent[slot] = unicode(value) if isinstance(value, str) else value
    return root[0]


def dumps(data: Any) -> str:
    """JSON text for a response: the standard library's (ASCII, with escapes), made
    again from ``json_safe`` data only when an escaped surrogate shows, which a lone
    one would be (a pair, an emoji, is left as it was)."""
    text = json.dumps(data)
    if "\\ud" not in text:
        return text
    return json.dumps(json_safe(data))
