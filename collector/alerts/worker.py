"""The alerter: a background task of every collector process with the store
(roles "all" and "ingest"), when ``[alerts] enabled``.

Every ``alerts.interval_s``:

1. **Evaluate**, on a database thread: the triggers of collector/alerts/rules.py over the
   store's state (the fleet rows, the probes' health reports, each contracted line's
   newest session, the InfluxDB dead letters). Each alert not raised before is recorded
   with a pending delivery for every notifier its kind is routed to, in one
   transaction; a key raised before (by this process, another one, or before a
   restart) is skipped, so an alert is raised once. A silent probe heard again
   resolves its silence's alert: a "resolved" alert of the same kind (so it reaches
   the notifiers the silence reached), keyed on the silence's, so once per silence.
2. **Deliver**: lease the due deliveries to the notifiers this process knows (a process
   that dies leaves its leases to expire; one that stops gives them back), send them
   concurrently, each within ``alerts.timeout_s``, and record each outcome: delivered;
   retried later with exponential backoff; or failed, after ``max_attempts`` or a
   refusal. The state is in the database, so a restart loses no delivery; a delivery is
   at least once (a process killed between the receiver's answer and recording it sends
   again: receivers drop a repeated X-Bbprobe-Alert-Id).
3. Delete the alerts older than ``keep_days``, once an hour (a condition that still
   holds is then announced again: a reminder).

A completed campaign is certified when its probe's health report says so: at once, in
the request that brings the report (``on_report``), and again by every tick while the
report stands, until a final verdict (breach or no breach) is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from agent.schema import format_utc
from agent.spec import CAMPAIGN_RULES, DEFAULT_CAMPAIGN_RULE
from collector import unreadable
from collector.alerts import rules as alerts
from collector.alerts.notifiers import APPRISE_THREADS, Notifier, Outcome
from collector.alerts.rules import Alert
from collector.compliance.certify import certify, families
from collector.compliance.facts import SessionFacts
from collector.config import AlertsConfig, CollectorConfig
from collector.errors import StoreError, StoreFault
from collector.fleet import control
from collector.lines import contract_for
from collector.storage.model import AlertDelivery, Probe
from collector.storage.store import (
    AlertStore,
    ContractStore,
    OutboxStore,
    ProbeStore,
    ReportStore,
    Store,
)

log = logging.getLogger("bbprobe.collector")


class Watched(control.ProbedFleet, ReportStore, OutboxStore, AlertStore, ContractStore,
              Protocol):
    """What the alert conditions are read from: the probes, the fleet's health and
    activity, the sessions' facts, the outbox's dead letters, the silences raised (to
    resolve them)."""


class Certifying(ProbeStore, ReportStore, AlertStore, ContractStore, Protocol):
    """A completed campaign certified from its facts, and its breach recorded."""


BATCH = 50
PRUNE_EVERY_S = 3600.0
# A campaign certified to a final verdict is not certified again by this process for
# this long (its key stays in memory only that long).
CERTIFIED_FOR_S = 30 * 86400.0


def lease_s(cfg: AlertsConfig) -> float:
    """A lease outlives the batch it covers. Webhook sends run at once, each within
    timeout_s; Apprise's run APPRISE_THREADS at a time, so a batch to one Apprise
    notifier takes up to ceil(BATCH / APPRISE_THREADS) timeouts; twice that, and a
    minute for the database, before another process may take the rows over."""
    rounds = -(-BATCH // APPRISE_THREADS) if cfg.apprise else 1
    return 2 * rounds * cfg.timeout_s + 60.0


def routes(cfg: AlertsConfig) -> list[tuple[str, Sequence[str]]]:
    """(notifier, triggers) of the configured notifiers (from the config alone)."""
    return [*((w.name, w.triggers) for w in cfg.webhooks),
            *((a.name, a.triggers) for a in cfg.apprise)]


class Judging(ReportStore, ContractStore, Protocol):
    """A line's sessions and its contract history (each session judged by its own)."""


def certify_campaign(store: Judging, probe: Probe, report: Mapping[str, Any],
                     timezone: str, now: datetime
                     ) -> tuple[tuple[str, str] | None, list[Alert]]:
    """Certify the campaign a report says is complete: (its key, when every verdict is
    final, else None; the breach alerts). A dual-stack line is certified once per IP
    version (each slot measured once over each: a campaign per family). "incomplete"
    (its last sessions not delivered yet, or bands counted in another time zone) is not
    final."""
    done = alerts.completed_campaign(report, now)
    if done is None or done[0] not in CAMPAIGN_RULES:
        return None, []
    rule, started, deadline = done
    facts = store.facts([probe.name], since=started, until=deadline)
    history = store.line_contracts(probe.name)
    final, found = True, []
    # A dual-stack line: a campaign per family, both certified (one whose sessions
    # have not all arrived is incomplete, not final).
    split: list[str | None] = list(families(facts)) or [None]
    for fam in split:
        cert = certify(probe.name, probe.line,
                       [f for f in facts if fam is None or f.address_family == fam],
                       CAMPAIGN_RULES[rule], timezone, family=fam, contracts=history)
        if cert.verdict == "incomplete" and not cert.contract_changed:
            # A campaign over a change of contract stays without a verdict: final.
            final = False
        elif (breach := alerts.breach(probe, started, cert)) is not None:
            found.append(breach)
    return ((probe.name, started) if final else None), found


def _unfilled(store: ReportStore, probe: Probe, started: str, rule_name: str,
              timezone: str) -> set[int]:
    """The hour bands of a campaign not yet filled, from the stored sessions."""
    rule = CAMPAIGN_RULES.get(rule_name, CAMPAIGN_RULES[DEFAULT_CAMPAIGN_RULE])
    cert = certify(probe.name, probe.line, store.facts([probe.name], since=started),
                   rule, timezone)
    return {h for h, n in enumerate(cert.band_counts) if n < rule.per_band}


def evaluate(store: Watched, cfg: CollectorConfig, now: datetime, outbox: bool,
             certified: Mapping[tuple[str, str], datetime]
             ) -> tuple[list[Alert], list[tuple[str, str]]]:
    """Every alert condition holding now, and the campaigns certified to a final verdict
    on the way (to be remembered once the alerts are recorded). Reads only."""
    a = cfg.alerts
    probes = {p.name: p for p in store.probes() if p.revoked_at is None}
    out: list[Alert] = []
    final: list[tuple[str, str]] = []
    # validity_days=0: the rows' validity counts are not needed here (and cost a scan).
    rows = control.fleet_rows(store, cfg.fleet.silent_after_s, 0, now, versions=False)
    for row in rows:
        probe = probes.get(row["probe_id"])
        with _per_row("results", row["probe_id"]):
            if probe is not None and (alert := alerts.silent(probe, row["last_seen"], now,
                                                             cfg.fleet.silent_after_s)):
                out.append(alert)
    out.extend(_resolved(store, probes, {r["probe_id"]: r["last_seen"] for r in rows}))
    for name, (_received, _skew, report) in store.health().items():
        probe = probes.get(name)
        if probe is None:
            continue
        with _per_row("health", name):
            final.extend(_from_report(store, cfg, probe, report, now, certified, out))
    contracted = sorted(n for n, p in probes.items()
                        if p.line.download_min_kbps or p.line.upload_min_kbps)
    for last in store.latest_sessions(contracted) if contracted else []:
        with _per_row("results", last.result_id):
            out.extend(below_minimum(store, probes[last.probe_id], last,
                                     a.below_minimum_every_s))
    # Read once (a count read apart could disagree with a retry in between).
    letters = store.outbox_dead_letters() if outbox else []
    if letters and (dead := alerts.influx_dead_letters(len(letters),
                                                       letters[-1]["failed_at"])):
        out.append(dead)
    return out, final


def below_minimum(store: ContractStore, probe: Probe, last: SessionFacts,
                  every_s: float) -> list[Alert]:
    """The below-minimum warnings of a probe's latest session, against the contract in
    force when it started (a session measured before the minimum was raised is judged by
    the minimum of then; one from before the first version, by the first). A line with
    no history is judged by its figures now."""
    history = store.line_contracts(probe.name)
    if not history:
        return alerts.below_minimum(probe, last, every_s)
    # Measured before the line's first version (a probe's clock set back, results older
    # than its registration): judged as certificates judge it (lines.contract_for).
    found = contract_for(history, last.started_at)
    return alerts.below_minimum(probe, last, every_s, found)


def _resolved(store: AlertStore, probes: Mapping[str, Probe],
              last_seen: Mapping[str, str | None]) -> list[Alert]:
    """The resolutions due: a silence alert with none yet whose probe has been heard
    since (a revoked probe's silence stays open; rotating its token re-enables it)."""
    kept = store.alerts_of_kind("probe_silent")
    done = {key for key, _probe, _details in kept if key.endswith(alerts.RESOLVED_SUFFIX)}
    out = []
    for key, name, details in kept:
        probe = probes.get(name or "")
        if probe is None or key.endswith(alerts.RESOLVED_SUFFIX) or \
                key + alerts.RESOLVED_SUFFIX in done:
            continue
        with _per_row("alerts", key):
            if (back := alerts.back(probe, key, details, last_seen.get(probe.name))):
                out.append(back)
    return out


@contextlib.contextmanager
def _per_row(table: str, row: str) -> Iterator[None]:
    """One probe's row that a trigger cannot interpret costs that probe's alert, never
    the tick: every other probe's silence, breach or dead letters still alert (a result
    dated 0999 made every tick fail, so no probe could raise anything)."""
    try:
        yield
    except (ValueError, TypeError, KeyError, ArithmeticError, AttributeError) as exc:
        unreadable.skipped(table, row, exc)


def _from_report(store: Judging, cfg: CollectorConfig, probe: Probe,
                 report: Mapping[str, Any], now: datetime,
                 certified: Mapping[tuple[str, str], datetime],
                 out: list[Alert]) -> list[tuple[str, str]]:
    """The alerts one probe's health report raises (into ``out``); the campaigns it
    certified to a final verdict."""
    a = cfg.alerts
    name = probe.name
    final: list[tuple[str, str]] = []
    if (dead := alerts.agent_dead_letters(probe, report)) is not None:
        out.append(dead)
    opened = alerts.open_campaign(report, now)
    if opened is not None:
        started, deadline, unfilled = opened
        # Within a day of the deadline, counting hours is not enough (the bands left
        # must be the ones still to come): ask the stored sessions which they are,
        # and trust them only when they agree with the probe's own count (sessions
        # still in its spool, or bands counted in another time zone, would not).
        bands: set[int] | None = None
        if (deadline - now).total_seconds() < 86400 and unfilled > 0:
            rule_name = str(report["campaign"].get("rule", DEFAULT_CAMPAIGN_RULE))
            stored = _unfilled(store, probe, started, rule_name, a.timezone)
            bands = stored if len(stored) == unfilled else None
        late = alerts.campaign_incomplete(probe, report, now, bands,
                                          ZoneInfo(a.timezone) if bands is not None else None)
        if late is not None:
            out.append(late)
    done = alerts.completed_campaign(report, now)
    if done is not None and (name, done[1]) not in certified:
        key, breaches = certify_campaign(store, probe, report, a.timezone, now)
        if key is not None:
            final.append(key)
        out.extend(breaches)
    return final


def record(store: AlertStore, found: Sequence[Alert], routes_: Sequence[tuple[str, Sequence[str]]],
           now: str) -> list[int]:
    """Record the alerts not raised before; their ids."""
    known = store.alert_keys([f.key for f in found])
    ids = []
    for alert in found:
        if alert.key in known:
            continue
        ident = store.add_alert(alert.key, alert.kind, alert.probe, alert.severity, now,
                                alert.subject, json.dumps(dict(alert.details),
                                                          sort_keys=True),
                                alerts.routed(alert.kind, routes_))
        if ident is not None:
            ids.append(ident)
            # WARNING: the level the collector's log shows (it configures no handler).
            log.warning("alert %d %s: %s", ident,
                        "resolved" if alert.status == "resolved" else "raised", alert.subject)
    return ids


def on_report(store: Certifying, cfg: CollectorConfig, probe_name: str,
              report: Mapping[str, Any], now: datetime) -> bool:
    """A health report just stored: if it says a campaign is complete, certify it now
    and record a breach (the next report, a session later, will speak of the next
    campaign). True if an alert was raised."""
    if not cfg.alerts.enabled or alerts.completed_campaign(report, now) is None:
        return False
    probe = store.probe(probe_name)
    if probe is None:
        return False
    _key, breaches = certify_campaign(store, probe, report, cfg.alerts.timezone, now)
    return bool(breaches and record(store, breaches, routes(cfg.alerts), format_utc(now)))


def as_alert(row: AlertDelivery) -> Alert:
    return Alert(row.kind, row.key, row.probe, row.severity,  # type: ignore[arg-type]
                 row.subject, json.loads(row.details))


@dataclass(slots=True)
class Alerter:
    cfg: CollectorConfig
    notifiers: Mapping[str, Notifier]
    run: Callable[[Callable[[Store], Any]], Awaitable[Any]]
    outbox: bool = False
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:"
                                                f"{uuid.uuid4().hex[:8]}")
    certified: dict[tuple[str, str], datetime] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pruned_at: datetime | None = None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    async def supervise(self) -> None:
        """Tick every interval until cancelled; a failed tick (the database away) is
        logged and the next one tries again."""
        while True:
            try:
                await self.tick()
            except Exception as exc:  # the database away, a bug: the next tick retries
                log.warning("alerts: %s: %s", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "",
                            exc_info=isinstance(exc, StoreFault)
                            or not isinstance(exc, StoreError | OSError))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.alerts.interval_s):
                    await self.wake.wait()
            self.wake.clear()

    async def tick(self) -> None:
        moment = self.clock()
        cfg, certified, outbox = self.cfg, self.certified, self.outbox
        found, final = await self.run(lambda s: evaluate(s, cfg, moment, outbox, certified))
        routes_ = routes(cfg.alerts)
        await self.run(lambda s: record(s, found, routes_, format_utc(moment)))
        # Remembered once its alert (if any) is recorded: a failure above retries it.
        for key in final:
            certified[key] = moment
        for key, at in list(certified.items()):
            if (moment - at).total_seconds() > CERTIFIED_FOR_S:
                del certified[key]
        await self.deliver()
        if self.pruned_at is None or (moment - self.pruned_at).total_seconds() > PRUNE_EVERY_S:
            before = format_utc(moment - timedelta(days=cfg.alerts.keep_days))
            await self.run(lambda s: s.prune_alerts(before))
            self.pruned_at = moment

    async def deliver(self, alert_id: int | None = None) -> int:
        """Send every due delivery to the notifiers this process knows (only those of
        ``alert_id`` if given), in leased batches; how many were sent."""
        sent = 0
        names = sorted(self.notifiers)
        while True:
            now = self.clock()
            lease = partial(_lease, owner=self.owner, now=format_utc(now),
                            until=format_utc(now + timedelta(seconds=lease_s(
                                self.cfg.alerts))),
                            notifiers=names, alert_id=alert_id)
            due: list[AlertDelivery] = await self.run(lease)
            if not due:
                return sent
            async with asyncio.TaskGroup() as group:
                for row in due:
                    group.create_task(self._one(row))
            sent += len(due)

    async def release(self) -> None:
        """Give this process's leases back (it is stopping)."""
        owner = self.owner
        await self.run(lambda s: s.release_deliveries(owner))

    async def _one(self, row: AlertDelivery) -> None:
        notifier = self.notifiers[row.notifier]
        try:
            outcome = await notifier.send(row.alert_id, row.created_at, as_alert(row))
        except Exception as exc:  # a notifier's bug costs its delivery, never the rest
            log.warning("alert %d to %s: %s", row.alert_id, row.notifier, exc,
                        exc_info=True)
            outcome = Outcome("retry", f"{type(exc).__name__}: {exc}"[:300])
        a = self.cfg.alerts
        attempts = row.attempts + 1
        now = self.clock()
        state = outcome.state
        if state == "retry" and attempts >= a.max_attempts:
            state = "failed"
        next_at = now + timedelta(seconds=alerts.retry_delay_s(
            attempts, a.retry_min_s, a.retry_max_s)) if state == "retry" else now
        if state != "delivered":
            log.warning("alert %d to %s: %s (%s, attempt %d)", row.alert_id, row.notifier,
                        outcome.error, "will retry" if state == "retry" else "given up",
                        attempts)
        owner = self.owner
        kept = await self.run(lambda s: s.finish_delivery(
            row.alert_id, row.notifier, owner, "pending" if state == "retry" else state,
            attempts, format_utc(next_at), outcome.error,
            format_utc(now) if state == "delivered" else None))
        if not kept:
            log.warning("alert %d to %s: the lease ran out before the outcome (%s) was "
                        "recorded; another process may send it again", row.alert_id,
                        row.notifier, state)


def _lease(store: AlertStore, *, owner: str, now: str, until: str, notifiers: Sequence[str],
           alert_id: int | None) -> list[AlertDelivery]:
    return store.lease_deliveries(owner, now, until, BATCH, notifiers, alert_id)
