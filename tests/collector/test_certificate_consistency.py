"""A certificate is evidence: its sentences agree with its own tables, and the agent's
daemon and the collector's certificate count one campaign the same way (the one rule of
agent/schedule.py), suppression windows and ``--first-now`` included. The daemon's loop
runs on an injected clock; its results go into a real collector's SQLite file."""

from __future__ import annotations

import asyncio
import random
import re
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from click.testing import CliRunner

from agent import health
from agent.app import daemon as d
from agent.schedule import Campaign
from agent.schema import SessionResult, format_utc
from collector.cli.main import main
from collector.compliance.certify import certify
from collector.compliance.facts import of_result
from collector.fleet.rules import Selector
from collector.lines import LineMetadata
from collector.reports.text import format_certificate
from collector.server.testing import RunningCollector
from tests.factories import attempt, session, store_result
from tests.httpclient import request

ROME = ZoneInfo("Europe/Rome")
CONTRACT = LineMetadata(operator="BT Italia", download_min_kbps=2200, upload_min_kbps=150,
                        max_delay_ms=70, max_loss_ratio=0.01)
# 05:00 in Rome (winter): the window covers local 05h and 06h.
START = datetime(2026, 1, 15, 4, 0, tzinfo=UTC)
WINDOW = (START, START + timedelta(hours=2))
REASON = "OLT maintenance"


class Line:
    """The daemon's world: injected time, and a session result per slot (every fifth
    one fails its upload, so some bands need a retry)."""

    def __init__(self) -> None:
        self.now = START
        self.results: list[SessionResult] = []

    def clock(self) -> datetime:
        return self.now

    async def wait(self, at: datetime, control: d.Control) -> None:
        self.now = max(self.now, at)

    async def measure(self, plan: d.Plan) -> tuple[datetime, bool]:
        n = len(self.results)
        result = session("p1", started_at=format_utc(self.now), transfers=[
            attempt("download"), attempt("upload", bps=10e6, ok=n % 5 != 4)])
        self.results.append(result)
        self.now += timedelta(seconds=40)
        return self.now, d.session_counts(result)


def _daemon(tmp_path: Path, sessions: int, first_now: bool) -> tuple[Line, Campaign]:
    line = Line()
    store = d.CampaignStore(tmp_path / "state")
    windows = (WINDOW,)

    async def plan() -> d.Plan:
        return d.Plan(windows=windows)

    asyncio.run(d.run_campaigns(d.Control(), store, line.measure, clock=line.clock,
                                wait=line.wait, rng=random.Random(7), max_sessions=sessions,
                                plan=plan, first_now=first_now))
    campaign = store.load()
    assert campaign is not None
    return line, campaign


def _bands_in_text(text: str) -> list[int]:
    cells = dict(re.findall(r"(\d\d)h (\d+)/\d", text))
    return [int(cells[f"{h:02d}"]) for h in range(24)]


def _counted_per_band_in_list(text: str) -> list[int]:
    counts = [0] * 24
    for band in re.findall(r"  band (\d\d)  counted", text):
        counts[int(band)] += 1
    return counts


def test_first_now_waits_for_the_window_and_counts_in_the_campaign(tmp_path: Path) -> None:
    """`daemon --first-now` started inside a suppression window: its first session is
    the first free slot after the window's end, not now, and it is a campaign slot,
    counted in its band."""
    line, campaign = _daemon(tmp_path, 3, first_now=True)
    first = datetime.fromisoformat(line.results[0].started_at)
    assert WINDOW[1] <= first < WINDOW[1] + timedelta(minutes=15)  # the first free slot
    assert campaign.attempted[first.astimezone(ROME).hour] == 3  # 3 sessions, 3 quarters
    assert all(not WINDOW[0] <= datetime.fromisoformat(r.started_at) < WINDOW[1]
               for r in line.results)


def test_first_now_outside_a_window_measures_at_once(tmp_path: Path) -> None:
    """Outside any window the first session is now, and the campaign counts it."""
    line = Line()
    store = d.CampaignStore(tmp_path / "state")
    asyncio.run(d.run_campaigns(d.Control(), store, line.measure, clock=line.clock,
                                wait=line.wait, rng=random.Random(7), max_sessions=1,
                                first_now=True))
    campaign = store.load()
    assert campaign is not None
    assert line.results[0].started_at == format_utc(START)
    assert campaign.counted[START.astimezone(ROME).hour] == 1


def test_agent_and_certificate_count_one_campaign_alike(tmp_path: Path,
                                                        collector: RunningCollector) -> None:
    """The daemon's sessions (failed ones retried) and a technician's one-shot session
    inside the window, certified by the collector over the window the operator set: the
    certificate's band table is the agent's campaign, bands filled alike, and every
    sentence agrees with the tables."""
    line, campaign = _daemon(tmp_path, 40, first_now=True)
    by_hand = session("p1", started_at=format_utc(START + timedelta(minutes=20)))
    collector.add_probe("p1", CONTRACT)
    with closing(collector.open_store()) as store:
        for r in (*line.results, by_hand):
            store_result(store, r)
        store.add_suppression(Selector(probe="p1").key(), format_utc(WINDOW[0]),
                              format_utc(WINDOW[1]), REASON, format_utc(START))
    status, cert, _ = request("GET", collector.url + "/api/v1/certificate?probe=p1")
    assert status == 200
    assert cert["band_counts"] == campaign.counted
    assert cert["bands_filled"] == health.campaign_state(campaign).bands_filled
    assert cert["sessions_counted"] == sum(campaign.counted)
    inside = [s for s in cert["sessions"] if s["suppressed_by"] is not None]
    assert [(s["result_id"], s["counted"]) for s in inside] == [(by_hand.result_id, False)]
    assert cert["suppressions"][0]["sessions_inside"] == [by_hand.result_id]

    result = CliRunner().invoke(main, ["--db", str(collector.db_path), "certify",
                                       "--probe", "p1"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert _bands_in_text(text) == campaign.counted == _counted_per_band_in_list(text)
    assert "1 session started inside it (listed below, not counted, no sample)" in text
    assert "no session started" not in text
    assert f"not counted: inside suppression window ({REASON})" in text
    filled = health.campaign_state(campaign).bands_filled
    assert f"{filled} of 24 bands filled" in text


def test_window_sentences_follow_the_sessions() -> None:
    """Pure: a window with no session inside says so; one with a session inside says
    how many, lists it as such, and leaves its band one short; every band the window
    covers that is short is named as short, in text and HTML alike."""
    from agent.schema import utc_now
    from collector.reports.html import certificate_page

    midnight = datetime(2026, 1, 14, 23, 0, tzinfo=UTC)
    results = [session("p1", started_at=format_utc(midnight + timedelta(minutes=15 * i)))
               for i in range(96)]
    facts = [of_result(r, r.started_at) for r in results]
    quiet = certify("p1", CONTRACT, facts, suppressed=[(
        format_utc(midnight - timedelta(hours=5)), format_utc(midnight - timedelta(hours=4)),
        "before the campaign")])
    assert quiet.verdict == "no_breach" and quiet.suppressions[0].sessions_inside == ()
    assert "no session started inside it; its bands have their sessions from outside it" \
        in format_certificate(quiet)

    window = (format_utc(midnight + timedelta(hours=5)),
              format_utc(midnight + timedelta(hours=5, minutes=20)), REASON)
    cert = certify("p1", CONTRACT, facts, suppressed=[window])
    assert cert.band_counts[5] == 2 and cert.verdict == "incomplete"
    assert cert.suppressions[0].sessions_inside == (results[20].result_id,
                                                    results[21].result_id)
    assert cert.suppressions[0].bands_short == (5,)
    text = format_certificate(cert)
    assert "2 sessions started inside it" in text and "bands 05h are short" in text
    assert _bands_in_text(text) == list(cert.band_counts) == _counted_per_band_in_list(text)
    page = certificate_page(cert, utc_now())
    assert "2 sessions started inside it" in page and "no session started" not in page
    assert page.count(f"not counted: inside suppression window ({REASON})") == 2
