"""The bbprobe session result: one versioned, self-describing, additive-only JSON document.

The agent produces it and the collector imports this module to validate what it receives,
so it uses the standard library only.

Rules (after m-lab/ndt-server ``data/result.go``):
- every field name carries its unit (``rtt_ms``, ``throughput_bps``, ``loss_ratio`` 0-1,
  ``duration_s``, ``bytes_total``);
- fields are never removed or repurposed; a new field gets a new name and
  ``SCHEMA_VERSION`` grows; the collector rejects versions newer than its own;
- raw samples travel next to the summaries computed from them, so anyone can recompute.

This module holds the records, their field metadata (bounds, text formats, the version a
field was added in) and the vocabulary they share. agent/decoding.py reads a JSON
document into them strictly, naming the field of every fault; agent/json_schema.py
publishes them as JSON Schema for the collector's OpenAPI document.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from agent.spec import CampaignRuleName

# 1: first version. 2: latency under load (ping_download, ping_upload, loaded RTT
# summaries), adaptive streams (TransferMethod.streams = 0), PingMethod.loaded_interval_s.
# 3: validity (valid/invalid with reasons), the clock's sync state; gap records.
# 4: session_seq, the probe's own count of its sessions, and the sequence numbers of the
# results a gap record stands for, so a collector can tell a result that never arrived
# from one the probe reported dropping (reliability.md C8).
# 5: fleet control (LMAP-style, RFC 7594): the central instruction a session ran under
# (instruction_version), and how its measurement server was chosen among candidates
# (server_selection: each candidate's RTT, the choice, any failover); the health report.
# 6: IPv6 (dual-stack lines): the address family a session measured over, the one asked
# for, and the local and remote addresses of its transfers' connections.
# 7: measurement tickets (counted per ticket, not per address: probes behind one
# carrier-grade NAT): the ticket a session measured under and whether a server refused
# it; the failure reasons server_refused and ticket_refused (counted apart from the
# line's failures); the candidates passed over as busy.
SCHEMA_VERSION = 7

Status = Literal["ok", "failed"]
# The IP version of a session's connections, and what the configuration asked for:
# "any" leaves the choice to the host's address selection (getaddrinfo's order,
# RFC 6724); "both" is a dual-stack session, run once per family, each its own result.
AddressFamily = Literal["ipv4", "ipv6"]
RequestedFamily = Literal["any", "ipv4", "ipv6", "both"]
Direction = Literal["download", "upload"]
TransferMode = Literal["duration", "file"]
# Why a transfer attempt failed (after the Ne.Me.Sys error codes, methodology.md §1.5).
FailureReason = Literal[
    "connect_error",  # TCP/HTTP connection could not be opened (80003)
    "http_status",  # the server answered, but not 200 (80003)
    "timeout",  # the attempt's deadline passed (80006)
    "zero_bytes",  # nothing was transferred (80005)
    "short_transfer",  # fewer bytes than the file, or a window cut short (80001)
    "broken_connection",  # the connection broke mid-transfer (80001)
    "server_report",  # the upload sink's report was missing or malformed
    # v7: the measurement server refused the transfer for capacity (HTTP 429 or 503):
    # the server's shortfall, not the line's; never in the failure rate.
    "server_refused",
    # v7: the server refused the session's ticket (expired, foreign, allowance used); the
    # attempt is retried without it, under the per-address rule. Not the line's either.
    "ticket_refused",
]
# Failure reasons that are the measurement server's, not the access line's: such
# attempts are counted apart and never enter the Allegato 2 failure rate.
REFUSAL_REASONS: frozenset[str] = frozenset({"server_refused", "ticket_refused"})

PROBE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REASON_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# A central instruction's version: the first 16 hex digits of the SHA-256 of its
# canonical JSON (collector/fleet/rules.py), so equal instructions have equal versions.
INSTRUCTION_VERSION_RE = re.compile(r"^[0-9a-f]{16}$")


def bounds(
    *, ge: float | None = None, gt: float | None = None, le: float | None = None
) -> dict[str, Any]:
    """Field metadata: numeric bounds, checked when a document is read (agent/decoding.py)."""
    return {"ge": ge, "gt": gt, "le": le}


_UTC = {"format": "utc"}
# Text shown as a label (an agent's version: in the fleet view, Prometheus labels and
# terminals): printable characters only, at most 64 (no control characters where a
# field is an identifier or a label: an escape sequence would act on an operator's
# terminal).
_LABEL = {"format": "label"}
LABEL_MAX_CHARS = 64

# Characters that act rather than show, in a terminal, a CSV cell or a label: C0 and C1
# controls (NUL, ESC, CSI), the line and paragraph separators, the bidirectional controls
# that reorder what a reader sees ("Trojan Source", CVE-2021-42574), and lone surrogates
# (no UTF-8 writer encodes them). Not refused: other text a printer shows or spaces
# (a no-break space in "Fastweb S.p.A.", a zero-width joiner in an emoji).
ACTING_RANGES = ((0x00, 0x1F), (0x7F, 0x9F), (0x200E, 0x200F), (0x2028, 0x2029),
                 (0x202A, 0x202E), (0x2066, 0x2069), (0xD800, 0xDFFF))
_ACTING_RE = re.compile("[" + "".join(f"\\u{a:04x}-\\u{b:04x}" for a, b in ACTING_RANGES)
                        + "]")


def acting_char(text: str) -> str | None:
    """The first character of ``text`` that acts rather than shows (ACTING_RANGES), or
    None."""
    found = _ACTING_RE.search(text)
    return found.group() if found else None

# Physical limits by unit suffix (the schema carries units in field names), for every
# number a field does not bound more tightly itself: a document may come from anyone who
# holds a token, and a 400-digit integer or 1.7e308 must be refused here (422 naming the
# field), not overflow a sum, SQLite's 64-bit integers or InfluxDB's nanosecond
# timestamps later. 1e9 s x 1e9 ns/s stays inside int64.
BPS_LIMIT = 1e13  # 10 Tbit/s
UNIT_LIMITS = (("_ms", 1e7), ("_s", 1e9), ("_mbps", 1e7), ("_bps", BPS_LIMIT),
               ("_bytes", 1e15), ("_ratio", 1.0), ("_percent", 100.0))
# Any other number (counts, indexes, versions): what a double holds exactly.
NUMBER_LIMIT = float(2**53)
SAMPLE_T_LIMIT_S = 1e9


def physical_bounds(name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with the field's physical limit filled in where it sets none."""
    limit = next((v for suffix, v in UNIT_LIMITS if name.endswith(suffix)), NUMBER_LIMIT)
    out = dict(meta)
    if out.get("le") is None:
        out["le"] = limit
    if out.get("ge") is None and out.get("gt") is None:
        out["ge"] = -limit
    return out


def utc_now() -> str:
    return format_utc(datetime.now(UTC))


def format_utc(moment: datetime) -> str:
    """ISO 8601 UTC with microseconds and a ``Z`` suffix, the only form the schema accepts.
    Built by hand, not with ``strftime("%Y")``: glibc writes year 999 as ``999``, not
    ``0999``, which is not ISO 8601 and sorts after ``2026`` as text, so one such row
    became a probe's "latest" session."""
    m = moment.astimezone(UTC)
    return (f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:"
            f"{m.second:02d}.{m.microsecond:06d}Z")


def parse_utc(text: str) -> datetime:
    """Parse an ISO 8601 timestamp that carries an explicit UTC offset."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("timestamp has no UTC offset")
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00 lies before year 1 in UTC
        raise ValueError("timestamp out of range") from None


# --- Method: how the numbers were obtained (recorded with every result) --------------------


@dataclass(frozen=True, slots=True)
class PingMethod:
    count: int = field(metadata=bounds(ge=1, le=10_000))
    interval_s: float = field(metadata=bounds(ge=0.001, le=60))
    payload_bytes: int = field(metadata=bounds(ge=0, le=65_000))
    timeout_s: float = field(metadata=bounds(gt=0, le=60))
    # Interval of the trains run during the download and upload windows; None: not run.
    loaded_interval_s: float | None = field(default=None, metadata=bounds(ge=0.001, le=60))


@dataclass(frozen=True, slots=True)
class TransferMethod:
    mode: TransferMode
    # Parallel streams; 0 = adaptive (chosen from the rate seen during the warm-up).
    streams: int = field(metadata=bounds(ge=0, le=64))
    warmup_s: float = field(metadata=bounds(ge=0, le=60))
    window_s: float = field(metadata=bounds(gt=0, le=600))
    file_size_bytes: int | None = field(metadata=bounds(gt=0))
    tests: int = field(metadata=bounds(ge=0, le=1000))
    attempts: int = field(metadata=bounds(ge=1, le=10))
    sample_interval_s: float = field(metadata=bounds(gt=0, le=10))
    timeout_s: float = field(metadata=bounds(gt=0, le=3600))


@dataclass(frozen=True, slots=True)
class Method:
    profile: str
    ping: PingMethod | None  # None: no ping train in this session
    download: TransferMethod
    upload: TransferMethod
    # How the one-way delay estimate is derived from ICMP echo round trips.
    one_way_delay: Literal["rtt_half"] = "rtt_half"


@dataclass(frozen=True, slots=True)
class Server:
    url: str | None  # measurement server base URL; None when no transfer was run
    ping_target: str | None


# --- Ping train ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PingSample:
    seq: int = field(metadata=bounds(ge=0))
    # When the echo request left, relative to the train start (monotonic clock).
    sent_offset_s: float = field(metadata=bounds(ge=0))
    # Round-trip time, or None when no reply came within the timeout (a lost ping).
    rtt_ms: float | None = field(metadata=bounds(ge=0))
    # Why there is no RTT: "timeout", or the ICMP error received (e.g. "unreachable").
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PingSummary:
    packets_sent: int = field(metadata=bounds(ge=0))
    packets_received: int = field(metadata=bounds(ge=0))
    loss_ratio: float | None = field(metadata=bounds(ge=0, le=1))
    rtt_min_ms: float | None = field(metadata=bounds(ge=0))
    rtt_mean_ms: float | None = field(metadata=bounds(ge=0))
    rtt_median_ms: float | None = field(metadata=bounds(ge=0))
    rtt_p95_ms: float | None = field(metadata=bounds(ge=0))
    rtt_max_ms: float | None = field(metadata=bounds(ge=0))
    # Sample (n-1) and population (n) standard deviations of the RTTs.
    rtt_stdev_ms: float | None = field(metadata=bounds(ge=0))
    rtt_pstdev_ms: float | None = field(metadata=bounds(ge=0))
    # Mean absolute difference of consecutive RTTs (IPDV-style jitter).
    jitter_ms: float | None = field(metadata=bounds(ge=0))
    # One-way delay estimate: RTT / 2 (see Method.one_way_delay).
    one_way_delay_mean_ms: float | None = field(metadata=bounds(ge=0))
    one_way_delay_stdev_ms: float | None = field(metadata=bounds(ge=0))


@dataclass(frozen=True, slots=True)
class PingTest:
    status: Status
    error: str | None
    target: str
    address: str | None
    privileged: bool | None
    started_at: str = field(metadata=_UTC)
    samples: tuple[PingSample, ...]
    summary: PingSummary


# --- HTTP transfers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransferAttempt:
    """One attempt at one transfer test. Failed attempts are kept: they are the failure rate."""

    direction: Direction
    test_index: int = field(metadata=bounds(ge=0))
    attempt: int = field(metadata=bounds(ge=1))
    status: Status
    failure_reason: FailureReason | None
    error: str | None
    http_status: int | None
    started_at: str = field(metadata=_UTC)
    duration_s: float = field(metadata=bounds(ge=0))
    streams: int = field(metadata=bounds(ge=1))
    # Every payload byte moved by the attempt, warm-up included.
    bytes_total: int = field(metadata=bounds(ge=0))
    # Bytes and seconds inside the measurement window, and the rate computed from them.
    window_bytes: int | None = field(metadata=bounds(ge=0))
    window_s: float | None = field(metadata=bounds(ge=0))
    throughput_bps: float | None = field(metadata=bounds(ge=0))
    # Who counted the bytes: the client for downloads, the server (receiver) for uploads.
    measured_at: Literal["client", "server"]
    # Per stream, (t_s, cumulative_bytes) pairs; t_s relative to the attempt's time origin.
    stream_samples: tuple[tuple[tuple[float, int], ...], ...]


# --- Session -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """Headline numbers, each computed from the raw samples in the same document."""

    # Median of the session's successful download (upload) tests.
    download_bps: float | None = field(metadata=bounds(ge=0))
    upload_bps: float | None = field(metadata=bounds(ge=0))
    rtt_mean_ms: float | None = field(metadata=bounds(ge=0))
    rtt_stdev_ms: float | None = field(metadata=bounds(ge=0))
    loss_ratio: float | None = field(metadata=bounds(ge=0, le=1))
    # Failed attempts / all attempts, per direction; from v7, of the line's attempts only
    # (an attempt the server refused, REFUSAL_REASONS, is in neither).
    download_failure_ratio: float | None = field(metadata=bounds(ge=0, le=1))
    upload_failure_ratio: float | None = field(metadata=bounds(ge=0, le=1))
    one_way_delay_mean_ms: float | None = field(metadata=bounds(ge=0))
    one_way_delay_stdev_ms: float | None = field(metadata=bounds(ge=0))
    # Latency under load: mean RTT during the download and upload windows (v2).
    rtt_download_mean_ms: float | None = field(default=None, metadata=bounds(ge=0))
    rtt_upload_mean_ms: float | None = field(default=None, metadata=bounds(ge=0))


@dataclass(frozen=True, slots=True)
class InvalidReason:
    """Why a session is not evidence about the line (Ne.Me.Sys refuses such measurements,
    methodology.md §2.6). ``code`` is a stable identifier such as ``wifi``, ``cpu_busy``,
    ``cross_traffic``, ``lan_hosts``, ``clock_unsynced``; ``detail`` says it in words,
    with the measured figure."""

    code: str = field(metadata={"format": "reason_code"})
    detail: str


@dataclass(frozen=True, slots=True)
class Validity:
    """The agent's judgement of its own measurement conditions (v3). Invalid sessions are
    kept and shown apart, never counted in compliance unless an analyst asks."""

    valid: bool
    reasons: tuple[InvalidReason, ...]


@dataclass(frozen=True, slots=True)
class ClockState:
    """The probe's wall clock when the session started (v3), so the collector can tell a
    trustworthy timestamp from a guess (after RIPE Atlas's ``lts``). Read from the
    kernel (adjtimex): ``synchronized`` is None when it could not be read."""

    synchronized: bool | None
    # The kernel's bound on the clock's error (timex.maxerror), when synchronized.
    max_error_ms: float | None = field(metadata=bounds(ge=0))
    source: Literal["adjtimex", "unknown"]


@dataclass(frozen=True, slots=True)
class HostContext:
    """Where and how the session ran (v3): the interface that routes to the measurement
    server and what the host was doing, so a reader can tell whether the line or the
    probe's surroundings set the numbers (Ne.Me.Sys host checks, methodology.md §2.6)."""

    interface: str | None
    addresses: tuple[str, ...]
    gateway: str | None
    mtu: int | None = field(metadata=bounds(ge=0))
    # NIC link speed as the driver reports it; None when unknown (virtual devices).
    link_speed_mbps: int | None = field(metadata=bounds(ge=0))
    wireless: bool | None
    loopback: bool
    # The source address towards the server is a public one (no NAT between).
    public_address: bool | None
    os: str
    kernel: str
    cpu_percent: float | None = field(metadata=bounds(ge=0, le=100))
    memory_used_ratio: float | None = field(metadata=bounds(ge=0, le=1))
    memory_total_bytes: int | None = field(metadata=bounds(ge=0))
    # Bytes on the interface in the transfer direction that were not the test's own, over
    # all there, in the download (upload) tests; None: not measured (or a loopback path).
    download_cross_traffic_ratio: float | None = field(default=None,
                                                       metadata=bounds(ge=0, le=1))
    upload_cross_traffic_ratio: float | None = field(default=None,
                                                     metadata=bounds(ge=0, le=1))
    # Hosts other than the gateway that answered an ARP scan of the LAN (agent/lan.py);
    # None when not scanned, and lan_scan says why.
    lan_hosts: int | None = field(default=None, metadata=bounds(ge=0))
    lan_scan: str | None = None


@dataclass(frozen=True, slots=True)
class ServerCandidate:
    """One measurement server the session could have used (v5), with the ICMP echo
    round trips to its host that ranked it (Ne.Me.Sys measures against the nearest
    server, methodology.md §2.1)."""

    url: str
    rtts_ms: tuple[float, ...] = field(metadata=bounds(ge=0))
    # Median of rtts_ms; None when no echo came back (ranked after every one that did).
    rtt_median_ms: float | None = field(metadata=bounds(ge=0))
    # Why it could not be pinged (resolution, permission), if so.
    error: str | None


@dataclass(frozen=True, slots=True)
class ServerFailover:
    """A candidate passed over at session start: its TCP connection failed (v5)."""

    url: str
    error: str


@dataclass(frozen=True, slots=True)
class ServerSelection:
    """How the session's measurement server was chosen (v5): candidates ranked by median
    RTT (ties: the order the instruction lists them), then the first that accepted a TCP
    connection and, from v7, had room (a busy one is passed over, and used only when every
    reachable candidate is busy). chosen_url is None when none connected (the transfers
    then fail, recorded)."""

    method: Literal["icmp_median_rtt"]
    candidates: tuple[ServerCandidate, ...]
    chosen_url: str | None
    failovers: tuple[ServerFailover, ...]


@dataclass(frozen=True, slots=True)
class TicketUse:
    """The measurement ticket a session ran under (v7): issued by the collector,
    presented to the measurement server, counted per ticket instead of per address."""

    # The ticket's id (its JWT "jti"): one per session.
    ticket_id: str = field(metadata=_LABEL)
    expires_at: str = field(metadata=_UTC)
    # The measurement servers (origins, scheme://host:port) it may be used at.
    servers: tuple[str, ...]
    # Whether it was presented to this session's server (False: the server is not one
    # of ``servers``, or the method fixes more streams at once than the ticket allows,
    # so the session measured under the per-address rule).
    presented: bool
    # The server's reason when it refused the ticket (then the rest of the session ran
    # without it); None: not refused.
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class SessionResult:
    schema_version: int
    result_id: str = field(metadata={"format": "uuid"})
    probe_id: str = field(metadata={"format": "probe_id"})
    agent_version: str = field(metadata=_LABEL)
    started_at: str = field(metadata=_UTC)
    ended_at: str = field(metadata=_UTC)
    duration_s: float = field(metadata=bounds(ge=0))
    method: Method
    server: Server
    ping: PingTest | None
    transfers: tuple[TransferAttempt, ...]
    summary: SessionSummary
    # Ping trains run during the first download and upload test windows (v2); they are
    # latency under load, reported apart and never mixed into the idle delay indicators.
    ping_download: PingTest | None = None
    ping_upload: PingTest | None = None
    # v3; None: the agent made no validity checks (counted as valid).
    validity: Validity | None = None
    # v3; None: not recorded (older agents).
    clock: ClockState | None = None
    # v3; None: not recorded.
    context: HostContext | None = None
    # v4: 1, 2, 3... per probe, given as the result enters the spool; None: older agents,
    # or not spooled (a technician's --no-push run).
    session_seq: int | None = field(default=None, metadata={**bounds(ge=1), "added": 4})
    # v5: the central instruction's version this session ran under; None: none (no
    # collector, or the probe never received one).
    instruction_version: str | None = field(
        default=None, metadata={"format": "instruction_version", "added": 5})
    # v5: None when the session had no server.candidates (one configured server).
    server_selection: ServerSelection | None = field(default=None, metadata={"added": 5})
    # v6: the IP version this session measured over: the one asked for, or under "any"
    # the one the transfers' connections used (else the ping's). None: older agents, or
    # under "any" no connection was made. Top-level fields, not per attempt: a field
    # added inside a nested object would change the canonical form of every older
    # document (to_dict drops only top-level defaults), and a resend would conflict.
    address_family: AddressFamily | None = field(default=None, metadata={"added": 6})
    # v6: server.address_family as configured ("both": this is one of the pair).
    address_family_requested: RequestedFamily | None = field(default=None,
                                                             metadata={"added": 6})
    # v6: the distinct local and remote IP addresses of the transfers' TCP connections,
    # in the order first used (the ping's address is ping.address).
    local_addresses: tuple[str, ...] = field(default=(), metadata={"added": 6})
    remote_addresses: tuple[str, ...] = field(default=(), metadata={"added": 6})
    # v7: the measurement ticket the session ran under; None: none (no collector, an
    # older collector, or tickets not issued).
    ticket: TicketUse | None = field(default=None, metadata={"added": 7})
    # v7: candidates found busy at session start: they refused for capacity, marked as
    # their own refusal (busy, not broken). Each passed over is also a failover with its
    # reason; when every candidate that answered was busy, the best-ranked of them is
    # used (server_selection.chosen_url): listed here, and not as a failover.
    busy_servers: tuple[str, ...] = field(default=(), metadata={"added": 7})

    @property
    def valid(self) -> bool:
        return self.validity is None or self.validity.valid


@dataclass(frozen=True, slots=True)
class GapRecord:
    """Results a probe had to drop before delivering them (v3): the spool was full, the
    disk was full, or they outlived the age cap. Sent in their place, so a missing
    measurement is a known gap, never a silent one (after RIPE Atlas's 9018/9007)."""

    schema_version: int
    gap_id: str = field(metadata={"format": "uuid"})
    probe_id: str = field(metadata={"format": "probe_id"})
    recorded_at: str = field(metadata=_UTC)
    reason: Literal["spool_full", "disk_full", "too_old"]
    dropped: int = field(metadata=bounds(ge=1))
    # Start times of the oldest and newest dropped session.
    first_started_at: str = field(metadata=_UTC)
    last_started_at: str = field(metadata=_UTC)
    # v4: the dropped results' session_seq, as [first, last] ranges (at most 1000).
    dropped_seq_ranges: tuple[tuple[int, int], ...] = field(default=(),
                                                          metadata={"added": 4})


@dataclass(frozen=True, slots=True)
class CampaignState:
    """Where the daemon's campaign stands (v5, in a health report)."""

    rule: CampaignRuleName
    started_at: str = field(metadata=_UTC)
    deadline_at: str = field(metadata=_UTC)
    bands_filled: int = field(metadata=bounds(ge=0, le=24))
    sessions_counted: int = field(metadata=bounds(ge=0, le=10_000))
    sessions_needed: int = field(metadata=bounds(ge=0, le=10_000))
    complete: bool
    # Planned sessions not started because a suppression window covered them (their
    # bands are planned again, later in the campaign window).
    sessions_suppressed: int = field(metadata=bounds(ge=0, le=100_000))


@dataclass(frozen=True, slots=True)
class HealthReport:
    """A probe's state (v5, POST /api/v1/health): sent after every delivery and at least
    hourly, so the collector can show its fleet and flag the silent and unhealthy."""

    schema_version: int
    agent_version: str = field(metadata=_LABEL)
    reported_at: str = field(metadata=_UTC)
    mode: Literal["daemon", "run"]
    instruction_version: str | None = field(metadata={"format": "instruction_version"})
    # Why the last instruction received could not be applied (the one before stays).
    instruction_error: str | None
    campaign: CampaignState | None
    spool_results: int = field(metadata=bounds(ge=0))
    spool_bytes: int = field(metadata=bounds(ge=0))
    dead_letters: int = field(metadata=bounds(ge=0))
    gaps_waiting: int = field(metadata=bounds(ge=0))
    dropped_total: int = field(metadata=bounds(ge=0))
    clock: ClockState | None
    last_error: str | None
    # Host-check reason codes that failed in each of the last sessions (at least two).
    failing_checks: tuple[str, ...] = field(metadata={"format": "reason_code"})
    # A suppression window in force now, and when the next session is planned.
    suppressed_until: str | None = field(metadata=_UTC)
    next_session_at: str | None = field(metadata=_UTC)


MAX_SEQ_RANGES = 1000


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted [first, last] ranges with overlapping and adjacent ones joined (pure)."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def seq_ranges(seqs: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Sorted, merged [first, last] ranges of ``seqs`` (pure)."""
    out: list[list[int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return tuple((a, b) for a, b in out)


# --- Upload sink report (collector -> agent) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadReport:
    """What the upload sink observed; upload rates are computed from this (receiver side)."""

    bytes_received: int = field(metadata=bounds(ge=0))
    # Server monotonic clock when the request headers arrived; samples are relative to it.
    t0_monotonic_s: float
    # (t_s, cumulative bytes) as received, t_s relative to t0_monotonic_s.
    samples: tuple[tuple[float, int], ...]


# --- Encoding (strict decoding: agent/decoding.py) -----------------------------------------


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass tree as plain JSON-ready data (tuples become lists when serialised).
    A field added in a later version is left out while it holds its default, so an older
    document keeps its canonical form, and with it its hash: a result resent across a
    collector upgrade is a duplicate, not a conflict."""
    result: dict[str, Any] = dataclasses.asdict(obj)
    for f in dataclasses.fields(obj):
        if "added" in f.metadata and getattr(obj, f.name) == f.default:
            del result[f.name]
    return result
