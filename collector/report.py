"""Pure formatting of compliance reports and result listings (text, JSON-ready dicts, CSV)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from collector.compliance.evaluate import IndicatorResult, Report

SHORT_NAMES = {
    "download_p95_kbps": "Download, banda massima (p95)",
    "download_p5_kbps": "Download, banda minima (p5)",
    "upload_p95_kbps": "Upload, banda massima (p95)",
    "upload_p5_kbps": "Upload, banda minima (p5)",
    "download_failure_ratio": "Download failure rate",
    "upload_failure_ratio": "Upload failure rate",
    "delay_mean_ms": "One-way delay, mean",
    "delay_stdev_ms": "One-way delay, std deviation",
    "loss_ratio": "Packet loss rate",
}


@dataclass(frozen=True, slots=True)
class Scope:
    probes: tuple[str, ...] | None  # None: all probes
    since: str | None
    until: str | None

    def describe(self) -> str:
        if self.probes is None:
            who = "all probes"
        elif not self.probes:
            who = "no probe matches the selection"
        else:
            who = "probe " + ", ".join(self.probes)
        return f"{who}; from {self.since or 'the first result'} to {self.until or 'now'}"


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ratio":
        return f"{value * 100:.3g} %"
    if unit == "kbit/s":
        return f"{value:,.0f} kbit/s"
    if unit == "ms":
        return f"{value:.3f} ms"
    return f"{value:g} {unit}"


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
    rows = [("Indicator", "Observed", "Target", "Samples", "Result")]
    for r in report.indicators:
        rows.append((
            SHORT_NAMES.get(r.id, r.id),
            format_value(r.observed, r.unit),
            f"{r.comparison} {format_value(r.target, r.unit)}",
            str(r.samples),
            _result_word(r),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for n, row in enumerate(rows):
        lines.append("  ".join(
            cell.rjust(widths[i]) if i in (1, 2, 3) else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    met = sum(1 for r in report.indicators if r.passed)
    lines += [
        "",
        f"Verdict:  {report.verdict.upper()} ({met} of {len(report.indicators)} "
        "measurable indicators met)",
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


def report_dict(report: Report, scope: Scope) -> dict[str, Any]:
    return {
        "targets": {"name": report.targets_name, "source": report.targets_source,
                    "regulation": list(report.regulation)},
        "scope": {"probes": list(scope.probes) if scope.probes is not None else None,
                  "since": scope.since, "until": scope.until},
        "sessions": report.sessions,
        "verdict": report.verdict,
        "indicators": [asdict(r) for r in report.indicators],
        "not_measured": [
            {"id": i.id, "name": i.name, "comparison": i.comparison, "target": i.target,
             "unit": i.unit}
            for i in report.not_measured
        ],
        "method": report.method,
    }


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
LISTING_COLUMNS = ("result_id", "probe_id", "started_at", "ended_at", "received_at",
                   *SUMMARY_COLUMNS)


def listing_row(
    result_id: str, probe: str, started: str, ended: str, received: str, body: dict[str, Any]
) -> dict[str, Any]:
    summary = body.get("summary", {})
    return {
        "result_id": result_id, "probe_id": probe, "started_at": started, "ended_at": ended,
        "received_at": received, **{c: summary.get(c) for c in SUMMARY_COLUMNS},
    }


def format_csv(rows: Iterable[dict[str, Any]], columns: Sequence[str] = LISTING_COLUMNS) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return out.getvalue()


def format_listing_text(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "no results\n"
    lines = []
    for r in rows:
        dl = r["download_bps"]
        ul = r["upload_bps"]
        rtt = r["rtt_mean_ms"]
        loss = r["loss_ratio"]
        lines.append(
            f"{r['started_at']}  {r['probe_id']:<16} {r['result_id']}  "
            f"down {'—' if dl is None else f'{dl / 1e6:.2f} Mbit/s'}  "
            f"up {'—' if ul is None else f'{ul / 1e6:.2f} Mbit/s'}  "
            f"rtt {'—' if rtt is None else f'{rtt:.3f} ms'}  "
            f"loss {'—' if loss is None else f'{loss * 100:.1f} %'}"
        )
    return "\n".join(lines) + "\n"
