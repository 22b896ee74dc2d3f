"""bbprobe-collector's ``probe key`` commands (and ``probe add --key``): the public key
each probe signs with (Ed25519, RFC 8032; collector/fleet/probe_keys.py). An admin pins
a key (a PEM public key, as ``bbprobe key show`` prints it, or a JWK file), replaces
one (the old stays in the history as past, so what it signed stays verifiable), lists a
probe's keys (pinned, taken on first use, or handed over by a rotation the old key
signed: ``bbprobe key rotate``), and revokes one (the JWK Set names it revoked). One key
may be bound to several probes (a laptop measuring several lines): revoking it on one
probe revokes that binding, and the others are named so the admin can revoke them too.

A change drops this process's key snapshots (collector/intake/keyring.py); a running
``serve`` sees it within keyring.MAX_AGE_S."""

from __future__ import annotations

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
from collector.errors import CollectorError, NotFound
from collector.fleet import probe_keys
from collector.intake import keyring
from collector.reports.text import format_json
from collector.storage.model import ProbeKey
from collector.storage.store import Store


@click.group("key")
def key() -> None:
    """A probe's public keys: pin one, list the history, revoke one."""


def pin(store: Store, name: str, path: str) -> tuple[bool, ProbeKey]:
    """Pin the key in ``path`` as probe ``name``'s (replacing its current one)."""
    public_key = probe_keys.read_key_file(path)
    done = probe_keys.bind(store, name, public_key, "pinned", utc_now(), replace=True)
    keyring.invalidate(name)
    return done


@key.command("set")
@shared_options
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_context
@handle_errors
def key_set(ctx: click.Context, name: str, file: str) -> None:
    """Pin the public key in FILE (PEM, or a JWK) as probe NAME's: it replaces the key
    bound now, which stays in the history as past (what it signed stays verifiable)."""
    with database(ctx) as store:
        before = [k for k in store.probe_keys(name) if k.status == "current"]
        fresh, bound = pin(store, name, file)
    if not fresh:
        echo(f"probe {name!r}: key {bound.kid} is already its key ({bound.source}, since "
             f"{bound.bound_from})")
        return
    replaced = f"; key {before[0].kid} is now past" if before else ""
    echo(f"probe {name!r}: key {bound.kid} pinned{replaced}")


def _key_line(k: ProbeKey) -> str:
    until = k.bound_until or "now"
    line = f"{k.kid}  {k.status}  {k.source}  {k.bound_from} .. {until}"
    if k.source in ("tofu", "rotation"):
        line += f"  first seen from {k.first_seen_address or 'unknown'}"
    if k.revoked_at:
        line += f"  revoked {k.revoked_at}: {k.revoked_reason}"
    return line


def _key_dict(k: ProbeKey) -> dict[str, object]:
    return {"kid": k.kid, "status": k.status, "source": k.source, "since": k.bound_from,
            "until": k.bound_until, "first_seen_at": k.first_seen_at,
            "first_seen_address": k.first_seen_address, "revoked_at": k.revoked_at,
            "revoked_reason": k.revoked_reason, "rotation_jws": k.rotation_jws}


@key.command("list")
@shared_options
@click.argument("name")
@format_option("text", "json")
@click.pass_context
@handle_errors
def key_list(ctx: click.Context, name: str, fmt: str) -> None:
    """Probe NAME's keys, oldest first: kid (RFC 7638 thumbprint), status, how it was
    bound (tofu: the agent's first contact, with its address; pinned), since and until,
    and its revocation."""
    with database(ctx) as store:
        if store.probe(name) is None:
            raise NotFound(f"no probe named {name!r}", "probe_id")
        found = store.probe_keys(name)
    emit_as(fmt, json=lambda: format_json({"probe_id": name,
                                           "keys": [_key_dict(k) for k in found]}),
            text=lambda: listed([_key_line(k) for k in found],
                                f"probe {name!r} has no key (the agent enrols one at "
                                "its first contact; or `probe key set`)"))


@key.command("revoke")
@shared_options
@click.argument("name")
@click.argument("kid")
@click.option("--reason", required=True, help="Why (kept with the key, shown in the JWK "
              "Set and by every verification that meets it).")
@click.pass_context
@handle_errors
def key_revoke(ctx: click.Context, name: str, kid: str, reason: str) -> None:
    """Revoke probe NAME's key KID (a leaked or lost device's): it stays listed, as
    revoked. A current key's binding ends: the probe's next key is pinned by an admin
    (`probe key set`), never taken on first use."""
    if not reason.strip():
        raise CollectorError("--reason: say why")
    with database(ctx) as store:
        if not store.revoke_probe_key(name, kid, utc_now(), reason.strip()):
            held = [k for k in store.probe_keys(name) if k.kid == kid]
            if held:
                raise CollectorError(f"probe {name!r}: key {kid} was revoked already "
                                     f"({held[0].revoked_at})")
            raise NotFound(f"probe {name!r} has no key {kid} (`probe key list {name}`)",
                           "kid")
        keyring.invalidate(name)
        others = sorted({k.probe_name for k in store.all_probe_keys(probe_keys.JWKS_MAX_KEYS)
                         if k.kid == kid and k.probe_name != name
                         and k.revoked_at is None})
    echo(f"probe {name!r}: key {kid} revoked")
    if others:
        # One device's key on several lines: each binding is revoked on its own.
        echo(f"key {kid} is also bound to {', '.join(map(repr, others))}: revoke it there "
             f"too if the device is lost (`probe key revoke NAME {kid} --reason ...`)")
