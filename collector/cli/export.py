"""bbprobe-collector ``export``: a scope's sessions, transfer attempts and pings as a
Parquet (or CSV) dataset with its data dictionary, for analysts' own tools (DuckDB,
Polars, pandas, Spark), or as open data a regulator can publish (``--open-data``).
Thin: options -> collector/export/run.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, cast

import click

from collector.cli.common import (
    chosen_scope,
    database,
    handle_errors,
    scope_options,
    shared_options,
)
from collector.errors import InputError
from collector.export import opendata
from collector.export.columns import TABLES
from collector.export.run import Exporting, Options, run


def parse_tables(text: str) -> tuple[str, ...]:
    """``--tables``: names among TABLES, comma-separated, each once, in TABLES' order."""
    given = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in given if t not in TABLES]
    if unknown or not given:
        raise InputError(f"--tables: expected names among {', '.join(TABLES)}, "
                         f"got {text[:80]!r}")
    return tuple(t for t in TABLES if t in given)


@click.command()
@shared_options
@scope_options
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet",
              show_default=True, help="parquet: zstd, hive partitions by month; csv: the "
                                      "collector's CSV convention, same layout.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory of the dataset (made if missing). The first run pins the "
                   "dataset to its start time (sessions started and received before it); "
                   "a re-run with the same options resumes that same dataset and adds "
                   "nothing newer: use --refresh, or another --out, for a new one.")
@click.option("--tables", default=",".join(TABLES), show_default=True,
              help="Which tables, comma-separated.")
@click.option("--open-data", is_flag=True,
              help="What a regulator can publish: pseudonyms, addresses and times "
                   "truncated, cells under k probes suppressed.")
@click.option("--pseudonym-key", type=click.Path(dir_okay=False),
              help="Open data: the secret HMAC key file (made at first use, mode 0600; "
                   "keep it: the same key gives the same pseudonyms).")
@click.option("--k", "k", type=int, default=None,
              help=f"Open data: fewest distinct probes a published cell holds "
                   f"(default {opendata.DEFAULT_K}).")
@click.option("--refresh", is_flag=True,
              help="Make a new dataset in --out at a new snapshot (now): remove every "
                   "partition of the export's layout there (listed in its manifest or "
                   "not, whatever its options; the old manifest is not read) and write "
                   "all.")
@click.pass_context
@handle_errors
def export(ctx: click.Context, /, probes: tuple[str, ...], since: str | None,
           until: str | None, period: str | None, fmt: str, out: str, tables: str,
           open_data: bool, pseudonym_key: str | None, k: int | None, refresh: bool,
           **filters: Any) -> None:
    """Export a scope as a dataset of three tables (sessions, attempts, pings) with a
    data dictionary; resumable per monthly partition, pinned to the first run's start
    (see --out and --refresh)."""
    chosen = parse_tables(tables)
    if not open_data and (pseudonym_key is not None or k is not None):
        raise InputError("--pseudonym-key and --k apply to --open-data only")
    if open_data and pseudonym_key is None:
        raise InputError("--open-data needs --pseudonym-key FILE (the secret key of the "
                         "pseudonyms, made at first use)")
    if k is not None and k < 2:
        raise InputError(f"--k: expected an integer of at least 2, got {k}")
    if pseudonym_key is not None and Path(pseudonym_key).resolve().is_relative_to(
            Path(out).resolve()):
        raise InputError(f"--pseudonym-key: {pseudonym_key} is inside --out {out}, whose "
                         "files get published; keep the key outside it")
    tty = sys.stderr.isatty()

    def progress(line: str) -> None:
        click.echo(f"\r\x1b[K{line}", err=True, nl=False)

    with database(ctx, read_only=True) as store:
        where = chosen_scope(store, probes, since, until, period, filters)
        # The key only once the scope is valid: a refused command leaves no new key.
        key = opendata.load_or_create_key(pseudonym_key) if pseudonym_key else None
        # SqlStore speaks ExportStore (storage/sql/exports.py); Store predates it.
        summary = run(cast(Exporting, store), Options(
            Path(out), fmt, where, chosen, open_data, key,
            k if k is not None else opendata.DEFAULT_K, refresh),
            progress if tty else None)
    if tty:
        click.echo("", err=True)
    counts = ", ".join(f"{t} {summary.rows.get(t, 0):,}" for t in chosen)
    pinned = summary.snapshot.get("received_before", "")
    gone = sum(summary.suppressed.values())
    click.echo(f"exported {counts} rows to {out} ({len(summary.written)} partition(s) "
               f"written, {len(summary.skipped)} already done; dataset as of {pinned}"
               + (f"; {gone:,} rows suppressed in cells under k probes" if open_data else "")
               + ")", err=True)


COMMANDS = (export,)
