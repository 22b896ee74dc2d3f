"""Routes administrators call (role "admin"): register probes, replace a probe's token
(rotate) and revoke it. Changes take a Bearer token and a JSON body only
(web/middleware.py, refuse_cross_site)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from aiohttp import web

from agent.schema import utc_now
from collector import auth
from collector.errors import ApiError
from collector.fleet import probes as admin
from collector.intake import ingest
from collector.lines import ContractVersion, LineMetadata
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
    by = await admin_name(request)
    token = await db(request, lambda s: admin.register_probe(s, name, metadata, by))
    return json_response({"probe_id": name, "token": token}, status=201)


async def admin_name(request: web.Request) -> str:
    """The name of the admin token the request came with (the middleware has checked
    it), as the line's contract history records who changed it."""
    token = auth.bearer(request.headers.get("Authorization"))
    found = None if token is None else \
        await db(request, lambda s: s.role_for_token(auth.hash_token(token)))
    return f"token:{found[1]}" if found is not None else "unknown"


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


async def change_contract(request: web.Request) -> web.Response:
    """Admin: change some of a probe's line metadata, as a new version of its contract
    (fields as ``POST /api/v1/probes``; ``from``: when it applies, default now; in the
    past, a correction recorded as retroactive). Recorded as changed by the admin
    token's name."""
    name = request.match_info["name"]
    data = ingest.parse_json(await read_body(request, 64 * 1024))
    allowed = {"from"} | {f.name for f in fields(LineMetadata)}
    if not isinstance(data, dict):
        raise ApiError(422, "expected a JSON object of line fields", field="body")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(422, f"{unknown[0][:40]}: unknown field", field=unknown[0][:40])
    since = data.pop("from", None)
    if since is not None and not isinstance(since, str):
        raise ApiError(422, "from: expected an ISO 8601 time with its UTC offset",
                       field="from")
    if all(v is None for v in data.values()):
        raise ApiError(422, "nothing to change: give at least one line field", field="body")
    by = await admin_name(request)
    version = await db(request, lambda s: admin.set_line(s, name, data, by, since))
    return json_response({"probe_id": name, **contract_doc(version)})


async def contract_history(request: web.Request) -> web.Response:
    """Analyst: every version of a probe's contract, oldest first."""
    name = request.match_info["name"]

    def read(s: Any) -> list[ContractVersion] | None:
        return None if s.probe(name) is None else s.line_contracts(name)

    history = await db(request, read)
    if history is None:
        raise ApiError(404, f"no probe named {name!r}", field="name")
    return json_response({"probe_id": name,
                          "versions": [contract_doc(v) for v in history]})


def contract_doc(v: ContractVersion) -> dict[str, Any]:
    return {"version": v.version, "valid_from": v.valid_from, "changed_at": v.changed_at,
            "changed_by": v.changed_by, "retroactive": v.retroactive, **asdict(v.line)}


def add_routes(routes: Routes) -> None:
    routes.post("/api/v1/probes", add_probe, role="admin")
    routes.post("/api/v1/probes/{name}/revoke", revoke_probe, role="admin")
    routes.post("/api/v1/probes/{name}/rotate", rotate_probe, role="admin")
    routes.post("/api/v1/probes/{name}/contract", change_contract, role="admin")
    routes.get("/api/v1/probes/{name}/contract", contract_history, role="analyst")
