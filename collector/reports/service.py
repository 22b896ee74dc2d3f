"""Operations shared by the CLI and the HTTP API, over a store (synchronous).

Refusals are domain errors (collector/errors.py: BadParameter, NotFound, Unacceptable),
each naming the parameter at fault; the web edge maps them to HTTP statuses and the CLI to
messages. Nothing here knows HTTP or renders a page."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, time
from typing import Any

from agent.family import FAMILIES
from agent.schema import PROBE_ID_RE, format_utc, utc_now
from collector import auth
from collector.compliance import certify
from collector.compliance.completeness import DayCompleteness
from collector.compliance.completeness import completeness as completeness_of
from collector.compliance.evaluate import Observations, Report, evaluate
from collector.compliance.targets import Targets
from collector.errors import BadParameter, NotFound, Unacceptable
from collector.fleet import control
from collector.lines import TECHNOLOGIES, canonical_technology
from collector.reports.text import Scope, listing_row
from collector.storage.model import HourRow, LineMetadata, StoredResult
from collector.storage.store import Store


def register_probe(store: Store, name: str, line: LineMetadata) -> str:
    """Create a probe and return its token (the only time the token exists in clear)."""
    if not PROBE_ID_RE.fullmatch(name):
        raise Unacceptable(
            f"probe name {name!r} must be 1-64 characters of letters, digits, '.', '_', '-'",
            "probe_id")
    token = auth.new_token()
    store.add_probe(name, auth.hash_token(token), utc_now(), line)
    return token


def technology(text: str) -> str:
    """The canonical spelling of an access technology (any case); Unacceptable if it is
    none of TECHNOLOGIES."""
    known = canonical_technology(text)
    if known is None:
        raise Unacceptable(f"technology: expected one of {', '.join(TECHNOLOGIES)}, got "
                           f"{text[:40]!r}", "technology")
    return known


def _checked_fields(given: Mapping[str, Any]) -> dict[str, Any]:
    """Each given line field checked alone: known, numbers finite within 0..1e12,
    strings 1-200 printable characters (an empty one unsets), the technology one of
    TECHNOLOGIES."""
    names = {f.name for f in fields(LineMetadata)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise Unacceptable(f"{unknown[0][:40]}: unknown field", unknown[0][:40])
    values: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        if key.endswith(("_kbps", "_ms", "_ratio")):
            number = isinstance(value, int | float) and not isinstance(value, bool)
            # NaN and the infinities fail the range (comparisons with NaN are false);
            # a huge int is compared exactly, never converted.
            if not number or not 0 <= value < 1e12:
                raise Unacceptable(f"{key}: expected a number within 0..1e12, got "
                                   f"{str(value)[:40]}", key)
            values[key] = float(value)
        elif not isinstance(value, str) or len(value) > 200 or \
                not all(c.isprintable() for c in value):
            raise Unacceptable(f"{key}: expected text of at most 200 printable characters",
                               key)
        else:
            values[key] = value.strip() or None
    if values.get("technology"):
        values["technology"] = technology(values["technology"])
    if (values.get("max_loss_ratio") or 0) > 1:
        raise Unacceptable("max_loss_ratio: expected a ratio within 0..1", "max_loss_ratio")
    return values


def _declared_in_order(values: Mapping[str, Any], changed: set[str] | None = None) -> None:
    """Each direction's declared speeds in order, minimum <= normally available <=
    maximum, where given (only the directions ``changed`` touches, if given)."""
    for d in ("download", "upload"):
        keys = (f"{d}_min_kbps", f"{d}_normal_kbps", f"{d}_nominal_kbps")
        if changed is not None and not changed & set(keys):
            continue
        declared = [(k, values[k]) for k in keys if values.get(k) is not None]
        for (low_key, low), (high_key, high) in itertools.pairwise(declared):
            if low > high:
                raise Unacceptable(f"{high_key}: {high:g} is below {low_key} ({low:g}): "
                                   "an offer declares minimum <= normally available <= "
                                   "maximum", high_key)


def line_metadata(given: Mapping[str, Any]) -> LineMetadata:
    """Line metadata from options or a request's fields, checked (``_checked_fields``,
    and each direction's declared speeds in order)."""
    values = _checked_fields(given)
    _declared_in_order(values)
    return LineMetadata(**values)


def set_line(store: Store, name: str, changes: Mapping[str, Any]) -> LineMetadata:
    """Change some of a probe's line metadata: the fields given are checked, and the
    declared speeds of the directions they touch against the ones stored (what was
    stored before the checks existed is left as it is)."""
    probe = store.probe(name)
    if probe is None:
        raise NotFound(f"no probe named {name!r}", "probe_id")
    checked = _checked_fields(changes)
    given = {k for k, v in changes.items() if v is not None}
    merged = {**{f.name: getattr(probe.line, f.name) for f in fields(LineMetadata)},
              **{k: checked.get(k) for k in given}}
    _declared_in_order(merged, given)
    store.update_line(name, {k: checked.get(k) for k in given})
    return LineMetadata(**merged)


def add_token(store: Store, name: str, role: str) -> str:
    """Create an analyst or admin token and return it (the only time it exists in clear)."""
    if role not in ("analyst", "admin"):
        raise Unacceptable(f"role must be analyst or admin, got {role!r}", "role")
    if not PROBE_ID_RE.fullmatch(name):
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
        moment = moment.astimezone(UTC)
    except (ValueError, OverflowError):  # overflow: before year 1 once in UTC
        raise BadParameter(
            f"{name}: expected an ISO 8601 date or timestamp, got {text!r}", field=name
        ) from None
    # A day's arithmetic on a bound (the next midnight, a campaign's window) must not
    # overflow: the last day of year 9999 was a 500 (issue 23's fuzzer). Years 1000 to
    # 9000 hold every question about a measurement.
    if not SCOPE_YEARS[0] <= moment.year <= SCOPE_YEARS[1]:
        raise BadParameter(f"{name}: expected a year from {SCOPE_YEARS[0]} to "
                           f"{SCOPE_YEARS[1]}, got {text[:40]!r}", field=name)
    return format_utc(moment)


SCOPE_YEARS = (1000, 9000)


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
# Scope filters on the sessions themselves: the IP version measured over (issue 16).
SESSION_FILTERS = ("family",)
def check_family(family: str | None) -> None:
    """A family filter is one of agent.family.FAMILIES (or none)."""
    if family is not None and family not in FAMILIES:
        raise BadParameter(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}",
                           field="family")


def probes_matching(store: Store, filters: dict[str, str]) -> list[str]:
    """Names of the probes whose line metadata equals every given filter."""
    return [p.name for p in store.probes()
            if all(getattr(p.line, key) == value for key, value in filters.items())]


def scope(probes: list[str] | None, since: str | None, until: str | None,
          period: str | None = None, *, store: Store | None = None,
          filters: dict[str, str] | None = None) -> Scope:
    """Resolve a scope: named probes and/or probes selected by metadata (operator, offer,
    region, technology), over ``period`` or [since, until); ``filters["family"]``
    ("ipv4"/"ipv6") keeps the sessions measured over that IP version."""
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
    family = active.pop("family", None)
    check_family(family)
    if "technology" in active:
        # Any case finds the canonical spelling (fwa, FWA: stored lines were made
        # canonical by the migration that brought the list); other text is kept.
        active["technology"] = canonical_technology(active["technology"]) or \
            active["technology"]
    if active:
        assert store is not None
        matching = probes_matching(store, active)
        selected = matching if selected is None else [p for p in selected if p in matching]
    return Scope(probes=tuple(selected) if selected is not None else None,
                 since=since_text, until=until_text, family=family)


# What a report can be broken down by (delibera 156/23/CONS: MisuraInternet publishes
# results by region every semester; analysts also compare offers and technologies).
BREAKDOWN = ("operator", "offer", "region", "technology", "semester", "family")
MAX_GROUPS = 1000


def semesters(since: str | None, until: str | None) -> list[tuple[str, str, str]]:
    """(label "YYYY-H1", since, until) of each calendar semester [since, until) touches,
    clipped to it (UTC, as period_bounds)."""
    if since is None or until is None:
        raise BadParameter("by semester: give a period (YYYY, YYYY-H1, YYYY-H2) or both "
                           "since and until", field="by")
    out = []
    year, half = int(since[:4]), 1 if since[5:7] < "07" else 2
    while True:
        lo, hi = period_bounds(f"{year}-H{half}")
        if lo >= until:
            break
        out.append((f"{year}-H{half}", max(lo, since), min(hi, until)))
        year, half = (year, 2) if half == 1 else (year + 1, 1)
        if len(out) > MAX_GROUPS:
            break
    return out


def groups(store: Store, where: Scope, by: Sequence[str], max_groups: int = MAX_GROUPS
           ) -> list[tuple[dict[str, str], Scope]]:
    """The scope split by line metadata and/or semester: (the group's key, its scope),
    groups without a probe left out. Probes whose field is unset form the group ""."""
    unknown = [b for b in by if b not in BREAKDOWN]
    if unknown or len(set(by)) != len(by):
        raise BadParameter(f"by: expected distinct values among {', '.join(BREAKDOWN)}, "
                           f"got {', '.join(by)}", field="by")
    fields_ = [b for b in by if b not in ("semester", "family")]
    # By IP version (issue 16): sessions of unknown family (schema < 6) are in neither.
    families: tuple[str | None, ...] = (where.family,)
    if "family" in by:
        if where.family is not None:
            raise BadParameter("by: family, with the scope already of one family",
                               field="by")
        families = FAMILIES
    periods: list[tuple[str | None, str | None, str | None]] = [
        (None, where.since, where.until)]
    if "semester" in by:
        periods = [(label, lo, hi) for label, lo, hi in semesters(where.since, where.until)]
    buckets: dict[tuple[str, ...], list[str]] = {}
    for p in store.probes():
        if where.probes is None or p.name in where.probes:
            key = tuple(getattr(p.line, f) or "" for f in fields_)
            buckets.setdefault(key, []).append(p.name)
    count = len(buckets) * len(periods) * len(families)
    if count > max_groups:
        raise BadParameter(f"by: {count} groups, more than {max_groups}; narrow the scope",
                           field="by")
    out = []
    for key in sorted(buckets):
        for label, lo, hi in periods:
            for fam in families:
                group = dict(zip(fields_, key, strict=True))
                if label is not None:
                    group["semester"] = label
                if "family" in by:
                    group["family"] = fam or ""
                out.append(({b: group[b] for b in by},
                            Scope(tuple(buckets[key]), lo, hi, fam)))
    return out


def breakdown(store: Store, where: Scope, targets: Targets, by: Sequence[str],
              include_invalid: bool = False, customers: Customers | None = None,
              max_groups: int = MAX_GROUPS) -> list[tuple[dict[str, str], Scope, Report]]:
    """One report per group of ``groups``, with the group's own scope. Customer tests
    (browser page, ndt7 clients) have no line: they join only a breakdown by semester
    alone, never one by line metadata."""
    chosen = customers or Customers()
    if chosen.include and set(by) - {"semester"}:  # family too: customer tests have none
        raise BadParameter("by: customer tests have no line metadata; include them only "
                           "in a breakdown by semester", field="by")
    return [(key, scope_, compliance(store, scope_, targets, include_invalid, chosen))
            for key, scope_ in groups(store, where, by, max_groups)]


def stored_results(store: Store, where: Scope, limit: int | None = None) -> list[
    StoredResult
]:
    return store.results(
        list(where.probes) if where.probes is not None else None, where.since, where.until, limit,
        family=where.family)


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
                             where.since, where.until, include_invalid, family=where.family)
    obs.customer_included = customers.include
    if where.family is not None:
        # Customer tests record no IP version: a report of one family leaves them out.
        return obs
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
                        where.since, where.until, family=where.family)
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
    hourly = store.hourly(probes, where.since, where.until, include_invalid,
                          family=where.family)
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
                rule: str, timezone: str, family: str | None = None) -> Any:
    """The line certificate of one probe over [since, until) (all its results if open),
    of one IP version: a dual-stack line is two campaigns, one per family (the agent
    measures each slot once over each), so ``family`` must then be given."""
    line = store.probe(probe)
    if line is None:
        raise NotFound(f"no probe named {probe!r}", field="probe")
    if rule not in certify.RULES:
        raise BadParameter(f"rule: expected one of {', '.join(certify.RULES)}, got {rule!r}",
                       field="rule")
    check_timezone(timezone)
    check_family(family)
    where = scope([probe], since, until)
    facts = store.facts([probe], where.since, where.until, family=family)
    if family is None and certify.families(facts):
        raise BadParameter("family: this line was measured over IPv4 and IPv6 (dual "
                           "stack), a campaign each: certify one, family ipv4 or ipv6",
                           field="family")
    # The suppression windows over the period (or over the sessions' span, when open).
    lo = where.since or min((f.started_at for f in facts), default=None)
    hi = where.until or max((f.started_at for f in facts), default=None)
    suppressed = [(w.starts_at, w.ends_at, w.reason) for w in control.windows(store)
                  if w.selector.matches(line) and lo is not None and hi is not None
                  and w.starts_at <= hi and w.ends_at > lo]
    return certify.certify(probe, line.line, facts, certify.RULES[rule], timezone,
                           suppressed=suppressed, family=family)


CompletenessInputs = tuple[list[tuple[str, int, str]], dict[str, list[tuple[int, int]]],
                           dict[str, int]]


def without_family(where: Scope, what: str) -> None:
    """Refuse a family filter where it cannot apply (a 400 naming it, never ignored)."""
    if where.family is not None:
        raise BadParameter(f"family: {what} counts every session a probe numbers, of "
                           "both families; it cannot be filtered by one", field="family")


def completeness_inputs(store: Store, where: Scope) -> CompletenessInputs:
    """What completeness needs from the store (run on the database thread)."""
    without_family(where, "completeness")
    probes = list(where.probes) if where.probes is not None else None
    return (store.session_seqs(probes, where.since, where.until),
            store.gap_seq_ranges(probes), store.seqs_before(probes, where.since))


def completeness(store: Store, where: Scope) -> list[DayCompleteness]:
    """Delivered / expected sessions per probe per day, with the missing sequence numbers
    apart from those gap records document (reliability.md C8)."""
    return completeness_of(*completeness_inputs(store, where))
