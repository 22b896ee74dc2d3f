"""What ``bbprobe daemon`` says in its log (the lines: agent/logline.py), and when.

The slot's line waits until the next slot is planned, so it can say when that is: the
daemon's loop calls ``planned`` with each slot it plans (run_campaigns' ``on_planned``).
A stop says the waiting line at once. Delivery and the instruction are said when they
change, not at every retry or fetch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from agent import logline
from agent.control import Applied
from agent.delivery import DeliveryReport
from agent.schedule import Campaign
from agent.schema import SessionResult
from agent.spec import CAMPAIGN_RULES
from agent.spool import Spool

# INFO: one line a slot and a line for each change; problems come through ``warn`` (in
# `bbprobe daemon`, this logger at WARNING).
log = logging.getLogger("bbprobe.daemon")


@dataclass(frozen=True, slots=True)
class SlotDone:
    """A slot measured, its line waiting for the next slot to be planned."""

    results: Sequence[SessionResult]
    counted: bool
    delivery: DeliveryReport | None  # None: not delivered (cut short by its deadline)
    spool_depth: int  # this identity's results left in the spool


class DaemonLog:
    """The log's state between slots. ``real``: campaign time to real time (the daemon's
    campaign clock may run faster in labs); ``warn``: the daemon's problem lines."""

    def __init__(self, real: Callable[[datetime], datetime],
                 warn: Callable[[str], None]) -> None:
        self.real = real
        self.warn = warn
        self.failing: str | None = None  # why delivery fails, while it does
        self._delivered: DeliveryReport | None = None  # the slot's delivery, when done
        self._done: SlotDone | None = None

    def instruction(self, applied: Applied, before: Applied | None) -> None:
        """A new instruction in force, or none any more. An instruction that sets nothing
        and holds no window (what a collector answers a probe no rule matches) is none."""
        now, then = _in_force(applied), _in_force(before)
        if now == then:
            return
        inst = applied.instruction
        if now is not None and inst is not None:
            log.info(logline.instruction_text(now, list(inst.settings),
                                              len(inst.suppressions)))
        else:
            log.info("no central instruction any more: running under the local "
                     "configuration")

    def delivering(self) -> None:
        self._delivered = None

    def delivered(self, outcome: DeliveryReport) -> None:
        """After a slot's delivery: a line when it starts failing, one when it
        recovers; the slot's own line says each time how many results wait."""
        self._delivered = outcome
        failing = outcome.error if outcome.pending else None
        if failing is not None and self.failing is None:
            self.warn(f"delivery failing: {failing}; {outcome.pending} result(s) wait in "
                      "the spool, sent again after every slot")
        elif failing is None and self.failing is not None:
            log.info(f"delivery recovered: {len(outcome.delivered)} result(s) delivered, "
                     f"{outcome.pending} left in the spool")
        self.failing = failing

    def delivery_cut(self) -> None:
        """A delivery cut short by its deadline (said by the daemon as it happens)."""
        self.failing = self.failing or "timed out"

    def slot(self, results: Sequence[SessionResult], counted: bool,
             spool: Spool | None) -> None:
        """The slot measured: its line waits for the next slot."""
        outcome = self._delivered
        if outcome is not None:
            depth = outcome.pending
        else:
            depth = len(spool.pending()) if spool is not None else 0
        self._done = SlotDone(results, counted, outcome, depth)

    def planned(self, campaign: Campaign, at: datetime | None,
                until: datetime | None) -> None:
        """run_campaigns' ``on_planned``: the last slot's line, which says when the next
        is; without one, the next slot (or the suppression holding it) and the
        campaign's progress."""
        zone, now = ZoneInfo(campaign.timezone), datetime.now(UTC)
        if at is not None:
            slot = logline.when(self.real(at), zone, now)
        elif until is not None:
            slot = f"after a suppression window, {logline.when(self.real(until), zone, now)}"
        else:
            slot = "none planned"
        if self._done is not None:
            log.info(self.line(self._done, campaign, slot))
            self._done = None
            return
        per = CAMPAIGN_RULES[campaign.rule].per_band
        state = logline.progress(campaign.rule, per, campaign.counted,
                                 logline.when(self.real(campaign.started_at), zone))
        if at is None and until is not None:
            log.info(f"suppressed: no session until {logline.when(self.real(until), zone, now)}"
                     f"; {state}")
        else:
            log.info(f"next slot {slot}; {state}")

    def stopping(self, campaign: Campaign | None) -> None:
        """A stop: the waiting line now."""
        if self._done is not None:
            log.info(self.line(self._done, campaign, "none: the daemon is stopping"))
            self._done = None

    @staticmethod
    def line(done: SlotDone, campaign: Campaign | None, slot: str) -> str:
        band = None
        if campaign is not None and campaign.last_at is not None:
            hour = campaign.last_at.astimezone(ZoneInfo(campaign.timezone)).hour
            band = (hour, campaign.counted[hour], CAMPAIGN_RULES[campaign.rule].per_band)
        outcome = done.delivery
        ids = set(outcome.delivered) if outcome is not None else set()
        delivered = bool(done.results) and all(r.result_id in ids for r in done.results)
        why = outcome.error if outcome is not None else "delivery cut short by its deadline"
        return logline.session_line(
            done.results, band=band, counted=done.counted, next_slot=slot,
            delivery=logline.delivery_text(delivered, done.spool_depth, why))


def _in_force(applied: Applied | None) -> str | None:
    """The version of the instruction ``applied`` runs under, if it asks anything."""
    inst = applied.instruction if applied is not None else None
    if applied is None or inst is None or not applied.version:
        return None
    return applied.version if inst.settings or inst.suppressions else None
