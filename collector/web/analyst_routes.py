"""Routes analysts call (role "analyst": an analyst or admin token; reads may be open with
server.query_auth = false): results, reports, certificates, samples, gaps, completeness,
the anonymous tables, pages, and the collector's health."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from agent import spec
from agent.schema import utc_now
from collector import __version__, exports, keys, safetext
from collector.compliance import targets as targets_mod
from collector.compliance.completeness import chain_summaries, completeness
from collector.errors import ApiError, BadParameter
from collector.measurement.slots import SLOTS
from collector.reports import html as html_pages
from collector.reports import semester, service
from collector.reports.text import (
    LISTING_COLUMNS,
    PROBE_COLUMNS,
    REPORT_COLUMNS,
    SAMPLE_COLUMNS,
    breakdown_dict,
    breakdown_rows,
    certificate_dict,
    format_csv,
    report_dict,
    report_rows,
    sample_rows,
)
from collector.routing import Routes
from collector.scope import Scope, check_timezone, parse_network, parse_time, shown
from collector.storage.model import Probe
from collector.web import keys_routes
from collector.web.app_keys import CONFIG, SINK
from collector.web.params import query_flag, query_format, query_limit, scope_of
from collector.web.replies import json_response
from collector.web.threads import analyst_db as db
from collector.web.threads import db as primary_db

# ``db`` is ``analyst_db``: every read here is an analyst's, on the replica
# storage.read_url when one is set; ``primary_db`` is the store itself (the health
# route's outbox).
COMPLIANCE_REPORT_FORMATS = ("json", "csv", "html")


def _customers(request: web.Request) -> service.Customers:
    return service.Customers(include=query_flag(request, "include_customer"),
                             network=parse_network(
                                 request.query.get("customer_network")))


async def list_probes(request: web.Request) -> web.Response:
    fmt = query_format(request)
    probes = await db(request, lambda s: s.probes())
    if fmt == "csv":
        return web.Response(text=format_csv((p.to_dict() for p in probes), PROBE_COLUMNS),
                            content_type="text/csv")
    return json_response({"probes": [p.to_dict() for p in probes]})


async def list_samples(request: web.Request) -> web.Response:
    """Per-test samples of a scope as CSV, in the ``evaluate --samples`` format."""
    query_format(request, ("csv",))
    where = await scope_of(request)
    invalid = query_flag(request, "include_invalid")
    sessions = await db(request, lambda s: service.samples(s, where, invalid))
    return web.Response(text=format_csv(sample_rows(sessions), SAMPLE_COLUMNS),
                        content_type="text/csv")


async def list_results(request: web.Request) -> web.Response:
    fmt = query_format(request)
    where = await scope_of(request)
    limit = query_limit(request)
    rows = await db(request, lambda s: service.listing(s, where, limit))
    if fmt == "csv":
        return web.Response(text=format_csv(rows, LISTING_COLUMNS), content_type="text/csv")
    return json_response({"results": rows})


async def get_result(request: web.Request) -> web.Response:
    result_id = request.match_info["result_id"]
    row = await db(request, lambda s: s.result(result_id))
    if row is None:
        raise ApiError(404, f"no result {result_id}")
    # A body stored before text was checked may hold a lone surrogate: valid JSON out.
    return web.Response(text=safetext.unicode(row.body), content_type="application/json")


async def _targets_and_scope(request: web.Request) -> tuple[targets_mod.Targets, Scope]:
    """The configured targets table (read off the event loop) and the query's scope."""
    path = request.app[CONFIG].compliance.targets
    table = await asyncio.get_running_loop().run_in_executor(None, targets_mod.load, path)
    return table, await scope_of(request)


# A breakdown over the API: at most this many groups (service.MAX_GROUPS on the CLI).
WEB_MAX_GROUPS = 200


async def get_compliance_report(request: web.Request) -> web.Response:
    """The compliance report of a scope: JSON (default), CSV (one row per indicator) or
    the HTML page with plots."""
    layout = request.query.get("layout", "standard")
    if layout not in REPORT_LAYOUTS:
        raise ApiError(400, f"layout: expected one of {', '.join(REPORT_LAYOUTS)}, got "
                            f"{shown(layout)}", field="layout")
    if layout == "semester":
        # CSV when no format is asked: the layout has no JSON (semester.check_request
        # refuses any format but csv and html, naming it).
        return await semester_report(request, request.query.get("format", "csv"))
    fmt = query_format(request, COMPLIANCE_REPORT_FORMATS)
    if fmt == "html":
        if request.query.getall("by", []):
            raise ApiError(400, "by: the HTML report is of one scope; use json or csv",
                           field="by")
        return await compliance_report_page(request)
    table, where = await _targets_and_scope(request)
    invalid, customers = query_flag(request, "include_invalid"), _customers(request)
    min_samples = request.app[CONFIG].reports.min_samples
    by = request.query.getall("by", [])
    if by:
        # One report per group (line metadata and/or semester): JSON or CSV.
        # Fewer groups than the CLI allows: one request holds a database thread for
        # all of them.
        parts = await db(request, lambda s: service.breakdown(
            s, where, table, by, invalid, customers, max_groups=WEB_MAX_GROUPS,
            min_samples=min_samples))
        if fmt == "csv":
            return web.Response(text=format_csv(breakdown_rows(by, parts),
                                                (*by, *REPORT_COLUMNS)),
                                content_type="text/csv")
        return json_response(breakdown_dict(by, parts))
    report = await db(request, lambda s: service.compliance(s, where, table, invalid,
                                                            customers,
                                                            min_samples=min_samples))
    if fmt == "csv":
        return web.Response(text=format_csv(report_rows(report, where), REPORT_COLUMNS),
                            content_type="text/csv")
    return json_response(report_dict(report, where))


REPORT_LAYOUTS = ("standard", "semester")


async def semester_report(request: web.Request, fmt: str) -> web.Response:
    """AGCOM's semester tables of the scope (collector/reports/semester.py): CSV or HTML."""
    semester.check_request(fmt, request.query.getall("by", []),
                           query_flag(request, "include_customer"))
    table, where = await _targets_and_scope(request)
    invalid = query_flag(request, "include_invalid")
    timezone = check_timezone(request.query.get("timezone", "Europe/Rome"))
    min_samples = request.app[CONFIG].reports.min_samples
    rows, sample = await db(request, lambda s: semester.gather(
        where, lambda scope, by: service.breakdown(s, scope, table, by, invalid,
                                                   max_groups=WEB_MAX_GROUPS,
                                                   min_samples=min_samples)))
    if fmt == "csv":
        return web.Response(text=semester.to_csv(rows), content_type="text/csv")
    return web.Response(text=semester.render(rows, where, sample, utc_now(), timezone),
                        content_type="text/html")


async def compliance_report_page(request: web.Request) -> web.Response:
    """``/report``: the HTML report of the scope in the query (per probe: ?probe=NAME)."""
    table, where = await _targets_and_scope(request)
    timezone = check_timezone(request.query.get("timezone", "Europe/Rome"))
    invalid, customers = query_flag(request, "include_invalid"), _customers(request)
    min_samples = request.app[CONFIG].reports.min_samples
    view = await db(request, lambda s: service.report_view(s, where, table, invalid,
                                                           customers,
                                                           min_samples=min_samples))
    page = html_pages.render_view(view, timezone, utc_now(), "Allegato 2 compliance report",
                                  base=_site_root(request))
    return web.Response(text=page, content_type="text/html")


# The front page's per-line answers are kept this long (and while the fleet's probes
# and lines stay as they are): with server.query_auth = false anyone may load the page,
# and each load must not certify the fleet again. Loads meanwhile wait for the one
# computing them, then share its answers.
FRONT_PAGE_TTL_S = 60.0


@dataclass(slots=True)
class FrontPage:
    made_at: float = -1e18
    probes: list[Probe] = field(default_factory=list)
    answers: dict[str, list[Any]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


FRONT_PAGE = web.AppKey("front_page_answers", FrontPage)


async def index_page(request: web.Request) -> web.Response:
    """``/``: every probe with its line and links to its report and certificate, and
    per line its certificate's answer (service.line_answers, at most FRONT_PAGE_TTL_S
    old)."""
    probes = await db(request, lambda s: s.probes())
    cache = request.app[FRONT_PAGE]
    async with cache.lock:
        if cache.probes != probes or time.monotonic() - cache.made_at >= FRONT_PAGE_TTL_S:
            cache.answers = await db(request, service.line_answers)
            cache.probes, cache.made_at = probes, time.monotonic()
        answers = cache.answers
    return web.Response(text=html_pages.index(probes, answers), content_type="text/html")


def _site_root(request: web.Request) -> str:
    """The page's relative path to the site root ("" at /report, "../../" under
    /api/v1/): links between pages stay relative, behind any path prefix."""
    return "../" * (request.path.count("/") - 1)


async def get_certificate(request: web.Request) -> web.Response:
    probe = request.query.get("probe")
    if not probe:
        raise ApiError(400, "probe: required", field="probe")
    q = request.query
    fmt = query_format(request, ("json", "html", "csv"))
    since, until = q.get("since"), q.get("until")
    rule, timezone = q.get("rule", spec.DEFAULT_CAMPAIGN_RULE), q.get("timezone", "Europe/Rome")
    family = q.get("family")
    try:
        min_samples = request.app[CONFIG].reports.min_samples
        cert = await db(request, lambda s: service.certificate(s, probe, since, until, rule,
                                                               timezone, family, min_samples))
    except BadParameter as exc:
        if fmt != "html" or family is not None or exc.field != "family":
            raise
        # A dual-stack line from a link without a family (the index page): a page that
        # links to the campaign of each family.
        return web.Response(text=html_pages.family_choice(probe, request.query_string),
                            content_type="text/html")
    if fmt == "html":
        own = await request.app[keys_routes.EVIDENCE].get() \
            if keys_routes.EVIDENCE in request.app else None
        return web.Response(text=html_pages.certificate_page(
            cert, utc_now(), _site_root(request), _certificate_query(request),
            own.kid if own is not None else None), content_type="text/html")
    if fmt == "csv":
        return web.Response(text=exports.to_csv(exports.certificate_rows(cert),
                                                exports.CERTIFICATE_COLUMNS),
                            content_type="text/csv")
    return json_response(certificate_dict(cert))


CERTIFICATE_PARAMS = ("probe", "since", "until", "rule", "timezone", "family")


def _certificate_query(request: web.Request) -> str:
    """The certificate's own parameters (not its format), for the link to its bundle."""
    return urlencode([(k, v) for k, v in request.query.items()
                      if k in CERTIFICATE_PARAMS and k != "probe"])


# A bundle is built whole in memory (up to 10,000 session bodies and their zip, a
# couple of hundred MB at worst): at most this many at once per collector; one more is
# a 503 with Retry-After (RFC 9110 §15.6.4, §10.2.3), never a collector out of memory.
EVIDENCE_BUILDS_MAX = 2
EVIDENCE_RETRY_AFTER_S = 30
BUILD_SLOT_FILE = "evidence-build.{n}.lock"


class Builds:
    """Evidence bundles being built now, at most EVIDENCE_BUILDS_MAX per collector: a
    build holds an exclusive flock(2) on one of that many slot files in the state
    directory (beside the database and the evidence key), so the processes of ``serve
    --workers`` share the bound, and a process that dies frees its slots (the kernel
    drops its locks). Where no slot file can be opened (a read-only directory), each
    process counts its own builds."""

    def __init__(self) -> None:
        self.running = 0  # this process's builds

    def take(self, directory: Path) -> int | None:
        """A slot: a locked file descriptor, or -1 (counted in this process only); None
        when every slot is taken."""
        if self.running >= EVIDENCE_BUILDS_MAX:
            return None
        for n in range(EVIDENCE_BUILDS_MAX):
            try:
                fd = os.open(directory / BUILD_SLOT_FILE.format(n=n),
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                self.running += 1
                return -1
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by another build, here or in another process
                os.close(fd)
                continue
            self.running += 1
            return fd
        return None

    def give_back(self, slot: int) -> None:
        self.running -= 1
        if slot >= 0:
            os.close(slot)  # closing the descriptor drops its lock


EVIDENCE_BUILDS = web.AppKey("evidence_builds", Builds)


async def get_certificate_evidence(request: web.Request) -> web.Response:
    """A line certificate's evidence bundle as a zip (collector/evidence/bundle.py),
    signed by the collector's evidence key; the certificate's parameters. At most
    EVIDENCE_BUILDS_MAX at once, else 503."""
    builds = request.app[EVIDENCE_BUILDS]
    slot = builds.take(keys.state_dir(request.app[CONFIG], os.environ))
    if slot is None:
        raise ApiError(503, f"evidence: {EVIDENCE_BUILDS_MAX} bundles are being built, as "
                       "many as this collector builds at once; retry later",
                       retry_after=str(EVIDENCE_RETRY_AFTER_S))
    try:
        return await _certificate_evidence(request)
    finally:
        builds.give_back(slot)


async def _certificate_evidence(request: web.Request) -> web.Response:
    from collector.evidence import bundle

    probe = request.match_info["name"]
    q = request.query
    since, until = q.get("since"), q.get("until")
    rule, timezone = q.get("rule", spec.DEFAULT_CAMPAIGN_RULE), q.get("timezone", "Europe/Rome")
    family = q.get("family")
    own = await request.app[keys_routes.EVIDENCE].get()
    if own is None:
        raise ApiError(503, "evidence: the collector's evidence key is unusable (its log "
                       "says why); no bundle can be signed")
    path = request.app[CONFIG].compliance.targets
    table = await asyncio.get_running_loop().run_in_executor(None, targets_mod.load, path)
    min_samples = request.app[CONFIG].reports.min_samples
    members = await db(request, lambda s: bundle.certificate_members(
        s, own, probe, since, until, rule, timezone, family, table,
        min_samples=min_samples))
    body = await asyncio.to_thread(bundle.bundle_zip, members)
    name = f"evidence-{probe}" + (f"-{family}" if family else "") + ".zip"
    return web.Response(body=body, content_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{name}"'})


async def list_gaps(request: web.Request) -> web.Response:
    where = await scope_of(request)
    probes = list(where.probes) if where.probes is not None else None
    service.without_family(where, "a gap record")
    rows = await db(request, lambda s: s.gaps(probes, where.since, where.until))
    return json_response({"gaps": rows})


async def get_completeness(request: web.Request) -> web.Response:
    where = await scope_of(request)
    inputs = await db(request, lambda s: service.completeness_inputs(s, where))
    # The arithmetic off the database thread: ingestion does not wait for a report.
    rows = await asyncio.to_thread(completeness, *inputs)
    return json_response({"completeness": [r.to_dict() for r in rows],
                          "chains": chain_summaries(rows)})


async def list_browser_results(request: web.Request) -> web.Response:
    since = parse_time(request.query.get("since"), "since")
    until = parse_time(request.query.get("until"), "until")
    rows = await db(request, lambda s: s.browser_results(since, until))
    return json_response({"browser_results": rows})


async def list_ndt7_tests(request: web.Request) -> web.Response:
    """ndt7 subtests third-party clients ran against this server (never in compliance
    unless an analyst includes them)."""
    measurements = query_flag(request, "measurements")
    since = parse_time(request.query.get("since"), "since")
    until = parse_time(request.query.get("until"), "until")
    rows = await db(request, lambda s: s.ndt7_tests(since, until, measurements))
    return json_response({"ndt7_tests": rows})


async def collector_health(request: web.Request) -> web.Response:
    """The details, for analysts: version, the measurement slots, the InfluxDB copy (its
    state, outbox and dead letters)."""
    doc: dict[str, Any] = {"status": "ok", "version": __version__}
    slots = request.app.get(SLOTS)
    if slots is not None:
        doc["measurement"] = {"transfers_running": slots.running,
                              "transfers_ticketed": slots.ticketed,
                              "transfers_anonymous": slots.running - slots.ticketed,
                              "clients": len(slots.by_client), "limit": slots.limit,
                              "per_client": slots.per_client,
                              "reserved_for_tickets": slots.reserved,
                              "tickets": len(slots.ledger.tickets)}
    sink = request.app.get(SINK)
    if sink is not None:
        # The outbox is the primary's own state (a replica's copy lags it): read there,
        # not with the analysts' reads.
        doc["influxdb"] = {**asdict(sink.state),
                           "outbox": await primary_db(request, lambda s: s.outbox_size()),
                           "dead_letters_stored": await primary_db(
                               request, lambda s: s.outbox_dead_count())}
        if not sink.state.running:
            doc["status"] = "degraded"
    return json_response(doc)


def add_routes(routes: Routes) -> None:
    routes.app[FRONT_PAGE] = FrontPage()
    routes.app[EVIDENCE_BUILDS] = Builds()
    routes.get(spec.RESULTS_PATH, list_results, role="analyst")
    routes.get(spec.RESULTS_PATH + "/{result_id}", get_result, role="analyst")
    routes.get("/api/v1/probes", list_probes, role="analyst")
    routes.get("/api/v1/samples", list_samples, role="analyst")
    routes.get("/api/v1/report", get_compliance_report, role="analyst")
    routes.get("/api/v1/certificate", get_certificate, role="analyst")
    routes.get("/api/v1/probes/{name}/certificate/evidence.zip", get_certificate_evidence,
               role="analyst")
    routes.get("/api/v1/gaps", list_gaps, role="analyst")
    routes.get("/api/v1/completeness", get_completeness, role="analyst")
    routes.get("/api/v1/browser-results", list_browser_results, role="analyst")
    routes.get("/api/v1/ndt7-results", list_ndt7_tests, role="analyst")
    routes.get("/api/v1/health", collector_health, role="analyst")
    routes.get("/", index_page, role="analyst")
    routes.get("/report", compliance_report_page, role="analyst")
