"""Pure compliance evaluation: session results + targets -> one verdict per indicator.

Definitions (docs/analyst.md, "How each indicator is measured and computed"):
- speeds: every successful transfer attempt is one per-test speed sample (kbit/s);
  "banda massima" is their 95th percentile and "banda minima" their 5th;
- transfer failure rate: failed attempts / all attempts, per direction; attempts the
  measurement server refused (for capacity, HTTP 429 or a bbprobe server's 503, or its
  refusal of the session's ticket: facts.is_refusal) are neither, and are counted apart,
  per server; a 503 from anything else on the path is the line's failure;
- one-way delay: from every ICMP echo reply in scope, RTT / 2 by default (``delay_basis``);
  mean, and sample standard deviation (n - 1);
- packet loss: pings with no delay value / pings sent (``loss_formula = "plain"``);
- jitter (delibera 156/23/CONS): the mean absolute difference of consecutive answered
  RTTs of the same ping train (IPDV-style, RFC 3393; pairs never span two sessions), on
  the round trip. Judged when the targets table gives ``jitter_mean_ms``, else reported
  as information.
A train that could not start (no ICMP permission) sent nothing and counts nowhere.

What the report judges is the targets table's (an operator's generic Allegato 2 targets),
over whatever sessions the scope holds; ``Coverage`` says how much of the day those
sessions span, so a verdict on a few minutes of sessions is never read as a line's
verdict. A line against its own contract, over a campaign of every hourly band, is the
certificate (certify.py), which judges delay on the 95th percentile of the round trip,
not on the mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from agent import stats
from agent.schema import SessionResult
from collector.compliance.facts import SessionFacts, of_result
from collector.compliance.speeds import SpeedList, Speeds
from collector.compliance.targets import Indicator, Targets
from collector.compliance.uncertainty import (
    DEFAULT_MIN_SAMPLES,
    Interval,
    jitter_interval,
    mean_interval,
    percentile_interval,
    percentile_interval_ranks,
    stdev_interval,
    wilson_interval,
)

Verdict = Literal["pass", "fail", "incomplete"]


@dataclass(slots=True)
class Observations:
    """The samples behind the indicators: every per-test speed, attempt and ping counts,
    and the RTTs as mergeable moments (``stats.Moments``: the same mean and standard
    deviation as the raw values, without holding millions of them)."""

    sessions: int = 0
    # In memory (``SpeedList``) unless a store selected the order statistics itself
    # (speeds.py): only a ``SpeedList`` takes more values.
    download_kbps: Speeds = field(default_factory=SpeedList)
    upload_kbps: Speeds = field(default_factory=SpeedList)
    download_attempts: int = 0
    download_failed: int = 0
    upload_attempts: int = 0
    upload_failed: int = 0
    rtt: stats.Moments = field(default_factory=stats.Moments)
    pings_sent: int = 0
    pings_lost: int = 0
    # Jitter (delibera 156/23/CONS): the sum of |differences| of consecutive answered RTTs
    # within each ping train, and the number of such pairs (facts.jitter_terms).
    jitter_sum_ns: int = 0
    jitter_pairs: int = 0
    # Sessions the agent flagged invalid, with counts per reason code; left out of every
    # figure above unless ``invalid_included``.
    invalid_sessions: int = 0
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    invalid_included: bool = False
    # Tests customers ran against the measurement server (browser page, ndt7 clients) in
    # the period, per kind; their speeds join the percentiles only when an analyst asks
    # (``customer_included``). They add speeds only: failure rate, delay and loss stay
    # the probes' (a browser's HTTP round trip is not an ICMP echo).
    customer_tests: dict[str, int] = field(default_factory=dict)
    customer_included: bool = False
    # Transfer attempts the measurement server refused, per server (facts.server_key),
    # in every session in scope, valid or not: never in the attempts and failures
    # above. ``refusals_known`` is False when the input cannot say which failures were
    # refusals (a samples file: samples_csv.py).
    refused_by_server: dict[str, int] = field(default_factory=dict)
    refusals_known: bool = True

    def add_refused(self, server: str, attempts: int) -> None:
        if attempts:
            self.refused_by_server[server] = self.refused_by_server.get(server, 0) + attempts

    def add_customer(self, kind: str, direction: str, kbps: float | None) -> None:
        self.customer_tests[kind] = self.customer_tests.get(kind, 0) + 1
        if self.customer_included and kbps is not None and kbps > 0:
            self.speed_list(direction).append(kbps)

    def speed_list(self, direction: str) -> SpeedList:
        """The direction's speeds, to add to (in memory only)."""
        values = self.download_kbps if direction == "download" else self.upload_kbps
        if not isinstance(values, SpeedList):
            raise TypeError("these observations' speeds were selected by the store; "
                            "no more can be added")
        return values

    def add(self, facts: SessionFacts) -> None:
        self.add_refused(facts.refused_server or "", facts.refused_attempts)
        if not facts.valid:
            self.invalid_sessions += 1
            # Sessions per reason: a session that gave one reason twice (cross traffic in
            # the download and in the upload) is one session with that reason.
            for code in set(facts.invalid_codes):
                self.invalid_reasons[code] = self.invalid_reasons.get(code, 0) + 1
            if not self.invalid_included:
                return
        self.sessions += 1
        for t in facts.transfers:
            if t.direction == "download":
                self.download_attempts += 1
                self.download_failed += not t.ok
                if t.ok and t.kbps is not None:
                    self.speed_list("download").append(t.kbps)
            else:
                self.upload_attempts += 1
                self.upload_failed += not t.ok
                if t.ok and t.kbps is not None:
                    self.speed_list("upload").append(t.kbps)
        self.pings_sent += facts.pings_sent
        self.pings_lost += facts.pings_lost
        self.rtt = self.rtt.merge(facts.rtt)
        self.jitter_sum_ns += facts.jitter_sum_ns
        self.jitter_pairs += facts.jitter_pairs


def observe(results: Iterable[SessionResult], include_invalid: bool = False) -> Observations:
    obs = Observations(invalid_included=include_invalid)
    for r in results:
        obs.add(of_result(r, r.started_at))
    return obs


@dataclass(frozen=True, slots=True)
class IndicatorResult:
    id: str
    name: str
    unit: str
    comparison: str
    target: float | None  # None: informational (no target in the table)
    observed: float | None
    samples: int
    passed: bool | None  # None: no samples, or nothing to judge
    measurable: bool = True
    # The 95 % confidence interval of ``observed`` and whether the minimum-sample rule
    # lets it be published (uncertainty.py); None only where nobody computed one.
    interval: Interval | None = None


# Hour bands a scope's sessions must touch for its report to speak of the line across
# the day: every one of the 24 local hours (a 244/08 campaign asks 4 or 1 sessions in
# each; a report asks no count, but a scope missing an hour band says nothing of it).
COVERAGE_BANDS = 24


@dataclass(frozen=True, slots=True)
class Coverage:
    """How much of the day a scope's (counted) sessions cover, from their UTC hours:
    the first and last hour (local, aware), how many sessions, and the local hour bands
    with at least one."""

    timezone: str
    sessions: int
    first_hour: datetime | None
    last_hour: datetime | None
    bands: tuple[int, ...]

    @property
    def representative(self) -> bool:
        return len(self.bands) >= COVERAGE_BANDS

    @property
    def span(self) -> timedelta:
        """From the start of the first hour with a session to the end of the last."""
        if self.first_hour is None or self.last_hour is None:
            return timedelta(0)
        return self.last_hour - self.first_hour + timedelta(hours=1)


def coverage_of(hours: Sequence[tuple[str, int]], timezone: str) -> Coverage:
    """The coverage of sessions counted per UTC hour (``("YYYY-MM-DDTHH", sessions)``,
    as the store's hourly rows give them); local bands in ``timezone`` (whole-hour
    offsets, as every zone a campaign uses has)."""
    zone = ZoneInfo(timezone)
    moments = sorted(datetime.strptime(h, "%Y-%m-%dT%H").replace(tzinfo=UTC)
                     for h, n in hours if n)
    return Coverage(
        timezone, sum(n for _, n in hours),
        moments[0].astimezone(zone) if moments else None,
        moments[-1].astimezone(zone) if moments else None,
        tuple(sorted({m.astimezone(zone).hour for m in moments})))


@dataclass(frozen=True, slots=True)
class Report:
    targets_name: str
    targets_source: str
    regulation: tuple[str, ...]
    sessions: int
    indicators: tuple[IndicatorResult, ...]
    not_measured: tuple[Indicator, ...]
    verdict: Verdict
    method: dict[str, str]
    invalid_sessions: int = 0
    invalid_reasons: tuple[tuple[str, int], ...] = ()
    invalid_included: bool = False
    customer_tests: tuple[tuple[str, int], ...] = ()
    customer_included: bool = False
    # Indicators observed without a target in the table (jitter, delibera 156/23/CONS):
    # shown, never judged, never in the verdict.
    informational: tuple[IndicatorResult, ...] = ()
    # Attempts the measurement server refused, (server, attempts) sorted by server:
    # counted apart, never in the failure rate; False: the input could not tell
    # (Observations.refusals_known).
    refused_by_server: tuple[tuple[str, int], ...] = ()
    refusals_known: bool = True
    # "rtt_half": delay judged as the one-way estimate RTT / 2; "rtt": the round trip.
    delay_basis: str = "rtt_half"
    # How much of the day the sessions cover (service.compliance adds it; None: not
    # known, as for a samples file evaluated offline).
    coverage: Coverage | None = None
    # The minimum-sample rule the indicators' intervals were marked by (uncertainty.py).
    min_samples: int = DEFAULT_MIN_SAMPLES

    @property
    def refused_attempts(self) -> int:
        return sum(n for _, n in self.refused_by_server)


JITTER_ID = "jitter_mean_ms"
JITTER_NAME = "Jitter (mean absolute difference of consecutive RTTs)"


def _value(ind: Indicator, obs: Observations, targets: Targets,
           speeds: dict[str, Speeds],
           min_samples: int = DEFAULT_MIN_SAMPLES) -> tuple[float | None, int, Interval]:
    """The observed value of one indicator, the number of samples behind it and its 95 %
    confidence interval (``speeds``: each direction's per-test speeds, read by order
    statistic: the percentile's ranks and its interval's in one request)."""
    opts = targets.options
    pm = opts.percentile_method
    if ind.id in ("download_p95_kbps", "download_p5_kbps", "upload_p95_kbps", "upload_p5_kbps"):
        values = speeds["download" if ind.id.startswith("download") else "upload"]
        p = 95 if "_p95_" in ind.id else 5
        n = len(values)
        ranks = set(stats.percentile_ranks(n, p, pm))
        ranks.update(percentile_interval_ranks(n, p) or ())
        ranked = values.ranked(sorted(ranks))
        return (stats.percentile_from(ranked, n, p, pm), n,
                percentile_interval(ranked, n, p, min_samples))
    if ind.id == "download_failure_ratio":
        return (stats.ratio(obs.download_failed, obs.download_attempts), obs.download_attempts,
                wilson_interval(obs.download_failed, obs.download_attempts, min_samples))
    if ind.id == "upload_failure_ratio":
        return (stats.ratio(obs.upload_failed, obs.upload_attempts), obs.upload_attempts,
                wilson_interval(obs.upload_failed, obs.upload_attempts, min_samples))
    scale = 0.5 if opts.delay_basis == "rtt_half" else 1.0
    delays = obs.rtt.scaled(scale)
    if ind.id == "delay_mean_ms":
        return delays.value_mean, delays.n, mean_interval(delays, min_samples)
    if ind.id == "delay_stdev_ms":
        return delays.sample_stdev, delays.n, stdev_interval(delays, min_samples)
    if ind.id == JITTER_ID:
        jitter = obs.jitter_sum_ns / obs.jitter_pairs / 1e6 if obs.jitter_pairs else None
        # Jitter is of the round trip, never halved: its spread bound is the RTT's.
        return (jitter, obs.jitter_pairs,
                jitter_interval(jitter, obs.jitter_pairs, obs.rtt, min_samples))
    if ind.id == "loss_ratio":
        plain = stats.loss_ratio(obs.pings_sent, obs.pings_sent - obs.pings_lost)
        pair = opts.loss_formula == "pair"
        if plain is not None and pair:
            plain = stats.pair_loss_ratio(plain)
        return plain, obs.pings_sent, wilson_interval(obs.pings_lost, obs.pings_sent,
                                                      min_samples, per_packet=pair)
    raise ValueError(f"no evaluator for indicator {ind.id!r}")  # targets.parse prevents it


def passes(observed: float, comparison: str, target: float) -> bool:
    return observed >= target if comparison == ">=" else observed <= target


def evaluate(obs: Observations, targets: Targets,
             min_samples: int = DEFAULT_MIN_SAMPLES) -> Report:
    """``min_samples``: the minimum-sample rule (uncertainty.py): a figure on fewer
    samples, or without an interval, is marked not enough data; no verdict changes."""
    results = []
    speeds = {"download": obs.download_kbps, "upload": obs.upload_kbps}
    for ind in targets.measurable:
        observed, samples, interval = _value(ind, obs, targets, speeds, min_samples)
        results.append(
            IndicatorResult(
                id=ind.id, name=ind.name, unit=ind.unit, comparison=ind.comparison,
                target=ind.target, observed=observed, samples=samples,
                passed=None if observed is None else passes(observed, ind.comparison,
                                                            ind.target),
                interval=interval,
            )
        )
    informational: tuple[IndicatorResult, ...] = ()
    if JITTER_ID not in {i.id for i in targets.measurable}:
        jitter_ind = Indicator(JITTER_ID, JITTER_NAME, True, "<=", 0.0, "ms")
        observed, samples, interval = _value(jitter_ind, obs, targets, speeds, min_samples)
        informational = (IndicatorResult(
            id=JITTER_ID, name=JITTER_NAME, unit="ms", comparison="", target=None,
            observed=observed, samples=samples, passed=None, interval=interval),)
    if any(r.passed is False for r in results):
        verdict: Verdict = "fail"
    elif results and all(r.passed for r in results):
        verdict = "pass"
    else:
        verdict = "incomplete"
    opts = targets.options
    return Report(
        targets_name=targets.name,
        targets_source=targets.source,
        regulation=targets.regulation,
        sessions=obs.sessions,
        indicators=tuple(results),
        not_measured=tuple(i for i in targets.indicator if not i.measurable),
        verdict=verdict,
        invalid_sessions=obs.invalid_sessions,
        invalid_reasons=tuple(sorted(obs.invalid_reasons.items())),
        invalid_included=obs.invalid_included,
        customer_tests=tuple(sorted(obs.customer_tests.items())),
        customer_included=obs.customer_included,
        informational=informational,
        refused_by_server=tuple(sorted(obs.refused_by_server.items())),
        refusals_known=obs.refusals_known,
        delay_basis=opts.delay_basis,
        min_samples=min_samples,
        method={
            "percentile": "Hyndman-Fan type 7 (linear interpolation)"
            if opts.percentile_method == "linear"
            else "nearest rank (Hyndman-Fan type 1)",
            "speed_sample": "one per successful transfer attempt",
            "failure_ratio": "failed attempts / all attempts; attempts the measurement "
                             "server refused for capacity (HTTP 429, or 503 from a bbprobe "
                             "server) or whose ticket it refused are counted apart and not "
                             "in the failure rate",
            "delay": "mean of the one-way delay, RTT / 2 (ICMP echo, symmetric path)"
            if opts.delay_basis == "rtt_half"
            else "mean of the round-trip time of ICMP echo",
            "delay_stdev": "sample standard deviation (n - 1)",
            "loss": "pings without reply / pings sent"
            if opts.loss_formula == "plain"
            else "1 - sqrt(1 - lost/sent) (per-packet)",
            "jitter": "mean |RTT(i+1) - RTT(i)| over consecutive answered echoes of each "
                      "ping train (round trip, not halved; pairs never span sessions); "
                      "samples = pairs",
            "ci95": f"95 % intervals: percentiles distribution-free from order statistics "
                    f"(exact binomial), ratios Wilson score, mean delay Student t, delay "
                    f"stdev chi-square, jitter normal with a bounded spread; a figure on "
                    f"fewer than {min_samples} samples is not enough data",
        },
    )
