"""Per-session facts: what compliance, certification and the plots need of one result,
derived once at ingestion (pure) and kept in SQLite beside the JSON body.

Evaluating a scope then reads small rows instead of decoding every body: a semester of
hourly sessions from 1,000 probes is 4.4 million bodies of ~20 kB each, but only 4.4
million session rows and twice as many transfer rows (docs/benchmarks.md). The JSON body
stays the master copy; the facts are rebuilt from it by a store migration.

- a transfer fact per attempt: direction, ok, per-test speed (kbit/s; None when failed),
  the same sample the evaluator has always used (one per attempt, README);
- ping facts per session: pings sent and lost, the RTT moments (n, mean, M2) so the mean
  and standard deviation of a whole scope merge exactly (``agent.stats.Moments``), and
  every raw RTT for the certificate's per-line percentile, and the jitter terms
  (``jitter_terms``);
- "completed": a successful download, a successful upload and a ping train that sent
  packets (what counts towards a campaign band, certify.py);
- validity: the agent's valid/invalid flag and the reason codes (schema v3); invalid
  sessions are left out of compliance and certification by default, and counted apart.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from agent.schema import SessionResult
from agent.stats import Moments


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
    # Jitter terms (issue 16): the sum of |differences| of consecutive answered RTTs of
    # the train, in whole nanoseconds, and how many such pairs; a scope's mean jitter is
    # the sum of sums over the sum of pairs (pairs never span two sessions). Integers,
    # so every sum (in Python, in SQL, in any order) is exact.
    jitter_sum_ns: int = 0
    jitter_pairs: int = 0
    # The IP version the session measured over (schema 6, issue 16); None: unknown.
    address_family: str | None = None
    # Whether the agent ran it as half of a dual-stack slot ("both"): such a line is a
    # campaign per family (certify.py).
    dual_stack: bool = False

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


def of_result(result: SessionResult, started_at: str) -> SessionFacts:
    """The facts of one validated result (``started_at`` as the store normalised it)."""
    transfers = tuple(
        TransferFact(
            a.direction, a.status == "ok",
            a.throughput_bps / 1000 if a.status == "ok" and a.throughput_bps is not None
            else None,
        )
        for a in result.transfers
    )
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
    )
