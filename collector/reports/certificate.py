"""A line certificate (collector/compliance/certify.py) as text and as the JSON-ready
dict the API, the evidence bundle and its verifier share, pure. (Its HTML page is
reports/html.py ``certificate_page``.)"""

from __future__ import annotations

from typing import Any

from collector import exports
from collector.compliance.uncertainty import DEFAULT_MIN_SAMPLES
from collector.reports.figures import (
    format_interval,
    format_value,
    labelled,
    refused_sentence,
    show_rtts,
    show_speeds,
)
from collector.reports.sentences import (
    bands_sentence,
    certificate_judges,
    delay_statistic,
    local_time,
    session_state,
    sessions_word,
    window_sentence,
)

VERDICT_WORDS = {
    "breach": "BREACH: at least one contractual figure is not met",
    "no_breach": "NO BREACH: every contractual figure that was judged is met",
    "incomplete": "INCOMPLETE: the campaign does not cover every hourly band; no verdict",
}


def contract_sentence(cert: Any) -> str:
    """Which version(s) of the line's contract the certificate used, and how."""
    tz = cert.timezone

    def one(v: Any) -> str:
        since = local_time(v.valid_from, tz) if v.valid_from else "the beginning"
        retro = ", a retroactive correction" if v.retroactive else ""
        return f"version {v.version} (in force from {since}, set " \
               f"{local_time(v.changed_at, tz)} by {v.changed_by}{retro})"

    versions = [one(v) for v in cert.contracts]
    if len(versions) == 1:
        return f"each session judged by contract {versions[0]}"
    head = "the contract changed during the campaign: " + "; ".join(versions) + "; "
    if cert.contract_changed:
        return head + ("its judged figures differ between them, so no verdict: certify "
                       "each part (--until / --since the version's start)")
    return head + (f"the judged figures are the same in each, judged by version "
                   f"{cert.contract_version}")


def verdict_words(cert: Any) -> str:
    """The verdict in words (a campaign over a change of contract says so)."""
    if getattr(cert, "contract_changed", False):
        return ("NO VERDICT: the contract's judged figures changed during the campaign; "
                "certify each part")
    return VERDICT_WORDS[cert.verdict]


def certificate_dict(cert: Any) -> dict[str, Any]:
    from dataclasses import asdict as as_dict

    doc: dict[str, Any] = as_dict(cert)
    for check, c in zip(doc["checks"], cert.checks, strict=True):
        del check["interval"]
        check["ci95"] = exports.ci95_dict(c.interval)
    doc["rule"] = {"name": cert.rule.name, "sessions_per_band": cert.rule.per_band,
                   "window_h": cert.rule.window_h}
    doc["refused_by_server"] = dict(cert.refused_by_server)
    # The agent's own campaign figures (health report, `bbprobe status`).
    doc["bands_filled"] = cert.bands_filled
    doc["sessions_counted"] = cert.sessions_counted
    doc["judges"] = certificate_judges(cert)
    return doc


def format_certificate(cert: Any) -> str:
    line = cert.line
    contract = [
        ("download, guaranteed minimum", format_value(line.download_min_kbps, "kbit/s")),
        ("normally available", format_value(line.download_normal_kbps, "kbit/s")),
        ("maximum", format_value(line.download_nominal_kbps, "kbit/s")),
        ("upload, guaranteed minimum", format_value(line.upload_min_kbps, "kbit/s")),
        ("normally available", format_value(line.upload_normal_kbps, "kbit/s")),
        ("maximum", format_value(line.upload_nominal_kbps, "kbit/s")),
        ("maximum delay", format_value(line.max_delay_ms, "ms")),
        ("maximum packet loss", format_value(line.max_loss_ratio, "ratio")),
    ]
    tz = cert.timezone
    out = [
        "Line certificate (delibera 244/08/CSP method)",
        f"Line:     probe {cert.probe_id}; operator {line.operator or '—'}; offer "
        f"{line.offer or '—'}; technology {line.technology or '—'}"
        + (f"; over {'IPv4' if cert.family == 'ipv4' else 'IPv6'} only (dual stack: a "
           "campaign per IP version)" if cert.family else ""),
        "Contract: " + "; ".join(f"{k} {v}" for k, v in contract),
        *([f"Version:  {contract_sentence(cert)}"] if cert.contracts else []),
        labelled("Judges:", certificate_judges(cert)),
        f"Period:   {local_time(cert.first, tz)} to {local_time(cert.last, tz)} "
        f"({sessions_word(len(cert.sessions))} listed)",
        f"Method:   rule {cert.rule.name} ({cert.rule.per_band} per hourly band, "
        f"{tz} local time); percentile Hyndman-Fan type 7; delay = "
        f"{delay_statistic(cert.delay_basis)}",
        "",
        f"Hourly bands (sessions counted / required, {tz}): {bands_sentence(cert)}",
    ]
    cells = [f"{h:02d}h {n}/{cert.rule.per_band}{'' if n >= cert.rule.per_band else ' !'}"
             for h, n in enumerate(cert.band_counts)]
    out += ["  " + "   ".join(cells[i : i + 6]) for i in range(0, 24, 6)]
    width = max(42, *(len(c.name) for c in cert.checks))
    out += ["", f"{'Indicator':<{width}}  {'Observed':>14}  {'Threshold':>17}  Samples  "
            f"{'Result':<10}  95 % interval"]
    for c in cert.checks:
        result = "info" if c.informational else \
            {True: "BREACH", False: "ok", None: "not judged"}[c.breach]
        threshold = ("information" if c.informational else "contract changed"
                     if cert.contract_changed else "not in contract") \
            if c.threshold is None else \
            f"{'>=' if c.comparison == '<' else '<='} {format_value(c.threshold, c.unit)}"
        out.append(f"{c.name:<{width}}  {format_value(c.observed, c.unit):>14}  "
                   f"{threshold:>17}  {c.samples:>7}  {result:<10}  "
                   + format_interval(c.interval, c.unit,
                                     getattr(cert, "min_samples", DEFAULT_MIN_SAMPLES)))
    out.append(f"Refused:  {refused_sentence(cert.refused_by_server)}")
    for w in cert.suppressions:
        out.append(f"Suppressed: {window_sentence(w, tz, cert.rule.per_band)}")
    out += ["", f"Verdict:  {verdict_words(cert)}", "",
            f"Every session (start in {tz} local time):"]
    many = len(cert.contracts) > 1
    for s in cert.sessions:
        out.append(f"  {local_time(s.started_at, tz)}  band {s.band:02d}  "
                   + (f"contract v{s.contract_version}  " if many else "")
                   + f"{session_state(s)}  down {show_speeds(s.download_kbps)}  "
                   f"up {show_speeds(s.upload_kbps)}  RTT {show_rtts(s.rtts_ms)}")
    return "\n".join(out) + "\n"
