"""The anonymous tables: browser speed tests and ndt7 subtests of third-party clients,
kept apart from probe results and bounded by their quotas; and the customers' speeds
read from both."""

from __future__ import annotations

import hmac
import ipaddress
import json
import threading
from typing import Any

from agent.schema import BPS_LIMIT
from collector.storage.model import Quota
from collector.storage.sql.base import SqlBase, Tx

# The anonymous tables are pruned every PRUNE_EVERY inserts a store makes (per process:
# with N collector processes a table may run over its cap by N x PRUNE_EVERY rows until
# the next pass, and the hourly pass applies the quota whatever the count).
PRUNE_EVERY = 64

ANONYMOUS = {"browser_results": ("id", "received_at"), "ndt7_tests": ("uuid", "started_at")}


class AnonymousQueries(SqlBase):
    """The browser_results and ndt7_tests tables."""

    def __init__(self) -> None:
        super().__init__()
        # Inserts this store made, per table (when to prune: ``_prune_due``).
        self._inserts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add_browser_result(self, received_at: str, client: str, body: str,
                           quota: Quota | None = None) -> int:
        def work(tx: Tx) -> int:
            row = tx.one("INSERT INTO browser_results (received_at, client, body) "
                         "VALUES (?, ?, ?) RETURNING id", (received_at, client, body))
            new_id = int(row[0]) if row else 0
            # Every PRUNE_EVERY ids, whichever process took the id.
            if quota is not None and new_id % PRUNE_EVERY == 0:
                self._prune_now(tx, "browser_results", quota)
            return new_id

        return self._transaction(work)

    def _prune_due(self, table: str) -> bool:
        """Whether this insert should prune: every PRUNE_EVERY inserts this store makes,
        counted once per call (not per transaction attempt), under a lock (PostgreSQL
        stores are called from several threads)."""
        with self._lock:
            count = self._inserts[table] = self._inserts.get(table, 0) + 1
        return count % PRUNE_EVERY == 0

    def _prune_now(self, tx: Tx, table: str, quota: Quota) -> None:
        """Anonymous tables stay bounded (anyone may fill them): rows older than the
        retention go, and past max_rows the oldest go. Run every PRUNE_EVERY inserts, so
        the cost of counting is spread thin; between runs a table may exceed its cap by
        that many, and the hourly pass applies the quota whatever the inserts."""
        key, time_column = ANONYMOUS[table]
        tx.run(f"DELETE FROM {table} WHERE {time_column} < ?", (quota.keep_after,))
        tx.run(f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} "
               f"ORDER BY {time_column} DESC, {key} DESC {self.dialect.no_limit} OFFSET ?)",
               (quota.max_rows,))

    def prune_anonymous(self, browser: Quota, ndt7: Quota) -> None:
        """Apply the quotas now (at start and hourly): retention holds for a table that
        gets no new rows too."""
        def work(tx: Tx) -> None:
            self._prune_now(tx, "browser_results", browser)
            self._prune_now(tx, "ndt7_tests", ndt7)

        self._transaction(work)

    def browser_results(self, since: str | None = None,
                        until: str | None = None) -> list[dict[str, Any]]:
        where, params = self._scope(None, since, until, "received_at", named_only=True)
        return [{"id": r[0], "received_at": r[1], "client": r[2], **json.loads(r[3])}
                for r in self._read(
                    f"SELECT id, received_at, client, body FROM browser_results WHERE {where} "
                    "ORDER BY id", params)]

    def browser_result(self, received_at: str, key: str,
                       key_field: str) -> dict[str, Any] | None:
        """The browser result received at ``received_at`` (indexed) whose body holds
        ``key`` under ``key_field``: what a result's link names. None if none does."""
        for ident, received, client, body in self._read(
                "SELECT id, received_at, client, body FROM browser_results "
                "WHERE received_at = ? ORDER BY id", (received_at,)):
            record = json.loads(body)
            stored = record.get(key_field) if isinstance(record, dict) else None
            # Compared in constant time: the key is the link's only secret.
            if isinstance(stored, str) and hmac.compare_digest(stored.encode(),
                                                               key.encode()):
                return {"id": ident, "received_at": received, "client": client, **record}
        return None

    def add_ndt7_test(self, archive: dict[str, Any], started_at: str, ended_at: str,
                      quota: Quota | None = None) -> None:
        summary = archive["Summary"]
        prune = quota is not None and self._prune_due("ndt7_tests")

        def work(tx: Tx) -> None:
            tx.run("INSERT INTO ndt7_tests (uuid, test, started_at, ended_at, client, "
                   "end_reason, throughput_bps, min_rtt_ms, body) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (uuid) DO NOTHING",
                   (archive["UUID"], archive["Test"], started_at, ended_at, archive["Client"],
                    archive["EndReason"], summary["throughput_bps"], summary["min_rtt_ms"],
                    json.dumps(archive, separators=(",", ":"))))
            if prune and quota is not None:
                self._prune_now(tx, "ndt7_tests", quota)

        self._transaction(work)

    def ndt7_tests(self, since: str | None = None, until: str | None = None,
                   measurements: bool = False) -> list[dict[str, Any]]:
        """Stored ndt7 subtests, oldest first; the per-interval measurements only when
        asked (they are most of each record)."""
        where, params = self._scope(None, since, until, named_only=True)
        out = []
        for (body,) in self._read(
                f"SELECT body FROM ndt7_tests WHERE {where} ORDER BY started_at, uuid",
                params):
            record = json.loads(body)
            if not measurements:
                record.pop("ServerMeasurements", None)
                record.pop("ClientMeasurements", None)
            out.append(record)
        return out

    def customer_speeds(self, since: str | None = None, until: str | None = None,
                        network: str | None = None) -> list[tuple[str, str, float | None]]:
        """(kind, direction, kbps or None) of every customer test in [since, until): each
        browser result gives a download and an upload, each ndt7 subtest one direction
        (None when it did not end normally). ``network``: only clients inside this CIDR."""
        inside = ipaddress.ip_network(network, strict=False) if network else None

        def wanted(client: str) -> bool:
            if inside is None:
                return True
            try:
                return ipaddress.ip_address(client_host(client)) in inside
            except ValueError:
                return False

        out: list[tuple[str, str, float | None]] = []
        for row in self.browser_results(since, until):
            if wanted(row["client"]):
                for direction in ("download", "upload"):
                    bps = row.get(f"{direction}_bps")
                    # Rows stored before ingest bounded numbers may hold anything:
                    # a speed outside any physical range counts as none.
                    kbps = bps / 1000 if isinstance(bps, int | float) and not isinstance(
                        bps, bool) and 0 < bps <= BPS_LIMIT else None
                    out.append(("browser", direction, kbps))
        where, params = self._scope(None, since, until, named_only=True)
        for test, client, reason, bps in self._read(
                "SELECT test, client, end_reason, throughput_bps FROM ndt7_tests "
                f"WHERE {where} ORDER BY started_at, uuid", params):
            if wanted(client):
                ok = reason in ("done", "client_closed", "early_exit") and bps
                out.append(("ndt7", test, bps / 1000 if ok else None))
        return out


def client_host(client: str) -> str:
    """The address of a stored client: ``ip``, ``ip:port`` or ``[ipv6]:port``."""
    if client.startswith("["):
        return client[1:client.find("]")]
    if client.count(":") == 1:
        return client.split(":", 1)[0]
    return client
