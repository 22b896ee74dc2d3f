"""Campaign scheduling (pure): cover the 24 hourly bands of local time, 244/08-style.

The rules are spec.CAMPAIGN_RULES: the default asks 4 valid sessions in every hourly
band, one in each quarter hour at a random offset (so probes do not all test at :00);
the other 1 per band, in a random quarter.
A session that failed or was flagged invalid does not count; its band still needs one,
so the next plan puts another session in that band, later in the campaign window (the
same hour band on the next day, or later the same hour when a quarter is still ahead).
The campaign ends when every band has its count, or when its window (``window_days``)
runs out, incomplete.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from agent.spec import CAMPAIGN_RULES, DEFAULT_CAMPAIGN_RULE, CampaignRuleName, campaign_rule


@dataclass(slots=True)
class Campaign:
    """Progress of one campaign; plain data, saved as JSON by the daemon."""

    started_at: datetime  # aware
    rule: CampaignRuleName = DEFAULT_CAMPAIGN_RULE
    timezone: str = "Europe/Rome"
    window_days: int = 3
    counted: list[int] = field(default_factory=lambda: [0] * 24)  # valid sessions per band
    attempted: list[int] = field(default_factory=lambda: [0] * 24)
    done_at: datetime | None = None
    last_at: datetime | None = None  # when the last session started: one per quarter
    # Sessions not started because a suppression window covered their slot (LMAP's
    # suppression): their bands still need them, so they are planned again within the
    # window.
    suppressed: int = 0

    @property
    def needed(self) -> list[int]:
        per = CAMPAIGN_RULES[self.rule].per_band
        return [max(0, per - c) for c in self.counted]

    @property
    def complete(self) -> bool:
        return not any(self.needed)

    def deadline(self) -> datetime:
        return self.started_at + timedelta(days=self.window_days)

    def record(self, at: datetime, counted: bool, started: datetime | None = None) -> int:
        """One session finished at ``at`` (started at ``started``, the slot): its band,
        counted if it was valid and whole."""
        self.last_at = started or at
        band = self.last_at.astimezone(ZoneInfo(self.timezone)).hour
        self.attempted[band] += 1
        if counted:
            self.counted[band] += 1
        if self.complete and self.done_at is None:
            self.done_at = at
        return band

    def to_json(self) -> dict[str, object]:
        return {"started_at": self.started_at.isoformat(), "rule": self.rule,
                "timezone": self.timezone, "window_days": self.window_days,
                "counted": self.counted, "attempted": self.attempted,
                "done_at": self.done_at.isoformat() if self.done_at else None,
                "last_at": self.last_at.isoformat() if self.last_at else None,
                "suppressed": self.suppressed}

    @staticmethod
    def from_json(data: dict[str, object]) -> Campaign:
        done = data.get("done_at")
        last = data.get("last_at")
        return Campaign(last_at=datetime.fromisoformat(str(last)) if last else None,
                        started_at=datetime.fromisoformat(str(data["started_at"])),
                        rule=campaign_rule(str(data["rule"])),
                        timezone=str(data["timezone"]),
                        window_days=int(str(data["window_days"])),
                        counted=_bands(data["counted"]), attempted=_bands(data["attempted"]),
                        done_at=datetime.fromisoformat(str(done)) if done else None,
                        suppressed=int(str(data.get("suppressed", 0))))


def _bands(value: object) -> list[int]:
    """24 per-band counts from a saved campaign; ValueError when they are not."""
    if not isinstance(value, list) or len(value) != 24:
        raise ValueError("a campaign's bands are a list of 24 counts")
    return [int(x) for x in value]


def next_slot(campaign: Campaign, now: datetime, rng: random.Random) -> datetime | None:
    """When to measure next: the earliest time after ``now`` in a band that still needs
    sessions, at a random offset inside a quarter hour not yet used in this hour. None
    when the campaign is complete or its window is over."""
    if campaign.complete or now >= campaign.deadline():
        return None
    zone = ZoneInfo(campaign.timezone)
    local = now.astimezone(zone)
    if campaign.last_at is not None:
        # Not twice in one quarter hour: start from the quarter after the last session's.
        last = campaign.last_at.astimezone(zone)
        next_quarter = last.replace(minute=last.minute // 15 * 15, second=0,
                                    microsecond=0) + timedelta(minutes=15)
        local = max(local, next_quarter.astimezone(zone))
    hour_start = local.replace(minute=0, second=0, microsecond=0)
    for step in range(campaign.window_days * 24 + 1):
        start = hour_start + timedelta(hours=step)
        # Wall-clock arithmetic on aware datetimes; normalise through UTC across DST.
        start = start.astimezone(zone)
        if campaign.needed[start.hour] == 0:
            continue
        quarters = [q for q in range(4)
                    if start + timedelta(minutes=15 * (q + 1)) > local]
        if not quarters:
            continue
        per = CAMPAIGN_RULES[campaign.rule].per_band
        # Spread a band's sessions over its quarters: 4 per hour -> one per quarter; 1 ->
        # a random quarter.
        q = quarters[0] if per == 4 else rng.choice(quarters)
        q_start = max(start + timedelta(minutes=15 * q), local)
        q_end = start + timedelta(minutes=15 * (q + 1))
        offset = rng.uniform(0, max(0.0, (q_end - q_start).total_seconds() - 60))
        moment = (q_start + timedelta(seconds=offset)).astimezone(now.tzinfo)
        if moment >= campaign.deadline():
            return None
        return moment
    return None


Window = tuple[datetime, datetime]  # a suppression: [start, end), aware


def next_free_slot(campaign: Campaign, now: datetime, rng: random.Random,
                   windows: Sequence[Window] = (), *, limit: int = 1000) -> datetime | None:
    """``next_slot``, never inside a suppression window (LMAP's suppression):
    a slot that falls in one is planned again from the window's end, so the band it
    would have filled is filled later in the campaign window, not lost."""
    for _ in range(limit):
        at = next_slot(campaign, now, rng)
        if at is None:
            return None
        until = suppressed_until(windows, at)
        if until is None:
            return at
        now = until
    return None


def suppressed_until(windows: Sequence[Window], moment: datetime) -> datetime | None:
    """The latest end of the windows ``moment`` falls in, or None (pure)."""
    ends = [end for start, end in windows if start <= moment < end]
    return max(ends) if ends else None
