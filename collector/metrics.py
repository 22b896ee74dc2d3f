"""Prometheus event metrics of a collector process, through ``prometheus-client``: what
the code that sees an event counts as it happens (ingestion outcomes, requests and their
latency by route, measurement transfers and their refusals, token bucket refusals).

Under ``serve --workers N`` every worker counts its own, in prometheus-client's
multiprocess files (``Metrics(directory)``), and a scrape of any worker adds them all up:
a counter never goes back because the kernel gave this scrape to another worker. The
fleet's state, read from the database at scrape time and the same in every worker, is
web/exposition.py's.

Units are the base units Prometheus asks for, named in the metric
(https://prometheus.io/docs/practices/naming/): seconds, ratios and bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

from collector import unreadable

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Request latency buckets, seconds: API calls take milliseconds; measurement transfers and
# ndt7 subtests last up to measurement.max_duration_s (60 s by default).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0, 30.0, 60.0, math.inf)

# Method labels: anything else a client sends is "other", so a stranger cannot make a
# new series per request.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

# Why a result was refused, by the HTTP status of the refusal (a bounded set; not the
# reasons an agent records for a transfer the measurement server refused).
RESULT_REFUSALS_BY_STATUS = {400: "malformed", 401: "unauthorized", 403: "forbidden",
                             408: "timeout", 409: "conflict", 413: "too_large",
                             415: "bad_encoding", 422: "invalid", 429: "rate_limited",
                             503: "unavailable"}

# Why a measurement transfer was refused (collector/measurement/slots.py): capacity, or
# a ticket's code (collector/tickets.py CODES, the allowance codes of the ledger).
TRANSFER_REFUSALS = ("busy", "per_client", "anonymous_share", "ticket_streams",
                     "ledger_full", "malformed", "unknown_key", "bad_signature",
                     "wrong_issuer", "not_yet_valid", "expired", "wrong_server",
                     "allowance_bytes", "allowance_duration", "too_many_tickets")


# What a result's signature was found to be (collector/intake/signed.py).
SIGNATURE_STATUSES = ("verified", "unverified", "unsigned", "refused")


def refusal_reason(status: int) -> str:
    return RESULT_REFUSALS_BY_STATUS.get(status, "other")


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
            values.ValueClass = values.MultiProcessValue()
        else:
            values.ValueClass = values.MutexValue
        # The *_created series double every counter's and histogram's, say nothing a
        # dashboard uses, and multiprocess mode has none: off everywhere.
        disable_created_metrics()
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
        self.signatures = Counter(
            "bbprobe_collector_result_signatures", "Results by their probe's signature "
            "(issue 27): verified, unverified (signed while the probe had no key bound) "
            "and unsigned, counted when stored; refused, a result refused for its "
            "signature (does not verify, a revoked or unknown key, a malformed JWS, or "
            "unsigned under evidence.require_signatures).", ["status"], registry=reg)
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
        for status in SIGNATURE_STATUSES:
            self.signatures.labels(status)
        for reason in TRANSFER_REFUSALS:
            self.transfers_refused.labels(reason)
        for limiter in ("probe", "anonymous", "capacity"):
            self.rate_limited.labels(limiter)

    def registry(self) -> CollectorRegistry:
        """What a scrape reads for the event metrics."""
        if self._own is not None:
            return self._own
        merged = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(merged, path=self.directory)
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

    def signature_statuses(self, statuses: Iterable[str]) -> None:
        for status in statuses:
            self.signatures.labels(status).inc()


# The process's event metrics, on the application of every server role (the measurement
# servers' too); absent with metrics.enabled = false.
METRICS = web.AppKey("metrics", Metrics)


def count(request: web.Request, fn: Callable[[Metrics], None]) -> None:
    """Count an event in this process's metrics, if it keeps them."""
    metrics = request.app.get(METRICS)
    if metrics is not None:
        fn(metrics)
