"""The agent's Prometheus metrics: what a probe's own monitoring wants to see
without asking the collector. Written in node_exporter's textfile-collector format
(``metrics.textfile``) after every session and health report, and served by the daemon
at ``GET /metrics`` on ``metrics.listen``.

``families`` is pure: the last result and health report in, metric families out. The
file is written whole (a temp file beside it, then a rename), so node_exporter never
reads half of one, and readable by node_exporter's user.

Units are Prometheus's base units (seconds, bytes, ratios): speeds in bytes per second,
a 100 Mbit/s line reading 12.5e6. Figures are the result's own summary, computed by the
agent from its raw samples:
speed per direction is the median of the session's successful tests, RTT the mean of
the answered echoes, jitter the mean absolute difference of consecutive answered RTTs
of the same train, loss the unanswered share.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.config import split_listen
from agent.errors import ConfigError
from agent.schema import HealthReport, SessionResult, parse_utc

OUTCOMES = ("complete", "incomplete", "invalid")


def outcome(result: SessionResult) -> str:
    """invalid: host or LAN checks flagged it (not evidence about the line); incomplete:
    the ping train or a direction produced nothing; complete: the rest."""
    if not result.valid:
        return "invalid"
    ok = {t.direction for t in result.transfers if t.status == "ok"}
    # No ping train at all: the method had none (a profile may leave it out).
    ping_ok = result.ping is None or result.ping.status == "ok"
    wanted = {t.direction for t in result.transfers}
    return "complete" if ping_ok and ok == wanted else "incomplete"


@dataclass(slots=True)
class AgentMetrics:
    """The state the metrics are made from, kept by the daemon (or one ``run``)."""

    version: str
    probe_id: str = ""
    last: SessionResult | None = None
    report: HealthReport | None = None
    # Sessions measured by this process, by outcome; None: not counted (a one-shot run,
    # whose counts would restart at every run).
    sessions: dict[str, int] | None = None

    def session(self, result: SessionResult) -> None:
        self.last = result
        if result.probe_id:
            self.probe_id = result.probe_id
        if self.sessions is not None:
            key = outcome(result)
            self.sessions[key] = self.sessions.get(key, 0) + 1


def _epoch(text: str) -> float:
    return parse_utc(text).timestamp()


def families(state: AgentMetrics) -> list[Metric]:
    out: list[Metric] = []

    def gauge(name: str, doc: str, value: float | None) -> None:
        if value is not None:
            out.append(GaugeMetricFamily(name, doc, value=value))

    info = GaugeMetricFamily("bbprobe_agent_info", "The agent's version and probe name.",
                             labels=["version", "probe"])
    info.add_metric([state.version, state.probe_id], 1.0)
    out.append(info)
    if state.sessions is not None:
        sessions = CounterMetricFamily(
            "bbprobe_agent_sessions", "Sessions this daemon measured since it started, by "
            "outcome: complete, incomplete (the ping train or a direction measured "
            "nothing) or invalid (host or LAN checks failed).", labels=["outcome"])
        for key in OUTCOMES:
            sessions.add_metric([key], float(state.sessions.get(key, 0)))
        out.append(sessions)
    r = state.last
    if r is not None:
        s = r.summary
        ping = r.ping.summary if r.ping is not None else None
        gauge("bbprobe_agent_last_session_timestamp_seconds", "Start of the last session "
              "(Unix time).", _epoch(r.started_at))
        gauge("bbprobe_agent_last_session_duration_seconds", "Length of the last session.",
              r.duration_s)
        gauge("bbprobe_agent_last_session_download_bytes_per_second", "Last session: "
              "median download speed of its successful tests.",
              None if s.download_bps is None else s.download_bps / 8)
        gauge("bbprobe_agent_last_session_upload_bytes_per_second", "Last session: median "
              "upload speed of its successful tests.",
              None if s.upload_bps is None else s.upload_bps / 8)
        gauge("bbprobe_agent_last_session_rtt_seconds", "Last session: mean RTT of the "
              "answered ICMP echoes.", None if s.rtt_mean_ms is None else s.rtt_mean_ms / 1e3)
        gauge("bbprobe_agent_last_session_jitter_seconds", "Last session: mean absolute "
              "difference of consecutive answered RTTs of the same train.",
              None if ping is None or ping.jitter_ms is None else ping.jitter_ms / 1e3)
        gauge("bbprobe_agent_last_session_loss_ratio", "Last session: share of ICMP "
              "echoes not answered.", s.loss_ratio)
        gauge("bbprobe_agent_last_session_rtt_under_load_seconds", "Last session: mean "
              "RTT during the download window (latency under load).",
              None if s.rtt_download_mean_ms is None else s.rtt_download_mean_ms / 1e3)
        gauge("bbprobe_agent_last_session_valid", "Last session: 1 if valid, else 0.",
              1.0 if r.valid else 0.0)
    h = state.report
    if h is not None:
        gauge("bbprobe_agent_spool_results", "Results waiting in the spool for the "
              "collector's acknowledgement.", h.spool_results)
        gauge("bbprobe_agent_spool_bytes", "Bytes of the waiting results.", h.spool_bytes)
        gauge("bbprobe_agent_dead_letters", "Results the collector refused for good "
              "(`bbprobe dead-letter list`).", h.dead_letters)
        gauge("bbprobe_agent_gaps_waiting", "Gap records waiting for delivery.",
              h.gaps_waiting)
        dropped = CounterMetricFamily("bbprobe_agent_spool_dropped", "Results dropped by "
                                      "the spool's bounds since it was created.",
                                      value=h.dropped_total)
        out.append(dropped)
        gauge("bbprobe_agent_health_report_timestamp_seconds", "When the last health "
              "report was made (Unix time).", _epoch(h.reported_at))
        if h.clock is not None and h.clock.synchronized is not None:
            gauge("bbprobe_agent_clock_synchronized", "1 if the kernel says the clock is "
                  "synchronised (adjtimex), else 0.", 1.0 if h.clock.synchronized else 0.0)
        if h.campaign is not None:
            c = h.campaign
            gauge("bbprobe_agent_campaign_bands_filled", "Hourly bands of the current "
                  "campaign holding the sessions they need (of 24).", c.bands_filled)
            gauge("bbprobe_agent_campaign_sessions_counted", "Valid sessions counted "
                  "towards the current campaign.", c.sessions_counted)
            gauge("bbprobe_agent_campaign_sessions_needed", "Sessions the current "
                  "campaign needs in all.", c.sessions_needed)
            gauge("bbprobe_agent_campaign_deadline_timestamp_seconds", "When the current "
                  "campaign's window ends (Unix time).", _epoch(c.deadline_at))
            gauge("bbprobe_agent_campaign_sessions_suppressed", "Planned sessions not "
                  "started because a suppression window covered them.",
                  c.sessions_suppressed)
        if h.next_session_at is not None:
            gauge("bbprobe_agent_next_session_timestamp_seconds", "When the next session "
                  "is planned (Unix time).", _epoch(h.next_session_at))
        gauge("bbprobe_agent_suppressed", "1 while a suppression window holds the "
              "probe, else 0.", 1.0 if h.suppressed_until else 0.0)
        failing = GaugeMetricFamily("bbprobe_agent_host_check_failing", "1 for each host "
                                    "check that failed in each of the last sessions.",
                                    labels=["check"])
        for code in h.failing_checks:
            failing.add_metric([code], 1.0)
        out.append(failing)
    return out


class _Families:
    def __init__(self, parts: list[Metric]) -> None:
        self.parts = parts

    def collect(self) -> Iterable[Metric]:
        return iter(self.parts)


def registry(state: AgentMetrics) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Families(families(state)))
    return reg


def exposition(state: AgentMetrics) -> bytes:
    """The Prometheus text format."""
    return generate_latest(registry(state))


def write_textfile(path: str, state: AgentMetrics) -> None:
    """Write the textfile whole: a temp file in the same directory (node_exporter reads
    only *.prom, so never the temp file), then a rename. Mode 0644 whatever the umask:
    the agent's unit runs with UMask=0077 as a dynamic user, and node_exporter, another
    user, must read the file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o644)
            out.write(exposition(state))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def publish(path: str, state: AgentMetrics, warn: Callable[[str], None]) -> None:
    """The textfile at ``path``, if configured; a failure is one line to ``warn``, since
    metrics are never worth a session. Only the daemon writes it: a one-shot ``run``
    beside it would replace the campaign's figures with its own."""
    if not path:
        return
    try:
        write_textfile(path, state)
    except OSError as exc:
        warn(f"metrics.textfile: cannot write {path}: {exc.strerror or exc}")
    except Exception as exc:  # a bug in the metrics: reported, the daemon goes on
        warn(f"metrics: {type(exc).__name__}: {exc}")


# A scrape is answered from a page made at most this often: a flood of requests must not
# take the CPU a transfer in progress needs.
PAGE_MAX_AGE_S = 1.0


async def serve(listen: str, state: AgentMetrics) -> web.AppRunner | None:
    """GET /metrics on ``listen`` (metrics.listen; "" serves nothing), from the daemon's
    live ``state``, until the returned runner is cleaned up. ConfigError, naming the
    address, when it cannot be bound."""
    if not listen:
        return None
    page: list[tuple[float, bytes]] = [(-PAGE_MAX_AGE_S, b"")]

    async def handler(request: web.Request) -> web.Response:
        now = time.monotonic()
        if now - page[0][0] >= PAGE_MAX_AGE_S:
            page[0] = (now, exposition(state))
        response = web.Response(body=page[0][1])
        response.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
        return response

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                           keepalive_timeout=10.0)
    await runner.setup()
    host, port = split_listen(listen)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"metrics.listen: cannot listen on {listen}: "
                          f"{exc.strerror or exc}") from None
    return runner
