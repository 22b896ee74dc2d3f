"""bbprobe-collector's ``result`` commands: remove a stored result, audited.

A result is evidence, so nothing removes one silently: ``result delete ID --reason``
needs the database (an operator's access, as every command here), takes the result, its
facts and its InfluxDB outbox entry away in one transaction, rebuilds its day's rollup
from the sessions left, and records the result's id, probe, start, SHA-256 and the
reason, with who ran it, in ``result_deletions`` (appended, never changed), which
``result deleted`` lists; its session number counts as documented in completeness
from then on. Points already copied to InfluxDB stay there: they are tagged by probe
and stamped with the session's start, so InfluxDB's own delete by predicate and time
range removes them (``influx delete --start T --stop T+1s --predicate 'probe="P"'``).
For a row that should
never have been stored (a result dated 0999 by a release before the timestamp window,
say), or one a probe's owner asks to withdraw. The probe may deliver it again from its
spool: the collector then judges it as any new result (a 0999 one is refused).
"""

from __future__ import annotations

import getpass
import json
import os
import socket

import click

from agent.schema import acting_char, utc_now
from collector import safetext
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

MAX_REASON_CHARS = 500


@click.group("result")
def result_group() -> None:
    """Remove a stored result (audited), and list what was removed."""


@result_group.command("delete")
@shared_options
@click.argument("result_id")
@click.option("--reason", required=True, help="Why (kept in the audit, at most 500 "
                                               "characters).")
@click.pass_context
@handle_errors
def delete(ctx: click.Context, result_id: str, reason: str) -> None:
    """Remove result RESULT_ID, its facts and outbox entry; record who-what-why."""
    reason = reason.strip()
    if not reason or len(reason) > MAX_REASON_CHARS or acting_char(reason) is not None:
        raise InputError(f"--reason: required, at most {MAX_REASON_CHARS} printable "
                         "characters")
    with database(ctx) as store:
        done = store.delete_result(result_id, reason, utc_now(), _operator())
    if done is None:
        raise CollectorError(f"no stored result {safetext.terminal(result_id)[:80]!r}")
    echo(f"result {done['result_id']} of probe {done['probe_id']} (started "
         f"{done['started_at']}, sha256 {done['body_sha256'][:16]}…) deleted by "
         f"{done['deleted_by']}: {reason}")


def _operator() -> str:
    """Who runs the command, for the audit: the login (the one sudo was called from,
    when run through sudo) at this host. Not proof against its own user: the database's
    access control is; the audit says who, on a host where logins are personal."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (a container)
        user = f"uid {os.getuid()}"
    invoker = os.environ.get("SUDO_USER")
    who = f"{invoker} (via sudo as {user})" if invoker and invoker != user else user
    return f"{who}@{socket.gethostname()}"[:200]


@result_group.command("deleted")
@shared_options
@format_option("text", "json")
@click.pass_context
@handle_errors
def deleted(ctx: click.Context, fmt: str) -> None:
    """The results removed with `result delete`, newest first."""
    with database(ctx) as store:
        rows = store.result_deletions()
    emit_as(fmt, json=lambda: json.dumps(rows, indent=2) + "\n",
            text=lambda: listed([safetext.terminal(
                f"{r['deleted_at']}  {r['result_id']}  {r['probe_id']}  started "
                f"{r['started_at']}  by {r['deleted_by']}: {r['reason']}") for r in rows],
                "no results deleted"))


COMMANDS = (result_group,)
