"""PostgreSQL's large tables by month: ``results``, ``session_facts`` and
``transfer_facts`` are range-partitioned on ``started_at`` (declarative partitioning), one
partition per UTC month, created ahead, detachable for retention.

The design (docs/scaling.md, section 6):

- **Bounds.** ``started_at`` is text, ISO 8601 UTC, ``COLLATE "C"``: it sorts by its
  bytes, so month M holds ``'M' <= started_at < 'M+1'`` (``'2026-05' <=
  '2026-05-03T10:00:00Z' < '2026-06'``). Partition ``results_p2026_05`` and its
  facts' ``session_facts_p2026_05``, ``transfer_facts_p2026_05``; queries bound
  ``started_at`` (a scope's period), so the planner reads only the months in scope.
- **A default partition**, ``<table>_default``, holds what no month holds: in a database
  made partitioned (migration 14) every row stored before, until ``partitions migrate``
  moves it; in a new one, nothing but a row dated beyond the months created (never lost
  for want of a partition).
- **Exactly once.** A unique index on a partitioned table must include the partition key,
  so ``result_id`` alone cannot be unique on ``results``. It is unique in a narrow
  unpartitioned table, ``result_ids (result_id PRIMARY KEY, started_at)``: a BEFORE INSERT
  trigger on ``results`` claims the id there (``INSERT ... ON CONFLICT DO NOTHING``, which
  waits for a concurrent claim of the same id to commit, as the unique key did) and
  drops the row when the id is taken, so the insert counts 0 rows and the store compares
  hashes as before (duplicate or conflict). Rows stored before migration 14 are not in
  ``result_ids`` until their month moves (registering them all would be a full pass in
  the migration): while they sit in ``results_default`` (whose old primary key on
  result_id is kept), the trigger also looks the id up there, one index probe, and
  registers the old row when found. An AFTER DELETE trigger releases the id
  (``result delete``). Each month's partition also keeps ``PRIMARY KEY (result_id)``.
- **References.** The facts and ``result_signatures`` reference ``result_ids`` (a
  partitioned table cannot be referenced by a column that is not unique on it), ``NOT
  VALID`` on the tables of before (their rows are not re-checked: no scan in the
  migration; a signature added later to an old result finds it registered by the
  trigger). The InfluxDB outbox and its dead letters lose their foreign key: ``influx
  backfill`` queues old results that are not registered yet; both are written only for
  a stored result, and ``result delete`` removes them with it.
- **Online migration.** Migration 14 only renames the three tables to
  ``<table>_default``, creates the partitioned parents with the same columns and attaches
  them as their DEFAULT partitions (no other partition yet: nothing to check, no scan,
  no rewrite): every row stays readable where it is. ``partitions migrate`` then copies
  the old rows into unattached month tables, a month a step, in short transactions
  that block nobody, following every later change to the old tables through a change
  log; and one catalog-only switch detaches the old default partitions and attaches the
  copies and a new default (section "the online migration" below says why not month by
  month in place).
- **Retention.** ``detach_month`` detaches a month's ``results`` partition (the bodies,
  the bulk): its rows leave every read; the table stays, to archive and drop. The facts
  and day rollups stay, so reports keep the month. Its ids stay in ``result_ids``: a
  result of a detached month sent again is not stored again.
- ``day_facts`` is not partitioned: one row per probe and day (36 M a year at 100,000
  probes), read by key ranges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from collector.errors import InputError
from collector.storage.sql.base import Tx

TABLES = ("results", "session_facts", "transfer_facts")
# Months created ahead of the current one, so inserts never wait for one.
AHEAD_MONTHS = 3
# A step waits this long for its locks, then gives up (a long report holds them).
LOCK_TIMEOUT = "10s"
MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")

# Each month's constraints and indexes, as the unpartitioned tables had them.
_CONSTRAINTS = {
    "results": ("PRIMARY KEY (result_id)",),
    "session_facts": ("PRIMARY KEY (probe_name, started_at, result_id)", "UNIQUE (result_id)",
                      "FOREIGN KEY (result_id) REFERENCES result_ids (result_id)"),
    "transfer_facts": ("PRIMARY KEY (probe_name, started_at, result_id, seq)",
                       "FOREIGN KEY (result_id) REFERENCES result_ids (result_id)"),
}
_INDEXES = {
    "results": ("(probe_name, started_at)", "(started_at)",
                "(probe_name, session_seq) WHERE session_seq IS NOT NULL"),
    "session_facts": (),
    "transfer_facts": (),
}

# The exactly-once claim (module docstring). ``bbprobe.moving`` is set by a month's move
# (its rows are registered by the move itself, and leaving the default partition is not
# a deletion).
_CLAIM = """
CREATE OR REPLACE FUNCTION bbprobe_claim_result() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    stored text;
BEGIN
    IF current_setting('bbprobe.moving', true) = 'on' THEN
        RETURN NEW;
    END IF;
    INSERT INTO result_ids (result_id, started_at) VALUES (NEW.result_id, NEW.started_at)
        ON CONFLICT (result_id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT d.started_at INTO stored FROM results_default d WHERE d.result_id = NEW.result_id;
    IF FOUND THEN
        UPDATE result_ids SET started_at = stored WHERE result_id = NEW.result_id;
        RETURN NULL;
    END IF;
    RETURN NEW;
END $$
"""
_RELEASE = """
CREATE OR REPLACE FUNCTION bbprobe_release_result() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('bbprobe.moving', true) IS DISTINCT FROM 'on' THEN
        DELETE FROM result_ids WHERE result_id = OLD.result_id;
    END IF;
    RETURN NULL;
END $$
"""


def convert(tx: Tx) -> None:
    """Migration 14: the three tables partitioned, their rows left where they are (as
    the default partitions). Catalog changes only, whatever the database's size."""
    row = tx.one("SELECT relkind FROM pg_class WHERE oid = to_regclass('results')")
    if row is not None and row[0] == "p":
        return
    tx.run('CREATE TABLE IF NOT EXISTS result_ids (result_id TEXT COLLATE "C" PRIMARY KEY, '
           'started_at TEXT COLLATE "C" NOT NULL)')
    for name, table in tx.rows(
            "SELECT conname, conrelid::regclass::text FROM pg_constraint "
            "WHERE contype = 'f' AND confrelid = 'results'::regclass"):
        tx.run(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for table in TABLES:
        tx.run(f"ALTER TABLE {table} RENAME TO {table}_default")
        tx.run(f"CREATE TABLE {table} (LIKE {table}_default INCLUDING DEFAULTS "
               "INCLUDING STORAGE) PARTITION BY RANGE (started_at)")
        tx.run(f"ALTER TABLE {table} ATTACH PARTITION {table}_default DEFAULT")
    for table in ("session_facts_default", "transfer_facts_default", "result_signatures"):
        tx.run(f"ALTER TABLE {table} ADD CONSTRAINT {table}_result_fkey FOREIGN KEY "
               "(result_id) REFERENCES result_ids (result_id) NOT VALID")
    tx.run(_CLAIM)
    tx.run(_RELEASE)
    tx.run("CREATE TRIGGER results_claim BEFORE INSERT ON results FOR EACH ROW "
           "EXECUTE FUNCTION bbprobe_claim_result()")
    tx.run("CREATE TRIGGER results_release AFTER DELETE ON results FOR EACH ROW "
           "EXECUTE FUNCTION bbprobe_release_result()")


def parse_month(text: str) -> str:
    """``YYYY-MM``, or a one-line InputError."""
    if not MONTH.match(text):
        raise InputError(f"month: expected YYYY-MM, got {text!r}")
    return text


def next_month(month: str) -> str:
    year, mon = int(month[:4]), int(month[5:7])
    return f"{year + mon // 12:04d}-{mon % 12 + 1:02d}"


def months_from(first: str, count: int) -> list[str]:
    out = [first]
    while len(out) < count:
        out.append(next_month(out[-1]))
    return out


def partition_name(table: str, month: str) -> str:
    return f"{table}_p{month.replace('-', '_')}"


@dataclass(frozen=True, slots=True)
class Month:
    month: str  # YYYY-MM, or "default"
    attached: bool
    rows: int  # results rows, PostgreSQL's estimate (pg_class.reltuples; -1 unknown)
    size_bytes: int  # the results partition with its TOASTed bodies and indexes
    copying: bool = False  # a copy ``partitions migrate`` is making, attached at its end


def months(tx: Tx) -> list[Month]:
    """The months of ``results`` (attached, detached and not yet dropped, or being copied
    by ``partitions migrate``), then the default partition."""
    attached = {r[0] for r in tx.rows(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'results'::regclass")}
    copying = {str(r[0]) for r in tx.rows("SELECT month FROM partition_moves")} \
        if migrating(tx) else set()
    out = []
    for name, tuples, size in tx.rows(
            "SELECT relname, reltuples::bigint, pg_total_relation_size(oid) FROM pg_class "
            "WHERE relkind = 'r' AND relname ~ '^results_p[0-9]{4}_[0-9]{2}$' "
            "ORDER BY relname"):
        month = f"{name[9:13]}-{name[14:16]}"
        out.append(Month(month, name in attached, int(tuples), int(size), month in copying))
    row = tx.one("SELECT reltuples::bigint, pg_total_relation_size(oid) FROM pg_class "
                 "WHERE oid = to_regclass('results_default')")
    if row is not None:
        out.append(Month("default", "results_default" in attached, int(row[0]), int(row[1])))
    return out


def _exists(tx: Tx, name: str) -> bool:
    row = tx.one("SELECT to_regclass(?) IS NOT NULL", (name,))
    return bool(row and row[0])


def create_month(tx: Tx, month: str) -> int | None:
    """Month ``month``'s partitions, with the rows of that month the default partitions
    held moved into them (module docstring): how many results moved, or None when the
    month exists already (attached or detached: a detached month is not made again)."""
    if _exists(tx, partition_name("results", month)):
        return None
    lo, hi = month, next_month(month)
    tx.run("SELECT set_config('lock_timeout', ?, true), set_config('bbprobe.moving', 'on', "
           "true)", (LOCK_TIMEOUT,))
    # Readers and writers of the three tables wait for this commit. A lighter lock would
    # not do: a reader that found the partitions before the attach committed and took
    # its snapshot after it would miss the month (the attach itself takes only SHARE
    # UPDATE EXCLUSIVE on the parent); a writer could put a row of the month in the
    # default partition between the move and the attach. Only the parents (each query
    # locks the parent first), in the order ingest takes them: no deadlock.
    tx.run(f"LOCK TABLE {', '.join('ONLY ' + t for t in TABLES)} IN ACCESS EXCLUSIVE MODE")
    moved = 0
    for table in TABLES:
        name = partition_name(table, month)
        tx.run(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING STORAGE)")
        # What the attach checks the month's rows against (no scan of them).
        tx.run(f"ALTER TABLE {name} ADD CONSTRAINT {name}_month CHECK "
               f"(started_at >= '{lo}' AND started_at < '{hi}')")
        count = tx.run(f"WITH moved AS (DELETE FROM {table}_default WHERE started_at >= ? "
                       f"AND started_at < ? RETURNING *) INSERT INTO {name} "
                       "SELECT * FROM moved", (lo, hi))
        if table == "results":
            moved = count
            tx.run("INSERT INTO result_ids (result_id, started_at) SELECT result_id, "
                   f"started_at FROM {name} ON CONFLICT (result_id) DO UPDATE "
                   "SET started_at = EXCLUDED.started_at")
        # Keys and indexes after the rows: built once, not maintained row by row.
        for constraint in _CONSTRAINTS[table]:
            tx.run(f"ALTER TABLE {name} ADD {constraint}")
        for index in _INDEXES[table]:
            tx.run(f"CREATE INDEX ON {name} {index}")
        tx.run(f"ALTER TABLE {table} ATTACH PARTITION {name} "
               f"FOR VALUES FROM ('{lo}') TO ('{hi}')")
    tx.run("SELECT set_config('bbprobe.moving', 'off', true)")
    return moved


def default_is_small(tx: Tx, limit: int = 100_000) -> bool:
    """Whether the default partitions are small enough for PostgreSQL's check of them,
    when a month is attached, to be quick (at a collector's start)."""
    row = tx.one(f"SELECT count(*) FROM (SELECT 1 FROM results_default LIMIT {limit + 1}) x")
    return row is not None and int(row[0]) <= limit


def create_ahead(tx: Tx, today: date, ahead: int = AHEAD_MONTHS) -> list[str]:
    """The current month's and the next ``ahead`` months' partitions, those missing. None
    while ``partitions migrate`` runs: its switch attaches them, with no scan."""
    if migrating(tx):
        return []
    made = []
    for month in months_from(today.strftime("%Y-%m"), ahead + 1):
        if create_month(tx, month) is not None:
            made.append(month)
    return made


def detach_month(tx: Tx, month: str) -> bool:
    """Detach ``month``'s results partition (retention): False if it is not attached."""
    name = partition_name("results", month)
    attached = tx.one("SELECT 1 FROM pg_inherits WHERE inhparent = 'results'::regclass "
                      "AND inhrelid = to_regclass(?)", (name,))
    if attached is None:
        return False
    tx.run("SELECT set_config('lock_timeout', ?, true)", (LOCK_TIMEOUT,))
    tx.run(f"ALTER TABLE results DETACH PARTITION {name}")
    return True


# --- the online migration (``partitions migrate``) --------------------------------------
#
# Why not month by month into the default's place: PostgreSQL lets a month be attached
# beside a default partition only once it can tell the default holds none of its rows,
# under an ACCESS EXCLUSIVE lock on the default (measured on PostgreSQL 15: even when a
# CHECK implies it), and by a scan of the default unless a validated CHECK implies it.
# Such a CHECK cannot be validated while the month's rows are still readable there, and
# once added (NOT VALID) it refuses every late delivery of the month routed there. So
# the rows are copied instead, month by month, into tables of their own that nobody
# reads yet, while every row stays where it is and every write goes on; then one short
# switch swaps the old default partitions for the copies: catalog changes only.

# Results copied per transaction.
BATCH = 1000
# The switch waits this long for its locks, then lets the queue go and tries again.
SWITCH_LOCK_TIMEOUT = "2s"
# Changes left to apply under the switch's lock, at most (else they are applied first).
SWITCH_BACKLOG = 2000
DEFAULT = "default"  # partition_moves' name for what no month holds

_CHANGES = """
CREATE OR REPLACE FUNCTION bbprobe_note_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO partition_changes (result_id, probe_name, started_at)
            VALUES (NEW.result_id, NEW.probe_name, NEW.started_at);
    ELSE
        INSERT INTO partition_changes (result_id, probe_name, started_at)
            VALUES (OLD.result_id, OLD.probe_name, OLD.started_at);
    END IF;
    RETURN NULL;
END $$
"""


def copy_name(table: str, month: str) -> str:
    """The table a month's rows are copied into (its partition-to-be)."""
    return f"{table}_newdefault" if month == DEFAULT else partition_name(table, month)


def migrating(tx: Tx) -> bool:
    return _exists(tx, "partition_moves")


def start_migration(tx: Tx) -> None:
    """Every change to the old default partitions from now on is noted (row triggers),
    so the copies can follow them. CREATE TRIGGER waits for, and briefly holds up, writers
    of the default partitions only (SHARE ROW EXCLUSIVE; readers go on)."""
    tx.run("SELECT set_config('lock_timeout', ?, true)", (LOCK_TIMEOUT,))
    tx.run('CREATE TABLE partition_moves (month TEXT COLLATE "C" PRIMARY KEY, '
           "copied BOOLEAN NOT NULL DEFAULT false)")
    tx.run('CREATE TABLE partition_changes (seq BIGSERIAL PRIMARY KEY, result_id TEXT COLLATE '
           '"C" NOT NULL, probe_name TEXT COLLATE "C" NOT NULL, started_at TEXT COLLATE "C" '
           "NOT NULL)")
    tx.run(_CHANGES)
    for table in TABLES:
        tx.run(f"CREATE TRIGGER {table}_default_changes AFTER INSERT OR UPDATE OR DELETE ON "
               f"{table}_default FOR EACH ROW EXECUTE FUNCTION bbprobe_note_change()")


def default_months(tx: Tx) -> list[str]:
    """The months of the rows in the default partition: one index probe each (a started_at
    that names no month is skipped: it stays in the default)."""
    found: list[str] = []
    after = ""
    while True:
        row = tx.one("SELECT min(started_at) FROM results_default WHERE started_at >= ?",
                     (after,))
        if row is None or row[0] is None:
            return found
        value = str(row[0])
        if MONTH.match(value[:7]):
            found.append(value[:7])
            after = next_month(value[:7])
        else:
            after = value + "\x01"


def _create_copy(tx: Tx, month: str, copied: bool) -> None:
    """A month's tables, unattached, with the CHECK that spares the attach a scan of them
    (the partition constraint is implied), keys and indexes; the foreign keys come at the
    switch (a result deleted meanwhile must not be held by its copy)."""
    if _exists(tx, copy_name("results", month)):
        raise InputError(
            f"month {month} has rows in the default partition and a detached partition "
            f"of its own: attach or drop {partition_name('results', month)} first")
    for table in TABLES:
        name = copy_name(table, month)
        tx.run(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING STORAGE)")
        if month != DEFAULT:
            tx.run(f"ALTER TABLE {name} ADD CONSTRAINT {name}_month CHECK (started_at >= "
                   f"'{month}' AND started_at < '{next_month(month)}')")
        for constraint in _CONSTRAINTS[table]:
            if not constraint.startswith("FOREIGN"):
                tx.run(f"ALTER TABLE {name} ADD {constraint}")
        for index in _INDEXES[table]:
            tx.run(f"CREATE INDEX ON {name} {index}")
    tx.run("INSERT INTO partition_moves (month, copied) VALUES (?, ?)", (month, copied))


def plan_migration(tx: Tx, today: date) -> list[str]:
    """The months to copy: those of the default partition's rows and the current and
    coming months (the switch attaches them with no scan), minus those attached; each
    gets its tables; then what no month holds. Run once, after ``start_migration``."""
    attached = {m.month for m in months(tx) if m.attached}
    found = set(default_months(tx))
    wanted = found | set(months_from(today.strftime("%Y-%m"), AHEAD_MONTHS + 1))
    planned = []
    for month in sorted(wanted - attached):
        # A month with no row now has nothing to copy: the changes noted bring any.
        _create_copy(tx, month, copied=month not in found)
        planned.append(month)
    _create_copy(tx, DEFAULT, copied=False)
    return planned


def next_to_copy(tx: Tx) -> str | None:
    row = tx.one("SELECT min(month) FROM partition_moves WHERE NOT copied")
    return None if row is None or row[0] is None else str(row[0])


def _planned(tx: Tx) -> list[str]:
    return [str(r[0]) for r in tx.rows(
        "SELECT month FROM partition_moves WHERE month <> ? ORDER BY month", (DEFAULT,))]


def _outside(planned: list[str]) -> list[tuple[str, str | None]]:
    """The started_at ranges no planned month holds (what the new default takes)."""
    out: list[tuple[str, str | None]] = []
    low = ""
    for month in planned:
        if low < month:
            out.append((low, month))
        low = next_month(month)
    out.append((low, None))
    return out


def _copy(tx: Tx, month: str, keys: list[tuple[str, str, str]]) -> None:
    """Copy these results (result_id, probe_name, started_at) and their facts from the
    default partitions into ``month``'s tables, registering their ids; what is there
    already stays (a re-run after an interruption)."""
    ids = [k[0] for k in keys]
    tx.run("INSERT INTO result_ids (result_id, started_at) SELECT result_id, started_at "
           "FROM results_default WHERE result_id = ANY(?) ON CONFLICT DO NOTHING", (ids,))
    tx.run(f"INSERT INTO {copy_name('results', month)} SELECT * FROM results_default "
           "WHERE result_id = ANY(?) ON CONFLICT DO NOTHING", (ids,))
    tx.run(f"INSERT INTO {copy_name('session_facts', month)} SELECT * FROM "
           "session_facts_default WHERE result_id = ANY(?) ON CONFLICT DO NOTHING", (ids,))
    tx.run(f"INSERT INTO {copy_name('transfer_facts', month)} SELECT t.* FROM "
           "unnest(?::text[], ?::text[], ?::text[]) AS k(r, p, s) JOIN transfer_facts_default t "
           "ON t.probe_name = k.p AND t.started_at = k.s AND t.result_id = k.r "
           "ON CONFLICT DO NOTHING", (ids, [k[1] for k in keys], [k[2] for k in keys]))


def copy_batch(tx: Tx, month: str, after: tuple[str, str]) -> tuple[int, tuple[str, str]]:
    """The next ``BATCH`` results of ``month`` (in (started_at, result_id) order after
    ``after``) copied: how many, and where the next batch starts. Index range reads."""
    ranges = _outside(_planned(tx)) if month == DEFAULT else [(month, next_month(month))]
    keys: list[tuple[str, str, str]] = []
    for low, high in ranges:
        if high is not None and high <= after[0]:
            continue
        bound = "" if high is None else " AND started_at < ?"
        # The index range starts where the last batch ended (the row comparison alone
        # would not bound it).
        keys += [(str(r[0]), str(r[1]), str(r[2])) for r in tx.rows(
            "SELECT result_id, probe_name, started_at FROM results_default WHERE "
            f"started_at >= ?{bound} AND (started_at, result_id) > (?, ?) "
            f"ORDER BY started_at, result_id LIMIT {BATCH - len(keys)}",
            (max(low, after[0]), *(() if high is None else (high,)), *after))]
        if len(keys) >= BATCH:
            break
    if keys:
        _copy(tx, month, keys)
        return len(keys), (keys[-1][2], keys[-1][0])
    tx.run("UPDATE partition_moves SET copied = true WHERE month = ?", (month,))
    return 0, after


def _target(planned: list[str], started_at: str) -> str:
    """The month whose range holds ``started_at`` (text order, as the partitions'), or the
    default."""
    month = started_at[:7]
    if MONTH.match(month) and month in planned:
        return month
    for m in planned:  # a started_at that is not ISO 8601 but sorts into a month
        if m <= started_at < next_month(m):
            return m
    return DEFAULT


def apply_changes(tx: Tx, everything: bool = False) -> int:
    """Bring the copies up to date with the changes noted since the migration started
    (a late delivery, a result deleted, a body repacked): each changed result is copied
    again as the default partitions hold it now. How many changes were applied."""
    sql = "SELECT seq, result_id, probe_name, started_at FROM partition_changes ORDER BY seq"
    noted = tx.rows(sql + ("" if everything else f" LIMIT {BATCH}"))
    if not noted:
        return 0
    planned = _planned(tx)
    by_month: dict[str, set[tuple[str, str, str]]] = {}
    for _seq, rid, probe, started in noted:
        month = _target(planned, str(started))
        if month == DEFAULT and MONTH.match(str(started)[:7]):
            # A month first seen now: all its rows came after the migration started,
            # so the changes noted hold every one of them.
            month = str(started)[:7]
            _create_copy(tx, month, copied=True)
            planned = _planned(tx)
        by_month.setdefault(month, set()).add((str(rid), str(probe), str(started)))
    for month, found in by_month.items():
        keys = sorted(found)
        ids = [k[0] for k in keys]
        tx.run(f"DELETE FROM {copy_name('results', month)} WHERE result_id = ANY(?)", (ids,))
        tx.run(f"DELETE FROM {copy_name('session_facts', month)} WHERE result_id = ANY(?)",
               (ids,))
        tx.run(f"DELETE FROM {copy_name('transfer_facts', month)} t USING unnest(?::text[], "
               "?::text[], ?::text[]) AS k(r, p, s) WHERE t.probe_name = k.p AND "
               "t.started_at = k.s AND t.result_id = k.r",
               (ids, [k[1] for k in keys], [k[2] for k in keys]))
        _copy(tx, month, keys)
    tx.run("DELETE FROM partition_changes WHERE seq = ANY(?)", ([int(r[0]) for r in noted],))
    return len(noted)


class Behind(Exception):
    """Too many changes to apply under the switch's lock: apply them first."""


def switch(tx: Tx) -> list[str]:
    """The switch, in one transaction: the three parents locked (ACCESS EXCLUSIVE, the
    lock DETACH takes anyway; readers and writers wait, for at most SWITCH_LOCK_TIMEOUT
    in the queue plus what follows), the last changes applied, the old default partitions
    detached (renamed ``<table>_premigration``), every copy attached (its CHECK implies its
    range: no scan; and no default is attached then, so none is scanned), the new default
    attached (PostgreSQL scans it: what no month holds, a few rows at most). Catalog
    changes only, whatever the size of the old tables. The months attached."""
    tx.run("SELECT set_config('lock_timeout', ?, true)", (SWITCH_LOCK_TIMEOUT,))
    # In the order ingest takes them: no deadlock.
    tx.run(f"LOCK TABLE {', '.join('ONLY ' + t for t in TABLES)} IN ACCESS EXCLUSIVE MODE")
    row = tx.one("SELECT count(*) FROM partition_changes")
    if row is not None and int(row[0]) > SWITCH_BACKLOG:
        raise Behind()
    apply_changes(tx, everything=True)
    if next_to_copy(tx) is not None:
        raise InputError("partitions migrate: a month is not copied yet")
    planned = _planned(tx)
    for table in TABLES:
        if _exists(tx, f"{table}_premigration"):
            raise InputError(f"table {table}_premigration is left from a migration: "
                             "drop it first")
        tx.run(f"DROP TRIGGER {table}_default_changes ON {table}_default")
        tx.run(f"ALTER TABLE {table} DETACH PARTITION {table}_default")
        tx.run(f"ALTER TABLE {table}_default RENAME TO {table}_premigration")
        for month in planned:
            tx.run(f"ALTER TABLE {table} ATTACH PARTITION {copy_name(table, month)} "
                   f"FOR VALUES FROM ('{month}') TO ('{next_month(month)}')")
        tx.run(f"ALTER TABLE {copy_name(table, DEFAULT)} RENAME TO {table}_default")
        tx.run(f"ALTER TABLE {table} ATTACH PARTITION {table}_default DEFAULT")
    for table in ("session_facts", "transfer_facts"):
        for name in [partition_name(table, m) for m in planned] + [f"{table}_default"]:
            # NOT VALID: no scan now; validated after the switch, online.
            tx.run(f"ALTER TABLE {name} ADD CONSTRAINT {name}_result_fkey FOREIGN KEY "
                   "(result_id) REFERENCES result_ids (result_id) NOT VALID")
    tx.run("DROP TABLE partition_changes, partition_moves")
    tx.run("DROP FUNCTION bbprobe_note_change()")
    return planned


def after_switch(tx: Tx) -> list[str]:
    """What the switch left, one statement each (the caller commits each): the foreign
    keys validated (SHARE UPDATE EXCLUSIVE on the partition: reads and writes go on), the
    old tables' keys to result_ids dropped, then the old tables. Nothing when no switch
    left any."""
    if not _exists(tx, "results_premigration"):
        return []
    todo = [f"ALTER TABLE {r[1]} VALIDATE CONSTRAINT {r[0]}" for r in tx.rows(
        "SELECT conname, conrelid::regclass::text FROM pg_constraint WHERE contype = 'f' "
        "AND NOT convalidated AND confrelid = 'result_ids'::regclass AND "
        "conrelid::regclass::text ~ '^(session|transfer)_facts_(p[0-9_]+|default)$'")]
    for table in TABLES:
        if _exists(tx, f"{table}_premigration"):
            todo += [f'ALTER TABLE {table}_premigration DROP CONSTRAINT "{r[0]}"' for r in
                     tx.rows("SELECT conname FROM pg_constraint WHERE contype = 'f' AND "
                             "conrelid = ?::regclass", (f"{table}_premigration",))]
            todo.append(f"DROP TABLE {table}_premigration")
    return todo


@dataclass(frozen=True, slots=True)
class Step:
    """One step of ``partitions migrate``: a month copied ("YYYY-MM", or "default": what
    no month holds; ``count`` its results), the switch ("switch"; ``count`` the months
    attached; ``verified`` the tables PostgreSQL scanned when attaching), or the old
    tables dropped ("cleanup"; ``count`` the statements)."""
    what: str
    count: int
    verified: tuple[str, ...] = ()
