"""Measurement and protocol constants, each with its unit and the reason for its value.

Defaults follow the Ne.Me.Sys/RMBT/BEREC methods summarised in
``shared/reference/methodology.md``; the profile actually used is recorded in every result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

# --- Collector endpoints (paths are part of the agent <-> collector contract) -------------
RESULTS_PATH = "/api/v1/results"
WHOAMI_PATH = "/api/v1/whoami"
# Fleet control: the probe's central instruction, and its health reports
# (LMAP and NIC.br SIMET call them the reported state).
INSTRUCTION_PATH = "/api/v1/instruction"
HEALTH_PATH = "/api/v1/reported-state"
DOWNLOAD_PATH = "/measure/v1/download"
UPLOAD_PATH = "/measure/v1/upload"
ECHO_PATH = "/measure/v1/echo"
# Measurement tickets: a probe behind a shared address (carrier-grade NAT)
# measures under a ticket the collector signs, counted per ticket instead of per address
# (M-Lab's locate service does the same for its fleet with access tokens). The agent asks
# for one with the instruction fetch (TICKET_REQUEST_HEADER; the ticket comes back in
# TICKET_HEADER, on a 304 too), or alone at TICKETS_PATH; it presents it to a measurement
# server in TICKET_HEADER; a server that refuses it says why in TICKET_REFUSED_HEADER.
TICKETS_PATH = "/api/v1/tickets"
TICKET_HEADER = "Bbprobe-Ticket"
TICKET_REQUEST_HEADER = "Bbprobe-Want-Ticket"
TICKET_REFUSED_HEADER = "Bbprobe-Ticket-Refused"
# A bbprobe measurement server marks its own capacity refusals (429, 503) with this header
# and the reason (busy, per_client, anonymous_share, ticket_streams, ledger_full): only
# such a refusal is the server's. A 429 or 503 without it may come from anything on the
# path (a captive portal, an operator's proxy under load) and stays the line's failure.
REFUSED_HEADER = "Bbprobe-Refused"
# The statuses of a server refusing a transfer for capacity: per-client limit reached
# (429, RFC 6585 §4) and server full (503, RFC 9110 §15.6.4); the server's own only with
# REFUSED_HEADER (agent/probes/wire.py server_refused).
REFUSAL_STATUSES = frozenset({429, 503})

# --- Ping train ---------------------------------------------------------------------------
# 10 pings, 1 s apart: the ETSI-aligned count Ne.Me.Sys adopted (methodology.md §1.9) and
# RMBT's/BEREC's 10 latency samples.
PING_COUNT = 10
PING_INTERVAL_S = 1.0
# 56 bytes of ICMP payload is iputils ping's default, so our RTTs compare like for like.
PING_PAYLOAD_BYTES = 56
# A reply later than this counts as lost. SamKnows uses 2 s (methodology.md §3.3).
PING_TIMEOUT_S = 2.0

# During the download and upload windows the ping train runs faster, to sample the
# queueing delay the transfer causes (bufferbloat) over the whole window.
LOADED_PING_INTERVAL_S = 0.2

# --- HTTP throughput ----------------------------------------------------------------------
# Warm-up discarded then a fixed window: Ne.Me.Sys 2 s + 10 s (methodology.md §2.4).
WARMUP_S = 2.0
WINDOW_S = 10.0
# Adaptive streams (Ne.Me.Sys 2024, methodology.md §2.4): start with 2, measure the rate
# halfway through the warm-up, then raise the count: (rate below bit/s, streams).
ADAPTIVE_START_STREAMS = 2
ADAPTIVE_STREAMS: tuple[tuple[float, int], ...] = (
    (5e6, 1), (50e6, 2), (100e6, 3), (200e6, 4), (300e6, 5), (500e6, 6),
    (1e9, 8), (2e9, 12), (5e9, 16),
)
ADAPTIVE_MAX_STREAMS = 20
# The most streams a config may fix (transfer.streams): a measurement ticket's default
# stream allowance is this, so no valid method is refused by its own ticket.
MAX_STREAMS = 64
# Ne.Me.Sys retries each test up to 3 times and records every failed attempt (§1.5).
ATTEMPTS = 3
# Per-interval samples; the issue asks for 100-250 ms.
SAMPLE_INTERVAL_S = 0.1
# Extra time after warm-up + window before an attempt is declared timed out.
TRANSFER_GRACE_S = 5.0
# Pause between a failed attempt and the next (agent/probes/transfer.py run_test).
RETRY_PAUSE_S = 1.0
# A duration-mode window shorter than this share of the configured window is a short
# transfer (the server or the path closed early), not a measurement.
MIN_WINDOW_SHARE = 0.9
# Incompressible payload is sliced from one buffer generated once per process: no RNG in
# the measurement loop. 8 MiB exceeds the window of any compressor a middlebox would run.
PAYLOAD_BUFFER_BYTES = 8 * 1024 * 1024
# File mode (131/06 "file di prova predefiniti"): default test file size.
FILE_SIZE_BYTES = 50_000_000

# --- Campaign rules ---------------------------------------------------------------------
# A campaign covers the 24 hourly bands of local time (delibera 244/08/CSP Allegato 1;
# methodology.md §1.4-1.6): the agent's daemon plans by these rules (agent/schedule.py)
# and the collector certifies a line by the same ones (collector/compliance/certify.py).


@dataclass(frozen=True, slots=True)
class CampaignRule:
    name: str
    # Valid sessions each hourly band needs.
    per_band: int
    # Hours the rule's campaign spans: 24 for four a band (one a quarter hour), 72 for
    # one a band (spread over three days).
    window_h: int


# The names a config and a health report may carry (the keys below).
CampaignRuleName = Literal["96in24h", "24in72h"]
CAMPAIGN_RULES: Mapping[str, CampaignRule] = {
    # Ne.Me.Sys since at least 2019: «96 misure, una ogni 15 minuti» (methodology.md §1.6).
    "96in24h": CampaignRule("96in24h", 4, 24),
    # The 2010-2012 rule: one session a band, spread over three days.
    "24in72h": CampaignRule("24in72h", 1, 72),
}
DEFAULT_CAMPAIGN_RULE: CampaignRuleName = "96in24h"


def campaign_rule(name: str) -> CampaignRuleName:
    """``name`` as a rule name; ValueError for a rule this version does not know."""
    if name not in CAMPAIGN_RULES:
        raise ValueError(f"unknown campaign rule {name!r}: expected one of "
                         f"{', '.join(CAMPAIGN_RULES)}")
    return cast(CampaignRuleName, name)


# --- Choosing the server (agent/probes/select.py), and resolving a ping train's host ------
# Pings of a server.select_pings train apart, and how long one may wait for its reply.
SELECT_PING_INTERVAL_S = 0.2
SELECT_REPLY_TIMEOUT_S = 1.0
# A candidate's TCP connect and its capacity ask, together (agent/budget.py plans one
# such deadline a candidate).
SELECT_CONNECT_TIMEOUT_S = 3.0
# Resolving the host a ping train goes to (agent/probes/icmp.py).
RESOLVE_TIMEOUT_S = 5.0


# --- Session budget (agent/budget.py computes a session's planned worst case) -----------
# A session must plan to fit one campaign slot. The 96in24h rule (Ne.Me.Sys since at
# least 2019: «96 misure, una ogni 15 minuti», methodology.md §1.6; agent/schedule.py)
# starts one session a quarter hour, so a session that may last longer cannot keep the
# pace; 24in72h has longer slots, but one limit keeps every config valid under either.
MAX_SESSION_S = 900.0
# A duration-mode transfer has no byte cap of its own (the client reads, or sends, until
# warm-up + window; the measurement server's cap, measurement.max_bytes, is per request
# and 50 GB): its volume is planned at the fastest fixed access line sold, 10 Gbit/s
# (XGS-PON FTTH), on any line.
PLANNING_LINE_RATE_BPS = 10e9
# Bytes a session may plan to move, both directions (and both families under "both").
# The shipped method planned that way is 90 GB (3 attempts x 12 s each way at 10 Gbit/s;
# 180 GB dual stack); 300 GB, four minutes at that rate, leaves room for longer windows
# and refuses file-mode plans of hundreds of gigabytes.
MAX_SESSION_BYTES = 300 * 10**9

# --- Refusals by the measurement server --------------------------------------------------
# A transfer the server refused for capacity (429, 503) is not the line's failure: it is
# retried after the server's Retry-After (at most REFUSAL_WAIT_MAX_S each time), at most
# REFUSAL_RETRIES times a test, and a session waits at most REFUSAL_WAIT_SESSION_S in all
# for refusals (agent/budget.py plans it), then records what it could not run.
REFUSAL_RETRIES = 4
REFUSAL_WAIT_MAX_S = 10.0
REFUSAL_WAIT_SESSION_S = 60.0
# The wait after a refusal that gives no Retry-After: the Retry-After the bbprobe server
# sends with its own 429 and 503 (collector/measurement/slots.py).
REFUSAL_WAIT_DEFAULT_S = 5.0
# A session's POST for a ticket of its own (agent/tickets.py, when the instruction fetch
# brought none) waits at most this long, and the time it takes is charged to the
# session's refusal allowance (agent/budget.py), which also bounds it: a session never
# waits for a ticket longer than its plan leaves room for.
TICKET_TIMEOUT_S = 10.0

# --- Delivery -----------------------------------------------------------------------------
PUSH_TIMEOUT_S = 30.0
