"""The error boundary of a command line (bbprobe's, and bbprobe-collector's, which imports
it): a known error becomes one line on stderr, ``PROG: message``, and its exit code, never a
traceback. Which errors are known, and their codes, each command line says (the trees in
agent/errors.py and collector/errors.py); anything else is a bug and propagates."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import click

P = ParamSpec("P")
R = TypeVar("R")
E = TypeVar("E", bound=Exception)


def error_boundary(prog: str, known: tuple[type[E], ...],
                   explain: Callable[[E], tuple[str, int]],
                   echo: Callable[..., Any] = click.echo,
                   ) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A decorator for click commands: an error of the ``known`` types is printed by
    ``echo`` as ``prog: message`` on stderr and exits with the code, both from
    ``explain(error)``."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except known as exc:
                message, code = explain(exc)
                echo(f"{prog}: {message}", err=True)
                sys.exit(code)

        return wrapper

    return decorate
