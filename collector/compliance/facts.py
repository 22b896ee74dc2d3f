"""Per-session facts: what compliance, certification and the plots need of one result,
derived once at ingestion (pure) and kept in SQLite beside the JSON body.

Evaluating a scope then reads small rows instead of decoding every body: a semester of
hourly sessions from 1,000 probes is 4.4 million bodies of ~20 kB each, but only 4.4
million session rows and twice as many transfer rows (docs/benchmarks.md). The JSON body
stays the master copy; the facts are rebuilt from it by a store migration.

- a transfer fact per attempt: direction, ok, per-test speed (kbit/s; None when failed),
  the same sample the evaluator has always used (one per attempt, docs/analyst.md);
- ping facts per session: pings sent and lost, the RTT moments (n, mean, M2) so the mean
  and standard deviation of a whole scope merge exactly (``agent.stats.Moments``), and
  every raw RTT for the certificate's per-line percentile, and the jitter terms
  (``jitter_terms``);
- "completed": a successful download, a successful upload and a ping train that sent
  packets (what counts towards a campaign band, certify.py);
- validity: the agent's valid/invalid flag and the reason codes (schema v3); invalid
  sessions are left out of compliance and certification by default, and counted apart;
- refusals: attempts the measurement server refused (``is_refusal``) are not
  transfer facts. Allegato 2's failure rate is "il rapporto tra le trasmissioni dei dati
  fallite e il numero totale dei tentativi di trasmissione" of the line; a server that
  turns a transfer away for its own capacity (many probes behind one carrier-grade NAT
  address share its per-address cap) or refuses the session's ticket says nothing of
  the line. They are counted per session with the server that refused them, and shown
  apart, per server, so an operator sees an under-sized server, not an unreliable line.
  Nothing else on the path may turn a line's failure into a refusal: a captive portal or
  an operator's proxy answering 503 under load is the line's failure (``is_refusal``).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from agent.schema import REFUSAL_REASONS, SessionResult
from agent.stats import Moments
from agent.ticket import origin

# How agents before schema 7 recorded a refusal: failure_reason "http_status" and the
# status, with nothing to say who answered it. Only two such records are the server's:
# - HTTP 429 Too Many Requests (RFC 6585 §4): the origin server's own rate limit, "the
#   user has sent too many requests"; a bbprobe server's per-address cap, which many
#   probes behind one carrier-grade NAT address share;
# - HTTP 503 whose recorded error text is a bbprobe server's own refusal, which began
#   "server busy: N transfers ..." in every release (collector/measurement/slots.py).
#   Such an agent recorded an upload's refusal as "HTTP 503: <the body's reason>"
#   (agent/probes/wire.py) and a download's as "HTTP 503 Service Unavailable from
#   <url>", with no reason: a 503 download of an old agent cannot be told from a
#   captive portal's or an overloaded proxy's, and stays the line's failure.
# Schema 7's reasons are trusted as recorded: its agent records server_refused only when
# the server marked the refusal with its own header (agent/spec.py REFUSED_HEADER).
LEGACY_REFUSAL_STATUS = 429
LEGACY_BUSY_503 = re.compile(r"HTTP 503: server busy: \d+ transfers ")
# A server key longer than this (a URL that is no http(s) URL: nothing to take the
# origin of) is cut: it is a label in reports, and one row of a day's rollup.
SERVER_KEY_CHARS = 200


@dataclass(frozen=True, slots=True)
class TransferFact:
    direction: str
    ok: bool
    kbps: float | None


@dataclass(frozen=True, slots=True)
class SessionFacts:
    result_id: str
    probe_id: str
    started_at: str  # normalised UTC, as stored
    pings_sent: int
    pings_lost: int
    rtt: Moments
    rtts_ms: tuple[float | None, ...]
    transfers: tuple[TransferFact, ...]
    valid: bool = True
    invalid_codes: tuple[str, ...] = ()
    # Jitter terms (delibera 156/23/CONS): the sum of |differences| of consecutive
    # answered RTTs of the train, in whole nanoseconds, and how many such pairs; a scope's
    # mean jitter is the sum of sums over the sum of pairs (pairs never span two
    # sessions). Integers, so every sum (in Python, in SQL, in any order) is exact.
    jitter_sum_ns: int = 0
    jitter_pairs: int = 0
    # The IP version the session measured over (schema 6); None: unknown.
    address_family: str | None = None
    # Whether the agent ran it as half of a dual-stack slot ("both"): such a line is a
    # campaign per family (certify.py).
    dual_stack: bool = False
    # Attempts the measurement server refused (``is_refusal``): not in ``transfers``,
    # never the line's failures; and the server (``server_key``) that refused them, None
    # when it refused none.
    refused_attempts: int = 0
    refused_server: str | None = None

    @property
    def completed(self) -> bool:
        ok = {t.direction for t in self.transfers if t.ok}
        return ok == {"download", "upload"} and self.pings_sent > 0

    def speeds(self, direction: str) -> tuple[float | None, ...]:
        return tuple(t.kbps for t in self.transfers if t.direction == direction)


def jitter_terms(rtts: Sequence[float | None]) -> tuple[int, int]:
    """(sum of |consecutive differences| in whole ns, pairs) of the answered RTTs (ms),
    in train order: the definition of agent.stats.jitter (mean absolute difference of
    consecutive RTTs, IPDV-style, RFC 3393 §2.4 with consecutive packets), in mergeable
    and exactly summable form (each difference rounded to the nanosecond: far below
    the microsecond the RTTs are measured to)."""
    answered = [r for r in rtts if r is not None]
    pairs = len(answered) - 1
    if pairs < 1:
        return 0, 0
    return sum(round(abs(b - a) * 1e6) for a, b in itertools.pairwise(answered)), pairs


def is_refusal(status: str, failure_reason: str | None, http_status: int | None,
               error: str | None) -> bool:
    """Whether a transfer attempt is one the measurement server refused: a failed
    attempt whose reason is one of the schema's REFUSAL_REASONS (server_refused: a 429
    or 503 the bbprobe server marked as its own; ticket_refused), or, as agents
    before schema 7 recorded it (failure_reason "http_status"), HTTP 429, or HTTP 503
    whose error text is a bbprobe server's "server busy" (LEGACY_BUSY_503). Any other
    failure is the line's, a 503 from anything else on the path included. Plain values,
    so a stored body's dicts are classed by the same rule as the schema's dataclasses
    (report.listing_row)."""
    if status != "failed":
        return False
    if failure_reason in REFUSAL_REASONS:
        return True
    if failure_reason != "http_status":
        return False
    return http_status == LEGACY_REFUSAL_STATUS or (
        http_status == 503 and isinstance(error, str) and LEGACY_BUSY_503.match(error) is not None)


def server_key(url: str | None) -> str:
    """The measurement server as reports count refusals by: its origin
    (``scheme://host:port``, as tickets name servers, agent.ticket.origin); a URL that
    has none, as it was (cut to SERVER_KEY_CHARS); "" when the session names none."""
    if not url:
        return ""
    try:
        return origin(url)
    except ValueError:
        return url[:SERVER_KEY_CHARS]


def of_result(result: SessionResult, started_at: str) -> SessionFacts:
    """The facts of one validated result (``started_at`` as the store normalised it)."""
    transfers = tuple(
        TransferFact(
            a.direction, a.status == "ok",
            a.throughput_bps / 1000 if a.status == "ok" and a.throughput_bps is not None
            else None,
        )
        for a in result.transfers
        if not is_refusal(a.status, a.failure_reason, a.http_status, a.error)
    )
    refused = len(result.transfers) - len(transfers)
    rtts: tuple[float | None, ...] = tuple(s.rtt_ms for s in result.ping.samples) \
        if result.ping is not None else ()
    answered = [r for r in rtts if r is not None]
    jitter_sum, pairs = jitter_terms(rtts)
    return SessionFacts(
        result_id=result.result_id, probe_id=result.probe_id, started_at=started_at,
        pings_sent=len(rtts), pings_lost=len(rtts) - len(answered),
        rtt=Moments.of(answered), rtts_ms=rtts, transfers=transfers,
        valid=result.valid,
        invalid_codes=tuple(r.code for r in result.validity.reasons)
        if result.validity is not None else (),
        jitter_sum_ns=jitter_sum, jitter_pairs=pairs,
        address_family=result.address_family,
        dual_stack=result.address_family_requested == "both",
        refused_attempts=refused,
        refused_server=server_key(result.server.url) if refused else None,
    )
