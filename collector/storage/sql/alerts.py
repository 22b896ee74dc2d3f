"""Alerts: each raised once (by its deduplication key), with a delivery per notifier
that one collector process at a time leases, sends and finishes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from collector.storage.model import AlertDelivery
from collector.storage.sql.base import SqlBase, Tx


class AlertQueries(SqlBase):
    """The alerts and alert_deliveries tables."""

    def add_alert(self, key: str, kind: str, probe: str | None, severity: str,
                  created_at: str, subject: str, details: str,
                  notifiers: Sequence[str]) -> int | None:
        """Record an alert and a pending delivery per notifier, in one transaction;
        None when an alert with ``key`` exists already (it was raised before)."""
        def work(tx: Tx) -> int | None:
            row = tx.one(
                "INSERT INTO alerts (dedup_key, kind, probe_name, severity, created_at, "
                "subject, details) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
                (key, kind, probe, severity, created_at, subject, details))
            if row is None:
                return None
            ident = int(row[0])
            tx.many("INSERT INTO alert_deliveries (alert_id, notifier, state, attempts, "
                    "next_at) VALUES (?, ?, 'pending', 0, ?)",
                    [(ident, name, created_at) for name in notifiers])
            return ident

        return self._transaction(work)

    def alert_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` were raised already."""
        if not keys:
            return set()
        clause, param = self.dialect.in_list("dedup_key", list(keys))
        return {r[0] for r in self._read(f"SELECT dedup_key FROM alerts WHERE {clause}",
                                         (param,))}

    def lease_deliveries(self, owner: str, now: str, until: str, limit: int,
                         notifiers: Sequence[str], alert_id: int | None = None
                         ) -> list[AlertDelivery]:
        """Pending deliveries due at ``now`` to one of ``notifiers`` (the ones this
        process can send: a delivery to a notifier it does not know waits for a process
        that does), that no live lease holds, leased to ``owner`` until ``until``
        (PostgreSQL skips rows another process is leasing), oldest first, with their
        alerts; only those of ``alert_id`` if given."""
        if not notifiers:
            return []

        def work(tx: Tx) -> list[AlertDelivery]:
            clause, param = self.dialect.in_list("notifier", list(notifiers))
            only, extra = ("AND alert_id = ? ", [alert_id]) if alert_id is not None \
                else ("", [])
            keys = tx.rows(
                "SELECT alert_id, notifier FROM alert_deliveries WHERE state = 'pending' "
                "AND next_at <= ? AND (leased_until IS NULL OR leased_until < ? OR "
                f"lease_owner = ?) AND {clause} {only}"
                "ORDER BY next_at, alert_id, notifier LIMIT ? "
                f"{self.dialect.skip_locked}", (now, now, owner, param, *extra, limit))
            out = []
            for ident, notifier in keys:
                tx.run("UPDATE alert_deliveries SET lease_owner = ?, leased_until = ? "
                       "WHERE alert_id = ? AND notifier = ?", (owner, until, ident, notifier))
                row = tx.one("SELECT d.attempts, a.dedup_key, a.kind, a.probe_name, "
                             "a.severity, a.created_at, a.subject, a.details "
                             "FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id "
                             "WHERE d.alert_id = ? AND d.notifier = ?", (ident, notifier))
                assert row is not None
                out.append(AlertDelivery(int(ident), notifier, int(row[0]), *row[1:]))
            return out

        return self._transaction(work)

    def finish_delivery(self, alert_id: int, notifier: str, owner: str, state: str,
                        attempts: int, next_at: str, error: str | None,
                        delivered_at: str | None) -> bool:
        """Record a send's outcome, if ``owner`` still holds the lease (False if not)."""
        return self._transaction(lambda tx: tx.run(
            "UPDATE alert_deliveries SET state = ?, attempts = ?, next_at = ?, "
            "last_error = ?, delivered_at = ?, lease_owner = NULL, leased_until = NULL "
            "WHERE alert_id = ? AND notifier = ? AND lease_owner = ?",
            (state, attempts, next_at, error, delivered_at, alert_id, notifier,
             owner))) == 1

    def release_deliveries(self, owner: str) -> int:
        """Give up ``owner``'s leases (a process stopping): others may send at once."""
        return self._transaction(lambda tx: tx.run(
            "UPDATE alert_deliveries SET lease_owner = NULL, leased_until = NULL "
            "WHERE lease_owner = ?", (owner,)))

    def alerts(self, limit: int, since: str | None = None,
               ident: int | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` alerts (since ``since``; or the one ``ident``), each with
        its deliveries."""
        params: list[Any]
        where, params = "1 = 1", []
        if ident is not None:
            where, params = "id = ?", [ident]
        elif since:
            where, params = self._scope(None, since, None, "created_at", named_only=True)
        with self._reading() as tx:
            rows = tx.rows(
                "SELECT id, dedup_key, kind, probe_name, severity, created_at, subject, "
                f"details FROM alerts WHERE {where} ORDER BY id DESC LIMIT ?", [*params, limit])
            out = []
            for r in rows:
                deliveries = [
                    {"notifier": d[0], "state": d[1], "attempts": d[2], "next_at": d[3],
                     "last_error": d[4], "delivered_at": d[5]}
                    for d in tx.rows(
                        "SELECT notifier, state, attempts, next_at, last_error, "
                        "delivered_at FROM alert_deliveries WHERE alert_id = ? "
                        "ORDER BY notifier", (r[0],))]
                out.append({"id": int(r[0]), "key": r[1], "kind": r[2], "probe": r[3],
                            "severity": r[4], "created_at": r[5], "subject": r[6],
                            "details": json.loads(r[7]), "deliveries": deliveries})
        return out

    def alerts_of_kind(self, kind: str) -> list[tuple[str, str | None, dict[str, Any]]]:
        """(key, probe, details) of every alert of ``kind`` kept (the alerter pairs a
        probe_silent alert with its resolution by key)."""
        return [(r[0], r[1], json.loads(r[2])) for r in self._read(
            "SELECT dedup_key, probe_name, details FROM alerts WHERE kind = ? ORDER BY id",
            (kind,))]

    def prune_alerts(self, before: str) -> int:
        """Delete the alerts created before ``before`` (and their deliveries)."""
        def work(tx: Tx) -> int:
            tx.run("DELETE FROM alert_deliveries WHERE alert_id IN "
                   "(SELECT id FROM alerts WHERE created_at < ?)", (before,))
            return tx.run("DELETE FROM alerts WHERE created_at < ?", (before,))

        return self._transaction(work)
