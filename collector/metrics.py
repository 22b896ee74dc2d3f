"""Prometheus metrics of a collector process (issue 16), through ``prometheus-client``.

Two kinds:

- **Events**, counted as they happen by the code that sees them (ingestion outcomes,
  requests and their latency by route, measurement transfers and their refusals, token
  bucket refusals). They live in ``Metrics``. Under ``serve --workers N`` every worker
  counts its own, in prometheus-client's multiprocess files (``Metrics(directory)``),
  and a scrape of any worker adds them all up: a counter never goes back because the
  kernel gave this scrape to another worker.
- **State**, read from the database at scrape time (``Snapshot``, built at the edge in
  web/metrics_routes.py): database size, the InfluxDB outbox and its dead letters, the
  fleet's probes seen, silent and healthy, and each probe's last session. These are the
  same in every worker, so they are never summed.

Everything here is pure apart from the counters themselves: ``state_families`` turns a
snapshot into metric families, and every label value comes from a bounded set or from
line metadata an administrator entered (never from what a stranger sends).

Units are the base units Prometheus asks for, named in the metric
(https://prometheus.io/docs/practices/naming/): seconds, ratios, and bytes, so speeds are
in bytes per second (8 bits: a 100 Mbit/s line reads 12.5e6; in Grafana, the unit
"bits/sec(SI)" of the expression times 8). promtool's lint passes on the exposition.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

from agent.schema import parse_utc
from agent.stats import jitter, median
from collector import safetext, unreadable
from collector.compliance.facts import SessionFacts
from collector.storage.model import Probe

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Request latency buckets, seconds: API calls take milliseconds; measurement transfers and
# ndt7 subtests last up to measurement.max_duration_s (60 s by default).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0, 30.0, 60.0, math.inf)

# Method labels: anything else a client sends is "other", so a stranger cannot make a
# new series per request.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

# Why a result was refused, by the HTTP status of the refusal (a bounded set).
REFUSAL_REASONS = {400: "malformed", 401: "unauthorized", 403: "forbidden",
                   408: "timeout", 409: "conflict", 413: "too_large",
                   415: "bad_encoding", 422: "invalid", 429: "rate_limited",
                   503: "unavailable"}

# Why a measurement transfer was refused (collector/measurement/slots.py): capacity, or
# a ticket's code (collector/tickets.py CODES, the allowance codes of the ledger).
TRANSFER_REFUSALS = ("busy", "per_client", "anonymous_share", "ticket_streams",
                     "ledger_full", "malformed", "unknown_key", "bad_signature",
                     "wrong_issuer", "not_yet_valid", "expired", "wrong_server",
                     "allowance_bytes", "allowance_duration", "too_many_tickets")

LINE_LABELS = ("probe", "operator", "offer", "region", "technology")


def refusal_reason(status: int) -> str:
    return REFUSAL_REASONS.get(status, "other")


class Metrics:
    """The event metrics of one collector process. ``directory``: the worker of ``serve
    --workers`` counts in prometheus-client's multiprocess files there (one directory per
    start, made by the supervisor), and a scrape reads them all."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory
        # prometheus-client picks how values are kept for the whole process, from
        # $PROMETHEUS_MULTIPROC_DIR when it is imported: chosen here instead, from what
        # this collector was told, so a variable left in the environment by something
        # else changes nothing. A worker is one collector for its whole life.
        if directory is not None:
            os.environ[MULTIPROC_ENV] = directory  # where prometheus-client's files go
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        else:
            values.ValueClass = values.MutexValue
        # The *_created series double every counter's and histogram's, say nothing a
        # dashboard uses, and multiprocess mode has none: off everywhere.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        # Single process: the metrics' own registry (never prometheus-client's global
        # one: tests run many collectors in one process).
        self._own = None if directory else CollectorRegistry(auto_describe=True)
        reg = self._own
        self.results = Counter(
            "bbprobe_collector_results", "Results probes sent, by outcome: stored, "
            "duplicate (already stored, same content), conflict (same id, other content) "
            "or refused (see bbprobe_collector_results_refused_total). A batch counts "
            "each result; a batch refused whole counts once.", ["outcome"], registry=reg)
        self.refused = Counter(
            "bbprobe_collector_results_refused", "Results (or whole result requests) "
            "refused, by reason.", ["reason"], registry=reg)
        self.requests = Counter(
            "bbprobe_collector_http_requests", "HTTP requests answered, by route "
            "template, method and status code.", ["route", "method", "code"], registry=reg)
        self.latency = Histogram(
            "bbprobe_collector_http_request_duration_seconds", "Time from the request's "
            "headers to the end of its response, by route template (measurement "
            "transfers last as long as the test).", ["route", "method"],
            buckets=LATENCY_BUCKETS_S, registry=reg)
        self.transfers = Gauge(
            "bbprobe_collector_measurement_transfers_active", "Measurement transfers "
            "running now (HTTP, ndt7, LibreSpeed; slots in use).", registry=reg,
            multiprocess_mode="livesum")
        self.transfers_limit = Gauge(
            "bbprobe_collector_measurement_transfers_limit", "Measurement slots "
            "(measurement.max_concurrent of each process, summed over the workers).",
            registry=reg,
            multiprocess_mode="livesum")
        self.transfers_ticketed = Gauge(
            "bbprobe_collector_measurement_transfers_ticketed", "Measurement transfers "
            "running now under a probe's ticket (part of transfers_active).",
            registry=reg, multiprocess_mode="livesum")
        self.transfers_refused = Counter(
            "bbprobe_collector_measurement_transfers_refused", "Measurement transfers "
            "refused: busy (every slot taken, 503), per_client (an anonymous client's "
            "share taken, 429), anonymous_share (the slots left to anonymous clients "
            "taken, 503), ticket_streams (a ticket's, or its probe's tickets', 429), "
            "ledger_full (503), or the ticket refused (403): one of malformed, "
            "unknown_key, bad_signature, wrong_issuer, not_yet_valid, expired, "
            "wrong_server, allowance_bytes, allowance_duration, too_many_tickets. "
            "Capacity asks (echo?capacity=1) are not counted.",
            ["reason"], registry=reg)
        self.rate_limited = Counter(
            "bbprobe_collector_rate_limited", "Requests refused by a token bucket (429): "
            "probe (server.probe_requests_per_min; a ticket asked for with the "
            "instruction is then not issued), anonymous "
            "(anonymous.browser_results_per_min) or capacity (a client's capacity asks, "
            "echo?capacity=1).", ["limiter"], registry=reg)
        self.health_reports = Counter(
            "bbprobe_collector_health_reports", "Health reports received from probes.",
            registry=reg)
        self.unreadable = Counter(
            "bbprobe_collector_unreadable_rows", "Stored rows a reader could not "
            "interpret and left out of that read (the rest of the read went on), by "
            "table; the log names each row (collector/unreadable.py).", ["table"],
            registry=reg)
        for table in unreadable.TABLES:
            self.unreadable.labels(table)
        unreadable.listen(self.row_unreadable)
        # Series that exist from the start, at zero: rate() and alerts need them.
        for outcome in ("stored", "duplicate", "conflict", "refused"):
            self.results.labels(outcome)
        for reason in TRANSFER_REFUSALS:
            self.transfers_refused.labels(reason)
        for limiter in ("probe", "anonymous", "capacity"):
            self.rate_limited.labels(limiter)

    def registry(self) -> CollectorRegistry:
        """What a scrape reads for the event metrics."""
        if self._own is not None:
            return self._own
        merged = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(merged, path=self.directory)  # type: ignore[no-untyped-call]
        return merged

    def row_unreadable(self, table: str) -> None:
        self.unreadable.labels(table).inc()

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def result_outcomes(self, outcomes: Iterable[str]) -> None:
        for outcome in outcomes:
            self.results.labels(outcome).inc()

    def result_refused(self, status: int) -> None:
        self.results.labels("refused").inc()
        self.refused.labels(refusal_reason(status)).inc()

    def results_refused(self, statuses: Iterable[int]) -> None:
        for status in statuses:
            self.result_refused(status)


# --- state read at scrape time -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeState:
    probe: Probe
    last_seen_at: str | None
    silent: bool
    session: SessionFacts | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a scrape reads from the database (plain data)."""

    database_size_bytes: int
    outbox_results: int | None  # None: the InfluxDB copy is off
    outbox_dead_letters: int | None
    probes: int
    silent: int
    healthy: int
    per_probe: Sequence[ProbeState]
    per_probe_omitted: int


def _epoch(text: str) -> float:
    return parse_utc(text).timestamp()


def session_values(facts: SessionFacts) -> dict[str, float]:
    """A session's headline figures in base units, from its stored raw samples: speed
    per direction is the median of its successful tests (as the result's own summary;
    one sample per successful attempt, as in the compliance evaluation), RTT the mean
    of the answered echoes, jitter the mean absolute difference of consecutive answered
    RTTs (agent.stats.jitter), loss the lost share of the echoes sent. A figure the
    session did not measure is left out."""
    out: dict[str, float] = {"timestamp_seconds": _epoch(facts.started_at),
                             "valid": 1.0 if facts.valid else 0.0}
    for direction in ("download", "upload"):
        ok = [s for s in facts.speeds(direction) if s is not None]
        if (middle := median(ok)) is not None:
            out[f"{direction}_bytes_per_second"] = middle * 1000.0 / 8
    if facts.rtt.n:
        out["rtt_seconds"] = facts.rtt.mean / 1000.0
    answered = [r for r in facts.rtts_ms if r is not None]
    if (j := jitter(answered)) is not None:
        out["jitter_seconds"] = j / 1000.0
    if facts.pings_sent:
        out["loss_ratio"] = facts.pings_lost / facts.pings_sent
    return out


PER_PROBE = (
    ("timestamp_seconds", "Start of the probe's last stored session (Unix time)."),
    ("download_bytes_per_second", "Last session: median download speed of its "
     "successful tests."),
    ("upload_bytes_per_second", "Last session: median upload speed of its successful "
     "tests."),
    ("rtt_seconds", "Last session: mean round-trip time of the answered ICMP echoes."),
    ("jitter_seconds", "Last session: mean absolute difference of consecutive answered "
     "RTTs of the same ping train."),
    ("loss_ratio", "Last session: share of the ICMP echoes sent that were not answered."),
    ("valid", "Last session: 1 if valid (host and LAN checks passed), else 0."),
)


# The line's contracted minimum speeds (`probe add --download-min-kbps`), so that an alert
# rule can compare the last session with them (configs/prometheus/bbprobe-alerts.yml).
CONTRACT = (
    ("download_min", "The line's contracted minimum download speed (probe metadata)."),
    ("upload_min", "The line's contracted minimum upload speed (probe metadata)."),
)


def _labels(probe: Probe) -> list[str]:
    line = probe.line
    return [probe.name, line.operator or "", line.offer or "", line.region or "",
            line.technology or ""]


@dataclass(slots=True)
class Family:
    """One gauge family of the scrape-time state: samples are (label string, value)."""

    name: str
    doc: str
    samples: list[tuple[str, float]]


def label_string(names: Sequence[str], values: Sequence[str]) -> str:
    """``{a="x",b="y"}`` with the text format's escapes (backslash, quote, newline)."""
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"'
                          for n, v in zip(names, values, strict=True)) + "}"


def _escape(value: str) -> str:
    return safetext.prom_label(value)


def state_families(snap: Snapshot, version: str) -> list[Family]:
    """The scrape-time metrics (pure). Each probe's label string is made once and shared
    by its series: a scrape of 1,000 probes writes some 10,000 samples."""
    out: list[Family] = []

    def gauge(name: str, doc: str, value: float) -> None:
        out.append(Family(name, doc, [("", value)]))

    out.append(Family("bbprobe_collector_build_info", "The collector's version.",
                      [(label_string(["version"], [version]), 1.0)]))
    gauge("bbprobe_collector_database_size_bytes", "Database size on disk (SQLite: the "
          "file and its WAL; PostgreSQL: pg_database_size).", snap.database_size_bytes)
    if snap.outbox_results is not None:
        gauge("bbprobe_collector_influx_outbox_results", "Results waiting to be copied "
              "to InfluxDB.", snap.outbox_results)
    if snap.outbox_dead_letters is not None:
        gauge("bbprobe_collector_influx_dead_letters", "Results InfluxDB refused for good "
              "(`bbprobe-collector influx dead-letters`).", snap.outbox_dead_letters)
    gauge("bbprobe_fleet_probes", "Probes registered and not revoked.", snap.probes)
    gauge("bbprobe_fleet_probes_seen", "Probes seen (a health report or a result) within "
          "fleet.silent_after_s.", snap.probes - snap.silent)
    gauge("bbprobe_fleet_probes_silent", "Probes not seen within fleet.silent_after_s, "
          "or never.", snap.silent)
    gauge("bbprobe_fleet_probes_healthy", "Probes seen, with no dead letters, failing "
          "checks, unapplied instruction or unsynchronised clock (the fleet view).",
          snap.healthy)
    gauge("bbprobe_fleet_per_probe_series_omitted", "Probes left out of the per-probe "
          "series by metrics.per_probe_max (or all, with metrics.per_probe off).",
          snap.per_probe_omitted)
    seen = Family("bbprobe_probe_last_seen_timestamp_seconds", "When the probe was last "
                  "seen: its last health report or result (Unix time).", [])
    silent = Family("bbprobe_probe_silent", "1 if the probe is silent (not seen within "
                    "fleet.silent_after_s), else 0.", [])
    families = {key: Family(f"bbprobe_probe_last_session_{key}", doc, [])
                for key, doc in PER_PROBE}
    contract = {key: Family(f"bbprobe_probe_contract_{key}_bytes_per_second", doc, [])
                for key, doc in CONTRACT}
    for state in snap.per_probe:
        labels = label_string(LINE_LABELS, _labels(state.probe))
        line = state.probe.line
        for (key, _doc), kbps in zip(CONTRACT, (line.download_min_kbps,
                                                line.upload_min_kbps), strict=True):
            if kbps is not None:
                contract[key].samples.append((labels, kbps * 1000.0 / 8))
        silent.samples.append((labels, 1.0 if state.silent else 0.0))
        try:  # one probe's row no reader can interpret costs its series, not the scrape's
            last_seen = _epoch(state.last_seen_at) if state.last_seen_at else None
            session = session_values(state.session) if state.session is not None else {}
        except (ValueError, ArithmeticError, TypeError) as exc:
            unreadable.skipped("results", state.probe.name, exc)
            continue
        if last_seen is not None:
            seen.samples.append((labels, last_seen))
        for key, value in session.items():
            families[key].samples.append((labels, value))
    out += [seen, silent, *families.values(), *contract.values()]
    return out


def _number(value: float) -> str:
    """A sample value as the text format spells it (Go's ParseFloat reads repr's)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def text_format(families: Iterable[Family]) -> str:
    """The Prometheus text format (0.0.4) of gauge families (pure). Written here rather
    than through prometheus-client's encoder, which validates and escapes every label
    of every sample: 220 ms for a scrape of 1,000 probes against 15 ms this way
    (docs/benchmarks.md). The tests read it back with prometheus-client's parser, and
    promtool checks it."""
    lines: list[str] = []
    for f in families:
        if not f.samples:
            continue
        doc = f.doc.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {f.name} {doc}\n# TYPE {f.name} gauge\n")
        lines.extend(f"{f.name}{labels} {_number(value)}\n"
                     for labels, value in f.samples)
    return "".join(lines)
