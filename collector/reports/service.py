"""Operations shared by the CLI and the HTTP API, over a store (synchronous).

Refusals are domain errors (collector/errors.py: BadParameter, NotFound, Unacceptable),
each naming the parameter at fault; the web edge maps them to HTTP statuses and the CLI to
messages. Nothing here knows HTTP or renders a page."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from agent.evidence import Link
from agent.family import FAMILIES
from agent.spec import CAMPAIGN_RULES
from agent.spec import DEFAULT_CAMPAIGN_RULE as DEFAULT_RULE
from collector.compliance import certify
from collector.compliance.completeness import DayCompleteness
from collector.compliance.completeness import completeness as completeness_of
from collector.compliance.evaluate import Observations, Report, coverage_of, evaluate
from collector.compliance.targets import Targets
from collector.compliance.uncertainty import DEFAULT_MIN_SAMPLES
from collector.errors import BadParameter
from collector.fleet import control
from collector.reports.text import listing_row
from collector.scope import (
    Scope,
    check_family,
    check_timezone,
    line_matches,
    resolve_scope,
    semesters,
    unknown_probe,
)
from collector.storage.model import HourRow, StoredResult
from collector.storage.store import (
    AnonymousStore,
    ContractStore,
    FleetStore,
    ProbeStore,
    ReportStore,
    ResultStore,
)


class Readings(ReportStore, AnonymousStore, Protocol):
    """A scope's facts and the customer tests of its period."""


class Breakdowns(Readings, ProbeStore, Protocol):
    """Readings, grouped by the probes' line metadata."""


class Certifiable(ProbeStore, ReportStore, FleetStore, ContractStore, Protocol):
    """A line's facts, its metadata and its contract history, and the suppression
    windows over its campaign."""


def probes_matching(store: ProbeStore, filters: Mapping[str, str]) -> list[str]:
    """Names of the probes whose line metadata has every given filter (in any case)."""
    return [p.name for p in store.probes() if line_matches(p.line, filters)]


# What a report can be broken down by (delibera 156/23/CONS: MisuraInternet publishes
# results by region every semester; analysts also compare offers and technologies).
BREAKDOWN = ("operator", "offer", "region", "technology", "semester", "family")
MAX_GROUPS = 1000


def groups(store: ProbeStore, where: Scope, by: Sequence[str], max_groups: int = MAX_GROUPS
           ) -> list[tuple[dict[str, str], Scope]]:
    """The scope split by line metadata and/or semester: (the group's key, its scope),
    groups without a probe left out. Probes whose field is unset form the group ""."""
    unknown = [b for b in by if b not in BREAKDOWN]
    if unknown or len(set(by)) != len(by):
        raise BadParameter(f"by: expected distinct values among {', '.join(BREAKDOWN)}, "
                           f"got {', '.join(by)}", field="by")
    fields_ = [b for b in by if b not in ("semester", "family")]
    # By IP version: sessions of unknown family (agents before schema 6 recorded none)
    # are in neither.
    families: tuple[str | None, ...] = (where.family,)
    if "family" in by:
        if where.family is not None:
            raise BadParameter("by: family, with the scope already of one family",
                               field="by")
        families = FAMILIES
    periods: list[tuple[str | None, str | None, str | None]] = [
        (None, where.since, where.until)]
    if "semester" in by:
        periods = list(semesters(where.since, where.until, MAX_GROUPS))
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


def breakdown(store: Breakdowns, where: Scope, targets: Targets, by: Sequence[str],
              include_invalid: bool = False, customers: Customers | None = None,
              max_groups: int = MAX_GROUPS,
              min_samples: int = DEFAULT_MIN_SAMPLES,
              ) -> list[tuple[dict[str, str], Scope, Report]]:
    """One report per group of ``groups``, with the group's own scope. Customer tests
    (browser page, ndt7 clients) have no line: they join only a breakdown by semester
    alone, never one by line metadata."""
    chosen = customers or Customers()
    if chosen.include and set(by) - {"semester"}:  # family too: customer tests have none
        raise BadParameter("by: customer tests have no line metadata; include them only "
                           "in a breakdown by semester", field="by")
    return [(key, scope_, compliance(store, scope_, targets, include_invalid, chosen,
                                     with_coverage=False, min_samples=min_samples))
            for key, scope_ in groups(store, where, by, max_groups)]


def stored_results(store: ResultStore, where: Scope, limit: int | None = None) -> list[
    StoredResult
]:
    return store.results(
        list(where.probes) if where.probes is not None else None, where.since, where.until, limit,
        family=where.family)


def listing(store: ResultStore, where: Scope, limit: int | None = None) -> list[dict[str, object]]:
    rows = stored_results(store, where, limit)
    signatures = store.result_signatures([r.result_id for r in rows])
    return [
        listing_row(r.result_id, r.probe_name, r.started_at, r.ended_at, r.received_at,
                    json.loads(r.body), r.clock_skew_s,
                    signatures[r.result_id].status if r.result_id in signatures
                    else "unsigned")
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class Customers:
    """Whether the speeds of customers' own tests (browser page, ndt7 clients) in the
    period join the probes' in the percentiles, and from which client network."""

    include: bool = False
    network: str | None = None


def observations(store: Readings, where: Scope, include_invalid: bool = False,
                 customers: Customers = Customers()) -> Observations:
    """The probes' facts of a scope, with the customer tests of its period counted (and
    their speeds included when asked; customer tests have no probe, so only the
    period and ``customers.network`` select them)."""
    # Customer tests record no IP version: a report of one family leaves them out.
    tests = [] if where.family is not None else store.customer_speeds(
        where.since, where.until, customers.network)
    # Included speeds join the probes' before the store selects order statistics.
    extra: dict[str, list[float]] = {"download": [], "upload": []}
    if customers.include:
        for _, direction, kbps in tests:
            if kbps is not None and kbps > 0:
                extra["download" if direction == "download" else "upload"].append(kbps)
    obs = store.observations(list(where.probes) if where.probes is not None else None,
                             where.since, where.until, include_invalid, family=where.family,
                             extra_speeds=extra)
    for kind, direction, _ in tests:
        obs.add_customer(kind, direction, None)  # counted; their speeds are in already
    obs.customer_included = customers.include
    return obs


# The campaign's zone: the hour bands a report's coverage counts (as certificates do).
COVERAGE_TIMEZONE = "Europe/Rome"


def compliance(store: Readings, where: Scope, targets: Targets,
               include_invalid: bool = False, customers: Customers = Customers(),
               timezone: str = COVERAGE_TIMEZONE, with_coverage: bool = True,
               min_samples: int = DEFAULT_MIN_SAMPLES) -> Report:
    """Evaluate a scope from the stored facts (never by decoding every body), with the
    coverage of its sessions (local hour bands in ``timezone``; one more read, of the day
    rollup's hours and the partial days' session rows, left out of a breakdown's many
    groups). ``min_samples``: the minimum-sample rule of
    the figures' intervals ([reports] min_samples)."""
    report = evaluate(observations(store, where, include_invalid, customers), targets,
                      min_samples)
    if not with_coverage:
        return report
    probes = list(where.probes) if where.probes is not None else None
    # The sessions per hour, from the day rollup where it can (whole days of valid
    # sessions): the counts ``hourly`` gives, without reading every session row.
    hours = store.coverage_hours(probes, where.since, where.until, include_invalid,
                                 family=where.family)
    return replace(report, coverage=coverage_of(hours, timezone))


def samples(store: ReportStore, where: Scope, include_invalid: bool = False) -> list[Any]:
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


def report_view(store: Readings, where: Scope, targets: Targets,
                include_invalid: bool = False,
                customers: Customers = Customers(),
                timezone: str = COVERAGE_TIMEZONE,
                min_samples: int = DEFAULT_MIN_SAMPLES) -> ReportView:
    """The data of a scope's HTML report (html_report.render_view draws it)."""
    probes = list(where.probes) if where.probes is not None else None
    obs = observations(store, where, include_invalid, customers)
    hourly = store.hourly(probes, where.since, where.until, include_invalid,
                          family=where.family)
    scale = 0.5 if targets.options.delay_basis == "rtt_half" else 1.0
    report = replace(evaluate(obs, targets, min_samples), coverage=coverage_of(
        [(h.hour, h.sessions) for h in hourly], timezone))
    return ReportView(report, where, obs, hourly, scale)


def certificate(store: Certifiable, probe: str, since: str | None, until: str | None,
                rule: str, timezone: str, family: str | None = None,
                min_samples: int = DEFAULT_MIN_SAMPLES) -> Any:
    """The line certificate of one probe over [since, until) (all its results if open),
    of one IP version: a dual-stack line is two campaigns, one per family (the agent
    measures each slot once over each), so ``family`` must then be given."""
    line = store.probe(probe)
    if line is None:
        raise unknown_probe(probe, [p.name for p in store.probes()])
    if rule not in CAMPAIGN_RULES:
        raise BadParameter(f"rule: expected one of {', '.join(CAMPAIGN_RULES)}, got {rule!r}",
                       field="rule")
    check_timezone(timezone)
    check_family(family)
    where = resolve_scope([probe], since, until)
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
    # Each session judged by the contract in force when it was measured (certify.py).
    return certify.certify(probe, line.line, facts, CAMPAIGN_RULES[rule], timezone,
                           suppressed=suppressed, family=family,
                           contracts=store.line_contracts(probe), min_samples=min_samples)


# The front page answers "does this line meet its contract?" from each line's
# certificate, which reads every session of its line (about 4 ms per 100 sessions,
# docs/benchmarks.md): it stops certifying once this many sessions were read, or this
# many lines were certified (each costs a few queries even with no session: a fleet of
# new probes), so a big fleet's front page stays quick; the lines left link to their
# certificate unanswered.
FRONT_PAGE_SESSIONS = 50_000
FRONT_PAGE_LINES = 100


def line_answers(store: Certifiable, budget: int = FRONT_PAGE_SESSIONS,
                 lines: int = FRONT_PAGE_LINES) -> dict[str, list[Any]]:
    """Active probes' certificates (their default: every result, rule and zone as the
    certificate link's), one per IP version for a dual-stack line: the front page's
    answer is the very certificate its link opens. Probes past ``budget`` sessions read
    or ``lines`` probes certified are left out."""
    answers: dict[str, list[Any]] = {}
    read = 0
    for p in store.probes():
        if p.revoked_at:
            continue
        if read >= budget or len(answers) >= lines:
            break
        try:
            certs = [certificate(store, p.name, None, None, DEFAULT_RULE, COVERAGE_TIMEZONE)]
        except BadParameter as exc:
            if exc.field != "family":
                raise
            certs = [certificate(store, p.name, None, None, DEFAULT_RULE, COVERAGE_TIMEZONE,
                                 fam) for fam in FAMILIES]
        answers[p.name] = certs
        read += sum(len(c.sessions) for c in certs)
    return answers


CompletenessInputs = tuple[list[tuple[str, int, str]], dict[str, list[tuple[int, int]]],
                           dict[str, int], dict[str, list[Link]]]


def without_family(where: Scope, what: str) -> None:
    """Refuse a family filter where it cannot apply (a 400 naming it, never ignored)."""
    if where.family is not None:
        raise BadParameter(f"family: {what} counts every session a probe numbers, of "
                           "both families; it cannot be filtered by one", field="family")


def completeness_inputs(store: ResultStore, where: Scope) -> CompletenessInputs:
    """What completeness needs from the store (run on the database thread)."""
    without_family(where, "completeness")
    probes = list(where.probes) if where.probes is not None else None
    seqs = store.session_seqs(probes, where.since, where.until)
    # Each probe's hash chain over the same scope (signed results, issue 27): one
    # query per probe with numbered results in it.
    links = {probe: store.chain_links(probe, where.since, where.until)
             for probe in sorted({row[0] for row in seqs})}
    return (seqs, store.gap_seq_ranges(probes), store.seqs_before(probes, where.since),
            links)


def completeness(store: ResultStore, where: Scope) -> list[DayCompleteness]:
    """Delivered / expected sessions per probe per day, with the missing sequence numbers
    apart from those gap records document (reliability.md C8)."""
    return completeness_of(*completeness_inputs(store, where))
