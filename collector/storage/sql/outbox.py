"""The InfluxDB outbox (collector/sinks/influx.py): every stored result queued for the
sink, leased to one collector process at a time, done or set apart as a dead letter
(InfluxDB is fed from here with synchronous writes; this store stays the master copy)."""

from __future__ import annotations

from collections.abc import Sequence

from collector.lines import LineMetadata
from collector.storage.sql.base import SqlBase, Tx
from collector.storage.sql.probes import LINE_COLUMNS
from collector.storage.sql.results import result_body


class OutboxQueries(SqlBase):
    """The influx_outbox and influx_dead_letters tables."""

    def outbox_lease(self, owner: str, limit: int, now: str,
                     until: str) -> list[tuple[str, str, LineMetadata]]:
        """Lease the oldest ``limit`` queued results that no other live lease holds, to
        ``owner`` until ``until``; return them as (result_id, body, line). The owner's own
        leases are taken again (a write that failed is retried with the same rows). With many
        collector processes each row goes to one of them (PostgreSQL skips the rows
        another is leasing); a process that dies leaves its lease to expire. Bodies are
        decoded by the caller, one at a time, so one that fails is set apart alone."""
        def work(tx: Tx) -> list[tuple[str, str, LineMetadata]]:
            while True:
                seqs = [int(r[0]) for r in tx.rows(
                    "SELECT seq FROM influx_outbox WHERE leased_until IS NULL OR "
                    "leased_until < ? OR lease_owner = ? "
                    f"ORDER BY seq LIMIT ? {self.dialect.skip_locked}", (now, owner, limit))]
                if not seqs:
                    return []
                clause, param = self.dialect.in_list("seq", seqs)
                tx.run(f"UPDATE influx_outbox SET lease_owner = ?, leased_until = ? "
                       f"WHERE {clause}", (owner, until, param))
                o_clause, o_param = self.dialect.in_list("o.seq", seqs)
                cols = ", ".join(f"p.{c}" for c in LINE_COLUMNS)
                leased = [(r[0], result_body(r[1], r[2]), LineMetadata(*r[3:])) for r in tx.rows(
                    f"SELECT o.result_id, r.body, r.body_packed, {cols} FROM influx_outbox o "
                    "JOIN results r ON r.result_id = o.result_id "
                    f"JOIN probes p ON p.name = r.probe_name WHERE {o_clause} ORDER BY o.seq",
                    (o_param,))]
                if len(leased) == len(seqs):
                    return leased
                # Entries whose result no read reaches (PostgreSQL: a month detached by
                # hand, outside `partitions detach`, which removes them): nothing to write,
                # and leased again and again they would fill every lease and stall the
                # sink for good (review 2, finding 4). Out of the queue, then lease again.
                gone = tx.run(f"DELETE FROM influx_outbox WHERE {clause} AND NOT EXISTS "
                              "(SELECT 1 FROM results r WHERE r.result_id = "
                              "influx_outbox.result_id)", (param,))
                if leased or not gone:
                    return leased

        return self._transaction(work)

    def outbox_done(self, result_ids: Sequence[str]) -> None:
        def work(tx: Tx) -> None:
            tx.many("DELETE FROM influx_outbox WHERE result_id = ?", [(r,) for r in result_ids])
            # Written at last (a backfill after a fix): no longer a dead letter.
            tx.many("DELETE FROM influx_dead_letters WHERE result_id = ?",
                    [(r,) for r in result_ids])

        self._transaction(work)

    def outbox_release(self, owner: str) -> None:
        """Give back what ``owner`` leased and did not finish (a clean stop)."""
        self._transaction(lambda tx: tx.run(
            "UPDATE influx_outbox SET lease_owner = NULL, leased_until = NULL "
            "WHERE lease_owner = ?", (owner,)))

    def outbox_dead_letter(self, result_id: str, reason: str, failed_at: str) -> None:
        """Out of the outbox, into the dead letters, in one transaction."""
        def work(tx: Tx) -> None:
            tx.run("DELETE FROM influx_outbox WHERE result_id = ?", (result_id,))
            tx.run("INSERT INTO influx_dead_letters (result_id, failed_at, reason) "
                   "VALUES (?, ?, ?) ON CONFLICT (result_id) DO UPDATE SET "
                   "failed_at = excluded.failed_at, reason = excluded.reason",
                   (result_id, failed_at, reason[:1000]))

        self._transaction(work)

    def outbox_dead_letters(self) -> list[dict[str, str]]:
        return [{"result_id": r[0], "failed_at": r[1], "reason": r[2]} for r in self._read(
            "SELECT result_id, failed_at, reason FROM influx_dead_letters "
            "ORDER BY failed_at, result_id")]

    def outbox_dead_count(self) -> int:
        return self._count("SELECT COUNT(*) FROM influx_dead_letters")

    def outbox_retry_dead(self, queued_at: str) -> int:
        """Queue every dead letter again (after the cause was fixed); returns how many.
        Exactly the letters this statement deletes are queued: one that another process
        sets apart meanwhile stays a dead letter."""
        def work(tx: Tx) -> int:
            taken = sorted(tx.rows("DELETE FROM influx_dead_letters "
                                   "RETURNING failed_at, result_id"))
            tx.many("INSERT INTO influx_outbox (result_id, queued_at) VALUES (?, ?) "
                    "ON CONFLICT (result_id) DO NOTHING",
                    [(result_id, queued_at) for _failed, result_id in taken])
            return len(taken)

        return self._transaction(work)

    def outbox_size(self) -> int:
        return self._count("SELECT COUNT(*) FROM influx_outbox")

    def outbox_enqueue(self, probes: Sequence[str] | None, since: str | None,
                       until: str | None, queued_at: str) -> int:
        """Queue stored results again (a backfill after enabling the sink); returns how
        many were added (those already queued are not queued twice)."""
        where, params = self._scope(probes, since, until, named_only=True)
        return self._transaction(lambda tx: tx.run(
            "INSERT INTO influx_outbox (result_id, queued_at) "
            f"SELECT result_id, CAST(? AS TEXT) FROM results WHERE {where} "
            "ORDER BY started_at, result_id ON CONFLICT (result_id) DO NOTHING",
            [queued_at, *params]))
