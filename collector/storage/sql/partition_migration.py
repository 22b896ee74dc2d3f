"""``partitions migrate``: an existing database's rows moved from the default partitions
into monthly partitions online (storage/sql/partitions.py has the layout; docs/scaling.md,
section 6, the steps).

Why not month by month into the default's place: PostgreSQL lets a month be attached
beside a default partition only once it can tell the default holds none of its rows,
under an ACCESS EXCLUSIVE lock on the default (measured on PostgreSQL 15: even when a
CHECK implies it), and by a scan of the default unless a validated CHECK implies it.
Such a CHECK cannot be validated while the month's rows are still readable there, and
once added (NOT VALID) it refuses every late delivery of the month routed there. So
the rows are copied instead, month by month, into tables of their own that nobody
reads yet, while every row stays where it is and every write goes on; then one short
switch swaps the old default partitions for the copies: catalog changes only.

The steps, each resumable: start and plan (one transaction: the change log's triggers,
then every month's tables; a failure leaves nothing behind), the copies (a month a step,
in batches, the change log applied as it comes), the switch, the cleanup (a statement a
transaction; each old table is checked on its own, so a crash between two drops leaves
nothing behind for good).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from collector.errors import InputError
from collector.storage.sql.base import Tx
from collector.storage.sql.partitions import (
    AHEAD_MONTHS,
    CONSTRAINTS,
    INDEXES,
    LOCK_TIMEOUT,
    MONTH,
    TABLES,
    exists,
    months_from,
    next_month,
    partition_name,
)

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
        if MONTH.fullmatch(value[:7]):
            found.append(value[:7])
            after = next_month(value[:7])
        else:
            after = value + "\x01"


def made_months(tx: Tx) -> set[str]:
    """The months that have a partition table of any of the three (attached, detached,
    a copy being made, or the facts' of a month whose bodies were detached and dropped)."""
    return {f"{name[-7:-3]}-{name[-2:]}" for (name,) in tx.rows(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND relname ~ "
        "'^(results|session_facts|transfer_facts)_p[0-9]{4}_[0-9]{2}$'")}


def movable_months(tx: Tx) -> list[str]:
    """The months of the default partition's rows that ``partitions migrate`` moves: not
    those of a month made already. Rows of a detached month delivered after its detach
    (new ids) stay in the default partition, readable; the month is not made twice."""
    made = made_months(tx)
    return [m for m in default_months(tx) if m not in made]


def _create_copy(tx: Tx, month: str, copied: bool) -> None:
    """A month's tables, unattached, with the CHECK that spares the attach a scan of them
    (the partition constraint is implied), keys and indexes; the foreign keys come at the
    switch (a result deleted meanwhile must not be held by its copy). Nothing when the
    month is planned already (a plan run again)."""
    if tx.one("SELECT 1 FROM partition_moves WHERE month = ?", (month,)) is not None:
        return
    for table in TABLES:
        name = copy_name(table, month)
        if exists(tx, name):
            raise InputError(f"partitions migrate: table {name} exists outside the "
                             "migration's plan: drop it, or attach it, first")
        tx.run(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING STORAGE)")
        if month != DEFAULT:
            tx.run(f"ALTER TABLE {name} ADD CONSTRAINT {name}_month CHECK (started_at >= "
                   f"'{month}' AND started_at < '{next_month(month)}')")
        for constraint in CONSTRAINTS[table]:
            if not constraint.startswith("FOREIGN"):
                tx.run(f"ALTER TABLE {name} ADD {constraint}")
        if table == "results":
            # The parent's key to probes, held from the start (probes are never deleted):
            # the switch's attach then takes it over instead of checking every row.
            tx.run(f"ALTER TABLE {name} ADD FOREIGN KEY (probe_name) REFERENCES probes "
                   "(name)")
        for index in INDEXES[table]:
            tx.run(f"CREATE INDEX ON {name} {index}")
    tx.run("INSERT INTO partition_moves (month, copied) VALUES (?, ?)", (month, copied))


def plan_migration(tx: Tx, today: date) -> list[str]:
    """The months to copy: those of the default partition's rows and the current and
    coming months (the switch attaches them with no scan), minus those made already;
    each gets its tables; then what no month holds. Run in ``start_migration``'s
    transaction; run again (resumed) it plans only what is not planned yet."""
    made = made_months(tx) - set(_planned(tx))
    found = set(default_months(tx))
    wanted = found | set(months_from(today.strftime("%Y-%m"), AHEAD_MONTHS + 1))
    planned = []
    for month in sorted(wanted - made):
        # A month with no row now has nothing to copy: the changes noted bring any.
        _create_copy(tx, month, copied=month not in found)
        planned.append(month)
    _create_copy(tx, DEFAULT, copied=False)
    return planned


def planned_fully(tx: Tx) -> bool:
    """Whether the plan is complete (its last row, the default's, is there)."""
    return tx.one("SELECT 1 FROM partition_moves WHERE month = ?", (DEFAULT,)) is not None


def _require_plan(tx: Tx) -> None:
    # Applying changes before the plan would take a month with old rows for one "first
    # seen" (all its rows noted): its copy would miss them (review 2, finding 1).
    if not planned_fully(tx):
        raise InputError("partitions migrate: the migration's plan is incomplete; run "
                         "`bbprobe-collector partitions migrate` again")


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


def _ranges(month: str, planned: list[str]) -> list[tuple[str, str | None]]:
    return _outside(planned) if month == DEFAULT else [(month, next_month(month))]


def _in_range(month: str, planned: list[str]) -> tuple[str, list[str]]:
    """SQL (on ``started_at``) for the rows ``month``'s copy may hold, and its values."""
    parts: list[str] = []
    params: list[str] = []
    for low, high in _ranges(month, planned):
        parts.append("started_at >= ?" if high is None else
                     "(started_at >= ? AND started_at < ?)")
        params += [low] if high is None else [low, high]
    return f"({' OR '.join(parts)})", params


def _copy(tx: Tx, month: str, keys: list[tuple[str, str, str]], planned: list[str]) -> None:
    """Copy these results (result_id, probe_name, started_at) and their facts from the
    default partitions into ``month``'s tables, registering their ids; what is there
    already stays (a re-run after an interruption). Only rows in the month's range: a
    result deleted and delivered again dated in another month (a change noted under
    both) goes to that month's copy, not against this one's CHECK (review 2, finding 6)."""
    ids = [k[0] for k in keys]
    where, bounds = _in_range(month, planned)
    # FOR KEY SHARE: a concurrent `result delete` of one of them waits for this commit,
    # so its release trigger sees the registration below and frees the id (review 2,
    # finding 11); one that came first is not copied nor registered.
    tx.run("SELECT 1 FROM results_default WHERE result_id = ANY(?) AND "
           f"{where} ORDER BY result_id FOR KEY SHARE", (ids, *bounds))
    tx.run("INSERT INTO result_ids (result_id, started_at) SELECT result_id, started_at "
           f"FROM results_default WHERE result_id = ANY(?) AND {where} "
           "ON CONFLICT DO NOTHING", (ids, *bounds))
    tx.run(f"INSERT INTO {copy_name('results', month)} SELECT * FROM results_default "
           f"WHERE result_id = ANY(?) AND {where} ON CONFLICT DO NOTHING", (ids, *bounds))
    tx.run(f"INSERT INTO {copy_name('session_facts', month)} SELECT * FROM "
           f"session_facts_default WHERE result_id = ANY(?) AND {where} "
           "ON CONFLICT DO NOTHING", (ids, *bounds))
    tx.run(f"INSERT INTO {copy_name('transfer_facts', month)} SELECT t.* FROM "
           "unnest(?::text[], ?::text[], ?::text[]) AS k(r, p, s) JOIN transfer_facts_default t "
           f"ON t.probe_name = k.p AND t.started_at = k.s AND t.result_id = k.r WHERE {where} "
           "ON CONFLICT DO NOTHING", (ids, [k[1] for k in keys], [k[2] for k in keys], *bounds))


def copy_batch(tx: Tx, month: str, after: tuple[str, str]) -> tuple[int, tuple[str, str]]:
    """The next ``BATCH`` results of ``month`` (in (started_at, result_id) order after
    ``after``) copied: how many, and where the next batch starts. Index range reads."""
    planned = _planned(tx)
    keys: list[tuple[str, str, str]] = []
    for low, high in _ranges(month, planned):
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
        _copy(tx, month, keys, planned)
        return len(keys), (keys[-1][2], keys[-1][0])
    tx.run("UPDATE partition_moves SET copied = true WHERE month = ?", (month,))
    return 0, after


def _target(planned: list[str], started_at: str) -> str:
    """The month whose range holds ``started_at`` (text order, as the partitions'), or the
    default."""
    month = started_at[:7]
    if MONTH.fullmatch(month) and month in planned:
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
    _require_plan(tx)
    planned = _planned(tx)
    made: set[str] | None = None
    by_month: dict[str, set[tuple[str, str, str]]] = {}
    for _seq, rid, probe, started in noted:
        month = _target(planned, str(started))
        if month == DEFAULT and MONTH.fullmatch(str(started)[:7]):
            made = made_months(tx) if made is None else made
            if str(started)[:7] not in made:
                # A month first seen now (the plan, made in the transaction that started
                # the change log, found none of its rows): every row it has came after,
                # so the changes noted hold each one.
                month = str(started)[:7]
                _create_copy(tx, month, copied=True)
                # The default's copy may have taken some of them before this note was
                # seen (it copies what no planned month holds): they are this month's
                # now, and left there they would fail the new default's attach.
                for table in TABLES:
                    tx.run(f"DELETE FROM {copy_name(table, DEFAULT)} WHERE started_at >= ? "
                           "AND started_at < ?", (month, next_month(month)))
                planned = _planned(tx)
                made.add(month)
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
        _copy(tx, month, keys, planned)
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
    _require_plan(tx)
    row = tx.one("SELECT count(*) FROM partition_changes")
    if row is not None and int(row[0]) > SWITCH_BACKLOG:
        raise Behind()
    apply_changes(tx, everything=True)
    if next_to_copy(tx) is not None:
        raise InputError("partitions migrate: a month is not copied yet")
    planned = _planned(tx)
    for table in TABLES:
        if exists(tx, f"{table}_premigration"):
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
    old tables' keys to result_ids dropped, then the old tables. Each old table is looked
    for on its own: a crash between two drops leaves the rest to the next run (review 2,
    finding 5). Nothing when no switch left any."""
    left = [t for t in TABLES if exists(tx, f"{t}_premigration")]
    if not left:
        return []
    todo = [f"ALTER TABLE {r[1]} VALIDATE CONSTRAINT {r[0]}" for r in tx.rows(
        "SELECT conname, conrelid::regclass::text FROM pg_constraint WHERE contype = 'f' "
        "AND NOT convalidated AND confrelid = 'result_ids'::regclass AND "
        "conrelid::regclass::text ~ '^(session|transfer)_facts_(p[0-9_]+|default)$'")]
    for table in left:
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
