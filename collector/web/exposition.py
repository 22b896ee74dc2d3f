"""The fleet's state as Prometheus gauges, read from the database at scrape time and
written in the text format (pure): database size, the InfluxDB outbox and its dead
letters, the probes seen, silent and healthy, and each probe's last session.

These values are the same in every worker of ``serve --workers``, so they are never
summed (the event counters are: collector/metrics.py). Every label value comes from a
bounded set or from line metadata an administrator entered, never from what a stranger
sends. Units are the base units Prometheus asks for, named in the metric
(https://prometheus.io/docs/practices/naming/): seconds, ratios, and bytes, so speeds are
in bytes per second (8 bits: a 100 Mbit/s line reads 12.5e6; in Grafana, the unit
"bits/sec(SI)" of the expression times 8). promtool's lint passes on the exposition.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.schema import parse_utc
from agent.stats import jitter, median
from collector import safetext, unreadable
from collector.compliance.facts import SessionFacts
from collector.storage.model import Probe

LINE_LABELS = ("probe", "operator", "offer", "region", "technology")


@dataclass(frozen=True, slots=True)
class ProbeState:
    """One probe as the per-probe series show it: its line, when it was last seen, and
    its newest stored session (None: none yet)."""

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


def _line_label_values(probe: Probe) -> list[str]:
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


def state_families(snap: Snapshot, collector_version: str) -> list[Family]:
    """The scrape-time metrics (pure). Each probe's label string is made once and shared
    by its series: a scrape of 1,000 probes writes some 10,000 samples."""
    out: list[Family] = []

    def gauge(name: str, doc: str, value: float) -> None:
        out.append(Family(name, doc, [("", value)]))

    out.append(Family("bbprobe_collector_build_info", "The collector's version.",
                      [(label_string(["version"], [collector_version]), 1.0)]))
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
        labels = label_string(LINE_LABELS, _line_label_values(state.probe))
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
