"""The export's tables and their data dictionary, as data (pure).

Three tables, one row per stored session, per transfer attempt and per ICMP echo, joined
on ``session_id``. Each column says its type, unit, meaning, the method that produced
it, and what open-data mode does to it (``Column.open_data``, applied by rows.py): the
dictionary written beside the data (dictionary.json, dictionary.md) is rendered from
these definitions, so the files and their description cannot drift apart.

Every report figure can be recomputed from the tables (README, tests/collector/
test_export.py does it with DuckDB): speeds are ``attempts.kbps`` exactly as the
compliance facts hold them (one sample per successful attempt, Allegato 2); failure
ratios count attempts not ``refused``; delay, loss and jitter come from the ``idle``
ping train (the RTTs the facts hold), RTT / 2 under the default ``delay_basis``.

The export schema is versioned apart from the result schema (``EXPORT_SCHEMA_VERSION``,
in every Parquet file's key/value metadata): additive only, as the result schema is; a
column is never removed or repurposed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from collector.compliance.uncertainty import CONFIDENCE, DEFAULT_MIN_SAMPLES

EXPORT_SCHEMA_VERSION = "1"

# How a report's 95 % interval of each figure is computed from these rows, so an analyst
# reproduces the ci95 a report or certificate publishes (collector/compliance/
# uncertainty.py, whose docstring gives the references and the exact arithmetic).
INTERVAL_METHODS: Mapping[str, str] = {
    "percentiles": "speed p5/p95 (attempts.kbps), delay p95: distribution-free, from "
                   "order statistics x[j] <= p <= x[k] (0-based, ascending) with "
                   "P(j < B <= k) >= confidence for B ~ Binomial(n, p/100), computed "
                   "exactly; the equal-tailed pair, else the pair of fewest ranks; none "
                   "below n = 59 for p5/p95 (Hahn & Meeker 1991 §5.2; Conover §3.2)",
    "proportions": "failure ratios and packet loss: Wilson score interval (Wilson 1927; "
                   "Newcombe 1998); per-packet loss maps the interval of the train loss "
                   "through 1 - sqrt(1 - R); assumes independent trials",
    "delay_mean": "Student t with n - 1 degrees of freedom on the sample variance of the "
                  "RTTs (halved under delay_basis rtt_half); assumes independent samples",
    "delay_stdev": "chi-square with n - 1 degrees of freedom: s*sqrt((n-1)/chi2(1-a/2)) .. "
                   "s*sqrt((n-1)/chi2(a/2)); assumes independent normal samples",
    "jitter": "normal over the pairs with the spread bounded by 2*Var(RTT) of the scope "
              "(the store keeps only the sum of |dRTT| and the pairs): a bound, not an "
              "estimate",
    "minimum_samples": f"a figure on fewer than min_samples samples ([reports] "
                       f"min_samples, default {DEFAULT_MIN_SAMPLES}), or with no interval, "
                       "is published as not enough data; its verdict is unchanged",
}

# A session whose stored row cannot be read is kept, from its facts alone (storage/sql/
# exports.py): what every report counts stays in the export.
FACTS_ONLY = (
    "A session whose stored result cannot be read (on PostgreSQL: its month's results "
    "partition detached for retention, `partitions detach`; its facts stay, and every "
    "report still counts it) is exported from its compliance facts alone: "
    "sessions.received_at is null (never null otherwise), and so is every column only the "
    "result body holds (ended_at, session_seq, schema_version, agent_version, "
    "server_origin, ping_target_address, client_addresses, clock_skew_s); attempts has "
    "its attempts that were not refused, with direction, ok and kbps only (no refused "
    "ones: the facts leave them out, sessions.refused_attempts still counts them); pings "
    "has its idle train's RTTs only (no loaded trains). Every report figure is recomputed "
    "from these rows as from the others. Such a session cannot say when it was received, "
    "so the snapshot's received_before does not leave it out.")

ColumnType = Literal["string", "int64", "float64", "bool", "timestamp"]
# What open-data mode does to a column's values (rows.py ``published``).
OpenData = Literal["keep", "probe", "session", "minute", "address", "addresses", "origin",
                   "drop"]

OPEN_DATA_WORDS: Mapping[str, str] = {
    "keep": "published as is",
    "probe": "replaced by the probe's keyed pseudonym (HMAC-SHA256, 16 hex digits)",
    "session": "replaced by the session's keyed pseudonym (HMAC-SHA256, 32 hex digits)",
    "minute": "truncated to the minute (UTC)",
    "address": "truncated to its network: IPv4 /24, IPv6 /48",
    "addresses": "each address truncated to its network: IPv4 /24, IPv6 /48",
    "origin": "kept when the host is a name; an address as host truncated to its network",
    "drop": "left out (null): free text that could identify a customer",
}


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: ColumnType
    unit: str  # "" when the value has none
    meaning: str
    method: str
    open_data: OpenData = "keep"


def _c(name: str, type_: ColumnType, unit: str, meaning: str, method: str,
       open_data: OpenData = "keep") -> Column:
    return Column(name, type_, unit, meaning, method, open_data)


_SESSION_ID = _c("session_id", "string", "", "The session (the result's UUID, made by the "
                 "probe); joins sessions, attempts and pings.", "as delivered",
                 "session")
_PROBE_ID = _c("probe_id", "string", "", "The probe (its registered name): one line.",
               "as registered", "probe")
_VALID = _c("valid", "bool", "", "Whether the agent judged the session valid; invalid "
            "sessions are left out of every report figure by default.",
            "the agent's own checks (cross traffic, CPU, Wi-Fi...), result schema v3")

SESSIONS: tuple[Column, ...] = (
    _SESSION_ID, _PROBE_ID,
    _c("operator", "string", "", "The line's operator.", "the probe's line metadata at "
       "export time (probe add / probe set)"),
    _c("offer", "string", "", "The line's commercial offer.", "line metadata at export time"),
    _c("region", "string", "", "The line's region.", "line metadata at export time"),
    _c("technology", "string", "", "The line's access technology (FTTH, FTTC, FWA...).",
       "line metadata at export time"),
    _c("family", "string", "", "IP version measured over: ipv4, ipv6, or null (agents "
       "before result schema 6).", "as the agent recorded it"),
    _c("dual_stack", "bool", "", "Whether the session was half of a dual-stack slot.",
       "address_family_requested = both"),
    _c("started_at", "timestamp", "UTC", "When the session started.",
       "the agent's clock, as stored (microseconds)", "minute"),
    _c("ended_at", "timestamp", "UTC", "When the session ended.", "the agent's clock",
       "minute"),
    _c("received_at", "timestamp", "UTC", "When the collector stored it.",
       "the collector's clock", "minute"),
    _c("hour_band", "int64", "hour", "Local hour (0-23) the session started in, "
       "Europe/Rome: the campaign's hour bands (244/08/CSP).",
       "tz database, DST-aware"),
    _VALID,
    _c("invalid_codes", "string", "", "Why the agent judged it invalid: reason codes, "
       "separated by '; ' (empty when valid).", "the agent's fixed vocabulary"),
    _c("pings_sent", "int64", "packets", "ICMP echo requests of the idle ping train.",
       "count of samples"),
    _c("pings_lost", "int64", "packets", "Echo requests with no reply.", "count"),
    _c("rtt_n", "int64", "packets", "Replies (RTT samples) of the idle train.", "count"),
    _c("rtt_mean_ms", "float64", "ms", "Mean round-trip time of the idle train.",
       "Welford's running mean (agent.stats.Moments)"),
    _c("rtt_m2_ms2", "float64", "ms^2", "Sum of squared deviations of the RTTs from "
       "their mean (Welford's M2): variance = M2 / (n - 1); sessions merge exactly "
       "(Chan et al.).", "Welford"),
    _c("jitter_sum_ns", "int64", "ns", "Sum of |RTT(i+1) - RTT(i)| over consecutive "
       "answered echoes of the idle train (delibera 156/23/CONS, RFC 3393 style).",
       "each difference rounded to the nanosecond: sums are exact"),
    _c("jitter_pairs", "int64", "pairs", "Consecutive answered pairs behind "
       "jitter_sum_ns; a scope's jitter is sum(jitter_sum_ns) / sum(jitter_pairs) / 1e6 ms.",
       "count"),
    _c("download_attempts", "int64", "attempts", "Download attempts, refused ones "
       "excluded.", "count of attempts rows with refused = false"),
    _c("download_failed", "int64", "attempts", "Failed download attempts.", "count"),
    _c("upload_attempts", "int64", "attempts", "Upload attempts, refused ones excluded.",
       "count"),
    _c("upload_failed", "int64", "attempts", "Failed upload attempts.", "count"),
    _c("refused_attempts", "int64", "attempts", "Attempts the measurement server refused "
       "(its capacity or the session's ticket): never the line's failures.",
       "collector/compliance/facts.py is_refusal"),
    _c("refused_server", "string", "", "The server that refused them (scheme://host:port).",
       "origin of the server URL", "origin"),
    _c("session_seq", "int64", "", "The probe's own session number (gaps show lost "
       "sessions).", "result schema v4"),
    _c("schema_version", "int64", "", "Result schema version the agent wrote.", "as "
       "delivered"),
    _c("agent_version", "string", "", "The agent's release.", "as delivered"),
    _c("server_origin", "string", "", "The measurement server (scheme://host:port).",
       "origin of the server URL", "origin"),
    _c("ping_target_address", "string", "", "Address the idle ping train was sent to.",
       "as resolved by the agent", "address"),
    _c("client_addresses", "string", "", "The probe's interface addresses, separated by "
       "'; '.", "the agent's host context", "addresses"),
    _c("clock_skew_s", "float64", "s", "Probe clock minus collector clock at delivery.",
       "the delivery's Date header against the collector's clock"),
)

ATTEMPTS: tuple[Column, ...] = (
    _SESSION_ID, _PROBE_ID,
    _c("started_at", "timestamp", "UTC", "When the attempt started.", "the agent's clock",
       "minute"),
    _VALID,
    _c("attempt_index", "int64", "", "Position of the attempt in its session (0-based).",
       "order of the result's transfers"),
    _c("direction", "string", "", "download or upload.", "as delivered"),
    _c("test_index", "int64", "", "The test of the session it belongs to (0-based).",
       "as delivered"),
    _c("attempt", "int64", "", "Try number within its test (1 = first try).",
       "as delivered"),
    _c("refused", "bool", "", "The measurement server refused it: in neither the "
       "attempts nor the failures of the failure ratio.",
       "collector/compliance/facts.py is_refusal"),
    _c("ok", "bool", "", "The attempt succeeded.", "status = ok (compliance facts)"),
    _c("kbps", "float64", "kbit/s", "Per-test speed: one sample per successful attempt, "
       "the sample Allegato 2's percentiles are taken over; null when failed or refused.",
       "throughput_bps / 1000 as the compliance facts hold it"),
    _c("failure_reason", "string", "", "Why it failed (the schema's vocabulary).",
       "as delivered"),
    _c("http_status", "int64", "", "HTTP status of the transfer, when one was received.",
       "as delivered"),
    _c("error", "string", "", "The agent's error text.", "as delivered", "drop"),
    _c("duration_s", "float64", "s", "How long the attempt ran.", "the agent's clock"),
    _c("streams", "int64", "", "Parallel TCP streams.", "as delivered"),
    _c("bytes_total", "int64", "bytes", "Bytes moved, warm-up included.", "as delivered"),
    _c("window_bytes", "int64", "bytes", "Bytes in the measurement window.",
       "as delivered"),
    _c("window_s", "float64", "s", "Length of the measurement window.", "as delivered"),
    _c("measured_at", "string", "", "Where the speed was measured: client or server.",
       "as delivered"),
)

PINGS: tuple[Column, ...] = (
    _SESSION_ID, _PROBE_ID, _VALID,
    _c("train", "string", "", "idle (the train every delay, loss and jitter figure uses), "
       "download or upload (loaded latency, during the transfer).", "as delivered"),
    _c("ping_index", "int64", "", "Position of the echo in its train (0-based): "
       "consecutive indexes are consecutive echoes (jitter pairs).", "order of samples"),
    _c("seq", "int64", "", "ICMP sequence number as recorded.", "as delivered"),
    _c("sent_offset_s", "float64", "s", "When it was sent, from the train's start.",
       "the agent's monotonic clock"),
    _c("rtt_ms", "float64", "ms", "Round-trip time; null when the echo was lost. One-way "
       "delay is rtt_ms / 2 (delay_basis rtt_half, the default).",
       "idle train: the RTTs the compliance facts hold"),
    _c("error", "string", "", "Why no reply was counted (timeout...).", "as delivered",
       "drop"),
)

TABLES: Mapping[str, tuple[Column, ...]] = {
    "sessions": SESSIONS, "attempts": ATTEMPTS, "pings": PINGS}


def names(table: str) -> tuple[str, ...]:
    return tuple(c.name for c in TABLES[table])


@dataclass(frozen=True, slots=True)
class OpenDataNote:
    """What an open-data export did, for its dictionary."""

    k: int
    suppressed: Mapping[str, int]  # rows left out, per table
    timezone: str


def dictionary(tables: Sequence[str], fmt: str, rows: Mapping[str, int],
               result_schema: int, note: OpenDataNote | None) -> dict[str, Any]:
    """The data dictionary of an export (dictionary.json)."""
    doc: dict[str, Any] = {
        "export_schema_version": EXPORT_SCHEMA_VERSION,
        "result_schema_version": result_schema,
        "format": fmt,
        "layout": "TABLE/month=YYYY-MM/part-0." + ("parquet" if fmt == "parquet" else "csv")
                  + " (hive partitions by the UTC month the session started in)",
        "tables": {t: {"rows": rows.get(t, 0), "columns": [
            {"name": c.name, "type": c.type, "unit": c.unit, "meaning": c.meaning,
             "method": c.method, "open_data": OPEN_DATA_WORDS[c.open_data]}
            for c in TABLES[t]]} for t in tables},
        "facts_only": FACTS_ONLY,
        "open_data": None,
        "interval_methods": {"confidence": CONFIDENCE, **INTERVAL_METHODS},
    }
    if note is not None:
        doc["open_data"] = {
            "k": note.k,
            "cell": "(operator, offer, region, technology, local hour band in "
                    f"{note.timezone})",
            "publication_unit": "month",
            "rule": f"a cell with fewer than {note.k} distinct probes in a UTC month is "
                    "suppressed from that month's files: its sessions there, with their "
                    "attempts and pings. k-anonymity holds per month: each month's files "
                    "may be published alone, and so may any set of whole months (a "
                    "semester, a year: every row published sits in a (month, cell) group "
                    f"of at least {note.k} probes); a part of a month (a day, a week) "
                    "selected from the rows is not covered",
            "pseudonyms": "HMAC-SHA256 (RFC 2104) under the operator's secret key, a "
                          "domain label per kind: the same key gives the same pseudonyms "
                          "in every export, no one without it can link them back",
            "truncations": "addresses to IPv4 /24 and IPv6 /48; times to the minute (UTC); "
                           "free text (error messages) left out",
            "suppressed_rows": dict(note.suppressed),
        }
    return doc


def dictionary_markdown(doc: Mapping[str, Any]) -> str:
    """dictionary.md: the same dictionary, for people."""
    out = [f"# bbprobe export: data dictionary (export schema "
           f"{doc['export_schema_version']}, result schema {doc['result_schema_version']})",
           "", f"Format: {doc['format']}. Layout: {doc['layout']}.", ""]
    if doc.get("facts_only"):
        out += [f"Sessions from their facts alone: {doc['facts_only']}", ""]
    note = doc.get("open_data")
    if note:
        out += ["## Open data", "", f"- k = {note['k']}; cell: {note['cell']}",
                f"- {note['rule']}", f"- Pseudonyms: {note['pseudonyms']}",
                f"- Truncations: {note['truncations']}",
                "- Rows suppressed: " + ", ".join(
                    f"{t} {n}" for t, n in note["suppressed_rows"].items()), ""]
    methods = doc.get("interval_methods")
    if methods:
        out += [f"## 95 % intervals of report figures (confidence "
                f"{methods['confidence']:g})", ""]
        out += [f"- {name}: {text}" for name, text in methods.items()
                if name != "confidence"]
        out.append("")
    for table, spec in doc["tables"].items():
        out += [f"## {table} ({spec['rows']} rows)", "",
                "| column | type | unit | meaning | method | open data |",
                "|---|---|---|---|---|---|"]
        out += [f"| {c['name']} | {c['type']} | {c['unit']} | {c['meaning']} | "
                f"{c['method']} | {c['open_data']} |" for c in spec["columns"]]
        out.append("")
    return "\n".join(out)
