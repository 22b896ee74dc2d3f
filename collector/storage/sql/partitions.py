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
  copies and a new default (storage/sql/partition_migration.py; it says why not month
  by month in place).
- **Retention.** ``detach_month`` detaches a month's ``results`` partition (the bodies,
  the bulk): its rows leave every read; the table stays, to archive and drop. The facts
  and day rollups stay, so reports keep the month. Its ids stay in ``result_ids``: a
  result of a detached month sent again is not stored again, and is answered
  "duplicate" (``detached_result``) without its hash compared: the stored body is out
  of reach (result_ids keeps no hash; 32 bytes more a session on a table that already
  grows by hundreds of millions of rows a year). Its InfluxDB outbox entries go with it.
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
# [0-9], not \d: Python's \d also matches other scripts' digits ("٢٠٢٦"), which would make
# a table name and an empty range (review 2, finding 12). Always used with fullmatch.
MONTH = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")
# The default partitions are "small" up to this many results: a month attached beside
# them makes PostgreSQL scan them under a lock that holds up ingest, quick only then.
DEFAULT_SMALL = 100_000

# Each month's constraints and indexes, as the unpartitioned tables had them.
CONSTRAINTS = {
    "results": ("PRIMARY KEY (result_id)",),
    "session_facts": ("PRIMARY KEY (probe_name, started_at, result_id)", "UNIQUE (result_id)",
                      "FOREIGN KEY (result_id) REFERENCES result_ids (result_id)"),
    "transfer_facts": ("PRIMARY KEY (probe_name, started_at, result_id, seq)",
                       "FOREIGN KEY (result_id) REFERENCES result_ids (result_id)"),
}
INDEXES = {
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
    -- FOR KEY SHARE: a concurrent delete of the old row waits for this commit, so its
    -- release trigger sees the registration and frees it (else the id stays taken with
    -- no row, and an honest re-delivery is a conflict); a delete that came first makes
    -- this find nothing, and the new row goes in.
    SELECT d.started_at INTO stored FROM results_default d WHERE d.result_id = NEW.result_id
        FOR KEY SHARE;
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
    # A result's probe must exist: the key goes on the parent, so every month partition
    # has it (LIKE copies no foreign key). The default partition's own key, the same,
    # is taken over without a scan.
    tx.run("ALTER TABLE results ADD CONSTRAINT results_probe_name_fkey FOREIGN KEY "
           "(probe_name) REFERENCES probes (name)")
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
    if not MONTH.fullmatch(text):
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


def exists(tx: Tx, name: str) -> bool:
    row = tx.one("SELECT to_regclass(?) IS NOT NULL", (name,))
    return bool(row and row[0])


def migrating(tx: Tx) -> bool:
    """Whether ``partitions migrate`` is under way (storage/sql/partition_migration.py)."""
    return exists(tx, "partition_moves")


def create_month(tx: Tx, month: str) -> int | None:
    """Month ``month``'s partitions, with the rows of that month the default partitions
    held moved into them (module docstring): how many results moved, or None when the
    month exists already (attached or detached: a detached month is not made again, nor
    one whose bodies were dropped after, its facts' partitions still there)."""
    if any(exists(tx, partition_name(table, month)) for table in TABLES):
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
        for constraint in CONSTRAINTS[table]:
            tx.run(f"ALTER TABLE {name} ADD {constraint}")
        for index in INDEXES[table]:
            tx.run(f"CREATE INDEX ON {name} {index}")
        tx.run(f"ALTER TABLE {table} ATTACH PARTITION {name} "
               f"FOR VALUES FROM ('{lo}') TO ('{hi}')")
    tx.run("SELECT set_config('bbprobe.moving', 'off', true)")
    return moved


def default_rows(tx: Tx, limit: int) -> int:
    """The results in the default partition, counted up to ``limit + 1`` (a bounded read,
    however large the partition)."""
    row = tx.one(f"SELECT count(*) FROM (SELECT 1 FROM results_default LIMIT {limit + 1}) x")
    return 0 if row is None else int(row[0])


def default_is_small(tx: Tx) -> bool:
    """Whether the default partitions are small enough for PostgreSQL's check of them,
    when a month is attached, to be quick."""
    return default_rows(tx, DEFAULT_SMALL) <= DEFAULT_SMALL


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


def _attached(tx: Tx, name: str) -> bool:
    return tx.one("SELECT 1 FROM pg_inherits WHERE inhparent = 'results'::regclass "
                  "AND inhrelid = to_regclass(?)", (name,)) is not None


def detach_month(tx: Tx, month: str) -> bool:
    """Detach ``month``'s results partition (retention): False if it is not attached.
    Its results' InfluxDB outbox entries and dead letters go in the same transaction:
    the sink leases through a join with ``results``, so an entry whose row left every
    read would be leased again and again and never done, and enough of them at the
    queue's head would stall the sink for good (review 2, finding 4)."""
    name = partition_name("results", month)
    if not _attached(tx, name):
        return False
    tx.run("SELECT set_config('lock_timeout', ?, true)", (LOCK_TIMEOUT,))
    for table in ("influx_outbox", "influx_dead_letters"):
        tx.run(f"DELETE FROM {table} q USING {name} r WHERE q.result_id = r.result_id")
    tx.run(f"ALTER TABLE results DETACH PARTITION {name}")
    return True


def detached_result(tx: Tx, result_id: str) -> bool:
    """Whether ``result_id`` is registered for a month whose results partition was made
    and is no longer attached (detached, or dropped after): its row is out of every
    read, and a delivery of it again is a duplicate whose hash cannot be compared."""
    row = tx.one("SELECT started_at FROM result_ids WHERE result_id = ?", (result_id,))
    month = "" if row is None else str(row[0])[:7]
    if not MONTH.fullmatch(month):
        return False
    # The month's facts partition stays attached when its bodies are detached or dropped:
    # it tells a month once partitioned from one whose rows are still in the default.
    return exists(tx, partition_name("session_facts", month)) and not _attached(
        tx, partition_name("results", month))


