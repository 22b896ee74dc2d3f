"""``bbprobe daemon``: campaigns back to back, as the systemd service (Type=notify).

Owns one loop: plan the next slot (agent/schedule.py), sleep until it (an asyncio wait on
the stop/reload events: no CPU while idle), measure, spool and deliver, record the
session in the campaign, save the campaign. SIGTERM stops it cleanly (the session in
progress is cancelled, every unacknowledged result stays in the spool); SIGHUP reloads
the configuration before the next slot. systemd is told READY, RELOADING, STOPPING and
WATCHDOG through $NOTIFY_SOCKET (sd_notify(3)'s datagram protocol, no library needed).

The clock, the wait and the measurement are injected, so the whole campaign logic runs
in a test without sleeping (tests/agent/test_daemon.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent import schedule
from agent.schedule import Campaign, Window, next_free_slot

Clock = Callable[[], datetime]
# Measure once; returns (finished_at, counts_for_its_band).
Measure = Callable[[], Awaitable[tuple[datetime, bool]]]


def notify(message: str) -> None:
    """sd_notify(3): one datagram to $NOTIFY_SOCKET; silently nothing outside systemd."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), address)
    except OSError:
        pass


@dataclass(slots=True)
class Control:
    """What the signal handlers ask of the loop."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reload: asyncio.Event = field(default_factory=asyncio.Event)


class CampaignStore:
    """The current campaign in state_dir/campaign.json (temp + rename)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / "campaign.json"

    def load(self) -> Campaign | None:
        try:
            return Campaign.from_json(json.loads(self.path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, campaign: Campaign) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(campaign.to_json()), encoding="utf-8")
            tmp.replace(self.path)
        except OSError:
            pass  # progress is also in the results themselves; a full disk must not stop us


@dataclass(frozen=True, slots=True)
class Plan:
    """The campaign the instruction in force asks for, and its suppression windows
    (issue 15); without a collector, the command line's."""

    rule: str = "96in24h"
    timezone: str = "Europe/Rome"
    window_days: int = 3
    windows: tuple[Window, ...] = ()

    def suppressed_until(self, moment: datetime) -> datetime | None:
        return schedule.suppressed_until(self.windows, moment)


# (campaign, suppressed until, next session) -> a health report sent.
Report = Callable[[Campaign | None, datetime | None, datetime | None], Awaitable[None]]


async def run_campaigns(
    control: Control, store: CampaignStore, measure: Measure, *, clock: Clock,
    wait: Callable[[datetime, Control], Awaitable[None]], rule: str = "96in24h",
    timezone: str = "Europe/Rome", window_days: int = 3, rng: random.Random | None = None,
    on_reload: Callable[[], None] | None = None, max_sessions: int | None = None,
    plan: Callable[[], Awaitable[Plan]] | None = None, report: Report | None = None,
    report_every_s: float = 3600.0, on_error: Callable[[str], None] | None = None,
) -> int:
    """The daemon's loop; returns the number of sessions run (until ``control.stop``, or
    ``max_sessions`` for tests).

    ``plan`` is asked before every planning step and again when a slot is reached, so
    an instruction or a suppression changed while the daemon waits applies to the next
    session. ``report`` is called at least every ``report_every_s`` (the wait is cut
    short for it) and after every session. Neither may stop the daemon: an exception
    from either is passed to ``on_error`` and the last good plan is kept."""
    rng = rng or random.Random()
    last_plan = Plan(rule, timezone, window_days)
    sessions = 0
    campaign = store.load()
    pending: tuple[datetime, Plan] | None = None  # the planned slot, and under what plan
    last_report: datetime | None = None
    every = timedelta(seconds=report_every_s)

    async def planned() -> Plan:
        nonlocal last_plan
        if plan is not None:
            try:
                last_plan = await plan()
            except Exception as exc:  # the daemon outlives a bad plan
                if on_error is not None:
                    on_error(f"planning failed, keeping the last plan: {exc}")
        return last_plan

    async def reported(campaign: Campaign | None, until: datetime | None,
                       next_at: datetime | None) -> None:
        nonlocal last_report
        now = clock()
        if report is None:
            return
        last_report = now
        try:
            await report(campaign, until, next_at)
        except Exception as exc:  # a report is never worth the daemon
            if on_error is not None:
                on_error(f"health report failed: {exc}")

    def due(now: datetime) -> bool:
        # A clock stepped back puts the last report in the future: report again now.
        return report is not None and (last_report is None or now - last_report >= every
                                       or now < last_report)

    def woken() -> bool:
        """After a wait: True when the loop must plan again (a reload was asked)."""
        if control.reload.is_set():
            control.reload.clear()
            if on_reload is not None:
                on_reload()
            return True
        return False

    while not control.stop.is_set() and (max_sessions is None or sessions < max_sessions):
        current = await planned()
        now = clock()
        fresh = False
        if campaign is None or campaign.rule != current.rule or \
                campaign.timezone != current.timezone or \
                campaign.window_days != current.window_days or campaign.complete or \
                now >= campaign.deadline():
            campaign = Campaign(started_at=now, rule=current.rule, timezone=current.timezone,
                                window_days=current.window_days)
            store.save(campaign)
            pending, fresh = None, True
        if pending is None or pending[1] != current or pending[0] < now:
            at = next_free_slot(campaign, now, rng, current.windows)
            pending = (at, current) if at is not None else None
        if pending is None:
            if not fresh:
                campaign = None
                continue
            # Even a new campaign has no free slot: suppressed throughout. Report, wait
            # for the window to end (or the next report), then plan again.
            until = current.suppressed_until(now)
            if due(now):
                await reported(campaign, until, None)
            await wait(min(until or now + every, now + every), control)
            if control.stop.is_set():
                break
            woken()
            pending, campaign = None, None
            continue
        at = pending[0]
        if due(now):
            await reported(campaign, current.suppressed_until(now), at)
        wake = at if report is None or last_report is None else \
            min(at, max(last_report, now) + every)
        await wait(wake, control)
        if control.stop.is_set():
            break
        if woken():
            pending = None
            continue  # re-plan under the new configuration
        if clock() < at:
            continue  # woke to report; plan again under the newest instruction
        latest = await planned()
        pending = None
        if latest.suppressed_until(clock()) is not None or \
                latest.suppressed_until(at) is not None:
            # A window made while we waited covers the slot: no session (LMAP's
            # suppression); the band still needs it and is planned again after.
            campaign.suppressed += 1
            store.save(campaign)
            continue
        finished, counted = await measure()
        campaign.record(finished, counted, started=at)
        store.save(campaign)
        sessions += 1
        await reported(campaign, None, None)
    return sessions


async def real_wait(at: datetime, control: Control) -> None:
    """Sleep until ``at`` or until a stop or reload is asked (no polling)."""
    delay = (at - datetime.now(UTC)).total_seconds()
    if delay <= 0:
        return
    stop = asyncio.ensure_future(control.stop.wait())
    reload = asyncio.ensure_future(control.reload.wait())
    try:
        await asyncio.wait({stop, reload}, timeout=delay,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        reload.cancel()


async def watchdog(interval_s: float, control: Control) -> None:
    while not control.stop.is_set():
        notify("WATCHDOG=1")
        try:
            async with asyncio.timeout(interval_s):
                await control.stop.wait()
        except TimeoutError:
            continue


def install_signals(control: Control) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, control.stop.set)
    loop.add_signal_handler(signal.SIGINT, control.stop.set)
    loop.add_signal_handler(signal.SIGHUP, control.reload.set)


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec (WATCHDOG_USEC), when this process is the one
    watched."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def utc_clock() -> datetime:
    return datetime.now(UTC)


def slot_counts(results: Sequence[object]) -> bool:
    """A campaign slot fills its band (once) when each of its sessions counts: its one
    session, or under server.address_family = "both" the IPv4 and the IPv6 session
    alike. Dual stack asks for evidence over both families, so a slot that has only
    one is measured again, like any failed slot (agent/schedule.py)."""
    return bool(results) and all(session_counts(r) for r in results)


def session_counts(result: object) -> bool:
    """A session fills its band when it is valid and whole: a successful download, a
    successful upload and a ping train that sent packets (as the collector's
    certificate counts it)."""
    valid = getattr(result, "valid", True)
    transfers = getattr(result, "transfers", ())
    ok = {t.direction for t in transfers if t.status == "ok"}
    ping = getattr(result, "ping", None)
    pinged = ping is not None and ping.summary.packets_sent > 0
    return bool(valid) and ok == {"download", "upload"} and pinged

