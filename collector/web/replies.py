"""The shape of every answer: JSON whose every string is valid Unicode, and refusals as
``{"error": message, "field": name-or-null}`` with a 4xx or 5xx status (and ``"code"``
where a client acts on the reason: a refused measurement ticket's)."""

from __future__ import annotations

from html import escape

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


def prefers_html(accept: str | None) -> bool:
    """Whether an ``Accept`` header (RFC 9110 §12.5.1) asks for HTML before JSON: a
    browser navigating (``text/html,...,*/*;q=0.8``) does; curl (``*/*``), fetch()'s
    default, an API client (``application/json``) or no header do not. HTML must be
    named, not reached through a wildcard, and weigh more than JSON, named or wildcard."""
    if not accept:
        return False
    html = json = 0.0
    for part in accept.split(","):
        kind, *params = (p.strip() for p in part.split(";"))
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        kind = kind.lower()
        if kind in ("text/html", "application/xhtml+xml"):
            html = max(html, weight)
        elif kind in ("application/json", "application/*", "*/*"):
            json = max(json, weight)
    return html > 0 and html > json


# What a browser that asked for a page without credentials gets: its own login prompt
# (the WWW-Authenticate challenge) and, if that is cancelled, this page saying what to
# type. Inline style only: no script, nothing fetched.
_LOGIN_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in: bbprobe collector</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:42em;margin:2em auto;padding:0 1em;
color:#222}}h1{{font-size:1.4em}}
code{{background:#f3f3f3;padding:.1em .3em;border-radius:3px;white-space:nowrap}}
.why{{color:#b00020;font-weight:600}}dt{{font-weight:600}}dd{{margin:0 0 .6em 1.2em}}</style>
</head><body>
<h1>This page needs an analyst or admin token</h1>
<p class="why">{reason}</p>
<p>When your browser asks for a user name and password:</p>
<dl>
<dt>User name</dt><dd>anything (it is not checked; your token's name is a good reminder)</dd>
<dt>Password</dt><dd>an analyst or admin token of this collector (it starts with
<code>bbp_</code>); a probe's token is refused</dd>
</dl>
<p>The collector's operator makes one on the collector's host, and it is printed once:</p>
<ul><li><code>bbprobe-collector token add YOUR-NAME</code> (reads only)</li>
<li><code>bbprobe-collector token add YOUR-NAME --role admin</code> (also manages probes)</li>
</ul>
<p>The browser keeps the login until it is closed; to log in with another token, open a
private window. Scripts and API clients send the token as
<code>Authorization: Bearer &lt;token&gt;</code> instead.</p>
<p><a href="">Try again</a></p>
</body></html>
"""


def login_page(reason: str) -> web.Response:
    """A 401 for a browser: HTML saying what to type at its login prompt (the caller adds
    the challenge)."""
    return web.Response(status=401, text=_LOGIN_PAGE.format(reason=escape(reason)),
                        content_type="text/html", headers={
                            "Cache-Control": "no-store",
                            "Content-Security-Policy": "default-src 'none'; style-src "
                            "'unsafe-inline'; base-uri 'none'; form-action 'none'; "
                            "frame-ancestors 'none'"})
