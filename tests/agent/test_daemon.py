"""The daemon's campaign loop with an injected clock: a full 96-slot campaign, failed and
invalid sessions retried in their own band, stop and reload; nothing sleeps."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast, get_args
from zoneinfo import ZoneInfo

import pytest

from agent import config
from agent.app import daemon as d
from agent.app.runner import ConfigSource, Runner
from agent.errors import ConfigError, DeliveryError
from agent.schedule import Campaign, next_slot
from agent.spec import CAMPAIGN_RULES, DEFAULT_CAMPAIGN_RULE, CampaignRuleName, campaign_rule

ROME = ZoneInfo("Europe/Rome")
START = datetime(2026, 1, 14, 23, 0, tzinfo=UTC)  # local midnight in Rome


class World:
    """Injected time: waiting jumps the clock; a session takes 40 s."""

    def __init__(self, failing: dict[int, int]) -> None:
        self.now = START
        self.failing = dict(failing)  # band -> how many sessions there fail
        self.sessions: list[tuple[datetime, int, bool]] = []

    def clock(self) -> datetime:
        return self.now

    async def wait(self, at: datetime, control: d.Control) -> None:
        assert at >= self.now
        self.now = at

    async def measure(self, plan: d.Plan) -> tuple[datetime, bool]:
        band = self.now.astimezone(ROME).hour
        ok = True
        if self.failing.get(band, 0) > 0:
            self.failing[band] -= 1
            ok = False
        started = self.now
        self.now += timedelta(seconds=40)
        self.sessions.append((started, band, ok))
        return self.now, ok


def _run(world: World, tmp_path: Path, max_sessions: int, **kw: object) -> Campaign:
    store = d.CampaignStore(tmp_path)
    control = d.Control()
    asyncio.run(d.run_campaigns(control, store, world.measure, clock=world.clock,
                                wait=world.wait, rng=random.Random(3),
                                max_sessions=max_sessions, **kw))  # type: ignore[arg-type]
    campaign = store.load()
    assert campaign is not None
    return campaign


def test_full_campaign_one_session_per_quarter(tmp_path: Path) -> None:
    """96 sessions in 24 hours: every band gets 4, one in each quarter hour, at random
    offsets; the campaign is complete after the last."""
    world = World({})
    campaign = _run(world, tmp_path, 96)
    assert campaign.complete and campaign.counted == [4] * 24
    assert len(world.sessions) == 96
    assert world.sessions[-1][0] - world.sessions[0][0] < timedelta(hours=24)
    quarters = {(t.astimezone(ROME).hour, t.astimezone(ROME).minute // 15)
                for t, _, _ in world.sessions}
    assert len(quarters) == 96  # each (band, quarter) exactly once
    minutes = {t.astimezone(ROME).minute % 15 for t, _, _ in world.sessions}
    assert len(minutes) > 5  # random offsets, not all on the quarter


def test_failed_sessions_are_retried_in_their_band(tmp_path: Path) -> None:
    """Two sessions fail in band 03 and one in band 17: those bands get their missing
    sessions later in the same hour band (the next day), and the campaign completes
    with 99 sessions."""
    world = World({3: 2, 17: 1})
    campaign = _run(world, tmp_path, 99)
    assert campaign.complete and campaign.counted == [4] * 24
    assert len(world.sessions) == 99
    retries = world.sessions[96:]
    assert sorted(band for _, band, _ in retries) == [3, 3, 17]
    assert all(t - START > timedelta(hours=24) for t, _, _ in retries)
    assert campaign.attempted[3] == 6 and campaign.attempted[17] == 5


def test_campaign_survives_a_restart(tmp_path: Path) -> None:
    """The daemon stops after 30 sessions and starts again: the saved campaign goes on
    where it was (no band measured twice in the same quarter)."""
    world = World({})
    _run(world, tmp_path, 30)
    campaign = _run(world, tmp_path, 66)
    assert campaign.complete and len(world.sessions) == 96


def test_window_runs_out_incomplete_then_a_new_campaign() -> None:
    """A band that never succeeds: after window_days the campaign stops planning it."""
    campaign = Campaign(started_at=START, window_days=1)
    campaign.counted = [4] * 24
    campaign.counted[5] = 0
    late = START + timedelta(days=1, minutes=1)
    assert next_slot(campaign, late, random.Random(1)) is None
    soon = next_slot(campaign, START, random.Random(1))
    assert soon is not None and soon.astimezone(ROME).hour == 5


def test_a_slot_stops_at_once_and_a_bug_costs_only_the_slot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemon.measure: a stop (SIGTERM) mid-session cancels it at once; a session that
    raises a bug, or outlives the slot's deadline, is a failed slot, said on stderr; a
    ConfigError stops the daemon."""
    said: list[str] = []
    cfg = config.parse({"state_dir": str(tmp_path)})
    daemon = d.Daemon(Runner(ConfigSource(None, {}), None, said.append), cfg, said.append)

    async def hangs(plan: d.Plan) -> tuple[datetime, bool]:
        await asyncio.sleep(3600)
        raise AssertionError("not cancelled")

    async def bug(plan: d.Plan) -> tuple[datetime, bool]:
        bands: list[bool] = []
        return datetime.now(UTC), bands[0]

    async def misconfigured(plan: d.Plan) -> tuple[datetime, bool]:
        raise ConfigError("server.url: not a URL")

    async def slots() -> None:
        monkeypatch.setattr(daemon, "session", hangs)
        asyncio.get_running_loop().call_later(0.05, daemon.control.stop.set)
        with pytest.raises(asyncio.CancelledError):
            await daemon.measure(d.Plan())
        daemon.control.stop.clear()
        with monkeypatch.context() as short:
            short.setattr(d, "slot_deadline_s", lambda cfg: 0.05)
            assert (await daemon.measure(d.Plan()))[1] is False
        assert said[-1].startswith("session failed: not done in 0.05 s")
        monkeypatch.setattr(daemon, "session", bug)
        assert (await daemon.measure(d.Plan()))[1] is False
        assert said[-1].startswith("session failed: IndexError: list index out of range (")
        monkeypatch.setattr(daemon, "session", misconfigured)
        with pytest.raises(ConfigError, match=r"server\.url"):
            await daemon.measure(d.Plan())

    asyncio.run(slots())



def test_a_slow_delivery_never_uncounts_a_measured_slot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemon.measure: the slot's verdict is its sessions'; a delivery that outlives its
    own deadline is paused (the rest waits in the spool), and the slot still counts."""
    said: list[str] = []
    cfg = config.parse({"state_dir": str(tmp_path)})
    daemon = d.Daemon(Runner(ConfigSource(None, {}), None, said.append), cfg, said.append)
    measured = SimpleNamespace(results=["whole"], spool=None)

    async def sessions(plan: d.Plan) -> object:
        return d.Sessions(cast(Any, SimpleNamespace(cfg=cfg)), None, cast(Any, measured))

    async def slow(done: object) -> None:
        await asyncio.sleep(3600)

    async def refused(done: object) -> None:
        raise DeliveryError("the collector refused this probe's token", retryable=False)

    async def slot() -> None:
        monkeypatch.setattr(daemon, "session", sessions)
        monkeypatch.setattr(d, "slot_counts", lambda results: results == ["whole"])
        monkeypatch.setattr(d, "delivery_deadline_s", lambda cfg: 0.05)
        monkeypatch.setattr(daemon, "deliver", slow)
        assert (await daemon.measure(d.Plan()))[1] is True
        assert said[-1].startswith("delivery paused after 0.05 s")
        monkeypatch.setattr(daemon, "deliver", refused)
        with pytest.raises(DeliveryError, match="refused"):
            await daemon.measure(d.Plan())

    asyncio.run(slot())


def test_a_config_error_leaves_the_daemon_as_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemon.run: a ConfigError from the campaigns comes out as a ConfigError (the CLI
    names it and exits with its code), not wrapped in an ExceptionGroup."""
    said: list[str] = []
    cfg = config.parse({"state_dir": str(tmp_path)})
    daemon = d.Daemon(Runner(ConfigSource(None, {}), None, said.append), cfg, said.append)

    async def no_name(cfg: object) -> None:
        return None

    async def misconfigured(first_now: bool, report_every_s: float) -> None:
        raise ConfigError("server.url: not a URL")

    monkeypatch.setattr(daemon.runner, "probe_id", no_name)
    monkeypatch.setattr(daemon, "_campaigns", misconfigured)
    monkeypatch.setattr(d, "install_signals", lambda control: None)
    with pytest.raises(ConfigError, match=r"server\.url"):
        asyncio.run(daemon.run(first_now=False, report_every_s=3600.0))

def test_notify_speaks_the_systemd_protocol(tmp_path: Path) -> None:
    """READY=1 arrives as one datagram on $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        os.environ["NOTIFY_SOCKET"] = str(path)
        try:
            d.notify("READY=1")
        finally:
            del os.environ["NOTIFY_SOCKET"]
        assert server.recv(64) == b"READY=1"


def test_daemon_process_stops_cleanly_on_sigterm(tmp_path: Path,
                                                 fast_config: Path) -> None:
    """The real daemon, between sessions (its next slot minutes away, idle): READY on
    the notify socket, then SIGTERM stops it at once with exit 0."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(fast_config), "--collector",
             "http://127.0.0.1:9", "--token", "t", "--probe-id", "p1", "daemon",
             "--rule", "24in72h"],
            env={**os.environ, "NOTIFY_SOCKET": str(path)}, stderr=subprocess.PIPE,
            text=True)
        assert server.recv(64) == b"READY=1"
        time.sleep(0.3)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 10
        assert proc.returncode == 0, err
        assert server.recv(64) == b"STOPPING=1"
        assert "daemon stopped" in err


def test_status_shows_campaign_progress(tmp_path: Path, fast_config: Path) -> None:
    """``bbprobe status`` reads the saved campaign: its rule, start, sessions counted of
    those needed, and each band's counted/attempted, a band still short marked "!"."""
    """`bbprobe status` shows the campaign's rule, start and sessions done, and flags an hourly
    band short of its sessions."""
    world = World({3: 1})
    store_dir = fast_config.parent / "state"
    _run(world, store_dir, 20)
    done = subprocess.run([sys.executable, "-m", "agent", "--config", str(fast_config),
                           "status", "--no-check"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "campaign: rule 96in24h started 2026-01-14 23:00 UTC, 19/96 sessions" in done.stdout
    assert "03h 3/4 !" in done.stdout and "00h 4/4" in done.stdout


def test_the_campaign_rules_are_the_names_a_config_accepts() -> None:
    """spec.CAMPAIGN_RULES, the one table the daemon plans by and the collector certifies
    by, has a rule for each name a config or a health report may carry, and no other."""
    assert tuple(CAMPAIGN_RULES) == get_args(CampaignRuleName)
    assert all(rule.name == name for name, rule in CAMPAIGN_RULES.items())
    assert campaign_rule(DEFAULT_CAMPAIGN_RULE) == DEFAULT_CAMPAIGN_RULE


def test_unit_is_a_notify_daemon_with_a_watchdog() -> None:
    """The shipped systemd unit runs ``bbprobe daemon`` as Type=notify with a watchdog,
    reloads with SIGHUP and gives a stop 30 s."""
    """The shipped agent unit runs `daemon` as Type=notify with a watchdog, reloads with SIGHUP
    and stops within 30 s."""
    unit = (Path(__file__).resolve().parents[2] / "systemd" /
            "bbprobe-agent.service").read_text()
    for line in ("Type=notify", "WatchdogSec=5min", "ExecReload=/bin/kill -HUP $MAINPID",
                 "TimeoutStopSec=30s"):
        assert line in unit.splitlines(), line
    assert " daemon" in next(x for x in unit.splitlines() if x.startswith("ExecStart="))
