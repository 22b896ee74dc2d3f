"""The fleet view, pure: one row per probe from its line metadata, its latest health
report, its recent results and the instruction in force; and the row as text, CSV and
an HTML page, each with a legend of its columns.

"Last seen" is the later of the last health report and the last result to arrive: an
agent older than the health reports sends none, and is still seen when it delivers. A
probe seen longer ago than ``silent_after_s`` (or never) is *silent*. A probe is
*healthy* when it is not silent, has no dead letters, no failing host checks, no
instruction it could not apply, and a synchronised clock where it says. A probe is
*suppressed* while a suppression window holds its sessions (the collector's window in
force now, or the probe's own report that it is suppressed until a later time): it is
shown so, with the window's reason, since no session is then expected of it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from agent.schema import format_utc, parse_utc
from collector import exports, safetext
from collector.fleet.rules import Effective, Window
from collector.storage.model import Probe

COLUMNS = ("probe_id", "operator", "region", "technology", "last_seen", "silent_s",
           "silent", "healthy", "problems", "agent_version", "instruction_version",
           "instruction_current", "spool_results", "dead_letters", "bands_filled",
           "sessions_suppressed", "validity_rate", "sessions", "clock_skew_s",
           "clock_synchronized", "last_error", "suppressed_until", "suppressed",
           "suppression_reason", "instruction_summary")


def _later(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return a if parse_utc(a) >= parse_utc(b) else b


def elapsed(seconds: float) -> str:
    """A duration as a person reads it: "45 s", "1 min 3 s", "4 h 12 min", "3 days 4 h"
    (two units at most; the smaller one left out when it is zero)."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total} s"
    if total < 3600:
        minutes, secs = divmod(total, 60)
        return f"{minutes} min" + (f" {secs} s" if secs else "")
    if total < 2 * 86400:
        hours, rest = divmod(total, 3600)
        return f"{hours} h" + (f" {rest // 60} min" if rest // 60 else "")
    days, rest = divmod(total, 86400)
    return f"{days} days" + (f" {rest // 3600} h" if rest // 3600 else "")


def _value(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 24 else text[:23] + "…"


def instruction_summary(eff: Effective) -> str:
    """The instruction a probe is given, as a person reads it: its settings (each one
    when there are two or fewer, else how many) and the rules they come from (as the
    command line writes their selectors), and the suppression windows not yet over."""
    parts = []
    if eff.settings:
        keys = sorted(eff.settings)
        what = ", ".join(f"{k} = {_value(eff.settings[k])}" for k in keys) \
            if len(keys) <= 2 else f"{len(keys)} settings"
        origins = ", ".join(dict.fromkeys(eff.sources[k] for k in keys if k in eff.sources))
        parts.append(f"{what} ({origins})" if origins else what)
    if eff.suppressions:
        count = len(eff.suppressions)
        parts.append(f"{count} suppression window{'s' if count != 1 else ''}")
    return "; ".join(parts) or "none (the probe's own config)"


def instruction_settings(eff: Effective) -> dict[str, dict[str, Any]]:
    """Every setting with the rule it comes from (as the command line writes it)."""
    return {k: {"value": v, "rule": eff.sources.get(k)} for k, v in sorted(eff.settings.items())}


def _detail(r: Mapping[str, Any]) -> str:
    """The instruction's version and every setting with its rule (the page's tooltip)."""
    version = r["instruction_version"]
    lines = [f"version {version}"] if version else []
    lines += [f"{k} = {json.dumps(v['value'], ensure_ascii=False)} ({v['rule']})"
              for k, v in (r.get("instruction_settings") or {}).items()]
    return "\n".join(lines)


def _window_now(eff: Effective | None, now: datetime) -> Window | None:
    if eff is None:
        return None
    moment = format_utc(now)
    return next((w for w in eff.suppressions if w.starts_at <= moment < w.ends_at), None)


def row(probe: Probe, health: tuple[str, float | None, dict[str, Any]] | None,
        activity: Mapping[str, Any] | None, current_version: str, now: datetime,
        silent_after_s: float, instruction: Effective | None = None) -> dict[str, Any]:
    """One probe's fleet row (plain data). ``instruction``: the one in force for the
    probe now, if worked out (its summary and its suppression window)."""
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
    window = _window_now(instruction, now)
    reported_until = report.get("suppressed_until")
    # The probe's own word counts while it holds (a report is up to an hour old).
    reported = reported_until is not None and parse_utc(reported_until) > now
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
        "suppressed_until": window.ends_at if window is not None else reported_until,
        "suppressed": window is not None or reported,
        "suppression_reason": window.reason if window is not None else None,
        "instruction_summary": instruction_summary(instruction)
        if instruction is not None else None,
        # JSON only (CSV has the summary): each setting with the rule it comes from.
        "instruction_settings": instruction_settings(instruction)
        if instruction is not None else None,
    }


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {"probes": len(rows), "silent": sum(bool(r["silent"]) for r in rows),
            "healthy": sum(bool(r["healthy"]) for r in rows),
            "suppressed": sum(bool(r.get("suppressed")) for r in rows)}


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "; ".join(str(v) for v in value) or "—"
    return str(value)


def _until(moment: str) -> str:
    """A suppression's end as the table shows it: minutes, UTC."""
    return format_utc(parse_utc(moment))[:16].replace("T", " ") + " UTC"


def _state(r: Mapping[str, Any]) -> str:
    parts = []
    if r.get("suppressed"):
        until = f" until {_until(r['suppressed_until'])}" if r.get("suppressed_until") else ""
        why = f" ({r['suppression_reason']})" if r.get("suppression_reason") else ""
        parts.append(f"suppressed{until}{why}")
    parts.append("ok" if r["healthy"] else _cell(r["problems"]))
    return "; ".join(parts)


def _instruction(r: Mapping[str, Any]) -> str:
    """The instruction as the table shows it: its summary (or its version when the
    summary was not worked out), and whether the probe runs it yet."""
    shown = r.get("instruction_summary") or _cell(r["instruction_version"])
    if r["instruction_current"] is False:
        runs = r["instruction_version"]
        shown += f" (not applied yet: runs {runs[:8]})" if runs else " (not applied yet)"
    return shown


def _short(r: Mapping[str, Any]) -> list[str]:
    rate = r["validity_rate"]
    bands = r["bands_filled"]
    seen = "never" if r["silent_s"] is None else elapsed(r["silent_s"]) + " ago"
    return [r["probe_id"], seen, _cell(r["agent_version"]), _instruction(r),
            _cell(r["spool_results"]), "—" if bands is None else f"{bands}/24",
            "—" if rate is None else f"{100 * rate:.0f} % of {r['sessions']}",
            _state(r)]


HEADERS = ["probe", "last seen", "agent", "instruction", "backlog", "bands",
           "valid", "state"]


def legend(silent_after_s: float, validity_days: int) -> list[tuple[str, str]]:
    """What each column means (the page's legend; the CLI's, shorter)."""
    return [
        ("last seen", "time since the probe's last health report or result; silent after "
                      f"{elapsed(silent_after_s)} without either (fleet.silent_after_s)"),
        ("agent", "the agent version the probe last reported"),
        ("instruction", "the central instruction in force for the probe: its settings and "
                        "the rules they come from (`bbprobe-collector instruction show "
                        "PROBE`); \"not applied yet\" while the probe still runs an older "
                        "one"),
        ("backlog", "results waiting in the probe's spool, not yet delivered"),
        ("bands", "hour bands of the probe's running certification campaign that hold "
                  "all their sessions (96in24h: 4 each; 24in72h: 1 each), of the 24 a "
                  "campaign fills (delibera 244/08/CSP), as the probe counts them; — "
                  "when it runs no campaign"),
        ("valid", f"share of the sessions received in the last {validity_days} days that "
                  "are valid (not flagged for cross traffic, Wi-Fi, a busy CPU...), of "
                  "that many sessions"),
        ("state", "ok, or what needs a look (silent, never seen, dead letters, failing "
                  "checks, an instruction not applied, a clock not synchronised); "
                  "\"suppressed\" while a suppression window holds its sessions"),
    ]


def format_text(rows: Sequence[Mapping[str, Any]], silent_after_s: float,
                validity_days: int = 7) -> str:
    table = [HEADERS, *([safetext.terminal(c) for c in _short(r)] for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in table]
    s = summary(rows)
    lines.append(f"{s['probes']} probe(s): {s['silent']} silent (no report or result for "
                 f"over {elapsed(silent_after_s)}), {s['healthy']} healthy, "
                 f"{s['suppressed']} suppressed")
    lines.append(f"bands: hour bands of the running campaign with all their sessions, of "
                 f"24; valid: valid sessions of those received in {validity_days} days")
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The export convention (collector/exports.py): true/false, UTC to the second."""
    return exports.to_csv(rows, COLUMNS)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bbprobe fleet</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9rem; }}
th, td {{ padding: 0.3rem 0.6rem; border-bottom: 1px solid #ddd; text-align: left;
          vertical-align: top; }}
tr.suppressed td {{ background: #e6f0fb; }}
tr.unhealthy td {{ background: #fff6dd; }}
/* Last: a silent probe is red even inside a window (its reports should still come). */
tr.silent td {{ background: #fde8e8; }}
small {{ color: #666; font-family: ui-monospace, monospace; }}
dl {{ font-size: 0.85rem; max-width: 60rem; }}
dt {{ font-weight: 600; float: left; clear: left; width: 7rem; }}
dd {{ margin: 0 0 0.3rem 7.5rem; }}
.swatch {{ display: inline-block; width: 0.8rem; height: 0.8rem; vertical-align: middle;
           border: 1px solid #ccc; }}
</style></head>
<body>
<h1>Fleet</h1>
<p id="summary">{probes} probe(s): <strong>{silent}</strong> silent (no report or result for
over {threshold}), <strong>{healthy}</strong> healthy, <strong>{suppressed}</strong>
suppressed. As of {now} UTC.</p>
<table id="fleet">
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody></table>
<h2>Legend</h2>
<dl id="legend">
{legend}
<dt>colours</dt><dd><span class="swatch" style="background:#fde8e8"></span> silent ·
<span class="swatch" style="background:#fff6dd"></span> needs a look ·
<span class="swatch" style="background:#e6f0fb"></span> suppressed (no session expected)</dd>
<dt>links</dt><dd>a probe's name opens its compliance report; "certificate" its
certification against its contract</dd>
</dl>
<p><a href="api/v1/fleet">JSON</a> · <a href="api/v1/fleet?format=csv">CSV</a> ·
<a href="./">home</a></p>
</body></html>
"""


def _row_html(r: Mapping[str, Any]) -> str:
    name = str(r["probe_id"])
    cells = [safetext.html(c) for c in _short(r)]
    # Relative links: the page works behind a proxy that serves the collector under a
    # path of its own.
    cells[0] = (f'<a href="report?probe={quote(name)}">{cells[0]}</a>'
                f'<br><small><a href="api/v1/certificate?probe={quote(name)}&amp;'
                f'format=html">certificate</a></small>')
    version = r["instruction_version"]
    short = f"<br><small>{safetext.html(version[:8])}</small>" if version else ""
    cells[3] = f'<span title="{safetext.html(_detail(r))}">{cells[3]}</span>{short}'
    kind = " ".join(k for k, on in (("silent", r["silent"]),
                                     ("unhealthy", not r["silent"] and not r["healthy"]),
                                     ("suppressed", bool(r.get("suppressed")))) if on)
    return (f'<tr class="{kind}" data-probe="{safetext.html(name)}">'
            + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")


def format_html(rows: Sequence[Mapping[str, Any]], silent_after_s: float,
                now: datetime, validity_days: int = 7) -> str:
    """The fleet page: everything escaped (probe names and errors come from outside)."""
    s = summary(rows)
    return PAGE.format(probes=s["probes"], silent=s["silent"], healthy=s["healthy"],
                       suppressed=s["suppressed"],
                       threshold=safetext.html(elapsed(silent_after_s)),
                       now=now.strftime("%Y-%m-%d %H:%M"),
                       head="".join(f"<th>{h}</th>" for h in HEADERS),
                       body="\n".join(_row_html(r) for r in rows),
                       legend="\n".join(f"<dt>{safetext.html(k)}</dt><dd>"
                                        f"{safetext.html(v)}</dd>"
                                        for k, v in legend(silent_after_s, validity_days)))
