"""bbprobe-collector command line. Thin: parse flags, call ``service``/``app``, print.

Errors are caught once here and printed as one line, never as a traceback:
exit 1 for operational errors, 2 for bad configuration or arguments.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from agent.schema import utc_now
from collector import __version__, safetext
from collector.alerts import notifiers
from collector.cli import (
    alerts as cli_alerts,
)
from collector.cli import (
    fleet as cli_fleet,
)
from collector.cli import (
    results as cli_results,
)
from collector.cli import (
    tickets as cli_tickets,
)
from collector.cli.common import _config, _shown, _store, echo, handle_errors, shared_options
from collector.compliance import targets as targets_mod
from collector.config import resolve_secrets
from collector.errors import CollectorError, InputError, StoreError
from collector.lines import TECHNOLOGIES
from collector.reports import html as html_report
from collector.reports import service
from collector.reports.text import (
    LISTING_COLUMNS,
    PROBE_COLUMNS,
    REPORT_COLUMNS,
    SAMPLE_COLUMNS,
    Scope,
    breakdown_dict,
    breakdown_rows,
    format_breakdown,
    format_csv,
    format_json,
    format_listing_text,
    format_text,
    report_dict,
    report_rows,
    sample_rows,
)
from collector.storage.postgres import masked
from collector.storage.store import Store, open_store

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bbprobe-collector")
@shared_options
@click.pass_context
def main(ctx: click.Context) -> None:
    """bbprobe collector: stores probe results, serves measurement endpoints, and checks
    them against the Allegato 2 targets."""
    ctx.ensure_object(dict)


@main.command()
@shared_options
@click.option("--host", help="Listen address (overrides server.host).")
@click.option("--port", type=int, help="Listen port, 0 for any free one (server.port).")
@click.option("--addr-file", help="Write the bound URL to this file once listening.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Processes serving the same port (SO_REUSEPORT), to use every core; "
                   "most useful with PostgreSQL (README, Scaling out).")
@click.option("--role", type=click.Choice(["all", "ingest", "measurement"]),
              help="What to serve (overrides server.role; default all): everything; "
                   "ingest (ingestion, queries, reports, admin: no measurement "
                   "endpoints); or measurement (the HTTP, ndt7 and LibreSpeed endpoints "
                   "and the speed-test page only: no database, no targets table).")
@click.pass_context
@handle_errors
def serve(ctx: click.Context, host: str | None, port: int | None, addr_file: str | None,
          workers: int, role: str | None) -> None:
    """Serve ingestion, queries and measurement endpoints until SIGTERM/SIGINT."""
    from collector.server import app
    from collector.server import workers as workers_mod

    cfg = resolve_secrets(_config(ctx, **{"server.host": host, "server.port": port,
                                          "server.addr_file": addr_file,
                                          "server.role": role}))
    cli_tickets.check(cfg)
    role = cfg.server.role
    if role == "measurement":
        if not cfg.measurement.enabled:
            raise InputError("--role measurement with measurement.enabled = false "
                             "would serve nothing")
        where = "measurement only: no database"
    else:
        # Fail now, not at the first report (or alert), if the targets table or a
        # notifier's secret is unusable.
        targets_mod.load(cfg.compliance.targets)
        if cfg.alerts.enabled:
            notifiers.build(cfg.alerts)
        where = "database " + (cfg.storage.path if cfg.storage.backend == "sqlite" else
                               masked(cfg.storage.url))
        if role == "ingest":
            where += ", no measurement endpoints"

    def ready(url: str) -> None:
        processes = f", {workers} processes" if workers > 1 else ""
        echo(f"bbprobe-collector {__version__} listening on {url} "
                   f"({where}{processes})", err=True)

    try:
        if workers > 1:
            workers_mod.run(cfg, workers, ready, role)
        else:
            asyncio.run(app.serve(cfg, ready, role=role))
    except OSError as exc:
        raise CollectorError(
            f"cannot listen on {cfg.server.host}:{cfg.server.port}: {exc.strerror}"
        ) from None


@main.command("check-config")
@shared_options
@click.pass_context
@handle_errors
def check_config(ctx: click.Context) -> None:
    """Validate the config, its secrets and the targets table it names, then exit."""
    cfg = resolve_secrets(_config(ctx))
    cli_tickets.check(cfg)
    if cfg.server.role == "measurement":
        echo("config OK; role measurement (no database, no targets table)")
        return
    table = targets_mod.load(cfg.compliance.targets)
    built = notifiers.build(cfg.alerts) if cfg.alerts.enabled else []
    alerting = f"; alerts on, {len(built)} notifier(s)" if cfg.alerts.enabled else ""
    echo(f"config OK; targets: {table.name} ({len(table.measurable)} measurable "
               f"of {len(table.indicator)} indicators){alerting}")


@main.group()
def probe() -> None:
    """Register, list and revoke probes."""


def line_options(fn: Any) -> Any:
    """The line metadata options of ``probe add`` and ``probe set``. Speeds are the
    offer's three declared speeds per direction (delibera 156/23/CONS)."""
    for name, kind, text in reversed((
        ("--operator", str, "Operator (ISP) of the line."),
        ("--offer", str, "Commercial offer of the line."),
        ("--region", str, "Region where the probe sits."),
        ("--technology", str, "Access technology: " + ", ".join(TECHNOLOGIES) + "."),
        ("--download-min-kbps", float, "Declared minimum download (guaranteed)."),
        ("--download-normal-kbps", float, "Declared normally available download."),
        ("--download-nominal-kbps", float, "Declared maximum (nominal) download."),
        ("--upload-min-kbps", float, "Declared minimum upload (guaranteed)."),
        ("--upload-normal-kbps", float, "Declared normally available upload."),
        ("--upload-nominal-kbps", float, "Declared maximum (nominal) upload."),
        ("--max-delay-ms", float, "Contract maximum delay."),
        ("--max-loss-ratio", float, "Contract maximum packet loss (0-1)."),
    )):
        fn = click.option(name, type=kind, help=text)(fn)
    return fn


@probe.command("add")
@shared_options
@click.argument("name")
@line_options
@click.pass_context
@handle_errors
def probe_add(ctx: click.Context, /, name: str, **line: Any) -> None:
    """Register probe NAME and print its token (shown this once only)."""
    with _store(ctx, create=True) as store:
        token = service.register_probe(store, name, service.line_metadata(line))
    echo(f"probe {name!r} registered; its token follows (shown once, stored hashed)",
               err=True)
    echo(token)


@probe.command("set")
@shared_options
@click.argument("name")
@line_options
@click.pass_context
@handle_errors
def probe_set(ctx: click.Context, /, name: str, **line: Any) -> None:
    """Change probe NAME's line metadata (the options given; the rest stays): say, the
    offer's declared speeds after a change of contract. Reports and certificates read
    the metadata as it is when they are made."""
    if all(v is None for v in line.values()):
        raise InputError("nothing to change: give at least one option (see --help)")
    with _store(ctx) as store:
        changed = service.set_line(store, name, line)
    echo(f"probe {name!r}: " + "; ".join(
        f"{k} {getattr(changed, k)}" for k, v in line.items() if v is not None))


@probe.command("list")
@shared_options
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv"]), default="text")
@click.pass_context
@handle_errors
def probe_list(ctx: click.Context, fmt: str) -> None:
    """List registered probes with their line metadata."""
    with _store(ctx) as store:
        probes = store.probes()
    if fmt == "json":
        echo(format_json({"probes": [p.to_dict() for p in probes]}), nl=False)
        return
    if fmt == "csv":
        echo(format_csv((p.to_dict() for p in probes), PROBE_COLUMNS), nl=False)
        return
    for p in probes:
        state = f"revoked {p.revoked_at}" if p.revoked_at else "active"
        extra = ", ".join(f"{k}={v}" for k, v in p.to_dict().items()
                          if k not in ("probe_id", "created_at", "revoked_at") and v is not None)
        echo(f"{p.name}  ({state}; created {p.created_at}){'  ' + extra if extra else ''}")
    if not probes:
        echo("no probes registered")


@probe.command("revoke")
@shared_options
@click.argument("name")
@click.pass_context
@handle_errors
def probe_revoke(ctx: click.Context, name: str) -> None:
    """Revoke NAME's token at once (its stored results stay)."""

    with _store(ctx) as store:
        if not store.revoke_probe(name, utc_now()):
            raise CollectorError(f"no active probe named {name!r}")
    echo(f"probe {name!r} revoked")


def _scope_options(fn: F) -> F:
    fn = click.option("--family", type=click.Choice(["ipv4", "ipv6"]),
                      help="Only sessions measured over this IP version.")(fn)
    fn = click.option("--technology", help="Only probes on this access technology.")(fn)
    fn = click.option("--region", help="Only probes in this region.")(fn)
    fn = click.option("--offer", help="Only probes on this offer.")(fn)
    fn = click.option("--operator", help="Only probes of this operator.")(fn)
    fn = click.option("--period", help="Calendar period: YYYY, YYYY-H1 or YYYY-H2.")(fn)
    fn = click.option("--until", help="End (exclusive): ISO date or timestamp.")(fn)
    fn = click.option("--since", help="Start (inclusive): ISO date or timestamp.")(fn)
    fn = click.option("--probe", "probes", multiple=True, help="Probe name (repeatable).")(fn)
    return fn


def _resolve_scope(store: Store, probes: tuple[str, ...], since: str | None,
                   until: str | None, period: str | None, filters: dict[str, Any]) -> Scope:
    return service.scope(list(probes) or None, since, until, period, store=store,
                         filters={k: v for k, v in filters.items() if v})


@main.command()
@shared_options
@_scope_options
@click.option("--limit", type=click.IntRange(1), help="At most this many results.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv"]), default="text")
@click.pass_context
@handle_errors
def results(ctx: click.Context, /, probes: tuple[str, ...], since: str | None, until: str | None,
            period: str | None, limit: int | None, fmt: str, **filters: Any) -> None:
    """List stored results with their summaries."""
    with _store(ctx) as store:
        where = _resolve_scope(store, probes, since, until, period, filters)
        rows = service.listing(store, where, limit)
    if fmt == "json":
        echo(format_json({"results": rows}), nl=False)
    elif fmt == "csv":
        echo(format_csv(rows, LISTING_COLUMNS), nl=False)
    else:
        echo(format_listing_text(rows), nl=False)


@main.command()
@shared_options
@_scope_options
@click.option("--targets", "targets_path", help="Targets TOML (default: compliance.targets).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv", "html"]),
              default="text", help="html: a standalone page with plots, written to a file.")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write here instead of stdout (html default: bbprobe-report.html).")
@click.option("--timezone", default="Europe/Rome", show_default=True,
              help="Local time of the hour bands and time axes (html).")
@click.option("--include-invalid", is_flag=True,
              help="Count sessions the agents flagged invalid (left out by default).")
@click.option("--include-customer", is_flag=True,
              help="Include the speeds of customers' own tests of the period (browser "
                   "page, ndt7 clients) in the percentiles (counted apart by default).")
@click.option("--customer-network", metavar="CIDR",
              help="Only customer tests from this client network, e.g. 203.0.113.0/24.")
@click.option("--by", "by", multiple=True, type=click.Choice(service.BREAKDOWN),
              help="One report per group: by line metadata and/or semester (repeatable: "
                   "--by region --by semester, as MisuraInternet publishes).")
@click.pass_context
@handle_errors
def report(ctx: click.Context, /, probes: tuple[str, ...], since: str | None, until: str | None,
           period: str | None, targets_path: str | None, fmt: str, output: str | None,
           timezone: str, include_invalid: bool, include_customer: bool,
           customer_network: str | None, by: tuple[str, ...], **filters: Any) -> None:
    """Compliance report: each Allegato 2 indicator against its target, for probes chosen
    by name or by line metadata, over a calendar period or a time range; or one per
    group with --by."""
    cfg = _config(ctx)
    table = targets_mod.load(targets_path or cfg.compliance.targets)
    customers = service.Customers(include_customer, service.parse_network(
        customer_network, "--customer-network"))
    if by and fmt == "html":
        raise InputError("--by: the HTML report is of one scope; use text, json or csv")
    with _store(ctx) as store:
        where = _resolve_scope(store, probes, since, until, period, filters)
        if by:
            parts = service.breakdown(store, where, table, by, include_invalid, customers)
            text = {"json": lambda: format_json(breakdown_dict(by, parts)),
                    "csv": lambda: format_csv(breakdown_rows(by, parts),
                                              (*by, *REPORT_COLUMNS)),
                    "text": lambda: format_breakdown(by, parts, where)}[fmt]()
            _emit(text, output)
            return
        if fmt == "html":
            view = service.report_view(store, where, table, include_invalid, customers)
            text = html_report.render_view(view, service.check_timezone(timezone), utc_now())
            output = output or "bbprobe-report.html"
        else:
            result = service.compliance(store, where, table, include_invalid, customers)
    if fmt == "json":
        text = json.dumps(report_dict(result, where), indent=2, ensure_ascii=False) + "\n"
    elif fmt == "csv":
        text = format_csv(report_rows(result, where), REPORT_COLUMNS)
    elif fmt == "text":
        text = format_text(result, where)
    _emit(text, output)


def _emit(text: str, output: str | None) -> None:
    """Print, or write a file whole (temp file + rename: never a half-written report)."""
    if output is None:
        echo(text, nl=False)
        return
    text = safetext.unicode(text)  # a lone surrogate stored before issue 23: no traceback
    import os
    from pathlib import Path

    target = Path(output)
    temp = target.with_name(f".{target.name}.tmp")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, target)
    except OSError as exc:
        raise StoreError(f"--output: cannot write {output}: {exc.strerror or exc}") from None
    echo(f"wrote {output} ({len(text.encode()):,} bytes)", err=True)


@main.command()
@shared_options
@_scope_options
@click.option("--include-invalid", is_flag=True,
              help="Also export sessions the agents flagged invalid.")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write here instead of stdout.")
@click.pass_context
@handle_errors
def samples(ctx: click.Context, /, probes: tuple[str, ...], since: str | None,
            until: str | None, period: str | None, include_invalid: bool, output: str | None,
            **filters: Any) -> None:
    """Export the per-test samples of a scope as CSV (probe_id,timestamp,kind,value,ok):
    the input of `evaluate --samples`, so a scope can be re-evaluated offline, against
    other targets or in a spreadsheet."""
    with _store(ctx) as store:
        where = _resolve_scope(store, probes, since, until, period, filters)
        sessions = service.samples(store, where, include_invalid)
    _emit(format_csv(sample_rows(sessions), SAMPLE_COLUMNS), output)


@main.command()
@shared_options
@click.option("--samples", "samples_path", required=True, type=click.Path(dir_okay=False),
              help="CSV: probe_id,timestamp,kind,value,ok (one row per test).")
@click.option("--targets", "targets_path", help="Targets TOML (default: compliance.targets).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
@handle_errors
def evaluate(ctx: click.Context, samples_path: str, targets_path: str | None,
             fmt: str) -> None:
    """Evaluate a CSV of per-test samples offline against a targets table.

    Rows that are not valid are all reported with their line numbers, and then no
    verdict is given: nothing is skipped silently (exit 2).
    """
    from pathlib import Path

    from collector.compliance import samples_csv
    from collector.compliance.evaluate import evaluate as run_evaluation

    table = targets_mod.load(targets_path or _config(ctx).compliance.targets)
    path = Path(samples_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    parsed = samples_csv.parse(text, str(path))
    if parsed.errors:
        shown = parsed.errors[: samples_csv.MAX_REPORTED]
        for line in shown:
            echo(line, err=True)
        more = len(parsed.errors) - len(shown)
        raise InputError(f"{len(parsed.errors)} bad row(s) in {path}"
                         + (f" ({more} more not shown)" if more else "")
                         + "; no verdict given")
    report = run_evaluation(parsed.observations, table)
    scope = Scope(
        probes=tuple(sorted(parsed.probes)),
        since=parsed.first.isoformat() if parsed.first else None,
        until=parsed.last.isoformat() if parsed.last else None,
    )
    if fmt == "json":
        document = report_dict(report, scope)
        document["samples_file"] = str(path)
        echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        echo(format_text(report, scope), nl=False)


@main.command()
@shared_options
@click.option("--probe", required=True, help="The line's probe.")
@click.option("--since", help="Campaign start (inclusive): ISO date or timestamp.")
@click.option("--until", help="Campaign end (exclusive): ISO date or timestamp.")
@click.option("--rule", type=click.Choice(["96in24h", "24in72h"]), default="96in24h",
              help="Completeness rule: 4 per hourly band (default) or the legacy 1 per band.")
@click.option("--timezone", default="Europe/Rome", help="Local time of the hourly bands.")
@click.option("--family", type=click.Choice(["ipv4", "ipv6"]),
              help="The IP version (required for a line measured over both: a campaign "
                   "each).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "html"]), default="text",
              help="html: a printable page to hand over, written to a file.")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write here instead of stdout (html default: certificate-PROBE.html).")
@click.pass_context
@handle_errors
def certify(ctx: click.Context, /, probe: str, since: str | None, until: str | None, rule: str,
            timezone: str, family: str | None, fmt: str, output: str | None) -> None:
    """Certify one line against its contract (probe metadata), 244/08 style."""
    from collector.reports.html import certificate_page
    from collector.reports.text import certificate_dict, format_certificate

    with _store(ctx) as store:
        cert = service.certificate(store, probe, since, until, rule, timezone, family)
    if fmt == "json":
        text = json.dumps(certificate_dict(cert), indent=2, ensure_ascii=False) + "\n"
    elif fmt == "html":
        text = certificate_page(cert, utc_now())
        output = output or f"certificate-{probe}.html"
    else:
        text = format_certificate(cert)
    _emit(text, output)


@main.group()
def influx() -> None:
    """The InfluxDB copy: queue stored results again, see the outbox."""


@influx.command("backfill")
@shared_options
@_scope_options
@click.pass_context
@handle_errors
def influx_backfill(ctx: click.Context, /, probes: tuple[str, ...], since: str | None,
                    until: str | None, period: str | None, **filters: Any) -> None:
    """Queue stored results in scope for InfluxDB (after enabling the sink, or to rebuild
    a bucket). A running collector with [influxdb] enabled writes them; points already
    there are rewritten identically."""

    with _store(ctx) as store:
        where = _resolve_scope(store, probes, since, until, period, filters)
        if where.family is not None:
            raise InputError("--family: a backfill copies whole results, of both families "
                             "(their session points carry the tag address_family)")
        added = store.outbox_enqueue(list(where.probes) if where.probes is not None else None,
                                     where.since, where.until, utc_now())
        waiting = store.outbox_size()
    echo(f"queued {added} result(s); {waiting} waiting for InfluxDB")
    if not _config(ctx).influxdb.enabled:
        echo("note: [influxdb] is not enabled in this configuration; the collector "
                   "will not write them until it is", err=True)


@influx.command("status")
@shared_options
@click.pass_context
@handle_errors
def influx_status(ctx: click.Context) -> None:
    """Results waiting in the outbox, and those set apart (dead letters) with why. A
    running collector's /api/v1/health shows more."""
    with _store(ctx) as store:
        waiting = store.outbox_size()
        dead = store.outbox_dead_letters()
    cfg = _config(ctx).influxdb
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

    with _store(ctx) as store:
        queued = store.outbox_retry_dead(utc_now())
        waiting = store.outbox_size()
    echo(f"queued {queued} result(s) again; {waiting} waiting")


@main.command()
@shared_options
@_scope_options
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv"]), default="text")
@click.pass_context
@handle_errors
def completeness(ctx: click.Context, /, probes: tuple[str, ...], since: str | None,
                 until: str | None, period: str | None, fmt: str, **filters: Any) -> None:
    """Per probe per day: sessions delivered / expected, and the missing sequence numbers
    that no gap record explains (goal C8; agents of schema v4 number their sessions)."""
    from collector.compliance.completeness import format_text

    with _store(ctx) as store:
        where = _resolve_scope(store, probes, since, until, period, filters)
        rows = service.completeness(store, where)
    if fmt == "json":
        echo(format_json({"completeness": [r.to_dict() for r in rows]}), nl=False)
    elif fmt == "csv":
        echo(format_csv((r.to_dict() for r in rows), COMPLETENESS_COLUMNS), nl=False)
    else:
        echo(format_text(rows), nl=False)


COMPLETENESS_COLUMNS = ("probe", "day", "delivered", "expected", "documented", "missing",
                        "discontinuities", "duplicates")


@main.command()
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
    from collector.storage.migrate import Checkpoint, copy_store

    if target.startswith(("postgresql://", "postgres://")):
        to = StorageConfig(backend="postgresql", url=target)
    else:
        to = StorageConfig(path=target)
    cfg = _config(ctx)
    table = targets_mod.load(cfg.compliance.targets)
    if checkpoint_path is None:
        checkpoint_path = (cfg.storage.path + ".migrate.json"
                           if cfg.storage.backend == "sqlite" else "bbprobe-migrate.json")
    with _store(ctx) as source:
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
            everything = service.scope(None, None, None)
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


@main.command()
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
    """Pack the bodies of results stored before bbprobe 0.2 (issue 14) as new ones are:
    losslessly, in about a sixth of the bytes. Safe while the collector runs (bodies
    are packed outside any transaction, then written in one short transaction per
    batch), and safe to interrupt and run again. A body the current schema cannot read
    is left as text and counted."""
    with _store(ctx) as store:
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


@main.command()
@shared_options
@click.option("--admin-name", default="admin", show_default=True,
              help="Name of the first admin token.")
@click.pass_context
@handle_errors
def init(ctx: click.Context, admin_name: str) -> None:
    """First run: create the database (or bring it to the current schema), create the
    first admin token if there is none (printed once, on stdout), and print the next
    steps. Safe to run again: an existing admin token is kept and none is added."""
    cfg = _config(ctx)
    table = targets_mod.load(cfg.compliance.targets)
    with _store(ctx, create=True) as store:
        tokens = store.tokens()
        admins = [t for t in tokens if t["role"] == "admin" and not t["revoked_at"]]
        if not admins and any(t["name"] == admin_name for t in tokens):
            raise InputError(f"a token named {admin_name!r} exists (revoked); choose another "
                             "name for the new admin token with --admin-name")
        secret = None if admins else service.add_token(store, admin_name, "admin")
        probes = len(store.probes())
        describe = store.describe
    if secret is not None:
        echo(secret)
    given = ctx.obj
    # Shown back to the user: a password in a --db URI is masked.
    config_flag = "".join(f"{flag} {_shown(str(given[key]))} " for flag, key in
                          (("--config", "config_path"), ("--db", "db")) if given.get(key))
    scheme = "https" if cfg.server.tls_cert else "http"
    steps = [
        f"database: {describe} ({probes} probe(s))",
        f"targets:  {table.name}",
        (f"admin token {admin_name!r} created (above, on stdout): keep it now, it is not "
         "shown again. Use it as 'Authorization: Bearer TOKEN', or as the password of the "
         "pages' login.") if secret is not None else
        f"admin token: {', '.join(repr(t['name']) for t in admins)} exists; none added.",
        "next steps:",
        f"  1. listen where probes reach you: server.host/port (now {cfg.server.host}:"
        f"{cfg.server.port}, {scheme}), TLS: server.tls_cert and tls_key_credential",
        f"  2. register a probe:  bbprobe-collector {config_flag}probe add NAME --operator … "
        "--offer … --download-min-kbps … (prints the probe's token once)",
        "  3. on the probe: put the token in /etc/bbprobe/token (root, mode 0600), set "
        "collector.url in /etc/bbprobe/agent.toml, then: systemctl enable --now "
        "bbprobe-agent",
        f"  4. read reports: bbprobe-collector {config_flag}report --probe NAME, or "
        f"{scheme}://HOST:{cfg.server.port}/ with an analyst token (token add NAME)",
    ]
    echo("\n".join(steps), err=True)


@main.group()
def token() -> None:
    """Analyst and admin tokens for the API and the HTML pages."""


@token.command("add")
@shared_options
@click.argument("name")
@click.option("--role", type=click.Choice(["analyst", "admin"]), default="analyst",
              show_default=True, help="analyst: read; admin: read and administer probes.")
@click.pass_context
@handle_errors
def token_add(ctx: click.Context, name: str, role: str) -> None:
    """Create a token; it is printed once (only its digest is stored)."""
    with _store(ctx, create=True) as store:
        secret = service.add_token(store, name, role)
    echo(secret)
    echo(f"{role} token {name!r} created; keep it now, it is not shown again",
               err=True)


@token.command("list")
@shared_options
@click.pass_context
@handle_errors
def token_list(ctx: click.Context) -> None:
    """Tokens by name, with role and state (never the secrets)."""
    with _store(ctx) as store:
        rows = store.tokens()
    for r in rows:
        state = f"revoked {r['revoked_at']}" if r["revoked_at"] else "active"
        echo(f"{r['name']}  {r['role']}  ({state}; created {r['created_at']})")
    if not rows:
        echo("no tokens")


@token.command("revoke")
@shared_options
@click.argument("name")
@click.pass_context
@handle_errors
def token_revoke(ctx: click.Context, name: str) -> None:
    """Revoke a token at once: the next request with it is refused."""

    with _store(ctx) as store:
        done = store.revoke_token(name, utc_now())
    if not done:
        raise StoreError(f"no active token named {name!r}")
    echo(f"token {name!r} revoked")


@main.command()
@click.argument("name", required=False)
@handle_errors
def files(name: str | None) -> None:
    """List the files shipped with bbprobe (example configs, targets tables, units, the
    Grafana dashboard), or print one: `bbprobe-collector files bt-italia-2013`."""
    from agent import share

    try:
        echo(share.show(name), nl=False)
    except LookupError as exc:
        raise InputError(str(exc)) from None


for _command in (*cli_fleet.COMMANDS, *cli_alerts.COMMANDS, *cli_results.COMMANDS,
                 *cli_tickets.COMMANDS):
    main.add_command(_command)
