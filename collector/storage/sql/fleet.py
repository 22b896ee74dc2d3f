"""Fleet control: the instruction rules probes fetch their settings by, suppression
windows, each probe's latest health report, and the fleet's activity."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from agent.schema import parse_utc
from collector import unreadable
from collector.storage.sql.base import LOOK_PAST, SqlBase, Tx, readable


class FleetQueries(SqlBase):
    """The instruction_rules, suppressions and probe_health tables."""

    def instruction_rules(self) -> list[tuple[str, dict[str, Any], str]]:
        """(selector key, settings, updated_at) of every instruction rule."""
        return [(r[0], json.loads(r[1]), r[2]) for r in self._read(
            "SELECT selector, settings, updated_at FROM instruction_rules ORDER BY selector")]

    def update_instruction_rule(
        self, selector: str, change: Callable[[dict[str, Any]], dict[str, Any]],
        updated_at: str,
    ) -> dict[str, Any]:
        """Replace a rule's settings with ``change(current)`` ({} when there is no rule)
        in one transaction; an empty result deletes the rule. Returns the new settings."""
        def work(tx: Tx) -> dict[str, Any]:
            # The row first (empty when new), then locked: two admins creating the same
            # rule at once take turns instead of one failing on the primary key.
            tx.run("INSERT INTO instruction_rules (selector, settings, updated_at) "
                   "VALUES (?, '{}', ?) ON CONFLICT (selector) DO NOTHING",
                   (selector, updated_at))
            row = tx.one("SELECT settings FROM instruction_rules WHERE selector = ? "
                         f"{self.dialect.for_update}", (selector,))
            settings = change(json.loads(row[0]) if row else {})
            if not settings:
                tx.run("DELETE FROM instruction_rules WHERE selector = ?", (selector,))
            else:
                tx.run("UPDATE instruction_rules SET settings = ?, updated_at = ? "
                       "WHERE selector = ?", (json.dumps(settings), updated_at, selector))
            return settings

        return self._transaction(work)

    SUPPRESSION_KEYS = ("id", "selector", "starts_at", "ends_at", "reason", "created_at")

    def suppressions(self, ending_after: str | None = None) -> list[dict[str, Any]]:
        """Suppression windows (those not over at ``ending_after``, if given)."""
        where, params = ("WHERE ends_at > ?", [ending_after]) if ending_after else ("", [])
        return [dict(zip(self.SUPPRESSION_KEYS, r, strict=True)) for r in self._read(
            f"SELECT {', '.join(self.SUPPRESSION_KEYS)} FROM suppressions {where} "
            "ORDER BY starts_at, id", params)]

    def add_suppression(self, selector: str, starts_at: str, ends_at: str, reason: str,
                        created_at: str, max_open: int | None = None,
                        forget_before: str | None = None) -> int | None:
        """Add a window; None when ``max_open`` windows not over at ``created_at``
        exist already (counted in the same transaction). Windows that ended before
        ``forget_before`` are deleted first (the certificates of those days list them
        no more: keep ``forget_before`` beyond the campaigns still to certify)."""
        def work(tx: Tx) -> int | None:
            if forget_before is not None:
                tx.run("DELETE FROM suppressions WHERE ends_at < ?", (forget_before,))
            if max_open is not None:
                row = tx.one("SELECT COUNT(*) FROM suppressions WHERE ends_at > ?",
                             (created_at,))
                if row is not None and int(row[0]) >= max_open:
                    return None
            row = tx.one("INSERT INTO suppressions (selector, starts_at, ends_at, reason, "
                         "created_at) VALUES (?, ?, ?, ?, ?) RETURNING id",
                         (selector, starts_at, ends_at, reason, created_at))
            assert row is not None
            return int(row[0])

        return self._transaction(work)

    def delete_suppression(self, ident: int) -> bool:
        return self._transaction(lambda tx: tx.run(
            "DELETE FROM suppressions WHERE id = ?", (ident,))) == 1

    def put_health(self, probe_name: str, received_at: str, clock_skew_s: float | None,
                   body: str) -> None:
        """A probe's latest health report (replaces the one before)."""
        self._transaction(lambda tx: tx.run(
            "INSERT INTO probe_health (probe_name, received_at, clock_skew_s, body) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (probe_name) DO UPDATE SET "
            "received_at = excluded.received_at, clock_skew_s = excluded.clock_skew_s, "
            "body = excluded.body", (probe_name, received_at, clock_skew_s, body)))

    def health(self) -> dict[str, tuple[str, float | None, dict[str, Any]]]:
        """probe -> (received_at, clock skew, report) of each probe's latest report; one
        the reader cannot interpret is left out (collector/unreadable.py)."""
        out: dict[str, tuple[str, float | None, dict[str, Any]]] = {}
        for name, received, skew, body in self._read(
                "SELECT probe_name, received_at, clock_skew_s, body FROM probe_health"):
            try:
                report = json.loads(body)
                parse_utc(received)
                if not isinstance(report, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                unreadable.skipped("health", name, exc)
                continue
            out[name] = (received, skew, report)
        return out

    def activity(self, since: str) -> dict[str, dict[str, Any]]:
        """Per probe: its newest result's start and arrival, and its sessions since
        ``since`` (valid and in all), from the session facts."""
        out: dict[str, dict[str, Any]] = {}
        with self._reading() as tx:
            for (name,) in tx.rows("SELECT name FROM probes ORDER BY name"):
                # One index seek per probe (results (probe_name, started_at)).
                last = next((r for r in tx.rows(
                    "SELECT started_at, received_at, result_id FROM results "
                    "WHERE probe_name = ? ORDER BY started_at DESC LIMIT ?",
                    (name, LOOK_PAST)) if readable(r[2], r[0], r[1])), None)
                counts = tx.one("SELECT COUNT(*), SUM(valid) FROM session_facts "
                                "WHERE probe_name = ? AND started_at >= ?", (name, since))
                out[name] = {
                    "last_started_at": last[0] if last else None,
                    "last_received_at": last[1] if last else None,
                    "sessions": int(counts[0]) if counts else 0,
                    "valid_sessions": int(counts[1] or 0) if counts else 0}
        return out
