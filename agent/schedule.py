"""Campaign scheduling (pure): cover the 24 hourly bands of local time, 244/08-style.

The rules are spec.CAMPAIGN_RULES: the default asks 4 valid sessions in every hourly
band, one in each quarter hour at a random offset (so probes do not all test at :00);
the other 1 per band, in a random quarter.
A session that failed or was flagged invalid does not count; its band still needs one,
so the next plan puts another session in that band, later in the campaign window (the
same hour band on the next day, or later the same hour when a quarter is still ahead).
The campaign ends when every band has its count, or when its window (``window_days``)
runs out, incomplete.

``band_of``, ``fills_band`` and ``bands_filled`` are the one counting rule: the daemon
counts its campaign with them and the collector's certificate counts a line's sessions
with them (collector/compliance/certify.py), so the agent's "bands filled" and the
certificate's band table are the same numbers of the same sessions.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from agent.spec import CAMPAIGN_RULES, DEFAULT_CAMPAIGN_RULE, CampaignRuleName, campaign_rule


def band_of(started: datetime, timezone: str) -> int:
    """The local hour band (0-23) of a session that started at ``started`` (aware): the
    band it fills, in the campaign's time zone (244/08 bands are local hours)."""
    return started.astimezone(ZoneInfo(timezone)).hour


def fills_band(valid: bool, ok_directions: Iterable[str], pings_sent: int,
               suppressed: bool = False) -> bool:
    """Whether a session counts for its band: valid (the agent's host checks found
    nothing that makes it no evidence about the line), a successful download and a
    successful upload, and a ping train that sent packets; and not started inside a
    suppression window (LMAP's suppression: the window's time is no campaign time, so
    the daemon starts no session there, and one started there by hand or by an older
    agent is not counted either)."""
    return (valid and not suppressed and pings_sent > 0
            and {"download", "upload"} <= set(ok_directions))


def bands_filled(counted: Sequence[int], per_band: int) -> int:
    """How many of the 24 bands have their ``per_band`` sessions (the agent's health
    report and status, the certificate's summary)."""
    return sum(c >= per_band for c in counted)


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
        band = band_of(self.last_at, self.timezone)
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
        local = max(local, _quarter_after(campaign.last_at, zone))
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


def _quarter_after(last: datetime, zone: ZoneInfo) -> datetime:
    """The start of the quarter hour after the one ``last`` fell in, in ``zone``."""
    local = last.astimezone(zone)
    return (local.replace(minute=local.minute // 15 * 15, second=0, microsecond=0)
            + timedelta(minutes=15)).astimezone(zone)


Window = tuple[datetime, datetime]  # a suppression: [start, end), aware


def why_not_now(campaign: Campaign, now: datetime,
                windows: Sequence[Window] = ()) -> str | None:
    """Why a campaign session may not start at ``now`` (None: it may), by the rules
    ``next_free_slot`` plans with: the campaign still needs sessions, ``now``'s band
    still needs one, no session started in ``now``'s quarter hour yet, and no
    suppression window covers ``now``. For a session asked at a moment of its own
    (``daemon --first-now``), which counts in its band like a planned one. Pure."""
    if campaign.complete or now >= campaign.deadline():
        return "the campaign needs no more sessions"
    until = suppressed_until(windows, now)
    if until is not None:
        return f"suppressed until {until}"
    zone = ZoneInfo(campaign.timezone)
    band = now.astimezone(zone).hour
    if campaign.needed[band] == 0:
        return f"band {band:02d}h already has its {campaign.counted[band]} session(s)"
    if campaign.last_at is not None and now < _quarter_after(campaign.last_at, zone):
        last = campaign.last_at.astimezone(zone)
        return f"a session already started in this quarter hour (at {last:%H:%M %Z})"
    return None


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
