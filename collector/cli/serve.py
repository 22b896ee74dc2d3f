"""bbprobe-collector's set-up and running commands: ``init`` (first run), ``check-config``
(what systemd runs before ``serve``), ``serve``, and ``files`` (what the package ships)."""

from __future__ import annotations

import asyncio

import click

from collector import __version__
from collector.alerts import notifiers
from collector.cli import tickets as cli_tickets
from collector.cli.common import (
    database,
    echo,
    handle_errors,
    load_config,
    shared_options,
    shown,
)
from collector.compliance import targets as targets_mod
from collector.config import resolve_secrets
from collector.errors import CollectorError, InputError
from collector.fleet import probes as admin
from collector.storage.uri import masked


@click.command()
@shared_options
@click.option("--host", help="Listen address (overrides server.host).")
@click.option("--port", type=int, help="Listen port, 0 for any free one (server.port).")
@click.option("--addr-file", help="Write the bound URL to this file once listening.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Processes serving the same port (SO_REUSEPORT), to use every core; "
                   "most useful with PostgreSQL (docs/operator.md, Scaling out).")
@click.option("--role", type=click.Choice(["all", "ingest", "measurement"]),
              help="What to serve (overrides server.role; default all): everything; "
                   "ingest (ingestion, queries, reports, admin: no measurement "
                   "endpoints); or measurement (the HTTP, ndt7 and LibreSpeed endpoints "
                   "and the speed-test page only: no database, no targets table).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="What the log on stderr says (overrides log.level; default info: a "
                   "line per result received and per request; warning: problems only).")
@click.pass_context
@handle_errors
def serve(ctx: click.Context, host: str | None, port: int | None, addr_file: str | None,
          workers: int, role: str | None, log_level: str | None) -> None:
    """Serve ingestion, queries and measurement endpoints until SIGTERM/SIGINT. Logs
    key=value lines on stderr (the journal under systemd): [log] in the config."""
    from collector.server import app
    from collector.server import workers as workers_mod
    from collector.web import accesslog

    cfg = resolve_secrets(load_config(ctx, **{"server.host": host, "server.port": port,
                                              "server.addr_file": addr_file,
                                              "server.role": role,
                                              "log.level": log_level}))
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

    # Before any worker is forked: each starts the log's writing thread of its own.
    accesslog.configure(cfg.log.level, cfg.log.access)

    def ready(url: str) -> None:
        processes = f", {workers} processes" if workers > 1 else ""
        echo(f"bbprobe-collector {__version__} listening on {url} ({where}{processes})",
             err=True)

    try:
        if workers > 1:
            workers_mod.run(cfg, workers, ready, role)
        else:
            asyncio.run(app.serve(cfg, ready, role=role))
    except OSError as exc:
        raise CollectorError(
            f"cannot listen on {cfg.server.host}:{cfg.server.port}: {exc.strerror}"
        ) from None


@click.command("check-config")
@shared_options
@click.pass_context
@handle_errors
def check_config(ctx: click.Context) -> None:
    """Validate the config, its secrets and the targets table it names, then exit."""
    cfg = resolve_secrets(load_config(ctx))
    cli_tickets.check(cfg)
    if cfg.server.role == "measurement":
        echo("config OK; role measurement (no database, no targets table)")
        return
    table = targets_mod.load(cfg.compliance.targets)
    built = notifiers.build(cfg.alerts) if cfg.alerts.enabled else []
    alerting = f"; alerts on, {len(built)} notifier(s)" if cfg.alerts.enabled else ""
    echo(f"config OK; targets: {table.name} ({len(table.measurable)} measurable "
         f"of {len(table.indicator)} indicators){alerting}")


@click.command()
@shared_options
@click.option("--admin-name", default="admin", show_default=True,
              help="Name of the first admin token.")
@click.pass_context
@handle_errors
def init(ctx: click.Context, admin_name: str) -> None:
    """First run: create the database (or bring it to the current schema), create the
    first admin token if there is none (printed once, on stdout), and print the next
    steps. Safe to run again: an existing admin token is kept and none is added."""
    cfg = load_config(ctx)
    table = targets_mod.load(cfg.compliance.targets)
    with database(ctx, create=True) as store:
        tokens = store.tokens()
        admins = [t for t in tokens if t["role"] == "admin" and not t["revoked_at"]]
        if not admins and any(t["name"] == admin_name for t in tokens):
            raise InputError(f"a token named {admin_name!r} exists (revoked); choose another "
                             "name for the new admin token with --admin-name")
        secret = None if admins else admin.add_token(store, admin_name, "admin")
        probes = len(store.probes())
        describe = store.describe
    if secret is not None:
        echo(secret)
    given = ctx.obj
    # Shown back to the user: a password in a --db URI is masked.
    config_flag = "".join(f"{flag} {shown(str(given[key]))} " for flag, key in
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


@click.command()
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


COMMANDS = (serve, check_config, init, files)
