"""``bbprobe daemon``: campaigns back to back, as the systemd service (Type=notify).

Owns one loop: plan the next slot (agent/schedule.py), sleep until it (an asyncio wait on
the stop/reload events: no CPU while idle), measure, spool and deliver (agent/app/runner.py),
record the session in the campaign, save the campaign. SIGTERM stops it cleanly (the
session in progress is cancelled, every unacknowledged result stays in the spool); SIGHUP
rereads the configuration before the next slot. systemd is told READY, RELOADING,
STOPPING and WATCHDOG through $NOTIFY_SOCKET (sd_notify(3)'s datagram protocol, no
library needed).

``run_campaigns`` is the loop with its clock, wait and measurement injected, so the whole
campaign logic runs in a test without sleeping (tests/agent/test_daemon.py); ``Daemon``
gives it the real ones. Every task the daemon starts belongs to a TaskGroup, and every
step has a deadline: a slot's session and delivery ``slot_deadline_s``, the instruction
fetch control.FETCH_TIMEOUT_S, a health report runner.HEALTH_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from agent import __version__, metrics, schedule, spec
from agent.app.daemonlog import DaemonLog, log
from agent.app.runner import Lines, Measured, Runner, daemon_client
from agent.config import AgentConfig
from agent.control import Applied
from agent.errors import AgentError, ConfigError, DeliveryError
from agent.schedule import Campaign, Window, next_free_slot
from agent.spec import DEFAULT_CAMPAIGN_RULE, CampaignRuleName
from agent.tickets import Offer

Clock = Callable[[], datetime]
# Measure once under a plan; returns (finished_at, counts_for_its_band).
Measure = Callable[["Plan"], Awaitable[tuple[datetime, bool]]]


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
    """The campaign the instruction in force asks for, its suppression windows (LMAP's
    suppression), and the config the next session measures with; without a collector,
    the command line's. Two plans are the same plan when their campaign and windows are:
    a planned slot stands until one of those changes."""

    rule: CampaignRuleName = DEFAULT_CAMPAIGN_RULE
    timezone: str = "Europe/Rome"
    window_days: int = 3
    windows: tuple[Window, ...] = ()
    # The local config under the instruction this plan was made from (None: the local
    # config alone, as when no plan could be made yet).
    applied: Applied | None = field(default=None, compare=False)

    def suppressed_until(self, moment: datetime) -> datetime | None:
        return schedule.suppressed_until(self.windows, moment)


# (campaign, suppressed until, next session) -> a health report sent.
Report = Callable[[Campaign | None, datetime | None, datetime | None], Awaitable[None]]
# (campaign, the slot planned or None, suppressed until) -> said in the log.
Planned = Callable[[Campaign, datetime | None, datetime | None], None]


async def run_campaigns(
    control: Control, store: CampaignStore, measure: Measure, *, clock: Clock,
    wait: Callable[[datetime, Control], Awaitable[None]],
    rule: CampaignRuleName = DEFAULT_CAMPAIGN_RULE,
    timezone: str = "Europe/Rome", window_days: int = 3, rng: random.Random | None = None,
    on_reload: Callable[[], None] | None = None, max_sessions: int | None = None,
    plan: Callable[[], Awaitable[Plan]] | None = None, report: Report | None = None,
    report_every_s: float = 3600.0, on_error: Callable[[str], None] | None = None,
    first_now: bool = False, on_planned: Planned | None = None,
) -> int:
    """The daemon's loop; returns the number of sessions run (until ``control.stop``, or
    ``max_sessions`` for tests).

    ``plan`` is asked before every planning step and again when a slot is reached, so
    an instruction or a suppression changed while the daemon waits applies to the next
    session: ``measure`` is handed the plan asked at the slot. ``report`` is called at
    least every ``report_every_s`` (the wait is cut short for it) and after every
    session. Neither may stop the daemon: an exception from either is passed to
    ``on_error`` and the last good plan is kept. ``first_now``: the first slot is now
    (a campaign slot like any other, counted in its band) when the plan's rules allow a
    session now (schedule.why_not_now: the band still needs one, none yet in this
    quarter hour, no suppression window); else the first free slot, and ``on_error``
    hears why. ``on_planned`` hears
    each slot once as it is planned, and each suppression that leaves no slot."""
    rng = rng or random.Random()
    last_plan = Plan(rule, timezone, window_days)
    sessions = 0
    campaign = store.load()
    pending: tuple[datetime, Plan] | None = None  # the planned slot, and under what plan
    announced: tuple[datetime, Plan] | None = None  # the last slot on_planned heard
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

    def heard(campaign: Campaign, at: datetime | None, until: datetime | None) -> None:
        if on_planned is not None:
            try:
                on_planned(campaign, at, until)
            except Exception as exc:  # a log line is never worth the daemon
                if on_error is not None:
                    on_error(f"logging the plan failed: {exc}")

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
        if first_now:
            # Now only where the plan could have put a slot: a restart right after a
            # slot (or a restart loop) must not stack counted sessions in one quarter.
            why = schedule.why_not_now(campaign, now, current.windows)
            if why is None:
                pending = (now, current)
            elif on_error is not None:
                on_error(f"--first-now: {why}; the first session is the next free slot")
            first_now = False
        if pending is None or pending[1] != current or pending[0] < now:
            at = next_free_slot(campaign, now, rng, current.windows)
            pending = (at, current) if at is not None else None
        if pending is not None and pending is not announced:
            announced = pending
            heard(campaign, pending[0], None)
        if pending is None:
            if not fresh:
                campaign = None
                continue
            # Even a new campaign has no free slot: suppressed throughout. Report, wait
            # for the window to end (or the next report), then plan again.
            until = current.suppressed_until(now)
            heard(campaign, None, until)
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
            heard(campaign, None, latest.suppressed_until(at) or
                  latest.suppressed_until(clock()))
            store.save(campaign)
            continue
        finished, counted = await measure(latest)
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
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay), asyncio.TaskGroup() as group:
            waits = [group.create_task(event.wait())
                     for event in (control.stop, control.reload)]
            for task in waits:
                task.add_done_callback(lambda _: _cancel(waits))


def _cancel(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()


async def watchdog(interval_s: float, control: Control) -> None:
    """WATCHDOG=1 every ``interval_s`` until the stop."""
    while not control.stop.is_set():
        notify("WATCHDOG=1")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await control.stop.wait()


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
    transfers = getattr(result, "transfers", ())
    ping = getattr(result, "ping", None)
    return schedule.fills_band(bool(getattr(result, "valid", True)),
                               (t.direction for t in transfers if t.status == "ok"),
                               ping.summary.packets_sent if ping is not None else 0)


# What a slot's measuring may take beyond its session(s), whose planned worst case,
# refusals included, fits spec.MAX_SESSION_S (agent/budget.py refuses a config that plans
# longer): the probe's name (a request timeout), and per session the host checks, name
# resolution, the spool's fsyncs and the event loop's own delays, which the budget does
# not plan.
SESSION_MARGIN_S = 60.0
# Delivery after the slot's sessions retries for at most DELIVERY_WAIT_S (the next slot
# must not wait on a collector that is away); a backlog left when its deadline passes waits
# in the spool for the next slot. It never changes whether the slot counted: its results
# were measured and spooled.
DELIVERY_WAIT_S = 30.0


def slot_deadline_s(cfg: AgentConfig) -> float:
    """A slot's liveness guarantee for its measuring, in seconds: past it the slot is cut
    and counts as a failed one (retried in its band) rather than hold the campaign."""
    sessions = 2 if cfg.server.address_family == "both" else 1
    return spec.MAX_SESSION_S + cfg.collector.timeout_s + sessions * SESSION_MARGIN_S


def delivery_deadline_s(cfg: AgentConfig) -> float:
    """How long the slot's delivery may take: the retry wait, then one last request."""
    return DELIVERY_WAIT_S + 2 * cfg.collector.timeout_s


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Sessions:
    """A slot's session(s), measured and spooled: what its delivery starts from."""

    applied: Applied
    named: str | None
    measured: Measured


@dataclass(frozen=True, slots=True)
class CampaignClock:
    """The campaign's clock: real time, or (labs, tests) ``scale`` times faster from
    ``origin``; measurements and timestamps stay real."""

    origin: datetime
    scale: float = 1.0

    def virtual(self, moment: datetime) -> datetime:
        return self.origin + (moment - self.origin) * self.scale

    def real(self, moment: datetime) -> datetime:
        return self.origin + (moment - self.origin) / self.scale

    def now(self) -> datetime:
        return self.virtual(datetime.now(UTC))

    async def wait(self, at: datetime, control: Control) -> None:
        await real_wait(self.real(at), control)


class Daemon:
    """The daemon's state between slots: the runner (config source and client, swapped
    whole by a reload), the campaign, the metrics, and what was last said, so each
    change is logged once."""

    def __init__(self, runner: Runner, cfg: AgentConfig, warn: Lines, *,
                 time_scale: float = 1.0) -> None:
        self.runner = runner
        self.cfg = cfg  # the local config (no instruction): state_dir, metrics, campaign
        self.warn = warn
        self.control = Control()
        self.clock = CampaignClock(datetime.now(UTC), time_scale)
        self.store = CampaignStore(cfg.state_dir)
        self.gauges = metrics.AgentMetrics(__version__, sessions={})
        self.in_force: Applied | None = None  # the last instruction fetched, as applied
        self._spent: Offer | None = None  # the ticket offer a session took already
        self._waiting = 0  # another identity's results, said once each time it changes
        self.said = DaemonLog(self.clock.real, warn)  # the log's lines (agent/app/daemonlog.py)

    def reload(self) -> None:
        """SIGHUP: reread the file and make a new client; a file or a token that will
        not do keeps the old configuration, said."""
        notify("RELOADING=1")
        try:
            source = self.runner.source.reread()
            cfg = source.load()
            self.runner = Runner(source, daemon_client(cfg), self.warn)
            self.cfg = cfg
            logging.getLogger("bbprobe").setLevel(cfg.log_level.upper())
            log.info("configuration reloaded")
        except AgentError as exc:
            self.warn(f"reload refused, keeping the old configuration: {exc}")
        notify("READY=1")

    async def plan(self) -> Plan:
        """Fetch the instruction (If-None-Match: cheap when unchanged) and rebuild the
        config under it: the next session runs with what it says."""
        applied = await self.runner.instructed(self.cfg)
        before = self.in_force
        if applied.error and applied.error != (before.error if before else None):
            self.warn(applied.error)
        self.said.instruction(applied, before)
        self.in_force = applied
        c = applied.cfg.campaign
        windows = tuple((self.clock.virtual(w.starts_at), self.clock.virtual(w.ends_at))
                        for w in applied.instruction.suppressions) \
            if applied.instruction is not None else ()
        return Plan(c.rule, c.timezone, c.window_days, windows, applied)

    async def report(self, campaign: Campaign | None, until: datetime | None,
                     next_at: datetime | None) -> None:
        """The health report: to the metrics, then to the collector."""
        spool = self.runner.spool(self.cfg)
        assert spool is not None  # the daemon's runner always has a client
        held = self.in_force
        report = self.runner.health(
            spool, mode="daemon", campaign=campaign or self.store.load(),
            instruction_version=held.version if held else None,
            instruction_error=held.error if held else None,
            suppressed_until=self.clock.real(until) if until else None,
            next_session_at=self.clock.real(next_at) if next_at else None)
        if report is not None:
            self.gauges.report = report
            metrics.publish(self.cfg.metrics.textfile, self.gauges, self.warn)
            await self.runner.send_health(report)

    async def session(self, plan: Plan) -> Sessions:
        """The slot's session(s) under ``plan``, measured and spooled; delivered after,
        under a deadline of its own (``deliver``)."""
        runner = self.runner
        applied = plan.applied or Applied(self.cfg, None, None, None)
        try:
            named = await runner.probe_id(applied.cfg)
        except DeliveryError as exc:
            # Refused mid-campaign: still measure; the results wait in the spool.
            self.warn(str(exc))
            named = None
        # The ticket that came with the instruction fetch, once (one a session).
        offer = None if applied.offer is self._spent else applied.offer
        self._spent = applied.offer
        measured = await runner.measure(applied, named, offer=offer, ticket_warn=self.warn,
                                        on_result=self.gauges.session)
        metrics.publish(self.cfg.metrics.textfile, self.gauges, self.warn)
        return Sessions(applied, named, measured)

    async def deliver(self, done: Sessions) -> None:
        """What the spool holds, to the collector (the slot's results first in line)."""
        spool = done.measured.spool
        assert spool is not None
        outcome = await self.runner.deliver(spool, done.applied.cfg, done.named,
                                            max_wait_s=DELIVERY_WAIT_S)
        self.said.delivered(outcome)
        if outcome.waiting != self._waiting:
            self._waiting = outcome.waiting
            self.runner.say_waiting(outcome, spool)

    async def _stoppable(self, work: Coroutine[Any, Any, T], deadline_s: float) -> T:
        """``work`` under a deadline, cancelled at once by a stop (SIGTERM: the results not
        yet acknowledged stay spooled; CancelledError). Its own exception comes out as
        itself, not in a group, so the caller classifies it."""
        async with asyncio.timeout(deadline_s):
            try:
                async with asyncio.TaskGroup() as group:
                    task = group.create_task(work)
                    stop = group.create_task(self.control.stop.wait())
                    stop.add_done_callback(lambda _: task.cancel())
                    task.add_done_callback(lambda _: stop.cancel())
            except BaseExceptionGroup as failed:
                raise failed.exceptions[0] from None
        if task.cancelled():
            raise asyncio.CancelledError  # stopped mid-way
        return task.result()

    def _cost_only_the_slot(self, error: BaseException, what: str) -> None:
        """A bug or an environment the session did not foresee costs the slot, never the
        daemon; a configuration or a token the collector refuses stops it."""
        if isinstance(error, (ConfigError, DeliveryError)) or not isinstance(error, Exception):
            raise error
        where = traceback.extract_tb(error.__traceback__)[-1]
        self.warn(f"{what} failed: {type(error).__name__}: {error} "
                  f"({where.filename}:{where.lineno})")

    async def measure(self, plan: Plan) -> tuple[datetime, bool]:
        """The slot: its session(s) under the slot's deadline, then delivery under its
        own. Whether the slot counts in its band is the sessions' verdict alone: a slot
        past its deadline, or whose session failed, is retried in its band; a delivery cut
        short leaves the rest in the spool for the next slot."""
        cfg = plan.applied.cfg if plan.applied is not None else self.cfg
        try:
            done = await self._stoppable(self.session(plan), slot_deadline_s(cfg))
        except TimeoutError:
            self.warn(f"session failed: not done in {slot_deadline_s(cfg):g} s; results "
                      "not yet acknowledged stay in the spool")
            return self.clock.now(), False
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            self._cost_only_the_slot(error, "session")
            return self.clock.now(), False
        counted = slot_counts(done.measured.results)
        self.said.delivering()
        try:
            await self._stoppable(self.deliver(done), delivery_deadline_s(done.applied.cfg))
        except TimeoutError:
            self.warn(f"delivery paused after {delivery_deadline_s(done.applied.cfg):g} s; "
                      "the rest waits in the spool for the next slot")
            self.said.delivery_cut()
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            self._cost_only_the_slot(error, "delivery")
        self.said.slot(done.measured.results, counted, done.measured.spool)
        return self.clock.now(), counted

    async def run(self, *, first_now: bool, report_every_s: float) -> int:
        """Until SIGTERM: the campaigns, the watchdog and GET /metrics. Returns 0."""
        install_signals(self.control)
        # Asked here only to refuse a bad token at start and to say who we are; each
        # session asks again (the collector may be away now and back later).
        probe_id = await self.runner.probe_id(self.cfg)
        self.gauges.probe_id = probe_id or ""
        # The metrics listener is bound from the file as read at start (a reload does
        # not move it): a port that cannot be bound stops the start, named.
        site = await metrics.serve(self.cfg.metrics.listen, self.gauges)
        failure: AgentError | None = None
        try:
            async with asyncio.TaskGroup() as group:
                interval = watchdog_interval()
                if interval:
                    group.create_task(watchdog(interval, self.control))
                notify("READY=1")
                who = f"as probe {probe_id}" if probe_id else (
                    "(probe name not known yet: the collector does not answer; asked at "
                    "each session)")
                log.info(f"daemon running {who}, rule {self.cfg.campaign.rule}")
                try:
                    await self._campaigns(first_now, report_every_s)
                except asyncio.CancelledError:
                    pass  # a stop during a session
                except AgentError as exc:
                    # Raised past the group, as itself: the CLI names it and exits with
                    # its code (a TaskGroup would wrap it in an ExceptionGroup).
                    failure = exc
                finally:
                    notify("STOPPING=1")
                    self.control.stop.set()
                    self.said.stopping(self.store.load())
        finally:
            if site is not None:
                await site.cleanup()
        if failure is not None:
            raise failure
        log.info("daemon stopped; unacknowledged results stay in the spool")
        return 0

    async def _campaigns(self, first_now: bool, report_every_s: float) -> None:
        c = self.cfg.campaign
        await run_campaigns(self.control, self.store, self.measure, clock=self.clock.now,
                            wait=self.clock.wait, rule=c.rule, timezone=c.timezone,
                            window_days=c.window_days, on_reload=self.reload,
                            plan=self.plan, report=self.report, on_error=self.warn,
                            report_every_s=report_every_s * self.clock.scale,
                            first_now=first_now, on_planned=self.said.planned)
