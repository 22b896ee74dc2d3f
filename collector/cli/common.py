"""What every bbprobe-collector command shares: the --config/--db options, the config,
the store, the scope options of the reports, the output (printed safe for a terminal, or
written whole to a file), and the one-line error handling (exit 1 operational, 2 bad
input)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from agent.clierrors import error_boundary
from collector import safetext
from collector.config import CollectorConfig, load, warn_on_stderr
from collector.errors import ApiError, CollectorError, InputError, StoreError
from collector.scope import Scope, resolve_scope
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from collector.storage.uri import masked

F = TypeVar("F", bound=Callable[..., Any])


def echo(text: Any = "", **kwargs: Any) -> None:
    """click.echo through safetext.text_block: what a command prints may hold text a
    probe or a client wrote (a lone surrogate would be a traceback, an escape sequence
    would reach the operator's terminal raw)."""
    click.echo(safetext.text_block(str(text)), **kwargs)


def _explained(exc: CollectorError) -> tuple[str, int]:
    """The line and exit code of an error a command ends with. A database changed or
    damaged under us, or a server gone, is a StoreError too: the store says it as
    "database error: ..." (libpq's words, which never hold the password)."""
    if isinstance(exc, ApiError):
        return exc.message, 2
    return str(exc), exc.exit_code


handle_errors = error_boundary("bbprobe-collector", (CollectorError,), _explained, echo)


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Collect --config/--db into ctx.obj, whether given before or after the command."""
    obj = ctx.ensure_object(dict)
    from_env = ctx.get_parameter_source(str(param.name)) is click.core.ParameterSource.ENVIRONMENT
    if value is not None and not (from_env and str(param.name) in obj):
        obj[str(param.name)] = value
    return value


def shared_options(fn: F) -> F:
    fn = click.option("--db", expose_value=False, callback=_remember,
                      help="SQLite database path, or a postgresql:// URI (overrides "
                           "[storage]).")(fn)
    fn = click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                      envvar="BBPROBE_COLLECTOR_CONFIG", expose_value=False,
                      callback=_remember, help="Collector TOML config.")(fn)
    return fn


def load_config(ctx: click.Context, **overrides: Any) -> CollectorConfig:
    """The config file (--config) with --db and the command's own options over it."""
    given = ctx.ensure_object(dict)
    db = given.get("db")
    chosen: dict[str, Any] = {"storage.path": db}
    if isinstance(db, str) and db.startswith(("postgresql://", "postgres://")):
        # The database named is the one read: not the config's replica of another.
        chosen = {"storage.backend": "postgresql", "storage.url": db, "storage.read_url": ""}
    elif db is not None:
        chosen["storage.read_url"] = ""
    merged = {k: v for k, v in {**chosen, **overrides}.items() if v is not None}
    # A command reads the config more than once: each warning is printed once.
    warned: set[str] = given.setdefault("warned", set())

    def warn(line: str) -> None:
        if line not in warned:
            warned.add(line)
            warn_on_stderr(line)

    return load(given.get("config_path"), merged, warn=warn)


def shown(value: str) -> str:
    """A --db or --config value as echoed back: a PostgreSQL URI with its password
    masked, a path as it is."""
    return masked(value) if value.startswith(("postgresql://", "postgres://")) else value


@contextmanager
def database(ctx: click.Context, create: bool = False, read_only: bool = False
             ) -> Iterator[Store]:
    """The configured database, closed however the command ends. Only the commands that
    set a collector up (init, probe add, token add) may create it: a typo in --db must
    not quietly open a new, empty database and report nothing. ``read_only``: an
    analyst's command (reports, certificates, exports, listings), which reads the
    replica storage.read_url when one is set."""
    storage = load_config(ctx).storage
    if storage.backend == "sqlite" and not create and not Path(storage.path).exists():
        raise InputError(f"no database at {storage.path} (check --db or storage.path; "
                         "`bbprobe-collector init` creates one)")
    store = open_store(storage, read_only=read_only)
    try:
        yield store
    finally:
        store.close()


def format_option(*choices: str, help: str | None = None) -> Callable[[F], F]:
    """``--format``, one of ``choices`` (the first by default), passed as ``fmt``."""
    return click.option("--format", "fmt", type=click.Choice(choices), default=choices[0],
                        help=help)


def scope_options(fn: F) -> F:
    """The options that choose a report's scope: probes by name or line metadata, a time
    range or a calendar period, an IP version."""
    fn = click.option("--family", type=click.Choice(["ipv4", "ipv6"]),
                      help="Only sessions measured over this IP version.")(fn)
    fn = click.option("--technology", help="Only probes on this access technology.")(fn)
    fn = click.option("--region", help="Only probes in this region.")(fn)
    fn = click.option("--offer", help="Only probes on this offer.")(fn)
    fn = click.option("--operator", help="Only probes of this operator (metadata in any "
                                         "case; a value no probe has is an error).")(fn)
    fn = click.option("--period", help="Calendar period: YYYY, YYYY-H1 or YYYY-H2.")(fn)
    fn = click.option("--until", help="End (exclusive): ISO date or timestamp.")(fn)
    fn = click.option("--since", help="Start (inclusive): ISO date or timestamp.")(fn)
    fn = click.option("--probe", "probes", multiple=True,
                      help="Probe name (repeatable; an unknown name is an error).")(fn)
    return fn


def chosen_scope(store: Store, probes: tuple[str, ...], since: str | None,
                 until: str | None, period: str | None, filters: dict[str, Any]) -> Scope:
    """The scope the ``scope_options`` given choose: a probe name that is not registered,
    or metadata that selects no probe, is refused with the nearest names (exit 2)."""
    return resolve_scope(list(probes) or None, since, until, period,
                         filters={k: v for k, v in filters.items() if v},
                         known=store.probes)


def emit_as(fmt: str, **renderings: Callable[[], str]) -> None:
    """Print the rendering of the chosen format (each ends with its own newline)."""
    echo(renderings[fmt](), nl=False)


def listed(lines: Sequence[str], empty: str) -> str:
    """One line each, or ``empty`` when there is none."""
    return "\n".join(lines or [empty]) + "\n"


def emit(text: str, output: str | None) -> None:
    """Print, or write a file whole (temp file + rename: never a half-written report).
    ``-o -`` is stdout, as for curl, tar and every tool that takes -o: even where the
    format's default is a file (html)."""
    if output is None or output == "-":
        echo(text, nl=False)
        return
    # A lone surrogate stored by an older release is replaced, not a traceback.
    text = safetext.unicode(text)
    target = Path(output)
    temp = target.with_name(f".{target.name}.tmp")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, target)
    except OSError as exc:
        raise StoreError(f"--output: cannot write {output}: {exc.strerror or exc}") from None
    echo(f"wrote {output} ({len(text.encode()):,} bytes)", err=True)
