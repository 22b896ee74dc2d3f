"""What reports, plots and metrics read instead of the bodies: the evaluator's
observations of a scope (whole UTC days from the day rollup, partial days from the
session rows), the day rollups themselves, sessions' facts, hourly sums, and each
probe's latest session."""

from __future__ import annotations

from collections.abc import Sequence

from collector.compliance import rollup
from collector.compliance.evaluate import Observations
from collector.compliance.facts import SessionFacts, TransferFact
from collector.compliance.rollup import DayRollup
from collector.storage.model import HourRow
from collector.storage.sql.base import LOOK_PAST, SqlBase, Tx, readable
from collector.storage.sql.facts import (
    DAY_COLUMNS,
    SESSION_FACT_COLUMNS,
    day_rollup,
    facts_where,
    session_facts_of,
)


class ReportQueries(SqlBase):
    """Reads of the facts tables (session_facts, transfer_facts, day_facts)."""

    def observations(self, probes: Sequence[str] | None = None, since: str | None = None,
                     until: str | None = None, include_invalid: bool = False,
                     family: str | None = None) -> Observations:
        """The evaluator's input for a scope: counts, RTT moments and every per-test speed
        (percentiles need the values). Whole UTC days come from the day rollup, the
        partial days at either end from the session rows; both hold the same samples.
        Sessions the agent flagged invalid are left out unless ``include_invalid`` (which
        reads every session row), and counted apart."""
        obs = Observations(invalid_included=include_invalid)
        # The day rollup does not split by family: one family reads the session rows.
        days = None if include_invalid or family else rollup.whole_days(since, until)
        with self._reading() as tx:
            if days is None:
                self._observe_sessions(tx, obs, probes, since, until, family)
                return obs
            lo, hi = days
            rollup.observe_days(obs, self._days(tx, probes, lo and lo[:10], hi and hi[:10]))
            if since is not None and lo is not None and since < lo:
                self._observe_sessions(tx, obs, probes, since, lo)
            if until is not None and hi is not None and hi < until:
                self._observe_sessions(tx, obs, probes, hi, until)
        return obs

    def _observe_sessions(self, tx: Tx, obs: Observations, probes: Sequence[str] | None,
                          since: str | None, until: str | None,
                          family: str | None = None) -> None:
        where, params = self._scope(probes, since, until, family=family)
        t_where, t_params = self._scope(probes, since, until, family=family,
                                        table="transfer_facts")
        # Plain tuples straight from the driver (rollup.SessionRow, TransferRow).
        sessions = tx.rows(
            "SELECT pings_sent, pings_lost, rtt_n, rtt_mean_ms, rtt_m2, valid, invalid_codes "
            f"FROM session_facts WHERE {where} ORDER BY probe_name, started_at, result_id",
            params)
        transfers = tx.rows(
            f"SELECT direction, ok, kbps, valid FROM transfer_facts WHERE {t_where} "
            "ORDER BY probe_name, started_at, result_id, seq", t_params)
        rollup.observe_sessions(obs, sessions, transfers)
        # Jitter terms are integers (ns): the database sums them exactly, and the row
        # loop above (millions of rows) carries two columns fewer.
        counted = "" if obs.invalid_included else " AND valid = 1"
        total = tx.one("SELECT COALESCE(SUM(jitter_sum_ns), 0), COALESCE(SUM(jitter_pairs), 0) "
                       f"FROM session_facts WHERE {where}{counted}", params)
        if total is not None:
            obs.jitter_sum_ns += int(total[0])
            obs.jitter_pairs += int(total[1])
        # Attempts the measurement server refused, per server, of every session valid or
        # not (as the day rollup counts them: rollup.add_session); integers again.
        for server, refused in tx.rows(
                "SELECT refused_server, SUM(refused_attempts) FROM session_facts "
                f"WHERE {where} AND refused_attempts > 0 GROUP BY refused_server", params):
            obs.add_refused(server or "", int(refused))

    def _days(self, tx: Tx, probes: Sequence[str] | None, day_lo: str | None,
              day_hi: str | None) -> list[DayRollup]:
        where, params = self._scope(probes, day_lo, day_hi, column="day")
        return [day_rollup(r) for r in tx.rows(
            f"SELECT {', '.join(DAY_COLUMNS)} FROM day_facts WHERE {where} "
            "ORDER BY probe_name, day", params)
            if readable(f"{r[0]} {r[1]}", f"{r[1]}T00:00:00.000000Z")]

    def facts(self, probes: Sequence[str] | None = None, since: str | None = None,
              until: str | None = None, family: str | None = None) -> list[SessionFacts]:
        """Every session's facts in scope, by start time (a line's campaign)."""
        with self._reading() as tx:
            return self._facts(tx, probes, since, until, family)

    def _facts(self, tx: Tx, probes: Sequence[str] | None, since: str | None,
               until: str | None, family: str | None = None) -> list[SessionFacts]:
        where, params = self._scope(probes, since, until, family=family)
        t_where, t_params = self._scope(probes, since, until, family=family,
                                        table="transfer_facts")
        return facts_where(tx, where, params, t_where, t_params)

    def hourly(self, probes: Sequence[str] | None = None, since: str | None = None,
               until: str | None = None, include_invalid: bool = False,
               family: str | None = None) -> list[HourRow]:
        """Per UTC hour: sessions, pings, RTT sum and per-direction speed sums (plots of
        any scope size, collector/reports/plots.py); valid sessions only unless asked. The sums
        are the database's (plots only; no verdict rests on them)."""
        where, params = self._scope(probes, since, until, family=family)
        t_where, t_params = self._scope(probes, since, until, family=family,
                                        table="transfer_facts")
        if not include_invalid:
            where += " AND valid = 1"
            t_where += " AND valid = 1"
        rows: dict[str, HourRow] = {}
        with self._reading() as tx:
            for hour, sessions, sent, lost, n, rtt_sum, jsum, jpairs in tx.rows(
                    "SELECT substr(started_at, 1, 13), COUNT(*), SUM(pings_sent), "
                    "SUM(pings_lost), SUM(rtt_n), SUM(rtt_n * rtt_mean_ms), "
                    "SUM(jitter_sum_ns), SUM(jitter_pairs) "
                    f"FROM session_facts WHERE {where} GROUP BY 1 ORDER BY 1", params):
                rows[hour] = HourRow(hour, int(sessions), int(sent), int(lost), int(n),
                                     float(rtt_sum), jitter_sum_ns=int(jsum or 0),
                                     jitter_pairs=int(jpairs or 0))
            for hour, direction, count, total in tx.rows(
                    "SELECT substr(started_at, 1, 13), direction, COUNT(*), SUM(kbps) "
                    f"FROM transfer_facts WHERE {t_where} AND ok = 1 AND kbps IS NOT NULL "
                    "GROUP BY 1, 2", t_params):
                row = rows.setdefault(hour, HourRow(hour))
                if direction == "download":
                    row.download_n, row.download_kbps_sum = int(count), float(total)
                else:
                    row.upload_n, row.upload_kbps_sum = int(count), float(total)
        return [rows[h] for h in sorted(rows)
                if readable(f"hour {h}", f"{h}:00:00.000000Z")]

    def latest_sessions(self, probes: Sequence[str]) -> list[SessionFacts]:
        """Each named probe's newest session facts (by start time), for the per-probe
        metrics: two index seeks a probe, whatever its history."""
        out: list[SessionFacts] = []
        with self._reading() as tx:
            for name in probes:
                row = next((r for r in tx.rows(
                    f"SELECT {', '.join(SESSION_FACT_COLUMNS)} FROM session_facts "
                    "WHERE probe_name = ? "
                    "ORDER BY started_at DESC, result_id DESC LIMIT ?", (name, LOOK_PAST))
                    if readable(r[2], r[1])), None)
                if row is None:
                    continue
                probe, started, rid = row[:3]
                transfers = tuple(
                    TransferFact(direction, bool(ok), kbps) for direction, ok, kbps in tx.rows(
                        "SELECT direction, ok, kbps FROM transfer_facts WHERE probe_name = ? "
                        "AND started_at = ? AND result_id = ? ORDER BY seq",
                        (probe, started, rid)))
                out.append(session_facts_of(row, transfers))
        return out
