"""What reports, plots and metrics read instead of the bodies: the evaluator's
observations of a scope (whole UTC days from the day rollup, partial days from the
session rows), a scope's sessions per hour for its coverage (the same split), sessions'
facts, hourly sums, and each probe's latest session."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date, timedelta

from collector import unreadable
from collector.compliance import rollup, uncertainty
from collector.compliance.evaluate import Observations
from collector.compliance.facts import SessionFacts, TransferFact
from collector.storage.model import HourRow
from collector.storage.sql.base import LOOK_PAST, SqlBase, Tx, readable
from collector.storage.sql.facts import (
    DAY_FIGURES,
    SESSION_FACT_COLUMNS,
    facts_where,
    session_facts_of,
)

# Probes read per query when a scope is folded page by page: 32 probes' semester of day
# rows is about 5,800 rows (2 MiB of speeds); of session rows for a partial day, ~770.
PROBES_PER_PAGE = 32


class ReportQueries(SqlBase):
    """Reads of the facts tables (session_facts, transfer_facts, day_facts)."""

    def observations(self, probes: Sequence[str] | None = None, since: str | None = None,
                     until: str | None = None, include_invalid: bool = False,
                     family: str | None = None,
                     extra_speeds: Mapping[str, Sequence[float]] | None = None
                     ) -> Observations:
        """The evaluator's input for a scope: counts, RTT moments and the per-test speeds
        (``extra_speeds``, per direction, join them: customers' tests). Whole UTC days
        come from the day rollup, the partial days at either end from the session rows;
        both hold the same samples. Sessions the agent flagged invalid are left out
        unless ``include_invalid`` (which reads every session row), and counted apart.

        The rows are read a page of probes at a time, twice (rollup.ScopeFold): memory
        grows with a page, not with the scope's samples. A scope with few speeds keeps
        them (a list); a larger one holds only the order statistics a report reads
        (``uncertainty.needed_ranks``), selected exactly (selection.py)."""
        obs = Observations(invalid_included=include_invalid)
        # The day rollup does not split by family: one family reads the session rows.
        days = None if include_invalid or family else rollup.whole_days(since, until)
        fold = rollup.ScopeFold(obs, uncertainty.needed_ranks, extra_speeds)
        with self._reading() as tx, self._snapshot(tx):
            pages = self._probe_pages(tx, probes)
            if days is None:
                segments = [("sessions", since, until)]
            else:
                lo, hi = days
                segments = []
                if since is not None and lo is not None and since < lo:
                    segments.append(("head", since, lo))
                if until is not None and hi is not None and hi < until:
                    segments.append(("tail", hi, until))
            while True:
                if days is not None and fold.wants("days"):
                    for page in pages:
                        fold.days(self._days(tx, page, days[0] and days[0][:10],
                                             days[1] and days[1][:10], fold.first,
                                             fold.wants_speeds))
                for name, lo_, hi_ in segments:
                    self._fold_sessions(tx, fold, name, pages, lo_, hi_,
                                        family if days is None else None)
                if fold.end_pass():
                    break
            for _, lo_, hi_ in segments:
                self._session_sums(tx, obs, probes, lo_, hi_,
                                   family if days is None else None)
        return obs

    @contextmanager
    def _snapshot(self, tx: Tx) -> Iterator[None]:
        """Every read inside in one snapshot: the passes over a scope must see the same
        rows. PostgreSQL's reading transaction is one (REPEATABLE READ); SQLite reads in
        autocommit, a snapshot per statement, so a savepoint opens a read transaction
        (WAL: writers go on; https://sqlite.org/lang_savepoint.html)."""
        if tx.dialect.name != "sqlite":
            yield
            return
        tx.run("SAVEPOINT observations")
        try:
            yield
        finally:
            tx.run("RELEASE observations")

    def _probe_pages(self, tx: Tx, probes: Sequence[str] | None) -> list[list[str]]:
        """The scope's probes in pages of ``PROBES_PER_PAGE`` (every registered probe
        when none is named: every fact row has one, by its result)."""
        names = sorted(set(probes)) if probes is not None else [
            str(r[0]) for r in tx.rows("SELECT name FROM probes ORDER BY name")]
        return [names[i:i + PROBES_PER_PAGE] for i in range(0, len(names), PROBES_PER_PAGE)]

    def _fold_sessions(self, tx: Tx, fold: rollup.ScopeFold, segment: str,
                       pages: list[list[str]], since: str | None, until: str | None,
                       family: str | None) -> None:
        # After the first read, only what the later ones take (RTT parts, speeds), in
        # any order (sums and selections do not depend on it), as the same tuples.
        first = fold.first
        valid = "" if fold.obs.invalid_included else " AND valid = 1"
        for page in pages:
            if fold.wants(segment, speeds=False):
                where, params = self._scope(page, since, until, family=family)
                # Plain tuples straight from the driver (rollup.SessionRow).
                fold.sessions(segment, tx.rows(
                    "SELECT pings_sent, pings_lost, rtt_n, rtt_mean_ms, rtt_m2, valid, "
                    f"invalid_codes FROM session_facts WHERE {where} "
                    "ORDER BY probe_name, started_at, result_id", params) if first else tx.rows(
                    "SELECT 0, 0, rtt_n, rtt_mean_ms, rtt_m2, valid, '' FROM session_facts "
                    f"WHERE {where} AND rtt_n > 0{valid}", params))
            if fold.wants(segment):
                t_where, t_params = self._scope(page, since, until, family=family,
                                                table="transfer_facts")
                fold.transfers(tx.rows(
                    f"SELECT direction, ok, kbps, valid FROM transfer_facts WHERE {t_where} "
                    "ORDER BY probe_name, started_at, result_id, seq", t_params) if first
                    else tx.rows(
                    f"SELECT direction, ok, kbps, valid FROM transfer_facts WHERE {t_where} "
                    f"AND ok = 1 AND kbps IS NOT NULL{valid}", t_params))

    def _session_sums(self, tx: Tx, obs: Observations, probes: Sequence[str] | None,
                      since: str | None, until: str | None, family: str | None) -> None:
        """What the database sums exactly over a segment's session rows: integers."""
        where, params = self._scope(probes, since, until, family=family)
        # Jitter terms are integers (ns): the database sums them exactly, and the row
        # loop (millions of rows) carries two columns fewer.
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
              day_hi: str | None, first: bool = True, speeds: bool = True
              ) -> Sequence[rollup.DayRow]:
        """The day rows of a page as the driver gives them (rollup.DayRow: summed a
        column at a time, no object per row); after the first read, only what the later
        reads take (RTT parts, and the speeds while a selection still wants them: the
        blobs are most of a day row), the other figures zero. A row whose day no reader
        interprets is left out (named and counted on the first read: unreadable.py);
        each distinct day is checked once, not each row."""
        where, params = self._scope(probes, day_lo, day_hi, column="day")
        if first:
            columns = ", ".join(DAY_FIGURES)
        else:
            blobs = "download_kbps, upload_kbps" if speeds else "NULL, NULL"
            columns = ("probe_name, day, 0, 0, 0, rtt_n, rtt_mean_ms, rtt_m2, 0, 0, 0, 0, "
                       f"{blobs}, 0, '{{}}', 0, 0, '{{}}'")
        rows = tx.rows(
            f"SELECT {columns} FROM day_facts WHERE {where} ORDER BY probe_name, day", params)
        bad = {day for day in {r[1] for r in rows}
               if not unreadable.canonical_time(f"{day}{rollup.DAY_START}")}
        if not bad:
            return rows
        if first:
            for r in rows:
                if r[1] in bad:
                    readable(f"{r[0]} {r[1]}", f"{r[1]}{rollup.DAY_START}")
        return [r for r in rows if r[1] not in bad]

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

    def coverage_hours(self, probes: Sequence[str] | None = None, since: str | None = None,
                       until: str | None = None, include_invalid: bool = False,
                       family: str | None = None) -> list[tuple[str, int]]:
        """Sessions per UTC hour ("YYYY-MM-DDTHH", sessions), hours with none left out,
        by hour: the session counts of ``hourly``, which a report's coverage reads
        (evaluate.coverage_of). Whole UTC days come from the day rollup's session_hours
        (a day row, not its sessions' rows: at national scale, seconds instead of
        minutes), the partial days at either end and any day whose hours are not known
        (NULL: a row written before the column) from the session rows. The rollup holds
        the valid sessions of both families, so ``include_invalid`` or ``family`` reads
        the scope's session rows, as ``hourly`` does. One snapshot, as observations'."""
        days = None if include_invalid or family else rollup.whole_days(since, until)
        counts: dict[str, int] = {}
        with self._reading() as tx, self._snapshot(tx):
            if days is None:
                self._count_hours(tx, counts, probes, since, until, include_invalid, family)
            else:
                lo, hi = days
                if since is not None and lo is not None and since < lo:
                    self._count_hours(tx, counts, probes, since, lo)
                if until is not None and hi is not None and hi < until:
                    self._count_hours(tx, counts, probes, hi, until)
                for page in self._probe_pages(tx, probes):
                    self._rollup_hours(tx, counts, page, lo and lo[:10], hi and hi[:10])
        return [(h, counts[h]) for h in sorted(counts)
                if counts[h] and readable(f"hour {h}", f"{h}:00:00.000000Z")]

    def _count_hours(self, tx: Tx, counts: dict[str, int], probes: Sequence[str] | None,
                     since: str | None, until: str | None, include_invalid: bool = False,
                     family: str | None = None) -> None:
        """``counts`` plus the sessions per UTC hour of [since, until), from the session
        rows (the database counts: integers)."""
        where, params = self._scope(probes, since, until, family=family)
        valid = "" if include_invalid else " AND valid = 1"
        for hour, n in tx.rows("SELECT substr(started_at, 1, 13), COUNT(*) FROM session_facts "
                               f"WHERE {where}{valid} GROUP BY 1", params):
            counts[hour] = counts.get(hour, 0) + int(n)

    def _rollup_hours(self, tx: Tx, counts: dict[str, int], page: Sequence[str],
                      day_lo: str | None, day_hi: str | None) -> None:
        """``counts`` plus a page of probes' whole days [day_lo, day_hi): from each day
        row's session_hours; a day not known (NULL, or not 24 counts) from its session
        rows, each run of such days of a probe in one read. Rows with the same hours on
        the same day (a fleet measuring on one schedule: most of them) are parsed once,
        and each distinct day's spelling checked once."""
        where, params = self._scope(page, day_lo, day_hi, column="day")
        rows = tx.rows(f"SELECT probe_name, day, session_hours FROM day_facts WHERE {where} "
                       "ORDER BY probe_name, day", params)
        bad = {day for day in {r[1] for r in rows}
               if not unreadable.canonical_time(f"{day}{rollup.DAY_START}")}
        same: dict[tuple[str, str], int] = {}
        parsed: dict[str, list[int] | None] = {}
        runs: list[list[str]] = []  # [probe, first day, last day] of days not known
        last_unknown = False
        for probe, day, hours in rows:
            if day in bad:  # named and counted, as observations' read does
                readable(f"{probe} {day}", f"{day}{rollup.DAY_START}")
                last_unknown = False
                continue
            if hours is not None and hours not in parsed:
                parsed[hours] = rollup.hour_counts(hours)
            if hours is None or parsed[hours] is None:
                if last_unknown and runs[-1][0] == probe:
                    runs[-1][2] = day
                else:
                    runs.append([probe, day, day])
                last_unknown = True
                continue
            last_unknown = False
            same[day, hours] = same.get((day, hours), 0) + 1
        for (day, hours), times in same.items():
            for hour, n in enumerate(parsed[hours] or ()):
                if n:
                    key = f"{day}T{hour:02d}"
                    counts[key] = counts.get(key, 0) + n * times
        for probe, first, last in runs:
            after = (date.fromisoformat(last) + timedelta(days=1)).isoformat()
            self._count_hours(tx, counts, [probe], first + rollup.DAY_START,
                              after + rollup.DAY_START)

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
