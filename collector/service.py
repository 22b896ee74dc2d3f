"""Operations shared by the CLI and the HTTP API, over a store (synchronous).

Refusals are domain errors (collector/errors.py: BadParameter, NotFound, Unacceptable),
each naming the parameter at fault; the web edge maps them to HTTP statuses and the CLI to
messages. Nothing here knows HTTP or renders a page."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, time
from typing import Any

from agent.schema import PROBE_ID_RE, format_utc, utc_now
from collector import auth, control
from collector.compliance import certify
from collector.compliance.completeness import DayCompleteness
from collector.compliance.completeness import completeness as completeness_of
from collector.compliance.evaluate import Observations, Report, evaluate
from collector.compliance.targets import Targets
from collector.errors import BadParameter, NotFound, Unacceptable
from collector.report import Scope, listing_row
from collector.storage.model import HourRow, LineMetadata, StoredResult
from collector.storage.store import Store


def register_probe(store: Store, name: str, line: LineMetadata) -> str:
    """Create a probe and return its token (the only time the token exists in clear)."""
    if not PROBE_ID_RE.match(name):
        raise Unacceptable(
            f"probe name {name!r} must be 1-64 characters of letters, digits, '.', '_', '-'",
            "probe_id")
    token = auth.new_token()
    store.add_probe(name, auth.hash_token(token), utc_now(), line)
    return token


def add_token(store: Store, name: str, role: str) -> str:
    """Create an analyst or admin token and return it (the only time it exists in clear)."""
    if role not in ("analyst", "admin"):
        raise Unacceptable(f"role must be analyst or admin, got {role!r}", "role")
    if not PROBE_ID_RE.match(name):
        raise Unacceptable(f"token name {name!r} must be 1-64 characters of letters, "
                           "digits, '.', '_', '-'", "name")
    token = auth.new_token()
    store.add_token(name, role, auth.hash_token(token), utc_now())
    return token


def parse_time(text: str | None, name: str) -> str | None:
    """A ``since``/``until`` bound: ISO date (midnight UTC) or timestamp -> normalised UTC."""
    if text is None or text == "":
        return None
    try:
        if len(text) == 10:
            moment = datetime.combine(datetime.fromisoformat(text).date(), time(), UTC)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
        return format_utc(moment)
    except (ValueError, OverflowError):  # overflow: before year 1 once in UTC
        raise BadParameter(
            f"{name}: expected an ISO 8601 date or timestamp, got {text!r}", field=name
        ) from None


def period_bounds(period: str) -> tuple[str, str]:
    """Calendar periods of the regulations (131/06: semesters and the year), pure:
    "2026" -> [2026-01-01, 2027-01-01); "2026-H1" -> [01-01, 07-01); "2026-H2" ->
    [07-01, next 01-01). Bounds in UTC, ``until`` exclusive."""
    text = period.strip().upper()
    year_text, _, half = text.partition("-")
    if not (year_text.isascii() and year_text.isdigit() and len(year_text) == 4) or \
            half not in ("", "H1", "H2"):
        raise BadParameter(f"period: expected YYYY, YYYY-H1 or YYYY-H2, got {period!r}",
                       field="period")
    year = int(year_text)
    if not 1 <= year <= 9998:
        raise BadParameter(f"period: year must be within 0001..9998, got {year_text}",
                       field="period")
    start_month = 7 if half == "H2" else 1
    end = datetime(year + 1, 1, 1, tzinfo=UTC) if half in ("", "H2") else \
        datetime(year, 7, 1, tzinfo=UTC)
    return format_utc(datetime(year, start_month, 1, tzinfo=UTC)), format_utc(end)


METADATA_FILTERS = ("operator", "offer", "region", "technology")


def probes_matching(store: Store, filters: dict[str, str]) -> list[str]:
    """Names of the probes whose line metadata equals every given filter."""
    return [p.name for p in store.probes()
            if all(getattr(p.line, key) == value for key, value in filters.items())]


def scope(probes: list[str] | None, since: str | None, until: str | None,
          period: str | None = None, *, store: Store | None = None,
          filters: dict[str, str] | None = None) -> Scope:
    """Resolve a scope: named probes and/or probes selected by metadata (operator, offer,
    region, technology), over ``period`` or [since, until)."""
    since_text: str | None
    until_text: str | None
    if period:
        if since or until:
            raise BadParameter("period: give either period or since/until, not both",
                           field="period")
        since_text, until_text = period_bounds(period)
    else:
        since_text, until_text = parse_time(since, "since"), parse_time(until, "until")
    selected = list(probes) if probes else None
    active = {k: v for k, v in (filters or {}).items() if v}
    if active:
        assert store is not None
        matching = probes_matching(store, active)
        selected = matching if selected is None else [p for p in selected if p in matching]
    return Scope(probes=tuple(selected) if selected is not None else None,
                 since=since_text, until=until_text)


def stored_results(store: Store, where: Scope, limit: int | None = None) -> list[
    StoredResult
]:
    return store.results(
        list(where.probes) if where.probes is not None else None, where.since, where.until, limit
    )


def listing(store: Store, where: Scope, limit: int | None = None) -> list[dict[str, object]]:
    return [
        listing_row(r.result_id, r.probe_name, r.started_at, r.ended_at, r.received_at,
                    json.loads(r.body), r.clock_skew_s)
        for r in stored_results(store, where, limit)
    ]


@dataclass(frozen=True, slots=True)
class Customers:
    """Whether the speeds of customers' own tests (browser page, ndt7 clients) in the
    period join the probes' in the percentiles, and from which client network."""

    include: bool = False
    network: str | None = None


def parse_network(text: str | None, name: str = "customer_network") -> str | None:
    if not text:
        return None
    import ipaddress

    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise BadParameter(f"{name}: expected a network such as 203.0.113.0/24, got "
                       f"{text!r}", field=name) from None


def observations(store: Store, where: Scope, include_invalid: bool = False,
                 customers: Customers = Customers()) -> Observations:
    """The probes' facts of a scope, with the customer tests of its period counted (and
    their speeds included when asked; customer tests have no probe, so only the
    period and ``customers.network`` select them)."""
    obs = store.observations(list(where.probes) if where.probes is not None else None,
                             where.since, where.until, include_invalid)
    obs.customer_included = customers.include
    for kind, direction, kbps in store.customer_speeds(where.since, where.until,
                                                       customers.network):
        obs.add_customer(kind, direction, kbps)
    return obs


def compliance(store: Store, where: Scope, targets: Targets,
               include_invalid: bool = False, customers: Customers = Customers()) -> Report:
    """Evaluate a scope from the stored facts (never by decoding every body)."""
    return evaluate(observations(store, where, include_invalid, customers), targets)


def samples(store: Store, where: Scope, include_invalid: bool = False) -> list[Any]:
    """The per-session facts of a scope, valid sessions only unless asked (the rows of a
    samples export)."""
    facts = store.facts(list(where.probes) if where.probes is not None else None,
                        where.since, where.until)
    return [f for f in facts if include_invalid or f.valid]


@dataclass(frozen=True, slots=True)
class ReportView:
    """What the HTML report of a scope shows: the verdicts, their samples, the hourly
    series for the plots, and the delay scale (RTT/2 or RTT)."""

    report: Report
    scope: Scope
    observations: Observations
    hourly: list[HourRow]
    delay_scale: float


def report_view(store: Store, where: Scope, targets: Targets,
                include_invalid: bool = False,
                customers: Customers = Customers()) -> ReportView:
    """The data of a scope's HTML report (html_report.render_view draws it)."""
    probes = list(where.probes) if where.probes is not None else None
    obs = observations(store, where, include_invalid, customers)
    hourly = store.hourly(probes, where.since, where.until, include_invalid)
    scale = 0.5 if targets.options.delay_basis == "rtt_half" else 1.0
    return ReportView(evaluate(obs, targets), where, obs, hourly, scale)


def check_timezone(timezone: str) -> str:
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(timezone)
    except (ValueError, KeyError, OSError):
        raise BadParameter(f"timezone: unknown time zone {timezone!r}",
                           field="timezone") from None
    return timezone


def certificate(store: Store, probe: str, since: str | None, until: str | None,
                rule: str, timezone: str) -> Any:
    """The line certificate of one probe over [since, until) (all its results if open)."""
    line = store.probe(probe)
    if line is None:
        raise NotFound(f"no probe named {probe!r}", field="probe")
    if rule not in certify.RULES:
        raise BadParameter(f"rule: expected one of {', '.join(certify.RULES)}, got {rule!r}",
                       field="rule")
    check_timezone(timezone)
    where = scope([probe], since, until)
    facts = store.facts([probe], where.since, where.until)
    # The suppression windows over the period (or over the sessions' span, when open).
    lo = where.since or min((f.started_at for f in facts), default=None)
    hi = where.until or max((f.started_at for f in facts), default=None)
    suppressed = [(w.starts_at, w.ends_at, w.reason) for w in control.windows(store)
                  if w.selector.matches(line) and lo is not None and hi is not None
                  and w.starts_at <= hi and w.ends_at > lo]
    return certify.certify(probe, line.line, facts, certify.RULES[rule], timezone,
                           suppressed=suppressed)


CompletenessInputs = tuple[list[tuple[str, int, str]], dict[str, list[tuple[int, int]]],
                           dict[str, int]]


def completeness_inputs(store: Store, where: Scope) -> CompletenessInputs:
    """What completeness needs from the store (run on the database thread)."""
    probes = list(where.probes) if where.probes is not None else None
    return (store.session_seqs(probes, where.since, where.until),
            store.gap_seq_ranges(probes), store.seqs_before(probes, where.since))


def completeness(store: Store, where: Scope) -> list[DayCompleteness]:
    """Delivered / expected sessions per probe per day, with the missing sequence numbers
    apart from those gap records document (reliability.md C8)."""
    return completeness_of(*completeness_inputs(store, where))
