"""`bbprobe daemon --first-now` measures at once only where the campaign's own plan
could have put a slot (agent/schedule.py why_not_now): the band still needs a session,
none started in this quarter hour yet, no suppression window. Otherwise it says why and
takes the next free slot, so a restart right after a slot, or a Restart= loop with the
flag, never stacks counted sessions in one quarter hour."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from agent import schedule
from agent.app import daemon as d
from agent.schedule import Campaign

ROME = ZoneInfo("Europe/Rome")
# 11:07 in Rome (winter): band 11h, its first quarter hour.
NOW = datetime(2026, 1, 15, 10, 7, tzinfo=UTC)


def _quarter(at: datetime) -> tuple[int, int]:
    local = at.astimezone(ROME)
    return local.hour, local.minute // 15


# --- the rule (pure) --------------------------------------------------------------------


def test_a_fresh_campaign_may_start_now() -> None:
    assert schedule.why_not_now(Campaign(started_at=NOW), NOW) is None


def test_not_twice_in_one_quarter_hour() -> None:
    """A session started at 11:02 (this quarter): not now; from 11:15 on, yes."""
    campaign = Campaign(started_at=NOW - timedelta(hours=1),
                        last_at=NOW - timedelta(minutes=5))
    assert schedule.why_not_now(campaign, NOW) == \
        "a session already started in this quarter hour (at 11:02 CET)"
    assert schedule.why_not_now(campaign, NOW + timedelta(minutes=8)) is None


def test_not_in_a_band_that_has_its_sessions() -> None:
    campaign = Campaign(started_at=NOW - timedelta(hours=1))
    campaign.counted[11] = 4
    assert schedule.why_not_now(campaign, NOW) == "band 11h already has its 4 session(s)"
    assert schedule.why_not_now(campaign, NOW + timedelta(hours=1)) is None


def test_not_inside_a_suppression_window_nor_after_the_campaign() -> None:
    campaign = Campaign(started_at=NOW - timedelta(hours=1))
    window = (NOW - timedelta(minutes=1), NOW + timedelta(hours=1))
    assert schedule.why_not_now(campaign, NOW, [window]) == \
        f"suppressed until {window[1]}"
    assert schedule.why_not_now(campaign, window[1], [window]) is None
    assert schedule.why_not_now(campaign, campaign.deadline()) == \
        "the campaign needs no more sessions"


# --- the daemon's loop, on an injected clock --------------------------------------------


class Line:
    """Injected time; every session takes 40 s and counts."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.started: list[datetime] = []

    def clock(self) -> datetime:
        return self.now

    async def wait(self, at: datetime, control: d.Control) -> None:
        self.now = max(self.now, at)

    async def measure(self, plan: d.Plan) -> tuple[datetime, bool]:
        self.started.append(self.now)
        self.now += timedelta(seconds=40)
        return self.now, True


def _start(line: Line, store: d.CampaignStore, said: list[str]) -> None:
    """One `daemon --first-now` start that runs one session, then stops."""
    asyncio.run(d.run_campaigns(d.Control(), store, line.measure, clock=line.clock,
                                wait=line.wait, rng=random.Random(3), max_sessions=1,
                                first_now=True, on_error=said.append))


def test_a_restart_loop_stacks_no_sessions_in_one_quarter(tmp_path: Path) -> None:
    """Started with --first-now, then restarted with it right after its session: the
    first start measures at once, the restart says why it does not and measures in the
    next quarter hour; the campaign holds one session per quarter."""
    line = Line(NOW)
    store = d.CampaignStore(tmp_path / "state")
    said: list[str] = []
    _start(line, store, said)
    assert line.started == [NOW] and said == []
    _start(line, store, said)
    assert said == ["--first-now: a session already started in this quarter hour (at "
                    "11:07 CET); the first session is the next free slot"]
    second = line.started[1]
    assert _quarter(second) == (11, 1)  # 11:15-11:30, the next quarter of band 11h
    campaign = store.load()
    assert campaign is not None
    assert campaign.attempted[11] == campaign.counted[11] == 2


def test_a_band_already_filled_is_not_measured_again(tmp_path: Path) -> None:
    """A restart in a band that has its four sessions: the first session goes to the
    next band that needs one, not now."""
    store = d.CampaignStore(tmp_path / "state")
    campaign = Campaign(started_at=NOW - timedelta(hours=2))
    campaign.counted[11] = campaign.attempted[11] = 4
    store.save(campaign)
    line = Line(NOW)
    said: list[str] = []
    _start(line, store, said)
    assert said == ["--first-now: band 11h already has its 4 session(s); the first "
                    "session is the next free slot"]
    assert _quarter(line.started[0]) == (12, 0)
    kept = store.load()
    assert kept is not None and kept.counted[11] == 4 and kept.counted[12] == 1
