"""The probe's health report: what the collector's fleet view shows, built from the
spool, the campaign and the instruction in force. Sent after every delivery and at
least hourly (LMAP's reported state, RFC 7594)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from agent import __version__, clock
from agent.schedule import Campaign
from agent.schema import (
    SCHEMA_VERSION,
    CampaignState,
    HealthReport,
    format_utc,
    utc_now,
)
from agent.spec import CAMPAIGN_RULES
from agent.spool import Spool

# A host check "keeps failing" when it failed in each of this many last sessions.
FAILING_AFTER = 2


def failing_checks(last_results: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """Reason codes present in each of the newest FAILING_AFTER results (pure)."""
    recent = [set(r.get("invalid_codes") or ()) for r in last_results[:FAILING_AFTER]]
    if len(recent) < FAILING_AFTER:
        return ()
    return tuple(sorted(set.intersection(*recent)))


def campaign_state(campaign: Campaign) -> CampaignState:
    per = CAMPAIGN_RULES[campaign.rule].per_band
    return CampaignState(
        rule=campaign.rule,
        started_at=format_utc(campaign.started_at),
        deadline_at=format_utc(campaign.deadline()),
        bands_filled=sum(c >= per for c in campaign.counted),
        sessions_counted=min(sum(campaign.counted), 10_000),
        sessions_needed=sum(campaign.needed),
        complete=campaign.complete,
        sessions_suppressed=campaign.suppressed)


def build(spool: Spool, *, mode: Literal["daemon", "run"], campaign: Campaign | None,
          instruction_version: str | None, instruction_error: str | None,
          suppressed_until: datetime | None = None,
          next_session_at: datetime | None = None) -> HealthReport:
    stats = spool.stats()
    # This probe's backlog: results spooled for another token wait for their own probe
    # and are no concern of this one's collector (agent/identity.py).
    entries = [e for e in spool.entries() if not spool.foreign(e.path)]
    error = stats.get("last_error")
    return HealthReport(
        schema_version=SCHEMA_VERSION,
        agent_version=__version__[:64],
        reported_at=utc_now(),
        mode=mode,
        instruction_version=instruction_version,
        instruction_error=(instruction_error or None) and instruction_error[:500],
        campaign=campaign_state(campaign) if campaign is not None else None,
        spool_results=len(entries),
        spool_bytes=sum(e.size for e in entries),
        dead_letters=len(spool.dead_letters()),
        gaps_waiting=sum(not spool.foreign(p) for p in spool.gaps()),
        dropped_total=int(stats.get("dropped_total", 0)),
        clock=clock.read(),
        last_error=str(error)[:500] if error else None,
        failing_checks=failing_checks(stats.get("last_results") or []),
        suppressed_until=format_utc(suppressed_until) if suppressed_until else None,
        next_session_at=format_utc(next_session_at) if next_session_at else None,
    )
