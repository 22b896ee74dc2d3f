"""Fleet control over HTTP: what the collector asks of each probe (its instruction) and
what each probe says of itself (its health report).

- Probes: ``GET /api/v1/instruction`` (their own effective instruction, ETag /
  If-None-Match) and ``POST /api/v1/reported-state`` (a health report).
- Administrators: instruction rules and suppression windows.
- Analysts: ``GET /api/v1/fleet`` (JSON or CSV) and the ``/fleet`` page.

A probe's token reads only its own instruction: the route takes no probe name, and the
per-probe view (``/api/v1/instructions/effective?probe=``) is for administrators.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from agent import spec
from agent.decoding import SchemaError, parse_health
from collector.alerts import rules as alert_rules
from collector.alerts import worker as alert_worker
from collector.errors import ApiError, StoreUnavailable
from collector.fleet import control
from collector.fleet import view as fleet_view
from collector.fleet.rules import Selector, selector
from collector.intake import ingest
from collector.metrics import count
from collector.routing import Routes
from collector.storage.store import Store
from collector.web.app_keys import ALERTER, CONFIG
from collector.web.params import query_format, read_body
from collector.web.probe_routes import authenticated_probe, clock_skew, ingesting_probe, probe_body
from collector.web.replies import json_response
from collector.web.threads import db
from collector.web.ticket_routes import instruction_headers

log = logging.getLogger("bbprobe.collector")
MAX_HEALTH_BYTES = 16 * 1024
MAX_ADMIN_BYTES = 64 * 1024


async def get_instruction(request: web.Request) -> web.Response:
    """Probe: its effective instruction. 304 when If-None-Match holds its version."""
    probe = await authenticated_probe(request)
    asked = request.query.get("probe")
    if asked is not None and asked != probe:
        raise ApiError(403, f"this token is probe {probe!r}'s: it reads no other probe's "
                       "instruction", field="probe")
    doc = (await db(request, lambda s: control.effective_for(s, probe))).document
    etag = f'"{doc["version"]}"'
    # A measurement ticket when asked for (ticket_routes.py), on the 304 too: the daemon
    # fetches at every slot and mostly holds the current instruction. Asking takes one of
    # the probe's requests from its rate limit (minting is not free: ledger.py).
    headers = {"ETag": etag, "Cache-Control": "no-cache",
               **(await instruction_headers(request, probe))}
    match = request.headers.get("If-None-Match", "")
    if etag in (t.strip() for t in match.split(",")):
        return web.Response(status=304, headers=headers)
    return json_response(doc, headers=headers)


async def post_health_report(request: web.Request) -> web.Response:
    """Probe: its health report (agent/schema.py HealthReport), kept as the latest."""
    probe = await ingesting_probe(request)
    raw = await probe_body(request, MAX_HEALTH_BYTES)
    data = ingest.parse_json(raw)
    try:
        health = parse_health(data)
    except SchemaError as exc:
        raise ApiError(422, str(exc), field=exc.path or None) from None
    # A year ahead at most, not a day: a probe whose clock runs ahead must still show
    # in the fleet, with the skew that explains it (its results are refused until it
    # is set right); its campaign is certified only once it has ended by our clock.
    ingest.check_times(health, datetime.now(UTC), ahead_s=ingest.PLANNED_AHEAD_S)
    skew = clock_skew(request)
    await db(request, lambda s: control.record_health(s, probe, data, skew))
    count(request, lambda m: m.health_reports.inc())
    cfg = request.app[CONFIG]
    if cfg.alerts.enabled and alert_rules.completed_campaign(data, datetime.now(UTC)) is not None:
        # A completed campaign is certified now: the next report, a session later,
        # speaks of the next one (collector/alerts/worker.py). The report is stored already:
        # a failure here is logged, and the alerter's ticks try again.
        now = datetime.now(UTC)
        try:
            raised = await db(request, lambda s: alert_worker.on_report(s, cfg, probe, data, now))
        except Exception as exc:
            log.warning("alerts: certifying %s's completed campaign failed: %s", probe, exc,
                        exc_info=not isinstance(exc, StoreUnavailable))
            raised = False
        alerter = request.app.get(ALERTER)
        if raised and alerter is not None:
            alerter.wake.set()
    return json_response({"probe_id": probe, "stored": True})


async def _admin_json(request: web.Request) -> dict[str, Any]:
    data = ingest.parse_json(await read_body(request, MAX_ADMIN_BYTES))
    if not isinstance(data, dict):
        raise ApiError(422, "expected a JSON object")
    return data


def _selector_of(data: dict[str, Any]) -> Selector:
    raw = data.get("selector")
    if not isinstance(raw, dict):
        raise ApiError(422, 'selector: required, an object such as {"all": true} or '
                       '{"region": "Lazio"}', field="selector")
    try:
        return selector(raw)
    except ValueError as exc:
        raise ApiError(422, str(exc), field="selector") from None


async def put_instruction(request: web.Request) -> web.Response:
    """Admin: {"selector": {...}, "set": {KEY: VALUE}, "unset": [KEY]} on one rule."""
    data = await _admin_json(request)
    unknown = sorted(set(data) - {"selector", "set", "unset"})
    if unknown:
        raise ApiError(422, f"{unknown[0]}: unknown field", field=unknown[0])
    chosen = _selector_of(data)
    put = data.get("set") or {}
    remove = data.get("unset") or []
    if not isinstance(put, dict):
        raise ApiError(422, "set: expected an object of KEY: VALUE", field="set")
    if not isinstance(remove, list) or not all(isinstance(k, str) for k in remove):
        raise ApiError(422, "unset: expected a list of keys", field="unset")

    def change(s: Store) -> tuple[Selector, dict[str, Any]]:
        # The stored rule that selects the same probes (any case), in its own spelling.
        stored = control.stored_selector(s, chosen, removing=not put)
        return stored, control.set_instruction(s, stored, put, remove)

    stored, settings = await db(request, change)
    return json_response({"selector": stored.to_dict(), "selects": stored.describe(),
                              "settings": settings})


async def list_instructions(request: web.Request) -> web.Response:
    rules = await db(request, control.rules)
    same = control.twins(rules)
    return json_response({"rules": [
        {"selector": r.selector.to_dict(), "selects": r.selector.describe(),
         "settings": r.settings, "updated_at": r.updated_at,
         "same_probes_as": same.get(r.selector.key(), [])}
        for r in sorted(rules, key=lambda r: (r.selector.rank(), r.updated_at))]})


async def effective_instruction(request: web.Request) -> web.Response:
    name = request.query.get("probe")
    if not name:
        raise ApiError(400, "probe: required", field="probe")
    return json_response(await db(request, lambda s: control.show(s, name)))


async def add_suppression(request: web.Request) -> web.Response:
    """Admin: {"selector": {...}, "from": T, "until": T, "reason": TEXT}."""
    data = await _admin_json(request)
    unknown = sorted(set(data) - {"selector", "from", "until", "reason"})
    if unknown:
        raise ApiError(422, f"{unknown[0]}: unknown field", field=unknown[0])
    chosen = _selector_of(data)
    for name in ("from", "until", "reason"):
        if not isinstance(data.get(name), str):
            raise ApiError(422, f"{name}: required, a string", field=name)
    window = await db(request, lambda s: control.add_window(
        s, chosen, data["from"], data["until"], data["reason"]))
    return json_response(window.to_dict(), status=201)


async def list_suppressions(request: web.Request) -> web.Response:
    windows = await db(request, control.windows)
    return json_response({"suppressions": [w.to_dict() for w in windows]})


async def delete_suppression(request: web.Request) -> web.Response:
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ApiError(404, f"no suppression window {raw[:20]!r}", field="id")
    await db(request, lambda s: control.delete_window(s, int(raw)))
    return json_response({"id": int(raw), "deleted": True})


async def _rows(request: web.Request) -> list[dict[str, Any]]:
    cfg = request.app[CONFIG].fleet
    return await db(request, lambda s: control.fleet_rows(s, cfg.silent_after_s,
                                                          cfg.validity_days))


async def get_fleet(request: web.Request) -> web.Response:
    fmt = query_format(request, ("json", "csv"))
    rows = await _rows(request)
    if fmt == "csv":
        return web.Response(text=fleet_view.format_csv(rows), content_type="text/csv")
    return json_response({"summary": fleet_view.summary(rows),
                              "silent_after_s": request.app[CONFIG].fleet.silent_after_s,
                              "probes": rows})


async def fleet_page(request: web.Request) -> web.Response:
    rows = await _rows(request)
    cfg = request.app[CONFIG].fleet
    page = fleet_view.format_html(rows, cfg.silent_after_s, datetime.now(UTC),
                                  cfg.validity_days)
    return web.Response(text=page, content_type="text/html")


def add_routes(routes: Routes) -> None:
    routes.get(spec.INSTRUCTION_PATH, get_instruction, role="probe")
    routes.post(spec.HEALTH_PATH, post_health_report, role="probe")
    routes.get("/api/v1/instructions", list_instructions, role="admin")
    routes.post("/api/v1/instructions", put_instruction, role="admin")
    routes.get("/api/v1/instructions/effective", effective_instruction, role="admin")
    routes.get("/api/v1/suppressions", list_suppressions, role="analyst")
    routes.post("/api/v1/suppressions", add_suppression, role="admin")
    routes.post("/api/v1/suppressions/{id}/delete", delete_suppression, role="admin")
    routes.get("/api/v1/fleet", get_fleet, role="analyst")
    routes.get("/fleet", fleet_page, role="analyst")
