"""The alerter (issue 16): a background task of every collector process with the store
(roles "all" and "ingest"), when ``[alerts] enabled``.

Every ``alerts.interval_s``:

1. **Evaluate**, on a database thread: the triggers of collector/alerts.py over the
   store's state (the fleet rows, the probes' health reports, each contracted line's
   newest session, the InfluxDB dead letters). A completed campaign is certified once
   per process. Each alert not raised before is recorded with a pending delivery for
   every notifier its kind is routed to, in one transaction; a key raised before (by this
   process, another one, or before a restart) is skipped, so an alert is raised once.
2. **Deliver**: lease the due deliveries (a process that dies leaves its leases to
   expire), send them concurrently, each within ``alerts.timeout_s``, and record each
   outcome: delivered; retried later with exponential backoff; or failed, after
   ``max_attempts`` or a refusal. The state is in the database, so a restart neither
   loses a delivery nor repeats one that was recorded as delivered.
3. Delete the alerts older than ``keep_days``, once an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from agent.schema import format_utc
from collector import alerts, control
from collector.alerts import Alert
from collector.compliance.certify import RULES, certify
from collector.config import CollectorConfig
from collector.notifiers import Notifier, Outcome
from collector.storage.model import AlertDelivery
from collector.storage.store import Store
from collector.web.base import StoreUnavailable

T = TypeVar("T")
log = logging.getLogger("bbprobe.collector")

LEASE_S = 120.0
BATCH = 50
PRUNE_EVERY_S = 3600.0
# A campaign certified without a breach is not certified again by this process for this
# long (its key stays in memory only that long).
CERTIFIED_FOR_S = 30 * 86400.0


def evaluate(store: Store, cfg: CollectorConfig, now: datetime, outbox: bool,
             certified: dict[tuple[str, str], datetime]) -> list[Alert]:
    """Every alert condition holding now (pure but for the store's reads)."""
    a = cfg.alerts
    probes = {p.name: p for p in store.probes() if p.revoked_at is None}
    out: list[Alert] = []
    for row in control.fleet_rows(store, cfg.fleet.silent_after_s, cfg.fleet.validity_days,
                                  now, versions=False):
        probe = probes.get(row["probe_id"])
        if probe is not None and (alert := alerts.silent(probe, row["last_seen"], now,
                                                         a.silent_after_s)):
            out.append(alert)
    for name, (_received, _skew, report) in store.health().items():
        probe = probes.get(name)
        if probe is None:
            continue
        for alert_ in (alerts.campaign_incomplete(probe, report, now),
                       alerts.agent_dead_letters(probe, report)):
            if alert_ is not None:
                out.append(alert_)
        done = alerts.completed_campaign(report)
        if done is None or (name, done[1]) in certified or done[0] not in RULES:
            continue
        rule, started, deadline = done
        facts = store.facts([name], since=started, until=deadline)
        cert = certify(name, probe.line, facts, RULES[rule], a.timezone)
        certified[(name, started)] = now
        if (alert_ := alerts.breach(probe, started, cert)) is not None:
            out.append(alert_)
    contracted = sorted(n for n, p in probes.items()
                        if p.line.download_min_kbps or p.line.upload_min_kbps)
    for last in store.latest_sessions(contracted) if contracted else []:
        out.extend(alerts.below_minimum(probes[last.probe_id], last,
                                        a.below_minimum_every_s))
    if outbox and (alert_ := alerts.influx_dead_letters(store.outbox_dead_count())):
        out.append(alert_)
    for key, at in list(certified.items()):
        if (now - at).total_seconds() > CERTIFIED_FOR_S:
            del certified[key]
    return out


def record(store: Store, found: Sequence[Alert], routes: Sequence[tuple[str, Sequence[str]]],
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
                                alerts.routed(alert.kind, routes))
        if ident is not None:
            ids.append(ident)
            log.info("alert %d: %s", ident, alert.subject)
    return ids


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

    @property
    def routes(self) -> list[tuple[str, Sequence[str]]]:
        return [(name, n.triggers) for name, n in self.notifiers.items()]

    async def supervise(self) -> None:
        """Tick every interval until cancelled; a failed tick (the database away) is
        logged and the next one tries again."""
        while True:
            try:
                await self.tick()
            except Exception as exc:  # the database away, a bug: the next tick retries
                log.warning("alerts: %s: %s", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "",
                            exc_info=not isinstance(exc, StoreUnavailable))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.alerts.interval_s):
                    await self.wake.wait()
            self.wake.clear()

    async def tick(self, now: datetime | None = None) -> None:
        moment = now or datetime.now(UTC)
        cfg, certified, outbox = self.cfg, self.certified, self.outbox
        found = await self.run(lambda s: evaluate(s, cfg, moment, outbox, certified))
        routes = self.routes
        await self.run(lambda s: record(s, found, routes, format_utc(moment)))
        await self.deliver()
        if self.pruned_at is None or (moment - self.pruned_at).total_seconds() > PRUNE_EVERY_S:
            before = format_utc(moment - timedelta(days=cfg.alerts.keep_days))
            await self.run(lambda s: s.prune_alerts(before))
            self.pruned_at = moment

    async def deliver(self) -> int:
        """Send every due delivery (in leased batches); how many were sent."""
        sent = 0
        while True:
            now = datetime.now(UTC)
            lease = partial(_lease, owner=self.owner, now=format_utc(now),
                            until=format_utc(now + timedelta(seconds=LEASE_S)))
            due: list[AlertDelivery] = await self.run(lease)
            if not due:
                return sent
            async with asyncio.TaskGroup() as group:
                for row in due:
                    group.create_task(self._one(row))
            sent += len(due)

    async def _one(self, row: AlertDelivery) -> None:
        notifier = self.notifiers.get(row.notifier)
        if notifier is None:
            # A notifier removed from the config since: its deliveries end here.
            outcome = Outcome("failed", "no such notifier in the config any more")
        else:
            try:
                outcome = await notifier.send(row.alert_id, row.created_at, as_alert(row))
            except Exception as exc:  # a notifier's bug costs its delivery, never the rest
                log.warning("alert %d to %s: %s", row.alert_id, row.notifier, exc,
                            exc_info=True)
                outcome = Outcome("retry", f"{type(exc).__name__}: {exc}"[:300])
        a = self.cfg.alerts
        attempts = row.attempts + 1
        now = datetime.now(UTC)
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
        await self.run(lambda s: s.finish_delivery(
            row.alert_id, row.notifier, owner, "pending" if state == "retry" else state,
            attempts, format_utc(next_at), outcome.error,
            format_utc(now) if state == "delivered" else None))


def _lease(store: Store, *, owner: str, now: str, until: str) -> list[AlertDelivery]:
    return store.lease_deliveries(owner, now, until, BATCH)
