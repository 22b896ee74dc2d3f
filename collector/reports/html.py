"""The compliance report as one standalone HTML page with plots (pure; the plots are
reports/report_plots.py, inline SVG), the front page, and the line certificate's page."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from zoneinfo import ZoneInfo

from agent.spec import DEFAULT_CAMPAIGN_RULE
from collector import __version__
from collector.compliance.certify import Certificate
from collector.compliance.evaluate import Observations, Report, coverage_of
from collector.compliance.uncertainty import Interval
from collector.reports import report_plots
from collector.reports.certificate import contract_sentence, verdict_words
from collector.reports.figures import (
    format_interval,
    format_value,
    refused_sentence,
    short_name,
    show_rtts,
    show_speeds,
)
from collector.reports.sentences import (
    CONTRACT_ELSEWHERE,
    REPORT_ELSEWHERE,
    bands_sentence,
    certificate_judges,
    certify_command,
    coverage_caveat,
    coverage_sentence,
    delay_statistic,
    local_time,
    report_command,
    report_judges,
    session_state,
    window_sentence,
)
from collector.reports.service import ReportView
from collector.reports.text import customer_sentence, invalid_sentence
from collector.safetext import html as escape
from collector.scope import Scope
from collector.storage.model import HourRow, Probe

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1440px;
       padding: 0 1.5em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { padding: 0.3em 0.8em; text-align: left;
  border-bottom: 1px solid #ddd; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #1b7d2c; font-weight: 600; } .fail { color: #b00020; font-weight: 600; }
.nodata { color: #777; }
.warning { background: #fff4e0; border-left: 4px solid #e08a00; padding: 0.4em 0.8em; }
.verdict { display: inline-block; padding: 0.2em 0.8em; border-radius: 4px; color: #fff;
  font-weight: 700; }
.verdict-pass { background: #1b7d2c; } .verdict-fail { background: #b00020; }
.verdict-incomplete { background: #777; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
svg.plot { border: 1px solid #e3e3e3; background: #fff; max-width: 100%; height: auto; }
svg .grid { stroke: #eee; } svg .axis { stroke: #555; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
svg .plot-title { font-weight: 600; font-size: 12px; } svg .empty { font-size: 14px; fill: #777; }
code { white-space: nowrap; }
dl.method dt { font-weight: 600; } dl.method dd { margin: 0 0 0.4em 1.2em; }
footer { margin-top: 2em; color: #777; font-size: 0.9em; }
"""

# Records, on each plot, how many of its marks the browser laid out with a size: what a
# headless browser test reads back (tests/collector/test_html_report.py). No data flows.
_SELF_CHECK = """
document.querySelectorAll("svg.plot").forEach(function (svg) {
  var drawn = 0;
  svg.querySelectorAll(".mark").forEach(function (m) {
    var box = m.getBBox(); if (box.width > 0 || box.height > 0) { drawn += 1; }
  });
  var r = svg.getBoundingClientRect();
  // Labels the viewBox cuts (an axis label or tick past the plot's edge): none wanted.
  var view = svg.viewBox.baseVal, clipped = [];
  svg.querySelectorAll("text").forEach(function (t) {
    var b = t.getBBox(), m = t.getCTM(), p = svg.createSVGPoint(), xs = [], ys = [];
    [[b.x, b.y], [b.x + b.width, b.y], [b.x, b.y + b.height],
     [b.x + b.width, b.y + b.height]].forEach(function (c) {
      p.x = c[0]; p.y = c[1]; var q = m ? p.matrixTransform(
        svg.getCTM().inverse().multiply(m)) : p; xs.push(q.x); ys.push(q.y); });
    if (Math.min.apply(null, xs) < view.x - 0.5 || Math.max.apply(null, xs) > view.x +
        view.width + 0.5 || Math.min.apply(null, ys) < view.y - 0.5 ||
        Math.max.apply(null, ys) > view.y + view.height + 0.5) { clipped.push(t.textContent); }
  });
  svg.setAttribute("data-clipped-labels", clipped.join(" | "));
  svg.setAttribute("data-drawn-marks", String(drawn));
  svg.setAttribute("data-drawn-size", Math.round(r.width) + "x" + Math.round(r.height));
});
"""


def _word(passed: bool | None) -> tuple[str, str]:
    return {True: ("PASS", "pass"), False: ("FAIL", "fail"), None: ("NO DATA", "nodata")}[
        passed]


def _link(href: str | None, text: str, command: str) -> str:
    """A link to the other page when served (``href``), and the command that gives it
    either way (a standalone file links nowhere)."""
    shown = f'<a href="{escape(href)}">{escape(text)}</a>' if href is not None \
        else escape(text)
    return f"{shown} (<code>{escape(command)}</code>)"


def render(report: Report, scope: Scope, obs: Observations, hourly: Sequence[HourRow],
           timezone: str, generated_at: str, delay_scale: float = 0.5,
           title: str = "Allegato 2 compliance report", base: str | None = None) -> str:
    """``base``: the served page's relative path to the site root ("" at /report,
    "../../" under /api/v1/), for the link to a line's certificate; None for a file."""
    from urllib.parse import quote

    zone = ZoneInfo(timezone)
    kind, buckets = report_plots.time_buckets(hourly, zone)
    # The coverage in this page's zone: the same hours as its plots.
    coverage = coverage_of([(h.hour, h.sessions) for h in hourly], timezone)
    probes = scope.probes or ()
    if len(probes) == 1:
        href = None if base is None else \
            f"{base}api/v1/certificate?probe={quote(probes[0])}&format=html"
        other = _link(href, f"the certificate of {probes[0]}", certify_command(probes[0]))
    else:
        href = None if base is None else base or "./"
        other = _link(href, "each line's certificate (front page)",
                      "bbprobe-collector certify --probe NAME")

    rows = []
    for r in (*report.indicators, *report.informational):
        word, css = _word(r.passed) if r.target is not None else ("INFO", "nodata")
        target = f"{r.comparison} {format_value(r.target, r.unit)}" \
            if r.target is not None else "(none in the table)"
        rows.append(
            f"<tr><td>{escape(short_name(r, report.delay_basis))}<br><small><code>{r.id}</code>"
            f"</small></td><td class=num>{escape(format_value(r.observed, r.unit))}</td>"
            f"<td class=num>{escape(target)}"
            f"</td><td class=num>{r.samples:,}</td><td class={css}>{word}</td>"
            f"{_interval_cell(r.interval, r.unit, report.min_samples)}</tr>")
    method = "".join(f"<dt>{escape(k.replace('_', ' '))}</dt><dd>{escape(v)}</dd>"
                     for k, v in report.method.items())
    unmeasured = "".join(
        f"<tr><td>{escape(i.name)}</td><td class=num>{escape(i.comparison)} "
        f"{escape(format_value(i.target, i.unit))}</td></tr>" for i in report.not_measured)
    failures = (f"{obs.download_failed} of {obs.download_attempts} download and "
                f"{obs.upload_failed} of {obs.upload_attempts} upload attempts failed; "
                f"{obs.pings_lost:,} of {obs.pings_sent:,} pings lost")
    sections = [
        f"<header><h1>{escape(title)}</h1>"
        f"<p><b>Targets:</b> {escape(report.targets_name)}<br><b>Source:</b> "
        f"{escape(report.targets_source)} (delibere {escape(', '.join(report.regulation))})"
        f"<br><b>Scope:</b> {escape(scope.describe())}; {report.sessions:,} session(s)</p>"
        f'<p class="judges"><b>What this report judges:</b> '
        f"{escape(report_judges(report))}. {escape(CONTRACT_ELSEWHERE)} {other}.</p>"
        f'<p class="coverage{"" if coverage.representative else " warning"}">'
        f"<b>Coverage:</b> {escape(coverage_sentence(coverage))}.</p>"
        f'<p>Verdict: <span class="verdict verdict-{report.verdict}">'
        f"{report.verdict.upper()}</span>{escape(coverage_caveat(coverage))}</p></header>",
        "<section><h2>Indicators</h2><table><tr><th>Indicator</th><th>Observed</th>"
        f"<th>Target</th><th>Samples</th><th>Result</th><th>95 % interval</th></tr>"
        f"{''.join(rows)}</table>"
        f"<p>{escape(failures)}.</p>"
        f'<p class="invalid"><b>Invalid measurements:</b> '
        f"{escape(invalid_sentence(report))}.</p>"
        f'<p class="customer"><b>Customer tests:</b> '
        f"{escape(customer_sentence(report))}.</p>"
        f'<p class="refused"><b>Refused by the measurement server:</b> '
        f"{escape(refused_sentence(report.refused_by_server, report.refusals_known))}."
        "</p></section>",
        "<section><h2>Speed distribution</h2><div class=plots>"
        f"{report_plots.speed_plot('download', obs, report)}"
        f"{report_plots.speed_plot('upload', obs, report)}"
        "</div></section>",
        "<section><h2>Hour-of-day profile and delay</h2><div class=plots>"
        f"{report_plots.profile_plot(hourly, zone)}"
        f"{report_plots.delay_plot(kind, buckets, zone, delay_scale)}"
        f"{report_plots.jitter_plot(kind, buckets, zone)}</div></section>",
        "<section><h2>Packet loss</h2><div class=plots>"
        f"{report_plots.loss_plot(kind, buckets, zone)}</div></section>",
        f'<section><h2>Method</h2><dl class="method">{method}</dl></section>',
    ]
    if unmeasured:
        sections.append("<section><h2>Not measurable by probes</h2><table><tr><th>Indicator"
                        f"</th><th>Target</th></tr>{unmeasured}</table></section>")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}: {escape(scope.describe())}</title><style>{_CSS}</style>"
        f"</head><body>{''.join(sections)}<footer>bbprobe-collector {__version__}, "
        f"generated {escape(local_time(generated_at, timezone))}; times in "
        f"{escape(timezone)}; speeds in Mbit/s.</footer>"
        f"<script>{_SELF_CHECK}</script></body></html>\n"
    )


def render_view(view: ReportView, timezone: str, generated_at: str,
                title: str = "Allegato 2 compliance report", base: str | None = None) -> str:
    """The HTML report of a scope, from the service layer's view of it."""
    return render(view.report, view.scope, view.observations, view.hourly, timezone,
                  generated_at, view.delay_scale, title, base)


# The certificate's own verdict words (text.VERDICT_WORDS), as the front page's answer.
_ANSWER = {"breach": ("BREACH", "fail"), "no_breach": ("NO BREACH: meets it", "pass"),
           "incomplete": ("INCOMPLETE, no verdict yet", "nodata")}


def line_answer(certs: Sequence[Certificate] | None) -> tuple[str, str]:
    """The front page's answer to "does this line meet its contract?", from the line's
    certificate(s) (one per IP version on a dual-stack line): (text, css class)."""
    if not certs:
        return "not computed on this page (a big fleet): open the certificate", "nodata"
    parts = []
    for cert in certs:
        judged = [c for c in cert.checks if not c.informational and c.threshold is not None]
        word, _ = _ANSWER[cert.verdict]
        if cert.contract_changed:
            word = "contract changed during the campaign: certify each part"
        elif not judged:
            word = "no contract figures recorded"
        elif cert.verdict == "breach":
            word += ": " + ", ".join(c.id for c in judged if c.breach)
        elif cert.verdict == "incomplete":
            word += f": {cert.bands_filled} of 24 bands filled"
        label = {"ipv4": "IPv4 ", "ipv6": "IPv6 "}.get(cert.family or "", "")
        parts.append(label + word)
    verdicts = {c.verdict for c in certs}
    css = "fail" if "breach" in verdicts else "pass" if verdicts == {"no_breach"} \
        else "nodata"
    return "; ".join(parts), css


def index(probes: Sequence[Probe],
          answers: Mapping[str, Sequence[Certificate]] | None = None) -> str:
    """The collector's front page: probes, their lines, links to reports, and per line
    the answer of its certificate (``answers``: service.line_answers; a line it leaves
    out links to its certificate unanswered) (pure)."""
    from urllib.parse import quote

    rows = []
    for p in probes:
        line = p.line
        link = f"report?probe={quote(p.name)}"
        operator = (f'<a href="report?operator={quote(line.operator)}">{escape(line.operator)}'
                    "</a>") if line.operator else ""
        contract = ", ".join(part for part in (
            f"down min {format_value(line.download_min_kbps, 'kbit/s')}"
            if line.download_min_kbps is not None else "",
            f"up min {format_value(line.upload_min_kbps, 'kbit/s')}"
            if line.upload_min_kbps is not None else "") if part)
        answer, css = line_answer((answers or {}).get(p.name))
        if p.revoked_at:
            answer, css = "revoked: open the certificate", "nodata"
        rows.append(
            f'<tr><td><a href="{link}">{escape(p.name)}</a></td><td>{operator}</td>'
            f"<td>{escape(line.offer or '')}</td><td>{escape(line.region or '')}</td>"
            f"<td>{escape(line.technology or '')}</td><td>{escape(contract)}</td>"
            f"<td>{'revoked ' + escape(p.revoked_at) if p.revoked_at else 'active'}</td>"
            f'<td class="{css}"><a href="api/v1/certificate?probe={quote(p.name)}'
            f'&amp;format=html">{escape(answer)}</a></td></tr>')
    table = ("<table><tr><th>Probe</th><th>Operator</th><th>Offer</th><th>Region</th>"
             "<th>Technology</th><th>Contract</th><th>Status</th>"
             "<th>Meets its contract? (certificate)</th></tr>"
             f"{''.join(rows)}</table><p><small>The answer is the line's certificate: its "
             "contract judged by the 244/08 method over a campaign of every hourly band "
             f"(rule {DEFAULT_CAMPAIGN_RULE}, Europe/Rome), all its sessions. INCOMPLETE: "
             "some band is still short of sessions. The compliance report (probe name) judges "
             "the operator's generic Allegato 2 targets instead.</small></p>") \
        if rows else "<p>No probes registered yet.</p>"
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>bbprobe collector"
        f"</title><style>{_CSS}</style></head><body><h1>bbprobe collector</h1>"
        '<p><a href="report">Report for all probes</a> &middot; '
        '<a href="fleet">Fleet (silent and unhealthy probes)</a> &middot; '
        '<a href="api/v1/openapi.json">API (OpenAPI)</a> &middot; '
        'query parameters of any report: <code>probe</code>, <code>operator</code>, '
        "<code>offer</code>, <code>region</code>, <code>technology</code>, "
        "<code>period</code> (YYYY, YYYY-H1, YYYY-H2), <code>since</code>, <code>until</code>, "
        f"<code>timezone</code>.</p><h2>Probes</h2>{table}"
        f"<footer>bbprobe-collector {__version__}</footer></body></html>\n"
    )


def family_choice(probe: str, query: str) -> str:
    """A dual-stack line's certificate links: one campaign per IP version."""
    links = "".join(
        f'<li><a href="certificate?{escape(query)}&amp;family={fam}">{label} campaign</a>'
        "</li>" for fam, label in (("ipv4", "IPv4"), ("ipv6", "IPv6")))
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>Certificate: {escape(probe)}</title><style>{_CSS}</style></head><body>"
            f"<h1>Line certificate: {escape(probe)}</h1><p>This line is measured over IPv4 "
            "and IPv6 (dual stack): each is a campaign of its own.</p>"
            f"<ul>{links}</ul></body></html>\n")


def certificate_page(cert: Certificate, generated_at: str, base: str | None = None,
                     query: str = "", evidence_kid: str | None = None) -> str:
    """A line certificate a technician can hand over or print: line and contract, what it
    judges, method, the 24 hourly bands, each check against its threshold, the verdict,
    every session (local time, the bands' zone). ``base``: as ``render``'s, for the link
    to the line's compliance report and to its evidence bundle (``query``: the page's
    own parameters, which the bundle takes too); ``evidence_kid``: the thumbprint of the
    collector's key that signs the bundle, for the reader to compare with the one
    published."""
    from urllib.parse import quote

    line = cert.line
    tz = cert.timezone
    contract = (
        ("Download, guaranteed minimum", format_value(line.download_min_kbps, "kbit/s")),
        ("Download, normally available", format_value(line.download_normal_kbps, "kbit/s")),
        ("Download, maximum", format_value(line.download_nominal_kbps, "kbit/s")),
        ("Upload, guaranteed minimum", format_value(line.upload_min_kbps, "kbit/s")),
        ("Upload, normally available", format_value(line.upload_normal_kbps, "kbit/s")),
        ("Upload, maximum", format_value(line.upload_nominal_kbps, "kbit/s")),
        ("Maximum delay", format_value(line.max_delay_ms, "ms")),
        ("Maximum packet loss", format_value(line.max_loss_ratio, "ratio")),
    )
    bands = [f'<td class="{"pass" if n >= cert.rule.per_band else "fail"}">{h:02d}h<br>'
             f"{n}/{cert.rule.per_band}</td>" for h, n in enumerate(cert.band_counts)]
    checks = []
    for c in cert.checks:
        word, css = ("info", "nodata") if c.informational else \
            {True: ("BREACH", "fail"), False: ("met", "pass"),
             None: ("not judged", "nodata")}[c.breach]
        threshold = ("information" if c.informational else "contract changed"
                     if cert.contract_changed else "not in contract") \
            if c.threshold is None else \
            f"{'>=' if c.comparison == '<' else '<='} {format_value(c.threshold, c.unit)}"
        checks.append(f"<tr><td>{escape(c.name)}</td><td class=num>"
                      f"{escape(format_value(c.observed, c.unit))}</td><td class=num>"
                      f"{escape(threshold)}</td><td class=num>{c.samples:,}</td>"
                      f"<td class={css}>{word}</td>"
                      f"{_interval_cell(c.interval, c.unit, cert.min_samples)}</tr>")
    many = len(cert.contracts) > 1
    sessions = [
        f"<tr><td>{escape(local_time(s.started_at, tz))}</td><td>{s.band:02d}</td>"
        + (f"<td>v{s.contract_version}</td>" if many else "") +
        f"<td>{escape(session_state(s))}</td><td class=num>"
        f"{escape(show_speeds(s.download_kbps))}</td><td class=num>"
        f"{escape(show_speeds(s.upload_kbps))}</td><td>{escape(show_rtts(s.rtts_ms))}</td>"
        "</tr>" for s in cert.sessions]
    verdict_css = {"breach": "fail", "no_breach": "pass", "incomplete": "incomplete"}[
        cert.verdict]
    href = None if base is None else f"{base}report?probe={quote(cert.probe_id)}"
    report = _link(href, "Allegato 2 compliance report", report_command(cert.probe_id))
    judges = escape(certificate_judges(cert)).replace(escape(
        f"{REPORT_ELSEWHERE} (`{report_command(cert.probe_id)}`)"), f"The {report}")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>Line certificate: {escape(cert.probe_id)}</title><style>{_CSS}"
        ".bands td { text-align: center; font-size: 0.85em; padding: 0.3em 0.4em; }"
        "td.pass { background: #e6f4ea; } td.fail { background: #fde7e9; }"
        "@media print { body { margin: 0; } }</style></head><body>"
        "<h1>Line certificate</h1><p>Method of delibera 244/08/CSP: measurements across the "
        "24 hourly bands, each contractual figure judged on its percentile.</p>"
        f"<p><b>Line:</b> probe {escape(cert.probe_id)}; operator "
        f"{escape(line.operator or '—')}; offer {escape(line.offer or '—')}; technology "
        f"{escape(line.technology or '—')}; region {escape(line.region or '—')}"
        + (f"; over {'IPv4' if cert.family == 'ipv4' else 'IPv6'} only" if cert.family
           else "") + "<br>"
        f"<b>Period:</b> {escape(local_time(cert.first, tz))} to "
        f"{escape(local_time(cert.last, tz))} ({len(cert.sessions)} sessions listed)<br>"
        f"<b>Method:</b> rule {escape(cert.rule.name)} "
        f"({cert.rule.per_band} per hourly band, {escape(tz)} local time); "
        f"percentile Hyndman-Fan type 7; delay = {escape(delay_statistic(cert.delay_basis))}"
        f'</p><p class="judges"><b>What this certificate judges:</b> {judges}.</p>'
        "<h2>Contract</h2><table>" + "".join(
            f"<tr><td>{k}</td><td class=num>{escape(v)}</td></tr>" for k, v in contract)
        + "</table>"
        + (f'<p class="contract-version"><b>Contract version:</b> '
           f"{escape(contract_sentence(cert))}.</p>" if cert.contracts else "")
        + f"<h2>Hourly bands ({escape(tz)}; sessions counted / required)</h2>"
        f'<p class="bands-summary">{escape(bands_sentence(cert))}.</p>'
        f'<table class="bands"><tr>{"".join(bands[:12])}</tr>'
        f'<tr>{"".join(bands[12:])}</tr></table>'
        "<h2>Checks</h2><table><tr><th>Indicator</th><th>Observed</th><th>Threshold</th>"
        f"<th>Samples</th><th>Result</th><th>95 % interval</th></tr>{''.join(checks)}</table>"
        + "".join(f'<p class="suppressed"><b>Suppressed:</b> '
                  f"{escape(window_sentence(w, tz, cert.rule.per_band))}.</p>"
                  for w in cert.suppressions)
        + f'<p class="refused"><b>Refused by the measurement server:</b> '
        f"{escape(refused_sentence(cert.refused_by_server))}.</p>"
        + f'<p>Verdict: <span class="verdict verdict-{verdict_css}">'
        f"{escape(verdict_words(cert))}</span></p>"
        f"<h2>Every session</h2><table><tr><th>Start ({escape(tz)})</th><th>Band</th>"
        + ("<th>Contract</th>" if many else "")
        + "<th>State</th><th>Download</th><th>Upload</th><th>RTT ms</th></tr>"
        f"{''.join(sessions)}</table>"
        + evidence_paragraph(cert, base, query, evidence_kid)
        + f"<footer>bbprobe-collector {__version__}, generated "
        f"{escape(local_time(generated_at, tz))}; speeds in Mbit/s.</footer></body></html>\n"
    )


def _interval_cell(interval: Interval | None, unit: str, min_samples: int) -> str:
    """A figure's 95 % interval (uncertainty.py), its method on hover; "not enough data"
    under the minimum-sample rule."""
    text = escape(format_interval(interval, unit, min_samples))
    if interval is None:
        return f"<td class=num>{text}</td>"
    css = "num" if interval.enough else "nodata"
    return f'<td class={css} title="{escape(interval.method)}">{text}</td>'


def evidence_paragraph(cert: Certificate, base: str | None, query: str,
                       evidence_kid: str | None) -> str:
    """The certificate's evidence bundle (collector/evidence/bundle.py): where to get it,
    which key signs it, and how to check it offline."""
    from urllib.parse import quote

    href = None
    if base is not None:
        href = (f"{base}api/v1/probes/{quote(cert.probe_id)}/certificate/evidence.zip"
                + (f"?{query}" if query else ""))
    command = (f"bbprobe-collector certify --probe {cert.probe_id}"
               + (f" --family {cert.family}" if cert.family else "") + " --evidence DIR")
    key = ("" if evidence_kid is None else
           f" It is signed by this collector's evidence key, thumbprint (RFC 7638) "
           f"<code>{escape(evidence_kid)}</code>, published at "
           "<code>/.well-known/bbprobe-keys.json</code>.")
    return (f'<p class="evidence"><b>Evidence:</b> the '
            f"{_link(href, 'evidence bundle', command)}: every session as its probe signed "
            f"it, the keys, and the inputs of this certificate, to check offline with "
            f"<code>bbprobe verify</code> or OpenSSL (its VERIFY.txt says how).{key}</p>")
