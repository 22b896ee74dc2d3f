"""bbprobe-collector's reading commands: ``results`` (the listing), ``report`` (Allegato 2
compliance, whole or broken down), ``samples`` (the export) and ``evaluate`` (that export
judged offline), ``certify`` (one line against its contract) and ``completeness`` (sessions
delivered against the campaign's plan). Thin: scope options -> collector/reports/service.py
-> a rendering of collector/reports/ -> printed or written whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from agent.schema import utc_now
from agent.spec import CAMPAIGN_RULES, DEFAULT_CAMPAIGN_RULE
from collector import exports
from collector.cli.common import (
    chosen_scope,
    database,
    echo,
    emit,
    emit_as,
    format_option,
    handle_errors,
    load_config,
    scope_options,
    shared_options,
)
from collector.compliance import targets as targets_mod
from collector.errors import InputError
from collector.reports import html as html_report
from collector.reports import semester, service
from collector.reports import text as formats
from collector.scope import Scope, check_timezone, parse_network


@click.command()
@shared_options
@scope_options
@click.option("--limit", type=click.IntRange(1), help="At most this many results.")
@format_option("text", "json", "csv")
@click.pass_context
@handle_errors
def results(ctx: click.Context, /, probes: tuple[str, ...], since: str | None, until: str | None,
            period: str | None, limit: int | None, fmt: str, **filters: Any) -> None:
    """List stored results with their summaries."""
    with database(ctx, read_only=True) as store:
        where = chosen_scope(store, probes, since, until, period, filters)
        rows = service.listing(store, where, limit)
    emit_as(fmt, json=lambda: formats.format_json({"results": rows}),
            csv=lambda: formats.format_csv(rows, formats.LISTING_COLUMNS),
            text=lambda: formats.format_listing_text(rows))


@click.command()
@shared_options
@scope_options
@click.option("--targets", "targets_path", help="Targets TOML (default: compliance.targets).")
@format_option("text", "json", "csv", "html",
               help="html: a standalone page with plots, written to a file.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write here instead of stdout; - is stdout (html default: "
                   "bbprobe-report.html).")
@click.option("--timezone", default="Europe/Rome", show_default=True,
              help="Local time of the hour bands (coverage, html time axes).")
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
@click.option("--layout", type=click.Choice(("standard", "semester")), default="standard",
              show_default=True,
              help="semester: AGCOM's semester tables (delibera 156/23/CONS), a row per "
                   "region and technology for each semester and the year, every figure "
                   "with its 95 % interval and samples (csv or html; needs a period).")
@click.pass_context
@handle_errors
def report(ctx: click.Context, /, probes: tuple[str, ...], since: str | None, until: str | None,
           period: str | None, targets_path: str | None, fmt: str, output: str | None,
           timezone: str, include_invalid: bool, include_customer: bool,
           customer_network: str | None, by: tuple[str, ...], layout: str,
           **filters: Any) -> None:
    """Compliance report: each Allegato 2 indicator against its target, for probes chosen
    by name or by line metadata, over a calendar period or a time range; or one per
    group with --by; or AGCOM's semester tables with --layout semester."""
    cfg = load_config(ctx)
    table = targets_mod.load(targets_path or cfg.compliance.targets)
    customers = service.Customers(include_customer, parse_network(
        customer_network, "--customer-network"))
    if layout == "semester":
        if ctx.get_parameter_source("fmt") is click.core.ParameterSource.DEFAULT:
            fmt = "csv"  # the semester tables are CSV or HTML; text is the report's
        semester.check_request(fmt, by, include_customer)
    if by and fmt == "html":
        raise InputError("--by: the HTML report is of one scope; use text, json or csv")
    with database(ctx, read_only=True) as store:
        where = chosen_scope(store, probes, since, until, period, filters)
        if layout == "semester":
            rows, sample = semester.gather(where, lambda scope, groups: service.breakdown(
                store, scope, table, groups, include_invalid,
                min_samples=cfg.reports.min_samples))
            if fmt == "csv":
                emit(semester.to_csv(rows), output)
            else:
                emit(semester.render(rows, where, sample, utc_now(), check_timezone(timezone)),
                     output or "bbprobe-semester.html")
            return
        if by:
            parts = service.breakdown(store, where, table, by, include_invalid, customers,
                                      min_samples=cfg.reports.min_samples)
            text = {"json": lambda: formats.format_json(formats.breakdown_dict(by, parts)),
                    "csv": lambda: formats.format_csv(formats.breakdown_rows(by, parts),
                                                      (*by, *formats.REPORT_COLUMNS)),
                    "text": lambda: formats.format_breakdown(by, parts, where)}[fmt]()
            emit(text, output)
            return
        if fmt == "html":
            view = service.report_view(store, where, table, include_invalid, customers,
                                       min_samples=cfg.reports.min_samples)
            text = html_report.render_view(view, check_timezone(timezone), utc_now())
            output = output or "bbprobe-report.html"
        else:
            result = service.compliance(store, where, table, include_invalid, customers,
                                        check_timezone(timezone),
                                        min_samples=cfg.reports.min_samples)
    if fmt == "json":
        text = json.dumps(formats.report_dict(result, where), indent=2,
                          ensure_ascii=False) + "\n"
    elif fmt == "csv":
        text = formats.format_csv(formats.report_rows(result, where), formats.REPORT_COLUMNS)
    elif fmt == "text":
        text = formats.format_text(result, where)
    emit(text, output)


@click.command()
@shared_options
@scope_options
@click.option("--include-invalid", is_flag=True,
              help="Also export sessions the agents flagged invalid.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write here instead of stdout (- is stdout).")
@click.pass_context
@handle_errors
def samples(ctx: click.Context, /, probes: tuple[str, ...], since: str | None,
            until: str | None, period: str | None, include_invalid: bool, output: str | None,
            **filters: Any) -> None:
    """Export the per-test samples of a scope as CSV (probe_id,timestamp,kind,value,ok,unit):
    the input of `evaluate --samples`, so a scope can be re-evaluated offline, against
    other targets or in a spreadsheet."""
    with database(ctx, read_only=True) as store:
        where = chosen_scope(store, probes, since, until, period, filters)
        sessions = service.samples(store, where, include_invalid)
    emit(formats.format_csv(formats.sample_rows(sessions), formats.SAMPLE_COLUMNS), output)


@click.command()
@shared_options
@click.option("--samples", "samples_path", required=True,
              type=click.Path(dir_okay=False, allow_dash=True),
              help="CSV: probe_id,timestamp,kind,value,ok[,unit] (one row per test); - "
                   "reads stdin (`samples | evaluate --samples -`).")
@click.option("--targets", "targets_path", help="Targets TOML (default: compliance.targets).")
@format_option("text", "json")
@click.pass_context
@handle_errors
def evaluate(ctx: click.Context, samples_path: str, targets_path: str | None,
             fmt: str) -> None:
    """Evaluate a CSV of per-test samples offline against a targets table.

    Rows that are not valid are all reported with their line numbers, and then no
    verdict is given: nothing is skipped silently (exit 2).
    """
    from collector.compliance import samples_csv
    from collector.compliance.evaluate import evaluate as run_evaluation

    cfg = load_config(ctx)
    table = targets_mod.load(targets_path or cfg.compliance.targets)
    path = Path(samples_path)
    try:
        if samples_path == "-":
            with click.open_file("-", encoding="utf-8-sig") as stdin:
                text = stdin.read()
        else:
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
    verdict = run_evaluation(parsed.observations, table, cfg.reports.min_samples)
    scope = Scope(
        probes=tuple(sorted(parsed.probes)),
        since=parsed.first.isoformat() if parsed.first else None,
        until=parsed.last.isoformat() if parsed.last else None,
    )
    if fmt == "json":
        document = formats.report_dict(verdict, scope)
        document["samples_file"] = str(path)
        echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        echo(formats.format_text(verdict, scope), nl=False)


@click.command()
@shared_options
@click.option("--probe", required=True, help="The line's probe.")
@click.option("--since", help="Campaign start (inclusive): ISO date or timestamp.")
@click.option("--until", help="Campaign end (exclusive): ISO date or timestamp.")
@click.option("--rule", type=click.Choice(list(CAMPAIGN_RULES)), default=DEFAULT_CAMPAIGN_RULE,
              help="Completeness rule: 4 per hourly band (default) or the legacy 1 per band.")
@click.option("--timezone", default="Europe/Rome", help="Local time of the hourly bands.")
@click.option("--family", type=click.Choice(["ipv4", "ipv6"]),
              help="The IP version (required for a line measured over both: a campaign "
                   "each).")
@format_option("text", "json", "csv", "html",
               help="csv: one row per check (the export convention); html: a printable "
                    "page to hand over, written to a file.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write here instead of stdout; - is stdout (html default: "
                   "certificate-PROBE.html).")
@click.option("--evidence", "evidence_dir", type=click.Path(file_okay=False),
              help="Also write the certificate's evidence bundle to this new (or empty) "
                   "directory: every session as its probe signed it, the keys, the inputs, "
                   "signed by the collector's evidence key (check it with `verify DIR`).")
@click.pass_context
@handle_errors
def certify(ctx: click.Context, /, probe: str, since: str | None, until: str | None, rule: str,
            timezone: str, family: str | None, fmt: str, output: str | None,
            evidence_dir: str | None) -> None:
    """Certify one line against its contract (probe metadata), 244/08 style."""
    kid = None
    if evidence_dir is not None:
        kid = write_evidence(ctx, evidence_dir, probe, since, until, rule, timezone, family)
    min_samples = load_config(ctx).reports.min_samples
    with database(ctx, read_only=True) as store:
        cert = service.certificate(store, probe, since, until, rule, timezone, family,
                                   min_samples)
    if fmt == "json":
        text = json.dumps(formats.certificate_dict(cert), indent=2, ensure_ascii=False) + "\n"
    elif fmt == "csv":
        text = exports.to_csv(exports.certificate_rows(cert), exports.CERTIFICATE_COLUMNS)
    elif fmt == "html":
        text = html_report.certificate_page(cert, utc_now(),
                                            evidence_kid=kid or evidence_kid(ctx))
        output = output or f"certificate-{probe}.html"
    else:
        text = formats.format_certificate(cert)
    emit(text, output)


def evidence_kid(ctx: click.Context) -> str | None:
    """The thumbprint of the collector's evidence key, for the HTML page (as the served
    page shows it), when the key exists: systemd's credential or the key file in the
    state directory. Never made here (a page is no reason to create a signing key); one
    that cannot be read is said on stderr and the page names no key."""
    import os

    from collector import keys
    from collector.errors import ConfigError

    cfg = load_config(ctx)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not ((credentials and (Path(credentials) / keys.EVIDENCE_KEY_CREDENTIAL).is_file())
            or (keys.state_dir(cfg, os.environ) / keys.EVIDENCE_KEY_FILE).is_file()):
        return None
    try:
        return keys.evidence_signing_key(cfg).kid
    except ConfigError as exc:
        click.echo(f"warning: the page names no evidence key: {exc}", err=True)
        return None


def write_evidence(ctx: click.Context, out_dir: str, probe: str, since: str | None,
                   until: str | None, rule: str, timezone: str, family: str | None) -> str:
    """The certificate's evidence bundle, written to ``out_dir`` (said on stderr); the
    kid of the key that signed it."""
    import os

    from collector import keys
    from collector.evidence import bundle

    cfg = load_config(ctx)
    default_file = keys.state_dir(cfg, os.environ) / keys.EVIDENCE_KEY_FILE
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    new_key = not default_file.exists() and not (
        credentials and (Path(credentials) / keys.EVIDENCE_KEY_CREDENTIAL).is_file())
    key = keys.evidence_signing_key(cfg)
    if new_key:
        # From a shell, a service that reads its key from a systemd credential is not
        # seen: say that a key was made here, so that a bundle is never signed by a key
        # nobody publishes without the operator knowing.
        click.echo(f"warning: no evidence key was found, so a new one ({key.kid}) was made "
                   f"in {default_file}; if the service signs with the systemd credential "
                   f"{keys.EVIDENCE_KEY_CREDENTIAL!r}, run this with CREDENTIALS_DIRECTORY "
                   "set as the service has it, or fetch the bundle from the service "
                   "(GET /api/v1/probes/NAME/certificate/evidence.zip)", err=True)
    table = targets_mod.load(cfg.compliance.targets)
    with database(ctx, read_only=True) as store:
        members = bundle.certificate_members(store, key, probe, since, until, rule,
                                             timezone, family, table,
                                             min_samples=cfg.reports.min_samples)
    try:
        bundle.write_members(members, out_dir)
    except (bundle.BundleError, OSError) as exc:
        raise InputError(f"--evidence: {exc}") from None
    sessions = sum(1 for name in members if name.startswith("sessions/"))
    click.echo(f"evidence: {sessions} session(s) and the certificate, signed by key "
               f"{key.kid}, in {out_dir} (check it: bbprobe-collector verify {out_dir})",
               err=True)
    return key.kid


# probe_id, as in every CSV (collector/exports.py); the JSON says "probe".
# signed, chain_breaks: the day's signed results and undocumented chain breaks (issue 27).
COMPLETENESS_COLUMNS = ("probe_id", "day", "delivered", "expected", "documented", "missing",
                        "discontinuities", "duplicates", "signed", "chain_breaks")


@click.command()
@shared_options
@scope_options
@format_option("text", "json", "csv")
@click.pass_context
@handle_errors
def completeness(ctx: click.Context, /, probes: tuple[str, ...], since: str | None,
                 until: str | None, period: str | None, fmt: str, **filters: Any) -> None:
    """Per probe per day: sessions delivered / expected, and the missing sequence numbers
    that no gap record explains (agents number their sessions from result schema 4 on)."""
    from collector.compliance.completeness import chain_summaries, format_text

    with database(ctx, read_only=True) as store:
        where = chosen_scope(store, probes, since, until, period, filters)
        rows = service.completeness(store, where)
    emit_as(fmt,
            json=lambda: formats.format_json({"completeness": [r.to_dict() for r in rows],
                                              "chains": chain_summaries(rows)}),
            csv=lambda: formats.format_csv(({"probe_id": r.probe, **r.to_dict(),
                                             "signed": r.signed, "chain_breaks": r.broken}
                                            for r in rows), COMPLETENESS_COLUMNS),
            text=lambda: format_text(rows))


COMMANDS = (results, report, samples, evaluate, certify, completeness)
