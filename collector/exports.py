"""The one convention of every CSV the collector writes, pure: the results listing, the
compliance report (and its breakdown), the samples, the line certificate, completeness,
the probes and the fleet. Each goes through ``to_csv``, which applies it:

- **Booleans** are ``true`` / ``false`` (JSON's words); unknown or missing is an empty
  cell. Never Python's ``True``.
- **Speeds** are in kbit/s with the unit in the column's name (``download_kbps``): a
  value kept in bit/s (a result's ``summary.download_bps``) is exported divided by 1000
  under ``*_kbps``. kbit/s because everything an analyst compares a speed with is in
  kbit/s: the Allegato 2 targets tables, a line's contract (``download_min_kbps``), the
  compliance facts and the samples file; an integer number of kbit/s keeps the precision
  without decimals. The human pages (text, HTML) show Mbit/s, as MisuraInternet does.
- **Other units** are in the name too (``_ms``, ``_s``, ``_ratio`` for 0-1, never %). A
  long table, one row per indicator or per test, says its unit in a ``unit`` column
  (``kbit/s``, ``ms``, ``ratio``), and an indicator's ``id`` ends with it.
- **Times** are UTC, ISO 8601, to the second, with ``Z`` (``2026-05-01T10:00:00Z``), in
  the columns named ``*_at`` and those of ``TIME_COLUMNS``; truncated, not rounded, so a
  time never moves into the next second, hour band or day. Days are ``YYYY-MM-DD`` (UTC).
  JSON keeps the stored microseconds.
- **Names**: the probe's name is ``probe_id``; an indicator is its English snake_case
  ``id`` (as in the JSON), with the label of the targets table or contract (Allegato 2's
  Italian wording) in ``name``.
- **Lists** are one cell, items separated by ``"; "``.
- **Text** passes safetext.csv_cell: no control characters, and a cell a spreadsheet
  would run as a formula is quoted.
- A header row always, even with no rows; ``\\n`` line ends; UTF-8 without a BOM.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from collector.safetext import csv_cell

# Time columns whose name does not end in "_at".
TIME_COLUMNS = frozenset({"timestamp", "last_seen", "scope_since", "scope_until",
                          "suppressed_until"})
LIST_SEPARATOR = "; "


def is_time(column: str) -> bool:
    return column.endswith("_at") or column in TIME_COLUMNS


def boolean(value: bool | None) -> str:
    return "" if value is None else "true" if value else "false"


def utc_second(text: str) -> str:
    """A stored timestamp (ISO 8601 with an offset) as UTC to the second with ``Z``;
    text that is not one is returned as it is."""
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        m = moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return text
    # By hand, as agent.schema.format_utc: strftime writes year 999 as "999".
    return (f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:"
            f"{m.second:02d}Z")


def kbps(bps: float | None) -> float | None:
    return None if bps is None else bps / 1000


def column_name(column: str) -> str:
    """The header of a column: a bit/s value is exported in kbit/s."""
    return column[:-4] + "_kbps" if column.endswith("_bps") else column


def cell(column: str, value: Any) -> Any:
    """One value of ``column`` under the convention."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return boolean(value)
    if isinstance(value, list | tuple):
        return csv_cell(LIST_SEPARATOR.join(str(v) for v in value))
    if column.endswith("_bps") and isinstance(value, int | float):
        return value / 1000
    if isinstance(value, str) and is_time(column):
        return csv_cell(utc_second(value))
    return csv_cell(value)


def to_csv(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The CSV of ``rows`` (missing keys are empty cells), ``columns`` in this order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([column_name(c) for c in columns])
    for row in rows:
        writer.writerow([cell(c, row.get(c)) for c in columns])
    return out.getvalue()


# --- The 95 % confidence interval of a figure (collector/compliance/uncertainty.py) -------
# Appended columns and a nested object, never a changed one: a reader of the older
# layout reads the newer unchanged. ``enough_data`` false: the minimum-sample rule says
# the figure is not to be published (the numbers are still given, for analysts).
CI95_COLUMNS = ("ci95_low", "ci95_high", "ci_method", "enough_data")


def ci95_dict(interval: Any) -> dict[str, Any] | None:
    """The JSON object of an ``uncertainty.Interval`` (None: none computed)."""
    if interval is None:
        return None
    return {"low": interval.low, "high": interval.high, "method": interval.method,
            "samples": interval.samples, "enough_data": interval.enough}


def ci95_cells(interval: Any) -> dict[str, Any]:
    """The CSV cells of an ``uncertainty.Interval`` (empty when none computed)."""
    if interval is None:
        return dict.fromkeys(CI95_COLUMNS)
    return {"ci95_low": interval.low, "ci95_high": interval.high,
            "ci_method": interval.method, "enough_data": interval.enough}


# --- The line certificate --------------------------------------------------------------

# One row per check, with the certificate's line, campaign and verdict on every row (a
# CSV that stands alone, as the report's). ``breach_if`` is the comparison that is a
# breach (observed < threshold for a minimum speed); informational rows judge nothing.
CERTIFICATE_COLUMNS = ("probe_id", "family", "id", "name", "unit", "breach_if",
                       "threshold", "observed", "samples", "breach", "informational",
                       "verdict", "rule", "timezone", "sessions", "bands_filled",
                       "first_session_at", "last_session_at", "contract_versions",
                       *CI95_COLUMNS)


def certificate_rows(cert: Any) -> list[dict[str, Any]]:
    """The rows of a certificate (collector/compliance/certify.py's Certificate)."""
    filled = sum(n >= cert.rule.per_band for n in cert.band_counts)
    return [{"probe_id": cert.probe_id, "family": cert.family, "id": c.id, "name": c.name,
             "unit": c.unit, "breach_if": None if c.informational else c.comparison,
             "threshold": c.threshold, "observed": c.observed, "samples": c.samples,
             "breach": None if c.informational else c.breach,
             "informational": c.informational, "verdict": cert.verdict,
             "rule": cert.rule.name, "timezone": cert.timezone,
             "sessions": len(cert.sessions), "bands_filled": filled,
             "first_session_at": cert.first, "last_session_at": cert.last,
             # The line's contract version(s) used ("1", "1;2"; empty: no history).
             "contract_versions": ";".join(str(v.version) for v in cert.contracts),
             **ci95_cells(c.interval)}
            for c in cert.checks]
