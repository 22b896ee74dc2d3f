"""``bbprobe-collector partitions``: PostgreSQL's monthly partitions of results and their
facts (collector/storage/sql/partitions.py): list them, create the coming months' ahead,
move an older database's rows into them a month per transaction (online), and detach a
month's bodies for retention."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from collector.cli.common import database, echo, handle_errors, shared_options
from collector.errors import InputError
from collector.storage.store import Store

if TYPE_CHECKING:
    from collector.storage.sql.postgres import PostgresStore


def _postgres(store: Store) -> PostgresStore:
    """The store, if it is PostgreSQL's (partitions are PostgreSQL's: SQLite's one file
    has none)."""
    # Imported here: an SQLite collector never loads psycopg.
    from collector.storage.sql.postgres import PostgresStore

    if not isinstance(store, PostgresStore):
        raise InputError("partitions: only for storage.backend \"postgresql\"")
    return store


@click.group("partitions")
def partitions_group() -> None:
    """PostgreSQL's monthly partitions: list, create ahead, migrate an older database,
    detach a month (retention)."""


@partitions_group.command("list")
@shared_options
@click.pass_context
@handle_errors
def list_months(ctx: click.Context) -> None:
    """Each month's results partition (rows as PostgreSQL estimates them, bytes with the
    bodies), attached or detached, and the default partition (rows not moved yet)."""
    with database(ctx) as store:
        pg = _postgres(store)
        rows = pg.partition_months()
    for m in rows:
        state = "copying" if m.copying else "attached" if m.attached else "DETACHED"
        count = "?" if m.rows < 0 else f"~{m.rows:,}"
        echo(f"{m.month:8}  {state:8}  {count:>14} results  {m.size_bytes / 1024**2:,.1f} MiB")


@partitions_group.command("create-ahead")
@shared_options
@click.option("--months", type=click.IntRange(0, 120), default=3, show_default=True,
              help="Months after the current one.")
@click.pass_context
@handle_errors
def create_ahead(ctx: click.Context, months: int) -> None:
    """Create the current month's partitions and the next MONTHS' (each collector also
    does it when it starts, and daily while it serves). Rows of those months still in the
    default partition move into them. Refused while the default partition holds more
    than 100,000 results (each month made would stop ingest for a scan of it: run
    `partitions migrate` first) or another partitions command runs."""
    with database(ctx) as store:
        pg = _postgres(store)
        made = pg.partitions_create_ahead(datetime.now(UTC), months)
    echo(f"created: {', '.join(made)}" if made else "every month was there already")


@partitions_group.command("migrate")
@shared_options
@click.option("--months", type=click.IntRange(1, 10_000), default=1, show_default=True,
              help="At most this many steps (a month copied, or the switch).")
@click.pass_context
@handle_errors
def migrate(ctx: click.Context, months: int) -> None:
    """Move the rows a database held before partitioning (its default partition) into
    monthly partitions while the collector serves: each month is copied, oldest first,
    in short transactions (reads and writes go on; late deliveries land in the default
    partition and are copied after); once all are, a switch attaches them in one
    catalog-only transaction (readers and writers wait for it, seconds at most) and the
    old tables are dropped. Safe to interrupt and run again."""
    with database(ctx) as store:
        pg = _postgres(store)
        for _ in range(months):
            step = pg.partitions_migrate_step()
            if step is None:
                echo("nothing left in the default partition")
                return
            if step.what == "switch":
                echo(f"switch: {step.count} month(s) attached; PostgreSQL verified only "
                     f"{', '.join(step.verified) or 'nothing'}; old tables dropped")
            elif step.what == "cleanup":
                echo(f"old tables dropped ({step.count} statement(s))")
            else:
                echo(f"{step.what}: {step.count:,} result(s) copied")


@partitions_group.command("detach")
@shared_options
@click.argument("month")
@click.pass_context
@handle_errors
def detach(ctx: click.Context, month: str) -> None:
    """Detach MONTH's (YYYY-MM) results partition: its bodies leave every read and stay
    in table results_pYYYY_MM, to archive (pg_dump -t) and drop. The facts and day
    rollups stay, so reports keep the month; its results sent again are answered as
    duplicates, not stored again (their hashes cannot be compared); their InfluxDB outbox
    entries are removed."""
    from collector.storage.sql import partitions

    month = partitions.parse_month(month)
    with database(ctx) as store:
        pg = _postgres(store)
        if not pg.partitions_detach(month):
            raise InputError(f"month {month}: no attached partition "
                             "(`bbprobe-collector partitions list`)")
    echo(f"detached {partitions.partition_name('results', month)}: archive it "
         f"(pg_dump -t {partitions.partition_name('results', month)}), then DROP TABLE it")


