"""Copying a whole store (storage/migrate.py): every table, page by page in key order,
read from one store and loaded into another as it is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from collector.errors import StoreError
from collector.storage.sql.base import SqlBase, Tx
from collector.storage.sql.contracts import CONTRACT_COLUMNS
from collector.storage.sql.facts import DAY_COLUMNS
from collector.storage.sql.probe_keys import KEY_COLUMNS
from collector.storage.sql.probes import LINE_COLUMNS
from collector.storage.sql.signatures import GAP_SIGNATURE_COLUMNS, SIGNATURE_COLUMNS

# The copyable tables, in an order that satisfies their foreign keys: (key, columns).
# Generated keys (browser_results.id, influx_outbox.seq) are copied as they are.
TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "probes": (("name",), ("name", "token_sha256", "created_at", "revoked_at",
                           "rotated_at", *LINE_COLUMNS)),
    "tokens": (("name",), ("name", "role", "token_sha256", "created_at", "revoked_at")),
    # One key may be bound to several probes (migration 24): keyed by both.
    "probe_keys": (("probe_name", "kid"), KEY_COLUMNS),
    "results": (("result_id",), ("result_id", "probe_name", "schema_version", "started_at",
                                 "ended_at", "received_at", "body_sha256", "body",
                                 "clock_skew_s", "session_seq", "body_packed")),
    # Each signed result's JWS parts (storage/sql/signatures.py).
    "result_signatures": (("result_id",), SIGNATURE_COLUMNS),
    # Facts in their primary key's order: a page is an index range scan in both engines.
    "session_facts": (("probe_name", "started_at", "result_id"),
                      ("probe_name", "started_at", "result_id", "pings_sent", "pings_lost",
                       "rtt_n", "rtt_mean_ms", "rtt_m2", "rtts_ms", "valid",
                       "invalid_codes", "jitter_sum_ns", "jitter_pairs", "address_family",
                       "dual_stack", "refused_attempts", "refused_server")),
    "transfer_facts": (("probe_name", "started_at", "result_id", "seq"),
                       ("probe_name", "started_at", "result_id", "seq", "direction", "ok",
                        "kbps", "valid")),
    "day_facts": (("probe_name", "day"), DAY_COLUMNS),
    "gaps": (("gap_id",), ("gap_id", "probe_name", "received_at", "reason", "dropped",
                           "first_started_at", "last_started_at", "body_sha256",
                           "seq_ranges")),
    # Each gap record whole, and its signature (storage/sql/signatures.py).
    "gap_signatures": (("gap_id",), GAP_SIGNATURE_COLUMNS),
    "browser_results": (("id",), ("id", "received_at", "client", "body")),
    "ndt7_tests": (("uuid",), ("uuid", "test", "started_at", "ended_at", "client",
                               "end_reason", "throughput_bps", "min_rtt_ms", "body")),
    "influx_outbox": (("seq",), ("seq", "result_id", "queued_at")),
    "influx_dead_letters": (("result_id",), ("result_id", "failed_at", "reason")),
    "instruction_rules": (("selector",), ("selector", "settings", "updated_at")),
    "suppressions": (("id",), ("id", "selector", "starts_at", "ends_at", "reason",
                               "created_at")),
    "probe_health": (("probe_name",), ("probe_name", "received_at", "clock_skew_s",
                                       "body")),
    "alerts": (("id",), ("id", "dedup_key", "kind", "probe_name", "severity", "created_at",
                         "subject", "details")),
    "result_deletions": (("id",), ("id", "result_id", "probe_name", "started_at",
                                   "session_seq", "body_sha256", "deleted_at", "deleted_by",
                                   "reason")),
    # The sessions the refusal migration reclassified (storage/refusals.py).
    "refusal_reclassifications": (("id",), ("id", "result_id", "probe_name", "started_at",
                                            "attempts", "refused_server", "migrated_at")),
    # Each line's contract history (storage/sql/contracts.py).
    "line_contracts": (("probe_name", "version"), CONTRACT_COLUMNS),
    "alert_deliveries": (("alert_id", "notifier"), (
        "alert_id", "notifier", "state", "attempts", "next_at", "lease_owner",
        "leased_until", "last_error", "delivered_at")),
}


class CopyQueries(SqlBase):
    """Every table, as rows."""

    def count(self, table: str) -> int:
        """Rows of one of the store's tables (migrate checks its copy with it)."""
        if table not in TABLES:
            raise StoreError(f"no table {table!r}")
        return self._count(f"SELECT COUNT(*) FROM {table}")

    def dump(self, table: str, after: Sequence[Any] | None,
             limit: int) -> list[tuple[Any, ...]]:
        """Rows of ``table`` in key order after the key ``after`` (a page of a copy)."""
        key, columns = TABLES[table]
        where, params = "", []
        if after is not None:
            where = f"WHERE ({', '.join(key)}) > ({', '.join('?' * len(key))})"
            params = list(after)
        return self._read(f"SELECT {', '.join(columns)} FROM {table} {where} "
                          f"ORDER BY {', '.join(key)} LIMIT ?", [*params, limit])

    def load(self, table: str, rows: Sequence[Sequence[Any]]) -> int:
        """Insert copied rows as they are (keys already present are left alone: a copy
        that is run again resumes). Returns how many were new."""
        _key, columns = TABLES[table]
        marks = ", ".join("?" * len(columns))

        def work(tx: Tx) -> int:
            added = 0
            for row in rows:
                added += tx.run(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "
                                "ON CONFLICT DO NOTHING", row)
            return added

        return self._transaction(work)
