"""The shape of every answer: JSON whose every string is valid Unicode, and refusals as
``{"error": message, "field": name-or-null}`` with a 4xx or 5xx status (and ``"code"``
where a client acts on the reason: a refused measurement ticket's)."""

from __future__ import annotations

from aiohttp import web

from collector import safetext
from collector.errors import AlreadyExists, BadParameter, DomainError, NotFound, Unacceptable

# Domain errors (the service layer's) as HTTP statuses: the one place that knows both.
STATUS_OF: tuple[tuple[type[DomainError], int], ...] = (
    (AlreadyExists, 409), (NotFound, 404), (Unacceptable, 422), (BadParameter, 400),
)


def json_response(data: object, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    """A JSON reply whose every string is valid Unicode (collector/safetext.py): a
    stored text no UTF-8 writer can encode (a lone surrogate in a probe's health report)
    never makes a read a 500."""
    return web.json_response(data, status=status, headers=headers, dumps=safetext.dumps)


def error_body(status: int, message: str, field: str | None = None,
               code: str | None = None) -> web.Response:
    body: dict[str, str | None] = {"error": message, "field": field}
    if code is not None:
        body["code"] = code
    return json_response(body, status=status)


def http_status(exc: DomainError) -> int:
    return next(status for kind, status in STATUS_OF if isinstance(exc, kind))
