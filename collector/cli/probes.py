"""bbprobe-collector's ``probe`` and ``token`` commands: who may deliver results (probes,
with their lines' metadata) and who may read them (analyst and admin tokens). Thin:
options -> collector/fleet/probes.py -> printed output. A secret is printed once, on
stdout alone, so it can be captured; everything said about it goes to stderr."""

from __future__ import annotations

import getpass
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any

import click

from agent.schema import parse_utc, utc_now
from collector.cli.common import (
    database,
    echo,
    emit_as,
    format_option,
    handle_errors,
    listed,
    shared_options,
)
from collector.cli.probe_keys import key, pin
from collector.errors import CollectorError, DomainError, InputError
from collector.fleet import probe_keys
from collector.fleet import probes as admin
from collector.lines import TECHNOLOGIES, ContractVersion, LineMetadata
from collector.reports.text import PROBE_COLUMNS, format_csv, format_json
from collector.storage.model import Probe

LINE_FIELDS = {f.name for f in fields(LineMetadata)}


@click.group()
def probe() -> None:
    """Register, list and revoke probes; replace a probe's token (rotate); pin, list and
    revoke its public keys (key)."""


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
@click.option("--key", "key_file", type=click.Path(dir_okay=False), help="Pin the probe's "
              "public key from this file (PEM, as `bbprobe key show` prints it, or a "
              "JWK): the agent's own must match it (no trust on first use).")
@click.pass_context
@handle_errors
def probe_add(ctx: click.Context, /, name: str, key_file: str | None, **line: Any) -> None:
    """Register probe NAME and print its token (shown this once only)."""
    if key_file is not None:
        probe_keys.read_key_file(key_file)  # a bad file registers nothing
    with database(ctx, create=True) as store:
        token = admin.register_probe(store, name, admin.line_metadata(line), os_user())
        refused = None
        if key_file is not None:
            try:
                _, bound = pin(store, name, key_file)
                echo(f"probe {name!r}: key {bound.kid} pinned", err=True)
            except DomainError as exc:  # the key is another's: the probe stands, keyless
                refused = exc
    echo(f"probe {name!r} registered; its token follows (shown once, stored hashed)",
         err=True)
    echo(token)
    if refused is not None:
        raise CollectorError(f"probe {name!r} registered without a key: {refused}")


def os_user() -> str:
    """Who runs the command, as the contract history records it: the OS user."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a bare container)
        return "unknown"


@probe.command("set")
@shared_options
@click.argument("name")
@line_options
@click.option("--from", "since", metavar="TIME",
              help="When the change applies (ISO 8601 with its UTC offset; default now). "
                   "A time in the past corrects the contract from then on: recorded as "
                   "retroactive; never before the line's registration or the version in "
                   "force.")
@click.pass_context
@handle_errors
def probe_set(ctx: click.Context, /, name: str, since: str | None, **line: Any) -> None:
    """Change probe NAME's line metadata (the options given; the rest stays): say, the
    offer's declared speeds after a change of contract. Each change is a new version of
    the line's contract (`probe contract history NAME`): reports, certificates and
    alerts judge every session by the version in force when it was measured."""
    if all(v is None for v in line.values()):
        raise InputError("nothing to change: give at least one option (see --help)")
    with database(ctx) as store:
        version = admin.set_line(store, name, line, os_user(), since)
    retro = " (retroactive: a correction)" if version.retroactive else ""
    echo(f"probe {name!r}: contract version {version.version}, in force from "
         f"{version.valid_from}{retro}: " + "; ".join(
             f"{k} {getattr(version.line, k)}" for k, v in line.items() if v is not None))


@probe.group("contract")
def contract() -> None:
    """A line's contract history: every version of its figures, from when each applies."""


def contract_rows(history: Sequence[ContractVersion]) -> list[dict[str, Any]]:
    """The versions as rows (JSON, CSV): valid_until is the next version's start."""
    rows = []
    for i, v in enumerate(history):
        later = [w.valid_from for w in history[i + 1:] if w.valid_from is not None]
        rows.append({"version": v.version, "valid_from": v.valid_from,
                     "valid_until": min(later, key=parse_utc) if later else None,
                     "changed_at": v.changed_at, "changed_by": v.changed_by,
                     "retroactive": v.retroactive, **asdict(v.line)})
    return rows


@contract.command("history")
@shared_options
@click.argument("name")
@format_option("text", "json")
@click.pass_context
@handle_errors
def contract_history(ctx: click.Context, name: str, fmt: str) -> None:
    """Every version of probe NAME's contract, oldest first: from when it applies, who
    changed it and when, and its figures."""
    with database(ctx) as store:
        if store.probe(name) is None:
            raise CollectorError(f"no probe named {name!r}")
        rows = contract_rows(store.line_contracts(name))

    def text() -> str:
        return listed([
            f"version {r['version']}  from {r['valid_from'] or 'the beginning'}"
            f"{'  until ' + r['valid_until'] if r['valid_until'] else '  (in force)'}  "
            f"changed {r['changed_at']} by {r['changed_by']}"
            f"{' (retroactive)' if r['retroactive'] else ''}  " + ", ".join(
                f"{k}={v}" for k, v in r.items() if k in LINE_FIELDS and v is not None)
            for r in rows], f"no contract recorded for {name!r}")

    emit_as(fmt, json=lambda: format_json({"probe_id": name, "versions": rows}), text=text)


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


probe.add_command(key)

COMMANDS = (probe, token)
