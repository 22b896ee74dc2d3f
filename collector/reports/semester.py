"""AGCOM's semester tables as a report layout of their own, pure: per region and access
technology, each calendar semester and the year, the figures MisuraInternet publishes
(delibera 156/23/CONS: speed both ways, latency, packet loss and jitter, from probes in
each region, every six months and every year), each with its 95 % confidence interval
and the number of samples behind it; rendered as CSV (collector/exports.py's convention)
and as a standalone HTML page (a table per period).

A figure the minimum-sample rule marks "not enough data" (``interval.enough`` False,
collector/compliance/uncertainty.py) is never published as a number: "n.d." on the page,
an empty cell with ``*_enough_data`` false in the CSV, as Ofcom publishes only figures
whose intervals it can defend. The number of samples is shown either way.

Each period's figures are computed afresh from its own samples (``service.breakdown``):
the year's percentiles are not merged from the semesters' (a percentile of two halves
is not the percentile of the whole). This module reads no store: ``gather`` is handed
the breakdown to call, so the CLI and the API share it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from collector import __version__, exports
from collector.compliance.evaluate import Report
from collector.compliance.uncertainty import Interval
from collector.errors import BadParameter
from collector.reports.figures import indicator_name
from collector.reports.sentences import local_time
from collector.safetext import html as escape
from collector.scope import Scope, period_bounds

# The groups of the semester tables, and of the year's.
BY = ("region", "technology", "semester")
YEAR_BY = ("region", "technology")

# The figures of a row, in the order AGCOM's tables give them (156/23/CONS: speed both
# ways, latency, packet loss, jitter), then the transfer failure ratios of Allegato 2.
FIGURES = ("download_p5_kbps", "download_p95_kbps", "upload_p5_kbps", "upload_p95_kbps",
           "delay_mean_ms", "loss_ratio", "jitter_mean_ms", "download_failure_ratio",
           "upload_failure_ratio")
UNITS = {"kbps": "kbit/s", "ms": "ms", "ratio": "ratio"}

# A scope of more calendar years than this is refused (a breakdown per year each).
MAX_YEARS = 100

Part = tuple[dict[str, str], Scope, Report]
# service.breakdown with the store, targets and options bound: (scope, by) -> parts.
Breakdown = Callable[[Scope, Sequence[str]], Sequence[Part]]


@dataclass(frozen=True, slots=True)
class Figure:
    """One indicator of one row. ``value``, ``low`` and ``high`` are None when there is
    no figure to publish: no samples, not enough data (``enough`` False), or the targets
    table has no such indicator (``computed`` False). ``enough`` None: no interval was
    computed for it (a caller before intervals existed), so no rule was applied."""

    id: str
    unit: str
    value: float | None
    low: float | None
    high: float | None
    samples: int
    enough: bool | None
    method: str
    computed: bool = True


@dataclass(frozen=True, slots=True)
class Row:
    region: str
    technology: str
    period: str  # "2026-H1", "2026-H2" or "2026"
    since: str | None
    until: str | None
    family: str | None
    probes: int  # registered with this region and technology (measured or not)
    sessions: int
    figures: tuple[Figure, ...]


def unit_of(indicator_id: str) -> str:
    return UNITS[indicator_id.rsplit("_", 1)[1]]


def figure(report: Report, indicator_id: str) -> Figure:
    """The figure of ``indicator_id`` in ``report``, blanked when not publishable."""
    found = {i.id: i for i in (*report.indicators, *report.informational)}.get(indicator_id)
    if found is None:
        return Figure(indicator_id, unit_of(indicator_id), None, None, None, 0, None, "",
                      computed=False)
    interval: Interval | None = found.interval
    if interval is None:
        # No interval (older callers): the value as the report gives it, no rule applied;
        # no samples is no figure all the same.
        return Figure(found.id, found.unit, found.observed, None, None, found.samples,
                      None if found.observed is not None else False, "")
    if not interval.enough or found.observed is None:
        return Figure(found.id, found.unit, None, None, None, found.samples, False,
                      interval.method)
    return Figure(found.id, found.unit, found.observed, interval.low, interval.high,
                  found.samples, True, interval.method)


def row(key: dict[str, str], where: Scope, report: Report, period: str) -> Row:
    return Row(key.get("region", ""), key.get("technology", ""), period, where.since,
               where.until, where.family, len(where.probes or ()), report.sessions,
               tuple(figure(report, i) for i in FIGURES))


FORMATS = ("csv", "html")


def check_request(fmt: str, by: Sequence[str], include_customer: bool) -> None:
    """Refuse what the layout cannot be, naming the parameter at fault (the CLI and the
    API ask the same)."""
    if fmt not in FORMATS:
        raise BadParameter(f"format: the semester layout is csv or html, got {fmt}",
                           field="format")
    if by:
        raise BadParameter("by: the semester layout is grouped by region, technology and "
                           "semester already; drop by", field="by")
    if include_customer:
        raise BadParameter("include_customer: customer tests have no region or "
                           "technology, so no semester table can hold them",
                           field="include_customer")


def year_scopes(where: Scope) -> list[tuple[str, Scope]]:
    """(label "YYYY", scope) of each calendar year [since, until) touches, clipped to it
    (UTC, as scope.period_bounds)."""
    if where.since is None or where.until is None:
        raise BadParameter("period: the semester layout needs a period (YYYY, YYYY-H1, "
                           "YYYY-H2) or both since and until", field="period")
    out: list[tuple[str, Scope]] = []
    year = int(where.since[:4])
    while True:
        lo, hi = period_bounds(str(year))
        if lo >= where.until:
            return out
        if len(out) >= MAX_YEARS:
            raise BadParameter(f"period: more than {MAX_YEARS} calendar years; narrow "
                               "the scope", field="period")
        out.append((str(year), Scope(where.probes, max(lo, where.since),
                                     min(hi, where.until), where.family)))
        year += 1


def _order(r: Row) -> tuple[str, int, str, str]:
    # Each year's first semester, second semester, then the year; regions, then
    # technologies, alphabetically within each.
    return (r.period[:4], {"H1": 0, "H2": 1}.get(r.period[5:], 2), r.region, r.technology)


def rows(semester_parts: Sequence[Part],
         year_parts: Sequence[tuple[str, Sequence[Part]]]) -> list[Row]:
    """The table's rows from a breakdown by ``BY`` and, per year label, one by
    ``YEAR_BY`` over that year's scope."""
    out = [row(key, where, report, key["semester"]) for key, where, report in semester_parts]
    out += [row(key, where, report, label)
            for label, parts in year_parts for key, where, report in parts]
    return sorted(out, key=_order)


def gather(where: Scope, breakdown: Breakdown) -> tuple[list[Row], Report | None]:
    """The rows of ``where`` (which must have both bounds), and one of its reports (for
    the method its figures share; None when no group has a probe)."""
    years = year_scopes(where)
    semester_parts = breakdown(where, BY)
    year_parts = [(label, breakdown(scope, YEAR_BY)) for label, scope in years]
    sample = next((r for _, _, r in semester_parts), None)
    return rows(semester_parts, year_parts), sample


# --- CSV -----------------------------------------------------------------------------

def _stem(indicator_id: str) -> tuple[str, str]:
    stem, _, unit = indicator_id.rpartition("_")
    return stem, "_" + unit


def figure_columns(indicator_id: str) -> tuple[str, ...]:
    """The CSV columns of one figure, the unit at the end of each name that has one."""
    stem, unit = _stem(indicator_id)
    return (indicator_id, f"{stem}_ci95_low{unit}", f"{stem}_ci95_high{unit}",
            f"{stem}_ci_method", f"{stem}_samples", f"{stem}_enough_data")


COLUMNS = ("region", "technology", "period", "scope_since", "scope_until", "scope_family",
           "probes", "sessions", *(c for i in FIGURES for c in figure_columns(i)))


def csv_rows(table: Sequence[Row]) -> list[dict[str, Any]]:
    out = []
    for r in table:
        cells: dict[str, Any] = {
            "region": r.region, "technology": r.technology, "period": r.period,
            "scope_since": r.since, "scope_until": r.until, "scope_family": r.family or "",
            "probes": r.probes, "sessions": r.sessions}
        for f in r.figures:
            value, low, high, method, samples, enough = figure_columns(f.id)
            cells.update({value: f.value, low: f.low, high: f.high, method: f.method,
                          samples: f.samples if f.computed else None, enough: f.enough})
        out.append(cells)
    return out


def to_csv(table: Sequence[Row]) -> str:
    """Speeds in kbit/s, ratios 0-1, times UTC (collector/exports.py)."""
    return exports.to_csv(csv_rows(table), COLUMNS)


# --- HTML ----------------------------------------------------------------------------

NOT_ENOUGH = "n.d."
HTML_UNITS = {"kbit/s": "Mbit/s", "ms": "ms", "ratio": "%"}

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1600px;
       padding: 0 1.5em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.92em; }
td, th { padding: 0.25em 0.5em; text-align: left; border-bottom: 1px solid #ddd; }
th { vertical-align: bottom; } td.num { text-align: right; font-variant-numeric: tabular-nums;
  white-space: nowrap; }
.nodata { color: #777; }
dl.method dt { font-weight: 600; } dl.method dd { margin: 0 0 0.4em 1.2em; }
footer { margin-top: 2em; color: #777; font-size: 0.9em; }
"""


# The smallest percentage the page writes out (a ratio of 1e-8); below it, "< 0.000001".
SMALLEST_PERCENT = 1e-6


def percent(ratio: float) -> str:
    """A ratio in % to three significant digits, always in positional notation: a loss
    of 1.2e-7 reads "0.000012", not "1.2e-05" (which reads as a number to a reader who
    has never seen exponent notation)."""
    value = ratio * 100
    if value == 0:
        return "0"
    if abs(value) < SMALLEST_PERCENT:
        return f"< {SMALLEST_PERCENT:.6f}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def number(value: float, unit: str) -> str:
    """A figure as the page shows it: Mbit/s with two decimals (as MisuraInternet), ms
    with two, ratios in % to three significant digits (``percent``)."""
    if unit == "kbit/s":
        return f"{value / 1000:.2f}"
    if unit == "ratio":
        return percent(value)
    return f"{value:.2f}"


def _cells(f: Figure) -> str:
    if not f.computed:
        return "<td class=nodata>—</td><td class=nodata>—</td><td class=nodata>—</td>"
    samples = f"<td class=num>{f.samples:,}</td>"
    method = f' title="{escape(f.method)}"' if f.method else ""
    if f.value is None:
        return f"<td class=nodata{method}>{NOT_ENOUGH}</td><td class=nodata></td>{samples}"
    interval = "—" if f.low is None or f.high is None else \
        f"[{number(f.low, f.unit)}, {number(f.high, f.unit)}]"
    return (f"<td class=num>{number(f.value, f.unit)}</td><td class=num{method}>{interval}"
            f"</td>{samples}")


def _table(period: str, part: Sequence[Row], delay_basis: str) -> str:
    # The delay named for what the targets table judges (one way, RTT / 2, or the round
    # trip: targets.Options.delay_basis), as the compliance report names it.
    head = ("<tr><th rowspan=2>Region</th><th rowspan=2>Technology</th>"
            "<th rowspan=2>Probes</th><th rowspan=2>Sessions</th>"
            + "".join(f"<th colspan=3>{escape(indicator_name(i, delay_basis))}, "
                      f"{HTML_UNITS[unit_of(i)]}</th>" for i in FIGURES)
            + "</tr><tr>" + "<th>value</th><th>95 % CI</th><th>n</th>" * len(FIGURES)
            + "</tr>")
    body = "".join(
        f"<tr><td>{escape(r.region or '(unset)')}</td>"
        f"<td>{escape(r.technology or '(unset)')}</td><td class=num>{r.probes:,}</td>"
        f"<td class=num>{r.sessions:,}</td>{''.join(_cells(f) for f in r.figures)}</tr>"
        for r in part)
    first = part[0]
    since, until = (exports.utc_second(t) if t else "—" for t in (first.since, first.until))
    return (f"<section><h2>{escape(period)}</h2><p>From {escape(since)} to "
            f"{escape(until)} (UTC, end excluded).</p>"
            f'<table class=semester data-period="{escape(period)}">{head}{body}</table>'
            "</section>")


def _method(report: Report | None) -> str:
    items = [("probes", "the probes registered with the row's region and technology, "
                        "whether or not they measured in the period; sessions: the valid "
                        "sessions counted"),
             ("periods", "calendar semesters (H1: 1 January to 30 June; H2: 1 July to 31 "
                         "December) and the calendar year, in UTC, clipped to the scope; "
                         "each period's figures are computed from its own samples, never "
                         "merged from the semesters'")]
    if report is not None:
        items += [(k.replace("_", " "), v) for k, v in report.method.items()]
    items.append(("minimum-sample rule",
                  "a figure is published only when it has the minimum number of samples "
                  "(ci95 above; [reports] min_samples) and its samples give a 95 % "
                  f"interval; otherwise it is shown {NOT_ENOUGH} (not enough data) beside "
                  "its number of samples. Each interval's exact method (the order "
                  "statistics used and their coverage, the t or z value) is in the "
                  "cell's tooltip and in the CSV's *_ci_method columns. An interval shown "
                  "— was not computed; an indicator all — is one the targets table does "
                  "not have."))
    return "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items)


def render(table: Sequence[Row], where: Scope, report: Report | None, generated_at: str,
           timezone: str = "Europe/Rome") -> str:
    """The standalone page: one table per period, in the rows' order."""
    title = "Semester tables by region and technology (delibera 156/23/CONS)"
    periods: dict[str, list[Row]] = {}
    for r in table:
        periods.setdefault(r.period, []).append(r)
    basis = report.delay_basis if report is not None else "rtt_half"
    sections = "".join(_table(p, part, basis) for p, part in periods.items()) or \
        "<p class=nodata>No probe in the scope.</p>"
    targets = f"<br><b>Targets table:</b> {escape(report.targets_name)}" if report else ""
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}: {escape(where.describe())}</title><style>{_CSS}</style>"
        f"</head><body><header><h1>{escape(title)}</h1><p><b>Scope:</b> "
        f"{escape(where.describe())}{targets}</p><p>Speeds in Mbit/s, delay and jitter in "
        f"ms, loss and failure ratios in %; 95 % confidence intervals; n: the samples "
        f"behind each figure; {NOT_ENOUGH}: not enough data.</p></header>{sections}"
        f'<section><h2>Method</h2><dl class="method">{_method(report)}'
        f"</dl></section><footer>bbprobe-collector {escape(__version__)}, generated "
        f"{escape(local_time(generated_at, timezone))}.</footer></body></html>\n")
