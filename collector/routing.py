"""Route registration with the caller's role declared where the route is added.

    routes = Routes(app)
    routes.get("/api/v1/report", get_report, role="analyst")

The ``access`` middleware (web/middleware.py) reads the role of the matched route; a route
added some other way has no declared role and is treated as "admin" (closed by default).

Roles: "public" (anyone, bounded by its handler), "probe" (a probe's token or client
certificate, checked by the handler), "metrics" (GET /metrics: a metrics, analyst or
admin token), "analyst" (an analyst or admin token; reads may be open with
server.query_auth = false), "admin".

A token's role is what it may reach (``refusal``): admin everything but the probes'
routes, analyst the analyst and metrics routes, metrics only the metrics route (a
Prometheus server's credential reads no report or result), a probe's none of these.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from aiohttp import web

Role = Literal["public", "probe", "metrics", "analyst", "admin"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RouteKey = tuple[int, str]

ROLES = web.AppKey("route_roles", dict[RouteKey, str])
# The resources (by id) whose requests are measurement traffic: the access log counts
# them in a summary line rather than writing a line each (web/accesslog.py).
STREAMS = web.AppKey("measurement_routes", set[int])


class Routes:
    """Adds routes to ``app`` and records each one's role."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        app[ROLES] = {}
        app[STREAMS] = set()

    def add(self, method: str, path: str, handler: Handler, *, role: Role,
            **kwargs: Any) -> None:
        route = self.app.router.add_route(method, path, handler, **kwargs)
        self.app[ROLES][(id(route.resource), method)] = role

    def get(self, path: str, handler: Handler, *, role: Role, allow_head: bool = True,
            **kwargs: Any) -> None:
        # add_get: HEAD too (as aiohttp does), under the GET's role (role_of).
        route = self.app.router.add_get(path, handler, allow_head=allow_head, **kwargs)
        self.app[ROLES][(id(route.resource), "GET")] = role

    def post(self, path: str, handler: Handler, *, role: Role, **kwargs: Any) -> None:
        self.add("POST", path, handler, role=role, **kwargs)

    def put(self, path: str, handler: Handler, *, role: Role, **kwargs: Any) -> None:
        self.add("PUT", path, handler, role=role, **kwargs)

    def options(self, path: str, handler: Handler, *, role: Role) -> None:
        self.add("OPTIONS", path, handler, role=role)

    @contextmanager
    def measurement(self) -> Iterator[None]:
        """The routes added inside are measurement traffic (STREAMS)."""
        before = {id(resource) for resource in self.app.router.resources()}
        yield
        self.app[STREAMS] |= {id(r) for r in self.app.router.resources()} - before


# The route roles a token of each role may call (beyond "public" and "probe", whose
# handlers authenticate for themselves).
REACHES: dict[str, frozenset[str]] = {
    "admin": frozenset({"admin", "analyst", "metrics"}),
    "analyst": frozenset({"analyst", "metrics"}),
    "metrics": frozenset({"metrics"}),
    "probe": frozenset(),
}


def refusal(route_role: str, token_role: str) -> str | None:
    """Why a token of ``token_role`` may not call a route of ``route_role`` (the 403's
    message), or None when it may."""
    if route_role in REACHES.get(token_role, frozenset()):
        return None
    if token_role == "probe":
        return "a probe token can only send its results; use an analyst or admin token"
    if token_role == "metrics":
        return "a metrics token reads GET /metrics only; use an analyst or admin token"
    return "this needs an admin token" if route_role == "admin" else \
        f"this needs a {route_role} token"


def wanted(route_role: str) -> str:
    """The tokens a route of ``route_role`` takes, and how to make one (a 401 says it)."""
    if route_role == "metrics":
        return ("a metrics, analyst or admin token (Authorization: Bearer <token>; "
                "`bbprobe-collector token add --role metrics NAME`)")
    if route_role == "admin":
        return ("an admin token (Authorization: Bearer <token>; `bbprobe-collector token "
                "add --role admin NAME`)")
    return ("an analyst or admin token (Authorization: Bearer <token>; `bbprobe-collector "
            "token add`)")


def role_of(request: web.Request) -> str:
    """The declared role of the route ``request`` matched (HEAD: its GET's)."""
    route = request.match_info.route
    method = "GET" if request.method == "HEAD" else request.method
    return request.app[ROLES].get((id(route.resource), method), "admin")
