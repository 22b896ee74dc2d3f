"""bbprobe-collector's ``tickets`` commands: the ticket signing key's public
half, for the measurement-only servers that must trust it, and a ticket by hand (for
technicians and tests). Neither opens the database.

- ``tickets key [--out FILE]``: the public key as PEM (what a measurement server's
  tickets.trusted_keys file holds; --out writes it), its JWK (RFC 8037) and kid (RFC 7638
  thumbprint). The key is read as ``serve`` reads it, and generated if it does not exist
  yet (owned by whoever runs this: run it as the service's user).
- ``tickets issue --probe NAME [--server URL...]``: a ticket on stdout (its id, expiry
  and servers on stderr), naming the --server URLs, or else tickets.servers and
  tickets.audience.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from agent.schema import PROBE_ID_RE
from agent.ticket import origin
from collector import keys
from collector.cli.common import echo, handle_errors, load_config, shared_options
from collector.config import CollectorConfig
from collector.errors import ConfigError, InputError

if TYPE_CHECKING:
    from collector.web.ticket_routes import Authority


def check(cfg: CollectorConfig) -> None:
    """For ``check-config`` and ``serve``: the trusted keys load, and so does a signing
    key the config names (a file or credential); a generated one is left to its first
    need (it may not exist yet, and must be made by the service's user)."""
    t = cfg.tickets
    if not t.enabled:
        return
    keys.trusted_keys(t.trusted_keys)
    if cfg.server.role != "measurement" and (t.signing_key_file or t.signing_key_credential):
        keys.ticket_signing_key(cfg)


@click.group("tickets")
def tickets_group() -> None:
    """Measurement tickets: the signing key's public half, and a ticket by hand."""


def _enabled(ctx: click.Context) -> Authority:
    # Here, not at the top: the web stack (aiohttp) loads only for the commands using it.
    from collector.web.ticket_routes import Authority

    cfg = load_config(ctx)
    if not cfg.tickets.enabled:
        raise ConfigError("tickets.enabled = false: this collector issues no tickets")
    return Authority(cfg, cfg.server.role)


@tickets_group.command("key")
@shared_options
@click.option("--out", type=click.Path(dir_okay=False),
              help="Also write the public key (PEM) to this file.")
@click.pass_context
@handle_errors
def key(ctx: click.Context, out: str | None) -> None:
    """Print the ticket signing key's public half: PEM, JWK and kid."""
    authority = _enabled(ctx)
    signing = authority.own.load_now()
    pem = keys.public_pem(signing.public)
    if out:
        try:
            Path(out).write_text(pem)
        except OSError as exc:
            raise InputError(f"--out: cannot write {out!r}: {exc.strerror or exc}") from None
        echo(f"public key written to {out}", err=True)
    echo(f"# signing key: {signing.source}", err=True)
    echo(pem.rstrip("\n"))
    echo(json.dumps({**keys.jwk(signing.public), "kid": signing.kid, "use": "sig",
                     "alg": "EdDSA"}))
    echo(f"kid {signing.kid}")


@tickets_group.command("issue")
@shared_options
@click.option("--probe", required=True, help="The probe the ticket is for (its sub).")
@click.option("--server", "servers", multiple=True,
              help="A measurement server's URL the ticket may be used at (repeatable; "
                   "default: tickets.servers and tickets.audience).")
@click.pass_context
@handle_errors
def issue(ctx: click.Context, probe: str, servers: tuple[str, ...]) -> None:
    """Print a ticket for PROBE (stdout: the JWT alone)."""
    from collector.web.ticket_routes import ticket_document

    if not PROBE_ID_RE.fullmatch(probe):
        raise InputError(f"--probe: not a probe name: {probe[:80]!r}")
    authority = _enabled(ctx)
    try:
        named = [origin(url) for url in servers]
    except ValueError as exc:
        raise InputError(f"--server: {exc}") from None
    # No request here to take this collector's origin from: the configured ones.
    chosen = tuple(dict.fromkeys(named or (*authority.servers, *authority.own_audience)))
    if not chosen:
        raise InputError("give --server URL: tickets.servers and tickets.audience are "
                         "empty")
    issued = authority.issue(authority.own.load_now(), probe, None, time.time(), chosen)
    echo(issued.token)
    details = ticket_document(issued)
    echo(f"# ticket {details['ticket_id']} for {probe}, expires {details['expires_at']}, "
         f"servers {' '.join(issued.servers)}", err=True)


COMMANDS = (tickets_group,)
