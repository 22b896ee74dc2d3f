"""bbprobe-collector's commands over the store as a whole: ``migrate`` (copy it into
another, SQLite into PostgreSQL, checked), ``compact`` (pack old result bodies), and
``influx`` (the InfluxDB copy: backfill, outbox status, retry of the set-apart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from agent.schema import utc_now
from collector.cli.common import (
    chosen_scope,
    database,
    echo,
    handle_errors,
    load_config,
    scope_options,
    shared_options,
)
from collector.compliance import targets as targets_mod
from collector.errors import CollectorError, InputError
from collector.reports import service
from collector.reports.text import report_dict
from collector.scope import resolve_scope
from collector.storage.sql.backends import open_store


@click.command()
@shared_options
@click.option("--to", "target", required=True, metavar="URL",
              help="The store to copy into: a postgresql:// URI (its password from "
                   "$PGPASSWORD or ~/.pgpass), or an SQLite file.")
@click.option("--page", type=click.IntRange(1, 100_000), default=2000, show_default=True,
              help="Rows per transaction of the copy.")
@click.option("--full", is_flag=True,
              help="Walk every row again rather than go on from the checkpoint.")
@click.option("--checkpoint", "checkpoint_path", type=click.Path(dir_okay=False),
              help="Where the copy notes its progress (default: beside an SQLite source, "
                   "NAME.migrate.json; else ./bbprobe-migrate.json).")
@click.pass_context
@handle_errors
def migrate(ctx: click.Context, target: str, page: int, full: bool,
            checkpoint_path: str | None) -> None:
    """Copy this collector's store (probes, token digests, results with their facts,
    gaps, browser and ndt7 tests, the InfluxDB outbox) into another, typically SQLite
    into PostgreSQL. Stop the collector first. Resumable: run it again after an
    interruption. Checked by the row count of every table and by the compliance report
    of every probe, from both stores."""
    from collector.config import StorageConfig
    from collector.storage.sql.migrate import Checkpoint, copy_store

    if target.startswith(("postgresql://", "postgres://")):
        to = StorageConfig(backend="postgresql", url=target)
    else:
        to = StorageConfig(path=target)
    cfg = load_config(ctx)
    table = targets_mod.load(cfg.compliance.targets)
    if checkpoint_path is None:
        checkpoint_path = (cfg.storage.path + ".migrate.json"
                           if cfg.storage.backend == "sqlite" else "bbprobe-migrate.json")
    with database(ctx) as source:
        destination = open_store(to)
        try:
            if source.describe == destination.describe:
                raise InputError("--to names the store being copied")
            echo(f"copying {source.describe} into {destination.describe}", err=True)
            mark = Checkpoint.load(Path(checkpoint_path), destination.describe)
            if mark.keys and not full:
                echo(f"going on from the checkpoint in {checkpoint_path}", err=True)
            copies = copy_store(source, destination, page=page, full=full, checkpoint=mark)
            for c in copies:
                echo(f"{c.table}: {c.target_rows} of {c.source_rows} row(s) "
                     f"({c.copied} copied now)")
            differ = [c.table for c in copies if not c.complete]
            if differ:
                raise CollectorError(
                    f"row counts differ in: {', '.join(differ)} (the target already held "
                    "other rows, or the source changed during the copy; stop the "
                    "collector and run migrate again with --full)")
            everything = resolve_scope(None, None, None)
            mine = report_dict(service.compliance(source, everything, table), everything)
            theirs = report_dict(service.compliance(destination, everything, table),
                                 everything)
            if mine != theirs:
                raise CollectorError("the compliance reports of the two stores differ")
            echo(f"report: identical from both stores ({mine['sessions']} valid "
                 "session(s), every probe)")
            mark.remove()
        finally:
            destination.close()


@click.command()
@shared_options
@click.option("--batch", default=100, show_default=True, type=click.IntRange(1, 10_000),
              help="Bodies packed per step (one short transaction each).")
@click.option("--vacuum", is_flag=True,
              help="SQLite: then rewrite the file to give the freed pages back to the "
                   "disk. Stop the collector first: VACUUM holds the write lock while it "
                   "runs, and needs free disk about the database's size.")
@click.pass_context
@handle_errors
def compact(ctx: click.Context, batch: int, vacuum: bool) -> None:
    """Pack result bodies stored as plain JSON text (by a version that did not pack them)
    as new ones are: losslessly, in about a sixth of the bytes. Safe while the collector runs
    (bodies are packed outside any transaction, then written in one short transaction
    per batch), and safe to interrupt and run again. A body the current schema cannot
    read is left as text and counted."""
    with database(ctx) as store:
        before = store.size_bytes()
        after, packed, kept = "", 0, 0
        while True:
            done, left, last = store.pack_text_bodies(after, batch)
            packed, kept = packed + done, kept + left
            if last is None:
                break
            after = last
        echo(f"packed {packed} result bod{'y' if packed == 1 else 'ies'}"
             + (f"; {kept} left as text (the current schema cannot read them)"
                if kept else ""))
        if vacuum:
            store.vacuum()
        echo(f"{store.describe}: {before / 1024**2:.1f} MiB before, "
             f"{store.size_bytes() / 1024**2:.1f} MiB now"
             + ("" if vacuum else
                " (on SQLite, --vacuum gives the freed pages back to the disk)"))


@click.group()
def influx() -> None:
    """The InfluxDB copy: queue stored results again, see the outbox."""


@influx.command("backfill")
@shared_options
@scope_options
@click.pass_context
@handle_errors
def influx_backfill(ctx: click.Context, /, probes: tuple[str, ...], since: str | None,
                    until: str | None, period: str | None, **filters: Any) -> None:
    """Queue stored results in scope for InfluxDB (after enabling the sink, or to rebuild
    a bucket). A running collector with [influxdb] enabled writes them; points already
    there are rewritten identically."""
    with database(ctx) as store:
        where = chosen_scope(store, probes, since, until, period, filters)
        if where.family is not None:
            raise InputError("--family: a backfill copies whole results, of both families "
                             "(their session points carry the tag address_family)")
        added = store.outbox_enqueue(list(where.probes) if where.probes is not None else None,
                                     where.since, where.until, utc_now())
        waiting = store.outbox_size()
    echo(f"queued {added} result(s); {waiting} waiting for InfluxDB")
    if not load_config(ctx).influxdb.enabled:
        echo("note: [influxdb] is not enabled in this configuration; the collector "
             "will not write them until it is", err=True)


@influx.command("status")
@shared_options
@click.pass_context
@handle_errors
def influx_status(ctx: click.Context) -> None:
    """Results waiting in the outbox, and those set apart (dead letters) with why. A
    running collector's /api/v1/health shows more."""
    with database(ctx) as store:
        waiting = store.outbox_size()
        dead = store.outbox_dead_letters()
    cfg = load_config(ctx).influxdb
    state = f"enabled, {cfg.url}, bucket {cfg.bucket}" if cfg.enabled else "disabled"
    echo(f"influxdb: {state}; {waiting} result(s) waiting; {len(dead)} set apart")
    for row in dead:
        echo(f"  {row['result_id']}  {row['failed_at']}  {row['reason']}")


@influx.command("retry")
@shared_options
@click.pass_context
@handle_errors
def influx_retry(ctx: click.Context) -> None:
    """Queue the results set apart again (after fixing what InfluxDB refused, such as a
    bucket's retention)."""
    with database(ctx) as store:
        queued = store.outbox_retry_dead(utc_now())
        waiting = store.outbox_size()
    echo(f"queued {queued} result(s) again; {waiting} waiting")


COMMANDS = (migrate, compact, influx)
