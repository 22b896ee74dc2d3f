"""What every bbprobe-collector command shares: the --config/--db options, the config,
the store, and the one-line error handling (exit 1 operational, 2 bad input)."""

from __future__ import annotations

import functools
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg

from collector import safetext
from collector.config import CollectorConfig, load
from collector.errors import ApiError, CollectorError, InputError
from collector.storage.postgres import masked
from collector.storage.store import Store, open_store

F = TypeVar("F", bound=Callable[..., Any])


def echo(text: Any = "", **kwargs: Any) -> None:
    """click.echo through safetext.text_block: what a command prints may hold text a
    probe or a client wrote (a lone surrogate would be a traceback, an escape sequence
    would reach the operator's terminal raw: issue 23)."""
    click.echo(safetext.text_block(str(text)), **kwargs)


def handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiError as exc:
            echo(f"bbprobe-collector: {exc.message}", err=True)
            sys.exit(2)
        except CollectorError as exc:
            echo(f"bbprobe-collector: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (sqlite3.Error, psycopg.Error) as exc:
            # A database changed or damaged under us, or a server gone: say so, never a
            # traceback (libpq's messages name host and user, never the password).
            first = str(exc).strip().splitlines()[:1] or [type(exc).__name__]
            echo(f"bbprobe-collector: database error: {first[0]}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


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


def _config(ctx: click.Context, **overrides: Any) -> CollectorConfig:
    given = ctx.ensure_object(dict)
    db = given.get("db")
    chosen: dict[str, Any] = {"storage.path": db}
    if isinstance(db, str) and db.startswith(("postgresql://", "postgres://")):
        chosen = {"storage.backend": "postgresql", "storage.url": db}
    merged = {k: v for k, v in {**chosen, **overrides}.items() if v is not None}
    return load(given.get("config_path"), merged)


def _shown(value: str) -> str:
    """A --db or --config value as echoed back: a PostgreSQL URI with its password
    masked, a path as it is."""
    return masked(value) if value.startswith(("postgresql://", "postgres://")) else value


@contextmanager
def _store(ctx: click.Context, create: bool = False) -> Iterator[Store]:
    """The configured database, closed however the command ends. Only the commands that
    set a collector up (init, probe add, token add) may create it: a typo in --db must
    not quietly open a new, empty database and report nothing (issue 12)."""
    storage = _config(ctx).storage
    if storage.backend == "sqlite" and not create and not Path(storage.path).exists():
        raise InputError(f"no database at {storage.path} (check --db or storage.path; "
                         "`bbprobe-collector init` creates one)")
    store = open_store(storage)
    try:
        yield store
    finally:
        store.close()
