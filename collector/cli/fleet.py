"""bbprobe-collector's fleet-control commands: ``instruction`` (what probes measure, set
centrally), ``suppress`` (pause them over a network maintenance) and ``fleet`` (their
state). Thin: options -> collector/fleet/control.py -> printed output."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from agent.instruction import InstructionError, parse_pairs
from collector import safetext
from collector.cli.common import (
    database,
    echo,
    emit_as,
    format_option,
    handle_errors,
    listed,
    load_config,
    shared_options,
)
from collector.errors import InputError
from collector.fleet import control
from collector.fleet import view as fleet
from collector.fleet.rules import Selector, selector
from collector.scope import no_match
from collector.storage.store import ProbeStore

F = TypeVar("F", bound=Callable[..., Any])


def selector_options(fn: F) -> F:
    """The report scopes' probe selectors (metadata in any case), plus --all."""
    for name, text in (("technology", "on this access technology"),
                       ("region", "in this region"), ("offer", "on this offer"),
                       ("operator", "of this operator"), ("probe", "this probe only")):
        fn = click.option(f"--{name}", help=f"Probes {text}.")(fn)
    return click.option("--all", "every", is_flag=True, help="Every probe.")(fn)


def _selector(every: bool, given: dict[str, Any]) -> Selector:
    try:
        return selector(given, every)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _warn_if_empty(store: ProbeStore, chosen: Selector, what: str) -> None:
    """A rule or window on metadata no registered probe has today is kept (it may be
    meant for probes added later), with a warning on stderr naming the nearest values:
    a typo must not pass for a rule in force."""
    if chosen.every or chosen.probe is not None:
        return
    live = [p for p in store.probes() if p.revoked_at is None]
    if any(chosen.matches(p) for p in live):
        return
    _field, why = no_match(chosen.to_dict(), live)
    echo(f"bbprobe-collector: warning: {what} {chosen.describe()} selects no probe today "
         f"({why}); it applies to probes registered later with that metadata", err=True)


@click.group()
def instruction() -> None:
    """Set what probes measure, centrally (their next session applies it)."""


@instruction.command("set")
@shared_options
@selector_options
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.pass_context
@handle_errors
def instruction_set(ctx: click.Context, /, every: bool, pairs: tuple[str, ...],
                    **given: Any) -> None:
    """Set agent settings (the keys of the agent's --set; a value may be JSON, for
    lists) for the selected probes, e.g.
    `instruction set --region Lazio ping.count=20 server.candidates='["http://a"]'`."""
    chosen = _selector(every, given)
    try:
        put = parse_pairs(pairs)
    except InstructionError as exc:
        raise InputError(str(exc)) from None
    with database(ctx) as store:
        # The stored rule that selects the same probes, in its own spelling, if any.
        chosen = control.stored_selector(store, chosen)
        settings = control.set_instruction(store, chosen, put)
        _warn_if_empty(store, chosen, "the rule")
    echo(f"rule {chosen.describe()}: {json.dumps(settings, sort_keys=True)}")


@instruction.command("unset")
@shared_options
@selector_options
@click.argument("keys", nargs=-1, required=True)
@click.pass_context
@handle_errors
def instruction_unset(ctx: click.Context, /, every: bool, keys: tuple[str, ...],
                      **given: Any) -> None:
    """Remove KEYS from the rule of the selected probes (an emptied rule is deleted)."""
    chosen = _selector(every, given)
    with database(ctx) as store:
        chosen = control.stored_selector(store, chosen, removing=True)
        if not any(r.selector == chosen for r in control.rules(store)):
            # A typo here would otherwise print "(deleted)" for a rule that never was.
            raise InputError(f"no rule {chosen.describe()} (`instruction list` shows the "
                             "rules)")
        settings = control.set_instruction(store, chosen, {}, keys)
    echo(f"rule {chosen.describe()}: "
               + (json.dumps(settings, sort_keys=True) if settings else "(deleted)"))


@instruction.command("show")
@shared_options
@click.option("--probe", required=True, help="The probe.")
@format_option("text", "json")
@click.pass_context
@handle_errors
def instruction_show(ctx: click.Context, probe: str, fmt: str) -> None:
    """The effective instruction of PROBE, each key with the rule it came from."""
    with database(ctx) as store:
        doc = control.show(store, probe)
    if fmt == "json":
        echo(json.dumps(doc, indent=2))
        return
    lines = [f"probe {probe}: instruction {doc['version']}"]
    if not doc["settings"]:
        lines.append("  (no settings: the probe's own file decides)")
    for key, value in doc["settings"].items():
        lines.append(f"  {key} = {json.dumps(value)}    (from {doc['sources'][key]})")
    for w in doc["suppressions"]:
        lines.append(f"  suppressed {w['starts_at']} .. {w['ends_at']}: {w['reason']} "
                     f"(window {w['id']})")
    # Values and reasons an admin typed: no control character reaches a terminal raw.
    echo("\n".join(safetext.terminal(line) for line in lines))


@instruction.command("list")
@shared_options
@format_option("text", "json")
@click.pass_context
@handle_errors
def instruction_list(ctx: click.Context, fmt: str) -> None:
    """Every rule, least specific first."""
    with database(ctx) as store:
        rules = sorted(control.rules(store), key=lambda r: (r.selector.rank(), r.updated_at))
    # Rules stored before selectors ignored case may select the same probes: flagged.
    same = control.twins(rules)
    shown = [{"selector": r.selector.to_dict(), "selects": r.selector.describe(),
              "settings": r.settings, "updated_at": r.updated_at,
              "same_probes_as": same.get(r.selector.key(), [])} for r in rules]
    lines = [safetext.terminal(
        f"{r.selector.describe()}  ({r.updated_at}): {json.dumps(r.settings, sort_keys=True)}"
        + (f"  [selects the same probes as {' and '.join(same[r.selector.key()])}: "
           "remove one]" if r.selector.key() in same else "")) for r in rules]
    emit_as(fmt, json=lambda: json.dumps(shown, indent=2) + "\n",
            text=lambda: listed(lines, "no instruction rules: every probe follows its own file"))


@click.command()
@shared_options
@selector_options
@click.option("--from", "starts", help="Start, ISO 8601 with its zone (e.g. "
                                       "2026-12-01T02:00+01:00).")
@click.option("--until", "ends", help="End (exclusive), ISO 8601 with its zone.")
@click.option("--reason", help="Why (shown with the window and on certificates).")
@click.option("--list", "listing", is_flag=True, help="List the windows instead.")
@click.option("--delete", "delete", type=int, metavar="ID", help="Delete window ID instead.")
@format_option("text", "json")
@click.pass_context
@handle_errors
def suppress(ctx: click.Context, /, every: bool, starts: str | None, ends: str | None,
             reason: str | None, listing: bool, delete: int | None, fmt: str,
             **given: Any) -> None:
    """Pause the selected probes from --from to --until (a network maintenance): their
    daemons start no session in the window and plan the bands it cost again later in
    the campaign. Also --list and --delete ID."""
    with database(ctx) as store:
        if listing:
            windows = [w.to_dict() for w in control.windows(store)]
            emit_as(fmt, json=lambda: json.dumps(windows, indent=2) + "\n",
                    text=lambda: listed([f"{w['id']}: {w['selects']}  {w['starts_at']} .. "
                                         f"{w['ends_at']}  {w['reason']}" for w in windows],
                                        "no suppression windows"))
            return
        if delete is not None:
            control.delete_window(store, delete)
            echo(f"suppression window {delete} deleted")
            return
        if not (starts and ends and reason):
            raise InputError("suppress: give --from, --until and --reason (or --list, "
                             "or --delete ID)")
        window = control.add_window(store, _selector(every, given), starts, ends, reason)
        _warn_if_empty(store, window.selector, "the window")
    echo(f"suppression window {window.id}: {window.selector.describe()} "
         f"{window.starts_at} .. {window.ends_at} ({window.reason})")


@click.command("fleet")
@shared_options
@format_option("text", "json", "csv")
@click.pass_context
@handle_errors
def fleet_command(ctx: click.Context, fmt: str) -> None:
    """One row per probe: last seen, silent for how long, agent and instruction version,
    spool backlog, campaign bands filled, validity rate, problems."""
    cfg = load_config(ctx).fleet
    with database(ctx) as store:
        rows = control.fleet_rows(store, cfg.silent_after_s, cfg.validity_days)
    emit_as(fmt, json=lambda: json.dumps({"summary": fleet.summary(rows),
                                          "silent_after_s": cfg.silent_after_s,
                                          "probes": rows}, indent=2) + "\n",
            csv=lambda: fleet.format_csv(rows),
            text=lambda: fleet.format_text(rows, cfg.silent_after_s, cfg.validity_days))


COMMANDS = (instruction, suppress, fleet_command)
