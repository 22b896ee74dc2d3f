"""Route registration with the caller's role declared where the route is added.

    routes = Routes(app)
    routes.get("/api/v1/report", get_report, role="analyst")

The ``access`` middleware (web/middleware.py) reads the role of the matched route; a route
added some other way has no declared role and is treated as "admin" (closed by default).

Roles: "public" (anyone, bounded by its handler), "probe" (a probe's token or client
certificate, checked by the handler), "analyst" (an analyst or admin token; reads may be
open with server.query_auth = false), "admin".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiohttp import web

Role = Literal["public", "probe", "analyst", "admin"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RouteKey = tuple[int, str]

ROLES = web.AppKey("route_roles", dict[RouteKey, str])


class Routes:
    """Adds routes to ``app`` and records each one's role."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        app[ROLES] = {}

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

    def options(self, path: str, handler: Handler, *, role: Role) -> None:
        self.add("OPTIONS", path, handler, role=role)


def role_of(request: web.Request) -> str:
    """The declared role of the route ``request`` matched (HEAD: its GET's)."""
    route = request.match_info.route
    method = "GET" if request.method == "HEAD" else request.method
    return request.app[ROLES].get((id(route.resource), method), "admin")
