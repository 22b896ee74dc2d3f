"""The fleet view, pure: one row per probe from its line metadata, its latest health
report and its recent results; and the row as text, CSV and an HTML page.

"Last seen" is the later of the last health report and the last result to arrive: an
agent older than the health reports sends none, and is still seen when it delivers. A
probe seen longer ago than ``silent_after_s`` (or never) is *silent*. A probe is
*healthy* when it is not silent, has no dead letters, no failing host checks, no
instruction it could not apply, and a synchronised clock where it says.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from agent.schema import parse_utc
from collector import safetext
from collector.storage.model import Probe

COLUMNS = ("probe_id", "operator", "region", "technology", "last_seen", "silent_s",
           "silent", "healthy", "problems", "agent_version", "instruction_version",
           "instruction_current", "spool_results", "dead_letters", "bands_filled",
           "sessions_suppressed", "validity_rate", "sessions", "clock_skew_s",
           "clock_synchronized", "last_error", "suppressed_until")


def _later(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return a if parse_utc(a) >= parse_utc(b) else b


def row(probe: Probe, health: tuple[str, float | None, dict[str, Any]] | None,
        activity: Mapping[str, Any] | None, current_version: str, now: datetime,
        silent_after_s: float) -> dict[str, Any]:
    """One probe's fleet row (plain data)."""
    received, skew, report = health if health is not None else (None, None, {})
    act = activity or {}
    last_seen = _later(received, act.get("last_received_at"))
    silent_s = (now - parse_utc(last_seen)).total_seconds() if last_seen else None
    silent = silent_s is None or silent_s > silent_after_s
    campaign = report.get("campaign") or {}
    clock = report.get("clock") or {}
    sessions = int(act.get("sessions") or 0)
    problems: list[str] = []
    if silent:
        problems.append("never seen" if last_seen is None else "silent")
    if report.get("dead_letters"):
        problems.append(f"{report['dead_letters']} dead letter(s)")
    if report.get("failing_checks"):
        problems.append("failing checks: " + ", ".join(report["failing_checks"]))
    if report.get("instruction_error"):
        # Not applied (refused, or it did not fit the probe's file), or only not fetched
        # this time (the probe runs under the one it kept).
        problems.append("instruction not applied" if "not applied" in
                        report["instruction_error"] else "instruction not fetched")
    if clock.get("synchronized") is False:
        problems.append("clock not synchronised")
    version = report.get("instruction_version")
    return {
        "probe_id": probe.name,
        "operator": probe.line.operator,
        "region": probe.line.region,
        "technology": probe.line.technology,
        "last_seen": last_seen,
        "silent_s": round(silent_s, 1) if silent_s is not None else None,
        "silent": silent,
        "healthy": not problems,
        "problems": problems,
        "agent_version": report.get("agent_version"),
        "instruction_version": version,
        # Only meaningful once the probe has reported: None before.
        "instruction_current": (version == current_version) if report else None,
        "spool_results": report.get("spool_results"),
        "dead_letters": report.get("dead_letters"),
        "bands_filled": campaign.get("bands_filled"),
        "sessions_suppressed": campaign.get("sessions_suppressed"),
        "validity_rate": round(int(act.get("valid_sessions") or 0) / sessions, 4)
        if sessions else None,
        "sessions": sessions,
        "clock_skew_s": skew,
        "clock_synchronized": clock.get("synchronized"),
        "last_error": report.get("last_error") or report.get("instruction_error"),
        "suppressed_until": report.get("suppressed_until"),
    }


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {"probes": len(rows), "silent": sum(bool(r["silent"]) for r in rows),
            "healthy": sum(bool(r["healthy"]) for r in rows)}


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "; ".join(str(v) for v in value) or "—"
    return str(value)


def _short(r: Mapping[str, Any]) -> list[str]:
    rate = r["validity_rate"]
    bands = r["bands_filled"]
    return [r["probe_id"], _ago(r["silent_s"]), _cell(r["agent_version"]),
            _cell(r["instruction_version"]) + ("" if r["instruction_current"] in (None, True)
                                               else " (old)"),
            _cell(r["spool_results"]), "—" if bands is None else f"{bands}/24",
            "—" if rate is None else f"{100 * rate:.0f} % of {r['sessions']}",
            "ok" if r["healthy"] else _cell(r["problems"])]


HEADERS = ["probe", "last seen", "agent", "instruction", "backlog", "bands",
           "valid", "state"]


def format_text(rows: Sequence[Mapping[str, Any]], silent_after_s: float) -> str:
    table = [HEADERS, *([safetext.terminal(c) for c in _short(r)] for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in table]
    s = summary(rows)
    lines.append(f"{s['probes']} probe(s): {s['silent']} silent (no report or result for "
                 f"over {_ago(silent_after_s)}), {s['healthy']} healthy")
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([safetext.csv_cell("" if r[c] is None else
                                           "; ".join(r[c]) if isinstance(r[c], list)
                                           else r[c]) for c in COLUMNS])
    return out.getvalue()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bbprobe fleet</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9rem; }}
th, td {{ padding: 0.3rem 0.6rem; border-bottom: 1px solid #ddd; text-align: left; }}
tr.silent td {{ background: #fde8e8; }}
tr.unhealthy td {{ background: #fff6dd; }}
.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
</style></head>
<body>
<h1>Fleet</h1>
<p id="summary">{probes} probe(s): <strong>{silent}</strong> silent (no report or result for
over {threshold}), <strong>{healthy}</strong> healthy. As of {now} UTC.</p>
<table id="fleet">
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody></table>
<p><a href="/api/v1/fleet">JSON</a> · <a href="/api/v1/fleet?format=csv">CSV</a> ·
<a href="/">home</a></p>
</body></html>
"""


def format_html(rows: Sequence[Mapping[str, Any]], silent_after_s: float,
                now: datetime) -> str:
    """The fleet page: everything escaped (probe names and errors come from outside)."""
    lines = []
    for r in rows:
        kind = "silent" if r["silent"] else "" if r["healthy"] else "unhealthy"
        cells = "".join(f"<td>{safetext.html(c)}</td>" for c in _short(r))
        lines.append(f'<tr class="{kind}" data-probe="{safetext.html(r["probe_id"])}">'
                     f"{cells}</tr>")
    s = summary(rows)
    return PAGE.format(probes=s["probes"], silent=s["silent"], healthy=s["healthy"],
                       threshold=safetext.html(_ago(silent_after_s)),
                       now=now.strftime("%Y-%m-%d %H:%M"),
                       head="".join(f"<th>{h}</th>" for h in HEADERS),
                       body="\n".join(lines))
