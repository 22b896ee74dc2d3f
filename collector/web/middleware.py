"""The middleware: what every request passes through around its route's handler
(server/app.py sets the order). Before it: the client's address as IPv4 when the socket
maps it, a path or query no route could take refused, the caller's role checked against
the route's declared one (and cross-site changes refused). After it: domain, store and
HTTP errors turned into their JSON refusals (web/replies.py).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from agent.decoding import encodes
from collector import auth, safetext
from collector.errors import ApiError, DomainError, StoreError, StoreFault, Unstorable
from collector.routing import refusal, role_of, wanted
from collector.web.app_keys import CONFIG
from collector.web.replies import error_body, http_status, login_page, prefers_html
from collector.web.threads import db

log = logging.getLogger("bbprobe.collector")

# HTTP Basic (RFC 7617) for the pages: the user name is not read, the password is the
# token. The realm stays "bbprobe": browsers and password managers file saved logins
# under it.
CHALLENGE = 'Basic realm="bbprobe", charset="UTF-8"'


@web.middleware
async def plain_ipv4(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A collector listening on "::" (both families on one socket) sees an IPv4 client
    as ::ffff:a.b.c.d (RFC 4291 §2.5.5.2). Every handler sees a.b.c.d, as on an IPv4
    socket: the rate buckets, the measurement slots, the stored client address, the
    customer-network filter and LibreSpeed's getIP all read request.remote."""
    remote = request.remote
    if remote and remote[:7].lower() == "::ffff:":
        try:
            mapped = ipaddress.IPv6Address(remote).ipv4_mapped
        except ValueError:
            mapped = None
        if mapped is not None:
            request = request.clone(remote=str(mapped))
    return await handler(request)


def _unfit(text: str) -> bool:
    """Text no route takes in a path or a query: a control character (PostgreSQL cannot
    store a NUL in text) or a lone surrogate (no UTF-8 writer can encode it)."""
    if any(c < " " or c == "\x7f" for c in text):
        return True
    return not encodes(text)


@web.middleware
async def sane_request(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse (400, naming where) a path or query parameter no route could take, before
    any handler or database sees it."""
    if _unfit(request.path):
        return error_body(400, "the path holds a control character or invalid Unicode")
    for key, value in request.query.items():
        if _unfit(key) or _unfit(value):
            name = safetext.terminal(key)[:40]
            return error_body(400, f"{name}: a control character or invalid Unicode in "
                              "the query", name)
    return await handler(request)


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_body(exc.status, exc.message, exc.field, exc.code)
        response.headers.update(exc.headers)
        if exc.close:
            response.force_close()
        if exc.challenge:
            response.headers["WWW-Authenticate"] = CHALLENGE
            response.headers["Vary"] = "Accept"
        if exc.retry_after is not None:
            response.headers["Retry-After"] = exc.retry_after
        elif exc.status == 503:
            response.headers["Retry-After"] = "5"
        return response
    except DomainError as exc:
        return error_body(http_status(exc), exc.message, exc.field)
    except Unstorable as exc:
        # A value PostgreSQL cannot hold that a check above let through (a NUL in text,
        # a number out of its type's range): the caller's input, a 422, never a 500.
        # Logged, since a check is missing.
        log.warning("%s %s: a value the database refused: %s", request.method,
                    request.path, str(exc).splitlines()[0] if str(exc) else "")
        return error_body(422, "a value cannot be stored (a NUL character or a number "
                          "out of range)")
    except StoreFault:
        # A damaged database or a statement the engine refused: no moment's absence but
        # a fault, a 500 with its traceback in the log.
        raise
    except StoreError as exc:
        # The database is away (a PostgreSQL restart or failover, a locked SQLite file)
        # or cannot give what was asked now: a 503 the agent retries, never a 500; the
        # reason goes to the log, not to the caller (who may be anyone).
        log.warning("%s %s: database unavailable: %s", request.method, request.path,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        response = error_body(503, "the database is unavailable; retry later")
        response.headers["Retry-After"] = "5"
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_body(exc.status, exc.reason)


@web.middleware
async def access(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Analyst and admin routes need such a token (Bearer, or Basic with the token as
    password for browsers); revocation takes effect on the next request. Public and
    probe routes pass (a probe route's handler authenticates the probe)."""
    if request.match_info.http_exception is not None:
        return await handler(request)
    role = role_of(request)
    if role in ("public", "probe"):
        return await handler(request)
    changes = request.method not in ("GET", "HEAD", "OPTIONS")
    if changes:
        refuse_cross_site(request)
    if role in ("analyst", "metrics") and not request.app[CONFIG].server.query_auth \
            and not changes:
        return await handler(request)
    token = auth.bearer(request.headers.get("Authorization"))
    found = None if token is None else \
        await db(request, lambda s: s.role_for_token(auth.hash_token(token)))
    if found is None:
        if prefers_html(request.headers.get("Accept")):
            # A browser: its login prompt (the challenge), and a page saying what to type
            # there should the prompt be cancelled. API clients keep the JSON below.
            page = login_page("You are not logged in." if token is None else
                              "The token given is unknown or has been revoked.")
            page.headers["WWW-Authenticate"] = CHALLENGE
            page.headers["Vary"] = "Accept"
            return page
        raise ApiError(401, f"this needs {wanted(role)}" if token is None else
                       "unknown or revoked token", challenge=True)
    have, _name = found
    if (refused := refusal(role, have)) is not None:  # routing.py: what each role reaches
        raise ApiError(403, refused)
    return await handler(request)


def refuse_cross_site(request: web.Request) -> None:
    """State-changing analyst and admin routes refuse cross-site request forgery (OWASP
    CSRF). A browser that cached an admin's Basic credentials attaches them to any
    site's form post; it never attaches a Bearer header by itself. So these routes take
    Bearer only, a JSON body only (a form or text/plain post cannot send one without a
    CORS preflight, which we never grant), and refuse what the browser marks as
    cross-site."""
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("bearer "):
        raise ApiError(401, "changes need 'Authorization: Bearer <token>' (a browser's "
                            "Basic login is for reading pages only)")
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        raise ApiError(403, "cross-site request refused (Sec-Fetch-Site: cross-site)")
    # No Origin comparison: behind a TLS-terminating proxy our scheme and host are not
    # the browser's, and with Bearer required it would add nothing.
    if request.can_read_body and request.content_type != "application/json":
        raise ApiError(415, f"expected Content-Type: application/json, got "
                            f"{request.content_type!r}")
