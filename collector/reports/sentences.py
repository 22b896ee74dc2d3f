"""The sentences a report and a certificate print about themselves, pure and derived from
the same data their tables show (text and HTML alike): what each judges, against which
targets and with which statistic, over what coverage, and the suppression windows and
sessions of a certificate. A certificate is evidence: none of its sentences states a fact
its tables do not hold.

Times beside local hour bands are local (the campaign's zone) to the second; stored
times stay UTC in JSON and CSV.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

from agent.schema import parse_utc
from collector.compliance.evaluate import Coverage, Report
from collector.scope import Scope


def sessions_word(n: int) -> str:
    return f"{n:,} session" + ("" if n == 1 else "s")


def local_time(utc_text: str | None, timezone: str) -> str:
    """A stored UTC time as local time to the second, with the zone's abbreviation
    (CET, CEST): what sits beside local hour bands."""
    if not utc_text:
        return "—"
    return parse_utc(utc_text).astimezone(ZoneInfo(timezone)).strftime(
        "%Y-%m-%d %H:%M:%S %Z")


def _span(span: timedelta) -> str:
    hours = span.total_seconds() / 3600
    if hours <= 1:
        return "within one hour"
    if hours < 48:
        return f"over {hours:.0f} hours"
    return f"over {hours / 24:.0f} days"


def coverage_sentence(coverage: Coverage | None) -> str:
    """How much of the day the report's sessions cover, with a warning when they miss
    any of the 24 local hour bands (evaluate.COVERAGE_BANDS)."""
    if coverage is None:
        return "not known for this input"
    if coverage.first_hour is None or coverage.last_hour is None:
        return "no session in scope"
    first = coverage.first_hour.strftime("%Y-%m-%d %H:00")
    last = (coverage.last_hour + timedelta(hours=1)).strftime("%Y-%m-%d %H:00 %Z")
    text = (f"{sessions_word(coverage.sessions)} {_span(coverage.span)} ({first} to "
            f"{last}), in {len(coverage.bands)} of 24 local hour bands "
            f"({coverage.timezone})")
    if coverage.representative:
        return text
    return (text + ". WARNING: too little to represent the line across the day; the "
            "verdict holds for these hours only (a 244/08 campaign takes sessions in "
            "every one of the 24 bands: see the line's certificate)")


def coverage_caveat(coverage: Coverage | None) -> str:
    """The verdict's own caveat when the coverage warns (empty otherwise)."""
    if coverage is None or coverage.representative or coverage.first_hour is None:
        return ""
    return f"; on sessions in {len(coverage.bands)} of 24 hour bands only, see Coverage"


def certify_command(probe: str) -> str:
    return f"bbprobe-collector certify --probe {probe}"


def report_command(probe: str) -> str:
    return f"bbprobe-collector report --probe {probe}"


# Where a compliance report points for a line's own contract.
CONTRACT_ELSEWHERE = ("A line against its own contract (244/08: every hourly band, delay "
                      "on the 95th percentile of the round trip) is judged by")


def report_judges(report: Report) -> str:
    """What a compliance report judges: the targets table's generic figures, with the
    statistics named."""
    delay = ("the mean one-way delay (RTT / 2)" if report.delay_basis == "rtt_half"
             else "the mean round-trip time")
    return (f"the targets of {report.targets_name!r} (the operator's generic Allegato 2 "
            f"figures, not a line's contract): speeds on the 5th and 95th percentile of "
            f"per-test speeds, delay on {delay}, over every session in scope")


def judges_sentence(report: Report, scope: Scope) -> str:
    """``report_judges``, and where a line's own contract is judged instead."""
    probes = scope.probes or ()
    other = (f"its certificate (`{certify_command(probes[0])}`)" if len(probes) == 1
             else "each line's certificate (`bbprobe-collector certify --probe NAME`)")
    return f"{report_judges(report)}. {CONTRACT_ELSEWHERE} {other}"


def delay_statistic(delay_basis: str) -> str:
    return ("the 95th percentile of the round-trip time (RTT)" if delay_basis == "rtt"
            else "the 95th percentile of the one-way delay (RTT / 2)")


# Where a certificate points for the operator's generic targets.
REPORT_ELSEWHERE = "The Allegato 2 compliance report"


def certificate_judges(cert: Any) -> str:
    """What a certificate judges, and how it differs from the compliance report."""
    return (f"the contract recorded for this line (its guaranteed minimum speeds, maximum "
            f"delay and maximum loss): speeds on the 5th percentile of per-test speeds, "
            f"delay on {delay_statistic(cert.delay_basis)}, loss as lost / sent pings, "
            f"over a campaign of {cert.rule.per_band} session(s) in each of the 24 local "
            f"hour bands ({cert.timezone}, rule {cert.rule.name}). {REPORT_ELSEWHERE} "
            f"(`{report_command(cert.probe_id)}`) judges the operator's generic targets "
            "instead, delay on its mean, over whatever sessions its period holds: the "
            "two may answer differently")


def bands_sentence(cert: Any) -> str:
    """The band table in one sentence, in the agent's own figures (bands filled, as
    `bbprobe status` and the fleet view report them)."""
    missing = cert.sessions_required
    return (f"{cert.bands_filled} of 24 bands filled ({cert.rule.per_band} counted "
            f"session(s) each); {sessions_word(cert.sessions_counted)} counted"
            + (f", {missing} more needed" if missing else ""))


def _bands(bands: tuple[int, ...]) -> str:
    return ", ".join(f"{b:02d}h" for b in bands)


def window_sentence(window: Any, timezone: str, per_band: int) -> str:
    """One suppression window, from what the listed sessions say of it."""
    inside = len(window.sessions_inside)
    text = (f"{local_time(window.starts_at, timezone)} to "
            f"{local_time(window.ends_at, timezone)} ({window.reason}), over bands "
            f"{_bands(window.bands)}: ")
    text += (f"{sessions_word(inside)} started inside it (listed below, not counted, no "
             "sample)" if inside else "no session started inside it")
    if window.bands_short:
        text += (f"; bands {_bands(window.bands_short)} are short of {per_band} counted "
                 "session(s)")
    else:
        text += "; its bands have their sessions from outside it"
    return text


def session_state(s: Any) -> str:
    """Why a listed session counts or not (the certificate's session table)."""
    if not s.valid:
        state = f"INVALID ({', '.join(s.invalid_codes) or 'no reason given'}), not counted"
    elif s.suppressed_by is not None:
        state = f"not counted: inside suppression window ({s.suppressed_by})"
    elif s.counted:
        state = "counted"
    else:
        missing = [what for what, values in (("download", s.download_kbps),
                                              ("upload", s.upload_kbps))
                   if not any(v is not None for v in values)]
        if not s.rtts_ms:
            missing.append("ping")
        state = "not counted: no successful " + (" or ".join(missing) or "measurement")
    if s.refused_attempts:
        state += f"; {s.refused_attempts} refused by the server"
    return state
