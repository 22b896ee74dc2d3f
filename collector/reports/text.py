"""Pure formatting of compliance reports and result listings (text, JSON-ready dicts, CSV).

Human pages (text and HTML) show broadband speeds in Mbit/s with two decimals, as
MisuraInternet reports them, and times beside hour bands in the bands' local time to
the second; JSON and CSV keep the stored units and UTC. A report and a certificate each
say what they judge, against which targets, with which statistic and over what
coverage, and name the other (``judges_sentence``, ``coverage_sentence``,
``certificate_judges``).

A figure's own formatting is reports/figures.py and the certificate's text and JSON
reports/certificate.py; both are importable from here as well, where their callers
have always found them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

from agent import stats
from agent.schema import format_utc
from collector import exports
from collector.compliance.evaluate import IndicatorResult, Report
from collector.compliance.facts import is_refusal

# Re-exported (``X as X``, for mypy): where their callers (the CLI, the web routes, the
# evidence bundle) have always found the certificate's text and JSON and a figure's
# formatting.
from collector.reports.certificate import certificate_dict as certificate_dict  # noqa: PLC0414
from collector.reports.certificate import contract_sentence as contract_sentence  # noqa: PLC0414
from collector.reports.certificate import format_certificate as format_certificate  # noqa: PLC0414
from collector.reports.certificate import verdict_words as verdict_words  # noqa: PLC0414
from collector.reports.figures import SHORT_NAMES as SHORT_NAMES  # noqa: PLC0414
from collector.reports.figures import (
    format_interval,
    format_value,
    labelled,
    refusals_dict,
    refused_sentence,
    short_name,
)
from collector.reports.figures import show_rtts as show_rtts  # noqa: PLC0414
from collector.reports.figures import show_speeds as show_speeds  # noqa: PLC0414
from collector.reports.sentences import (
    coverage_caveat,
    coverage_sentence,
    judges_sentence,
    sessions_word,
)
from collector.scope import Scope


def _result_word(r: IndicatorResult) -> str:
    return {True: "PASS", False: "FAIL", None: "NO DATA"}[r.passed]


def format_text(report: Report, scope: Scope) -> str:
    lines = [
        "Compliance report",
        f"Targets:  {report.targets_name}",
        f"Source:   {report.targets_source} (delibere {', '.join(report.regulation)})",
        f"Scope:    {scope.describe()}; {report.sessions} session(s)",
        "",
    ]
    rows = [("Indicator", "Observed", "Target", "Samples", "Result", "95 % interval")]
    for r in (*report.indicators, *report.informational):
        rows.append((
            short_name(r, report.delay_basis),
            format_value(r.observed, r.unit),
            f"{r.comparison} {format_value(r.target, r.unit)}" if r.target is not None
            else "(none)",
            str(r.samples),
            _result_word(r) if r.target is not None else "info",
            format_interval(r.interval, r.unit, report.min_samples),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        lines.append("  ".join(
            cell.rjust(widths[i]) if i in (1, 2, 3) else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(labelled("Judges:", judges_sentence(report, scope)))
    lines.append(labelled("Coverage:", coverage_sentence(report.coverage)))
    lines.append(f"Invalid:  {invalid_sentence(report)}")
    lines.append(f"Customer: {customer_sentence(report)}")
    lines.append(f"Refused:  {refused_sentence(report.refused_by_server, report.refusals_known)}")
    met = sum(1 for r in report.indicators if r.passed)
    lines += [
        "",
        f"Verdict:  {report.verdict.upper()} ({met} of {len(report.indicators)} "
        "measurable indicators met" + coverage_caveat(report.coverage) + ")",
    ]
    lines.append("Method:")
    lines += [f"  {k.replace('_', ' ')}: {v}" for k, v in report.method.items()]
    if report.not_measured:
        lines.append(f"Not measurable by probes ({len(report.not_measured)} rows of the table):")
        lines += [
            f"  {i.name}: {i.comparison} {format_value(i.target, i.unit)}"
            for i in report.not_measured
        ]
    return "\n".join(lines) + "\n"


def invalid_sentence(report: Report) -> str:
    """How many sessions the agents flagged invalid, how many sessions gave each reason
    (a session may give several), and whether they count."""
    n = report.invalid_sessions
    if n == 0:
        return "no session in scope was flagged invalid"
    reasons = ", ".join(f"{code} in {sessions_word(count)}"
                        for code, count in report.invalid_reasons)
    fate = "included at the analyst's request" if report.invalid_included \
        else "left out of every indicator (--include-invalid counts them)"
    return (f"{sessions_word(n)} flagged invalid (reasons: {reasons or 'none given'}); "
            f"{fate}")


def customer_sentence(report: Report) -> str:
    """Customer tests (browser page, ndt7) in the period, and whether they count."""
    kinds = {"browser": "browser speed test(s)", "ndt7": "ndt7 subtest(s)"}
    counts = ", ".join(f"{n} {kinds.get(k, k)}" for k, n in report.customer_tests if n)
    if not counts:
        return "no customer test in the period"
    if report.customer_included:
        return (f"{counts} in the period; their speeds included at the analyst's request "
                "(failure rate, delay and loss are the probes' only)")
    return f"{counts} in the period; kept apart, not in any indicator"


def report_dict(report: Report, scope: Scope) -> dict[str, Any]:
    return {
        "targets": {"name": report.targets_name, "source": report.targets_source,
                    "regulation": list(report.regulation)},
        "scope": {"probes": list(scope.probes) if scope.probes is not None else None,
                  "since": scope.since, "until": scope.until, "family": scope.family},
        "sessions": report.sessions,
        "invalid": {"sessions": report.invalid_sessions,
                    "reasons": dict(report.invalid_reasons),
                    "included": report.invalid_included},
        "customer": {"tests": dict(report.customer_tests),
                     "included": report.customer_included},
        # Attempts the measurement server refused: not in the failure rate.
        "server_refusals": refusals_dict(report.refused_by_server, report.refusals_known),
        "verdict": report.verdict,
        "indicators": [indicator_dict(r) for r in report.indicators],
        # Observed, not judged: no target in the table (jitter, delibera 156/23/CONS).
        "informational": [indicator_dict(r) for r in report.informational],
        # The minimum-sample rule behind each figure's ci95.enough_data.
        "min_samples": report.min_samples,
        "not_measured": [
            {"id": i.id, "name": i.name, "comparison": i.comparison, "target": i.target,
             "unit": i.unit}
            for i in report.not_measured
        ],
        "method": report.method,
        # What the verdict judges (generic targets, named statistics) and how much of
        # the day its sessions cover (times UTC, bands local).
        "judges": judges_sentence(report, scope),
        "coverage": coverage_dict(report),
    }


def indicator_dict(r: IndicatorResult) -> dict[str, Any]:
    """An indicator's fields, its interval as ``ci95`` (low, high, method, samples,
    enough_data)."""
    doc = asdict(r)
    del doc["interval"]
    doc["ci95"] = exports.ci95_dict(r.interval)
    return doc


def coverage_dict(report: Report) -> dict[str, Any] | None:
    c = report.coverage
    if c is None:
        return None
    return {"sessions": c.sessions, "timezone": c.timezone, "bands": list(c.bands),
            "first_hour_utc": format_utc(c.first_hour) if c.first_hour else None,
            "last_hour_utc": format_utc(c.last_hour) if c.last_hour else None,
            "representative": c.representative}


REPORT_COLUMNS = ("id", "name", "unit", "comparison", "target", "observed", "samples",
                  "passed", "scope_probes", "scope_since", "scope_until", "targets",
                  "scope_family", "refused_attempts", "refused_by_server", "verdict",
                  *exports.CI95_COLUMNS)


def report_rows(report: Report, scope: Scope) -> list[dict[str, Any]]:
    """One row per indicator, with the scope on every row (a CSV that stands alone), and
    the scope's attempts the measurement server refused: in all, and per
    server as ``origin=attempts`` separated by spaces (empty when not recorded)."""
    probes = "*" if scope.probes is None else " ".join(scope.probes)
    known = report.refusals_known
    refused = report.refused_attempts if known else None
    by_server = " ".join(f"{server}={n}" for server, n in report.refused_by_server)
    return [
        {"id": r.id, "name": r.name, "unit": r.unit, "comparison": r.comparison,
         "target": r.target, "observed": r.observed, "samples": r.samples,
         "passed": "" if r.passed is None else str(r.passed).lower(),
         "scope_probes": probes, "scope_since": scope.since, "scope_until": scope.until,
         "targets": report.targets_name,
         "scope_family": scope.family or "", "refused_attempts": refused,
         "refused_by_server": by_server, "verdict": report.verdict,
         **exports.ci95_cells(r.interval)}
        for r in (*report.indicators, *report.informational)
    ]


Part = tuple[dict[str, str], Scope, Report]


def breakdown_dict(by: Sequence[str], parts: Sequence[Part]) -> dict[str, Any]:
    """Each group with its own report (its scope: its probes, its period)."""
    return {"by": list(by), "groups": [{"group": key, "report": report_dict(r, where)}
                                       for key, where, r in parts]}


def breakdown_rows(by: Sequence[str], parts: Sequence[Part]) -> list[dict[str, Any]]:
    """One row per group and indicator: the group's columns first, then the report row
    with the group's own scope."""
    return [{**key, **row} for key, where, r in parts for row in report_rows(r, where)]


# The columns of the breakdown's text table: the figures 156/23/CONS publishes.
BREAKDOWN_FIGURES = (("download_p5_kbps", "down p5"), ("download_p95_kbps", "down p95"),
                     ("upload_p5_kbps", "up p5"), ("delay_mean_ms", "delay"),
                     ("loss_ratio", "loss"), ("jitter_mean_ms", "jitter"))


def format_breakdown(by: Sequence[str], parts: Sequence[Part], scope: Scope) -> str:
    head = [*by, "sessions", *(label for _, label in BREAKDOWN_FIGURES), "verdict"]
    rows = [head]
    for key, _where, r in parts:
        observed = {i.id: i for i in (*r.indicators, *r.informational)}
        rows.append([*(key[b] or "—" for b in by), str(r.sessions),
                     *(format_value(observed[i].observed, observed[i].unit)
                       if i in observed else "—" for i, _ in BREAKDOWN_FIGURES),
                     r.verdict])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"Breakdown by {', '.join(by)}: {scope.describe()}", ""]
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", "Figures as in the full report (percentiles Hyndman-Fan type 7; speeds in "
              "Mbit/s; delay and jitter in ms; loss in %); `report` without --by for one "
              "group's detail."]
    return "\n".join(lines) + "\n"


SAMPLE_COLUMNS = ("probe_id", "timestamp", "kind", "value", "ok", "unit")
PROBE_COLUMNS = ("probe_id", "created_at", "revoked_at", "operator", "offer", "region",
                 "technology", "download_nominal_kbps", "download_min_kbps",
                 "upload_nominal_kbps", "upload_min_kbps", "max_delay_ms", "max_loss_ratio",
                 "download_normal_kbps", "upload_normal_kbps")


def sample_rows(sessions: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """Per-test rows in the offline ``evaluate --samples`` format (one per ping and per
    transfer attempt, stamped with the session start), from ``SessionFacts``: exporting a
    scope and evaluating the file gives the scope's report."""
    for f in sessions:
        for t in f.transfers:
            yield {"probe_id": f.probe_id, "timestamp": f.started_at, "kind": t.direction,
                   "value": t.kbps if t.ok else None, "ok": t.ok, "unit": "kbit/s"}
        for rtt in f.rtts_ms:
            yield {"probe_id": f.probe_id, "timestamp": f.started_at, "kind": "ping",
                   "value": rtt, "ok": rtt is not None, "unit": "ms"}


def format_json(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


# --- Result listings -------------------------------------------------------------------------

SUMMARY_COLUMNS = (
    "download_bps",
    "upload_bps",
    "rtt_mean_ms",
    "rtt_stdev_ms",
    "loss_ratio",
    "download_failure_ratio",
    "upload_failure_ratio",
    "one_way_delay_mean_ms",
    "one_way_delay_stdev_ms",
)
# New columns go at the end: scripts that read the CSV by position keep working.
LISTING_COLUMNS = ("result_id", "probe_id", "started_at", "ended_at", "received_at",
                   *SUMMARY_COLUMNS, "valid", "clock_synchronized", "clock_skew_s",
                   "jitter_ms", "refused_attempts", "signature")
# A probe clock further than this from the collector's at delivery is flagged
# (reliability.md A9).
SKEW_FLAG_S = 5.0


def listing_row(
    result_id: str, probe: str, started: str, ended: str, received: str, body: dict[str, Any],
    clock_skew_s: float | None = None, signature: str = "unsigned",
) -> dict[str, Any]:
    """One result's row in a listing; ``signature``: "verified", "unverified" (signed,
    by a key the collector did not hold yet) or "unsigned" (an older agent's)."""
    summary = dict(body.get("summary", {}))
    validity = body.get("validity") or {}
    clock = body.get("clock") or {}
    ping = (body.get("ping") or {}).get("summary") or {}
    transfers = body.get("transfers") or []
    line = [a for a in transfers if not is_refusal(
        a.get("status", ""), a.get("failure_reason"), a.get("http_status"), a.get("error"))]
    if len(line) < len(transfers):
        # Attempts the server refused are not the line's: the failure ratios
        # again without them (an agent before schema 7 counted them in its summary).
        for direction in ("download", "upload"):
            mine = [a for a in line if a.get("direction") == direction]
            summary[f"{direction}_failure_ratio"] = stats.ratio(
                sum(a.get("status") == "failed" for a in mine), len(mine))
    return {
        "result_id": result_id, "probe_id": probe, "started_at": started, "ended_at": ended,
        "received_at": received, **{c: summary.get(c) for c in SUMMARY_COLUMNS},
        # Transfer attempts the measurement server refused (not in the failure ratios).
        "refused_attempts": len(transfers) - len(line),
        # The ping train's own jitter (agent.stats.jitter), beside its RTT and loss.
        "jitter_ms": ping.get("jitter_ms"),
        "valid": validity.get("valid", True), "clock_synchronized": clock.get("synchronized"),
        "clock_skew_s": clock_skew_s,
        # Whether the probe signed it (issue 27): what a bundle of it can prove.
        "signature": signature,
    }


def format_csv(rows: Iterable[dict[str, Any]], columns: Sequence[str] = LISTING_COLUMNS) -> str:
    """Every CSV follows one convention (collector/exports.py)."""
    return exports.to_csv(rows, columns)


def format_listing_text(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "no results\n"
    lines = []
    for r in rows:
        dl = r["download_bps"]
        ul = r["upload_bps"]
        rtt = r["rtt_mean_ms"]
        jitter = r.get("jitter_ms")
        loss = r["loss_ratio"]
        flags = []
        if r.get("valid") is False:
            flags.append("INVALID")
        skew = r.get("clock_skew_s")
        if skew is not None and abs(skew) > SKEW_FLAG_S:
            flags.append(f"CLOCK {skew:+.0f} s")
        if r.get("clock_synchronized") is False:
            flags.append("clock unsynchronized")
        if r.get("refused_attempts"):
            flags.append(f"{r['refused_attempts']} attempt(s) refused by the server")
        lines.append(
            f"{r['started_at']}  {r['probe_id']:<16} {r['result_id']}  "
            f"down {'—' if dl is None else f'{dl / 1e6:.2f} Mbit/s'}  "
            f"up {'—' if ul is None else f'{ul / 1e6:.2f} Mbit/s'}  "
            f"rtt {'—' if rtt is None else f'{rtt:.3f} ms'}  "
            f"jitter {'—' if jitter is None else f'{jitter:.3f} ms'}  "
            f"loss {'—' if loss is None else f'{loss * 100:.1f} %'}"
            + (f"  [{'; '.join(flags)}]" if flags else "")
        )
    return "\n".join(lines) + "\n"
