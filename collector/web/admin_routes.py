"""Routes administrators call (role "admin"): register probes, replace a probe's token
(rotate) and revoke it. Changes take a Bearer token and a JSON body only
(web/middleware.py, refuse_cross_site)."""

from __future__ import annotations

from dataclasses import fields

from aiohttp import web

from agent.schema import utc_now
from collector.errors import ApiError
from collector.fleet import probes as admin
from collector.intake import ingest
from collector.lines import LineMetadata
from collector.routing import Routes
from collector.web.params import read_body
from collector.web.replies import json_response
from collector.web.threads import db


async def add_probe(request: web.Request) -> web.Response:
    """Admin: register a probe with its line metadata; the answer holds its token, the
    only time the token exists in clear."""
    data = ingest.parse_json(await read_body(request, 64 * 1024))
    allowed = {"probe_id"} | {f.name for f in fields(LineMetadata)}
    if not isinstance(data, dict) or not isinstance(data.get("probe_id"), str):
        raise ApiError(422, "probe_id: required, a string", field="probe_id")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(422, f"{unknown[0]}: unknown field", field=unknown[0])
    name = str(data["probe_id"])
    # Checked as `probe add` checks it (fleet/probes.py): 422 naming the field.
    metadata = admin.line_metadata({k: v for k, v in data.items() if k != "probe_id"})
    # A taken name is AlreadyExists (409) and a bad one Unacceptable (422): web/replies.py.
    token = await db(request, lambda s: admin.register_probe(s, name, metadata))
    return json_response({"probe_id": name, "token": token}, status=201)


async def revoke_probe(request: web.Request) -> web.Response:
    """Admin: revoke a probe's token at once (its results stay)."""
    name = request.match_info["name"]
    done = await db(request, lambda s: admin.revoke(s, "probe", name))
    if not done:
        raise ApiError(404, f"no active probe named {name!r}", field="name")
    return json_response({"probe_id": name, "revoked": True})


async def rotate_probe(request: web.Request) -> web.Response:
    """Admin: a new token for a probe (the answer holds it, the only time it exists in
    clear); the old one is refused from the next request; name, metadata and results
    stay; a client certificate issued before ``rotated_at`` is refused. A revoked probe
    is live again (fleet/probes.py rotate_probe says why)."""
    name = request.match_info["name"]
    now = utc_now()
    token, revoked_at = await db(request, lambda s: admin.rotate_probe(s, name, now))
    return json_response({"probe_id": name, "token": token,
                          "reenabled": revoked_at is not None,
                          "was_revoked_at": revoked_at, "rotated_at": now})


def add_routes(routes: Routes) -> None:
    routes.post("/api/v1/probes", add_probe, role="admin")
    routes.post("/api/v1/probes/{name}/revoke", revoke_probe, role="admin")
    routes.post("/api/v1/probes/{name}/rotate", rotate_probe, role="admin")
