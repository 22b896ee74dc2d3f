"""``bbprobe-collector alerts list|test``: the alerts raised about the fleet and their
deliveries, and a test alert through the configured notifiers. Thin: options -> the
store and the alerter (collector/alerts/worker.py) -> printed output."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Any

import click

from agent.schema import format_utc
from collector.alerts import notifiers
from collector.alerts import rules as alerts
from collector.alerts.worker import Alerter, record
from collector.cli.common import (
    database,
    echo,
    format_option,
    handle_errors,
    load_config,
    shared_options,
)
from collector.errors import InputError
from collector.safetext import terminal as _plain
from collector.storage.store import Store


@click.group("alerts")
def alerts_group() -> None:
    """Alerts raised and their deliveries; send a test alert."""


def _text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no alerts"
    lines = []
    for r in rows:
        resolved = isinstance(r["details"], dict) and r["details"].get("status") == "resolved"
        lines.append(f"#{r['id']} {r['created_at']} {r['severity']:<8} {r['kind']:<19} "
                     + ("RESOLVED " if resolved else "") + _plain(r["subject"]))
        for d in r["deliveries"]:
            extra = d["delivered_at"] if d["state"] == "delivered" else \
                f"{d['attempts']} attempt(s)" + (f", next {d['next_at']}"
                                                 if d["state"] == "pending" else "") + \
                (f": {_plain(d['last_error'])}" if d["last_error"] else "")
            lines.append(f"    -> {d['notifier']}: {d['state']} {extra}")
    return "\n".join(lines)


@alerts_group.command("list")
@shared_options
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True,
              help="The newest this many.")
@click.option("--since", help="Only those raised since (ISO 8601).")
@format_option("text", "json")
@click.pass_context
@handle_errors
def list_alerts(ctx: click.Context, limit: int, since: str | None, fmt: str) -> None:
    """The alerts raised, newest first, each with its deliveries' states."""
    if since is not None:
        try:
            since = format_utc(datetime.fromisoformat(since.replace("Z", "+00:00"))
                               .astimezone(UTC))
        except ValueError:
            raise InputError(f"--since: expected an ISO 8601 time, got {since!r}") from None
    with database(ctx) as store:
        rows = store.alerts(limit, since)
    echo(json.dumps(rows, indent=2) if fmt == "json" else _text(rows))


@alerts_group.command("test")
@shared_options
@click.option("--notifier", "only", multiple=True,
              help="Only this notifier (by name; repeatable). Default: every one.")
@click.pass_context
@handle_errors
def test_alert(ctx: click.Context, only: tuple[str, ...]) -> None:
    """Raise a test alert and deliver it now to the configured notifiers (whatever their
    triggers); print each outcome. Exit 1 if any was not delivered."""
    cfg = load_config(ctx)
    built = {n.name: n for n in notifiers.build(cfg.alerts)}
    unknown = [name for name in only if name not in built]
    if unknown:
        raise InputError(f"--notifier: no notifier named {', '.join(unknown)} "
                         f"(configured: {', '.join(built) or 'none'})")
    chosen = {k: v for k, v in built.items() if not only or k in only}
    if not chosen:
        raise InputError("no notifiers configured ([[alerts.webhooks]], [[alerts.apprise]])")
    now = datetime.now(UTC)
    with database(ctx) as store:
        def run_on(fn: Any) -> Any:
            return _call(fn, store)

        (ident,) = record(store, [alerts.test_alert(format_utc(now))],
                          [(name, ()) for name in chosen], format_utc(now))
        alerter = Alerter(cfg, chosen, run_on)
        # This alert only: other pending deliveries are the running collector's.
        asyncio.run(alerter.deliver(ident))
        (row,) = store.alerts(1, ident=ident)
    echo(_text([row]))
    if any(d["state"] != "delivered" for d in row["deliveries"]):
        sys.exit(1)


async def _call(fn: Any, store: Store) -> Any:
    """A store call from the CLI's one thread (the alerter awaits its store calls)."""
    return fn(store)


COMMANDS = [alerts_group]
