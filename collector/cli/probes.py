"""bbprobe-collector's ``probe`` and ``token`` commands: who may deliver results (probes,
with their lines' metadata) and who may read them (analyst and admin tokens). Thin:
options -> collector/fleet/probes.py -> printed output. A secret is printed once, on
stdout alone, so it can be captured; everything said about it goes to stderr."""

from __future__ import annotations

from typing import Any

import click

from agent.schema import utc_now
from collector.cli.common import (
    database,
    echo,
    emit_as,
    format_option,
    handle_errors,
    listed,
    shared_options,
)
from collector.errors import CollectorError, InputError
from collector.fleet import probes as admin
from collector.lines import TECHNOLOGIES
from collector.reports.text import PROBE_COLUMNS, format_csv, format_json
from collector.storage.model import Probe


@click.group()
def probe() -> None:
    """Register, list and revoke probes; replace a probe's token (rotate)."""


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
    with database(ctx, create=True) as store:
        token = admin.register_probe(store, name, admin.line_metadata(line))
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
    with database(ctx) as store:
        changed = admin.set_line(store, name, line)
    echo(f"probe {name!r}: " + "; ".join(
        f"{k} {getattr(changed, k)}" for k, v in line.items() if v is not None))


def _probe_line(p: Probe) -> str:
    state = f"revoked {p.revoked_at}" if p.revoked_at else "active"
    if p.rotated_at:
        state += f", token replaced {p.rotated_at}"
    extra = ", ".join(f"{k}={v}" for k, v in p.to_dict().items()
                      if k not in ("probe_id", "created_at", "revoked_at") and v is not None)
    return f"{p.name}  ({state}; created {p.created_at}){'  ' + extra if extra else ''}"


@probe.command("list")
@shared_options
@format_option("text", "json", "csv")
@click.pass_context
@handle_errors
def probe_list(ctx: click.Context, fmt: str) -> None:
    """List registered probes with their line metadata."""
    with database(ctx) as store:
        probes = store.probes()
    emit_as(fmt, json=lambda: format_json({"probes": [p.to_dict() for p in probes]}),
            csv=lambda: format_csv((p.to_dict() for p in probes), PROBE_COLUMNS),
            text=lambda: listed([_probe_line(p) for p in probes], "no probes registered"))


def revoke_command(group: click.Group, holder: admin.Holder, summary: str) -> None:
    """Add ``GROUP revoke NAME`` to ``group``: one revoke path, for probes and tokens."""

    @group.command("revoke", help=summary)
    @shared_options
    @click.argument("name")
    @click.pass_context
    @handle_errors
    def revoke(ctx: click.Context, name: str) -> None:
        with database(ctx) as store:
            if not admin.revoke(store, holder, name):
                raise CollectorError(f"no active {holder} named {name!r}")
        echo(f"{holder} {name!r} revoked")


revoke_command(probe, "probe", "Revoke NAME's token at once (its stored results stay; "
               "`probe rotate NAME` gives it a new token and re-enables it).")


@probe.command("rotate")
@shared_options
@click.argument("name")
@click.pass_context
@handle_errors
def probe_rotate(ctx: click.Context, name: str) -> None:
    """Give probe NAME a new token and print it (shown this once only): the old token is
    refused from the next request, and a client certificate issued before now is
    refused from now on (server.client_cert: the replacement needs one issued after
    this); the name, line metadata and results stay. For a lost SD card or a leaked
    token. A revoked probe is re-enabled under the new token. Put the token in the
    probe's token_file (or BBPROBE_TOKEN) and restart its daemon."""
    now = utc_now()
    with database(ctx) as store:
        token, revoked_at = admin.rotate_probe(store, name, now)
    again = f" (revoked since {revoked_at}: re-enabled)" if revoked_at else ""
    echo(f"probe {name!r}: new token follows{again}; the old one no longer works "
         "(shown once, stored hashed). A client certificate issued before now "
         f"({now}) is refused from now on: give the device one issued after it.", err=True)
    echo(token)


@click.group()
def token() -> None:
    """Analyst and admin tokens for the API and the HTML pages; metrics tokens for
    Prometheus."""


@token.command("add")
@shared_options
@click.argument("name")
@click.option("--role", type=click.Choice(admin.ROLES), default="analyst",
              show_default=True, help="analyst: read; admin: read and administer probes; "
              "metrics: GET /metrics only (for Prometheus: it reads no report or result).")
@click.pass_context
@handle_errors
def token_add(ctx: click.Context, name: str, role: str) -> None:
    """Create a token; it is printed once (only its digest is stored)."""
    with database(ctx, create=True) as store:
        secret = admin.add_token(store, name, role)
    echo(secret)
    echo(f"{role} token {name!r} created; keep it now, it is not shown again", err=True)
    if role == "metrics":
        echo("it reads GET /metrics only: save it alone in the file Prometheus's "
             "credentials_file names (`bbprobe-collector files prometheus.yml`)", err=True)


@token.command("list")
@shared_options
@click.pass_context
@handle_errors
def token_list(ctx: click.Context) -> None:
    """Tokens by name, with role and state (never the secrets)."""
    with database(ctx) as store:
        rows = store.tokens()
    echo(listed([f"{r['name']}  {r['role']}  ("
                 + (f"revoked {r['revoked_at']}" if r["revoked_at"] else "active")
                 + f"; created {r['created_at']})" for r in rows], "no tokens"), nl=False)


revoke_command(token, "token", "Revoke a token at once: the next request with it is refused.")


COMMANDS = (probe, token)
