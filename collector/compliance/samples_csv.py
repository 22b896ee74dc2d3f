"""Offline evaluation input: one CSV row per test, parsed strictly (pure).

Columns (any order; the first five required, no others):
    probe_id   the probe or line the row belongs to
    timestamp  ISO 8601 (a timestamp without offset is taken as UTC)
    kind       download | upload | ping
    value      kbit/s for a transfer, RTT in ms for a ping; empty for a failed transfer
               or a lost ping
    ok         true | false
    unit       optional: the value's unit, kbit/s for a transfer and ms for a ping (the
               collector's export writes it, as every long CSV it writes states its
               unit: collector/exports.py); a file without it means the same

Rows with the same probe_id and timestamp count as one session (a session export stamps
its ping, download and upload rows with the session start).

A failed transfer row is the line's failure (Allegato 2's failure rate). The file has no
column for why an attempt failed, so it cannot carry attempts the measurement server
refused: bbprobe's export (report.sample_rows) leaves them out, as the
collector's report does, and the report of a file says refusals are not recorded in it.

Every bad row is reported as ``FILE:LINE: column: problem``; nothing is skipped. A file
with any bad row yields no observations, so no verdict rests on data that was dropped.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from agent.schema import PROBE_ID_RE
from agent.stats import Moments
from collector.compliance.evaluate import Observations

COLUMNS = ("probe_id", "timestamp", "kind", "value", "ok")
OPTIONAL = ("unit",)
KINDS = ("download", "upload", "ping")
UNITS = {"download": "kbit/s", "upload": "kbit/s", "ping": "ms"}
MAX_REPORTED = 50


@dataclass(slots=True)
class Parsed:
    observations: Observations
    probes: set[str] = field(default_factory=set)
    first: datetime | None = None
    last: datetime | None = None
    errors: list[str] = field(default_factory=list)
    rows: int = 0


def _row_problem(row: dict[str, str]) -> tuple[str | None, tuple[str, datetime, str,
                                                                   float | None, bool] | None]:
    probe = row["probe_id"].strip()
    if not PROBE_ID_RE.fullmatch(probe):
        return "probe_id: must be 1-64 characters of letters, digits, '.', '_', '-'", None
    stamp = row["timestamp"].strip()
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return f"timestamp: not ISO 8601: {stamp!r}", None
    try:
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else \
            moment.astimezone(UTC)
    except OverflowError:
        return f"timestamp: out of range: {stamp!r}", None
    kind = row["kind"].strip().lower()
    if kind not in KINDS:
        return f"kind: must be download, upload or ping, got {row['kind']!r}", None
    unit = (row.get("unit") or "").strip()
    if "unit" in row and unit != UNITS[kind]:
        return f"unit: must be {UNITS[kind]} for {kind}, got {row['unit']!r}", None
    ok_text = row["ok"].strip().lower()
    if ok_text not in ("true", "false"):
        return f"ok: must be true or false, got {row['ok']!r}", None
    ok = ok_text == "true"
    raw = row["value"].strip()
    value: float | None = None
    if raw:
        try:
            value = float(raw)
        except ValueError:
            return f"value: not a number: {raw!r}", None
        if not math.isfinite(value) or value < 0:
            return f"value: must be a finite number >= 0, got {raw!r}", None
    what = "lost ping" if kind == "ping" else "failed transfer"
    if ok and value is None:
        return "value: required when ok is true", None
    if not ok and value is not None:
        return f"value: must be empty for a {what} (ok is false), got {raw!r}", None
    return None, (probe, moment, kind, value, ok)


def parse(text: str, source: str = "<samples>") -> Parsed:
    """Parse the whole CSV; ``errors`` lists every problem with its line number."""
    parsed = Parsed(observations=Observations(refusals_known=False))
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in COLUMNS if c not in header]
    unknown = [h for h in header if h not in (*COLUMNS, *OPTIONAL)]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown column(s) {', '.join(unknown)}")
        parsed.errors.append(f"{source}:1: header: {'; '.join(parts)} "
                             f"(expected {', '.join(COLUMNS)}, and optionally "
                             f"{', '.join(OPTIONAL)})")
        return parsed
    reader.fieldnames = header
    obs = parsed.observations
    sessions: set[tuple[str, datetime]] = set()
    rtts: list[float] = []
    for row in reader:
        line = reader.line_num
        parsed.rows += 1
        if None in row or any(row.get(c) is None for c in header):
            parsed.errors.append(f"{source}:{line}: row: expected {len(header)} fields")
            continue
        problem, fields = _row_problem(row)
        if problem is not None or fields is None:
            parsed.errors.append(f"{source}:{line}: {problem}")
            continue
        probe, moment, kind, value, ok = fields
        parsed.probes.add(probe)
        sessions.add((probe, moment))
        parsed.first = moment if parsed.first is None else min(parsed.first, moment)
        parsed.last = moment if parsed.last is None else max(parsed.last, moment)
        if kind == "ping":
            obs.pings_sent += 1
            if value is None:
                obs.pings_lost += 1
            else:
                rtts.append(value)
        elif kind == "download":
            obs.download_attempts += 1
            if ok and value is not None:
                obs.speed_list("download").append(value)
            else:
                obs.download_failed += 1
        else:
            obs.upload_attempts += 1
            if ok and value is not None:
                obs.speed_list("upload").append(value)
            else:
                obs.upload_failed += 1
    if parsed.rows == 0 and not parsed.errors:
        parsed.errors.append(f"{source}: no data rows")
    obs.sessions = len(sessions)
    obs.rtt = Moments.of(rtts)
    return parsed
