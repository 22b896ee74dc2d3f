"""The collector's OpenAPI 3.1 document, served at ``GET /api/v1/openapi.json``.

Component schemas are generated from the same dataclasses that validate requests
(``agent.json_schema.json_schema``), so the document cannot drift from what is enforced.
"""

from __future__ import annotations

from typing import Any

from agent import __version__, spec
from agent.json_schema import json_schema
from agent.schema import GapRecord, HealthReport, SessionResult, UploadReport
from collector.compliance.evaluate import IndicatorResult
from collector.measurement import librespeed
from collector.web.openapi_parts import (
    ADMIN,
    BEARER,
    CERTIFICATE,
    CI95,
    CI95_OR_NULL,
    KEY_PUT,
    MIN_SAMPLES,
    PUBLIC,
    SCOPE_PARAMETERS,
    SENT_AT,
    SIGNED_GAP,
    SIGNED_RESULT,
    TICKET,
    TICKET_RESPONSES,
    fleet_paths,
)
from collector.web.openapi_parts import error as _error
from collector.web.openapi_parts import json_body as _json
from collector.web.openapi_parts import query as _query

OPENAPI_PATH = "/api/v1/openapi.json"


def _probe_action(summary: str, not_found: str) -> dict[str, Any]:
    """An admin POST on one probe by name (revoke, rotate): the same security, parameter
    and answers, each with its own summary."""
    return {"post": {"summary": summary, "security": ADMIN,
                     "parameters": [{"name": "name", "in": "path", "required": True,
                                     "schema": {"type": "string"}}],
                     "responses": {"200": _json({"type": "object"}),
                                   "401": _error("Missing, unknown or revoked token."),
                                   "403": _error("Not an admin token."),
                                   "404": _error(not_found)}}}


def document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    result_ref = json_schema(SessionResult, schemas)
    json_schema(GapRecord, schemas)
    upload_ref = json_schema(UploadReport, schemas)
    indicator_ref = json_schema(IndicatorResult, schemas)
    # The JSON gives the indicator's interval as ``ci95`` (reports/text.py
    # ``indicator_dict``), not the dataclass's ``interval``.
    del schemas["IndicatorResult"]["properties"]["interval"], schemas["Interval"]
    schemas["IndicatorResult"]["properties"]["ci95"] = CI95_OR_NULL
    schemas["CI95"] = CI95
    schemas["Certificate"] = CERTIFICATE
    schemas["Error"] = {
        "type": "object", "required": ["error", "field"], "additionalProperties": False,
        "properties": {"error": {"type": "string"},
                       "field": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                       "code": {"type": "string",
                                "description": "A machine-readable reason, where a client "
                                               "acts on it (a refused ticket's; a result "
                                               "refused for its signature: "
                                               "malformed_signature, unknown_key, "
                                               "revoked_key, replaced_key, "
                                               "bad_signature, unsigned, not_numbered)."},
                       "bound_kid": {"type": "string",
                                     "description": "A key refused because another is "
                                                    "bound (409): the kid of the key bound "
                                                    "to the probe."}},
    }
    schemas["SignedResult"] = SIGNED_RESULT
    schemas["SignedGapRecord"] = SIGNED_GAP
    delivered = {"oneOf": [result_ref, {"$ref": "#/components/schemas/SignedResult"}]}
    gap_stored = {"type": "object", "required": ["gap_id", "stored", "signature"],
                  "properties": {"gap_id": {"type": "string"},
                                 "stored": {"type": "boolean"},
                                 "signature": {"enum": ["verified", "unverified",
                                                        "unsigned"]}}}
    schemas["IngestReply"] = {
        "type": "object", "required": ["result_id", "stored", "duplicate"],
        "properties": {"result_id": {"type": "string", "format": "uuid"},
                       "stored": {"type": "boolean"}, "duplicate": {"type": "boolean"}},
    }
    schemas["Report"] = {
        "type": "object", "required": ["targets", "scope", "sessions", "verdict", "indicators"],
        "properties": {
            "targets": {"type": "object"}, "scope": {"type": "object"},
            "sessions": {"type": "integer", "minimum": 0},
            "verdict": {"enum": ["pass", "fail", "incomplete"]},
            "indicators": {"type": "array", "items": indicator_ref},
            "informational": {"type": "array", "items": indicator_ref},
            "min_samples": MIN_SAMPLES,
            "not_measured": {"type": "array", "items": {"type": "object"}},
            "method": {"type": "object", "additionalProperties": {"type": "string"}},
            "invalid": {"type": "object"},
            "customer": {"type": "object", "properties": {
                "tests": {"type": "object", "additionalProperties": {"type": "integer"}},
                "included": {"type": "boolean"}}},
        },
    }
    bad_request = _error("A parameter is invalid; the message names it.")
    no_probe = _error("A probe name is not registered, or line metadata selects no probe; "
                      "the message names the parameter and the nearest names.")
    customer_parameters = [
        _query("include_customer", "Include the speeds of customers' own tests (browser "
               "page, ndt7) of the period in the percentiles (default false: counted "
               "apart).", {"enum": ["true", "false"]}),
        _query("customer_network", "Only customer tests from this network (CIDR)."),
    ]
    paths: dict[str, Any] = {
        spec.RESULTS_PATH: {
            "post": {
                "summary": "Ingest one session result (idempotent on result_id).",
                "security": BEARER,
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": delivered}}},
                "parameters": [SENT_AT],
                "responses": {
                    "201": _json({"$ref": "#/components/schemas/IngestReply"}, "Stored."),
                    "200": _json({"$ref": "#/components/schemas/IngestReply"},
                                 "Already stored with the same content; nothing new."),
                    "400": _error("Body is not JSON (or not UTF-8), or its zstd or gzip "
                                  "stream is damaged."),
                    "401": _error("Missing, unknown or revoked token."),
                    "403": _error("The result belongs to another probe."),
                    "409": _error("The same result_id was stored with other content."),
                    "413": _error("Body larger than server.max_body_bytes, sent or once "
                                  "inflated."),
                    "415": _error("Content-Type is not application/json, or "
                                  "Content-Encoding is not identity, zstd or gzip."),
                    "422": _error("The document breaks the schema (field names the path); "
                                  "or a signed result is malformed (field protected, "
                                  "payload or signature), does not verify with its key, "
                                  "is signed with a revoked key, one replaced more than "
                                  "an hour before the session ended or one not bound to "
                                  "the probe, or has no session_seq (field session_seq); "
                                  "or the result is unsigned and the collector "
                                  "requires signatures (evidence.require_signatures). "
                                  "The code says which."),
                },
            },
            "get": {
                "summary": "List results with their summaries (JSON or CSV).",
                "parameters": [*SCOPE_PARAMETERS,
                               _query("limit", "At most this many results.",
                                      {"type": "integer", "minimum": 1, "maximum": 1000000}),
                               _query("format", "json (default) or csv.",
                                      {"enum": ["json", "csv"]})],
                "responses": {"200": {"description": "Results.", "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "text/csv": {"schema": {"type": "string"}}}},
                    "400": bad_request, "404": no_probe},
            },
        },
        spec.RESULTS_PATH + "/batch": {
            "post": {
                "summary": "Ingest many results in one request and one transaction (a "
                           "backlog after an outage). Per-item outcomes, in order.",
                "security": BEARER,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "required": ["results"],
                               "additionalProperties": False,
                               "properties": {"results": {
                                   "type": "array", "minItems": 1,
                                   "items": delivered}}}}}},
                "parameters": [SENT_AT],
                "responses": {
                    "200": _json({"type": "object", "required": ["items"], "properties": {
                        "items": {"type": "array", "items": {"type": "object", "properties": {
                            "result_id": {"type": ["string", "null"]},
                            "status": {"type": "integer",
                                       "description": "201 stored, 200 duplicate, 409 "
                                                      "conflict, 403 another probe's, 422 "
                                                      "invalid (the document, or its "
                                                      "signature: as the single result's "
                                                      "422)"},
                            "error": {"type": ["string", "null"]},
                            "field": {"type": ["string", "null"]}}}}}}),
                    "400": _error("Body is not JSON."),
                    "401": _error("Missing, unknown or revoked token."),
                    "408": _error("The body did not arrive within server.body_timeout_s."),
                    "413": _error("Too many results or bytes for one batch (sent or once "
                                  "inflated)."),
                    "415": _error("Content-Type is not application/json, or "
                                  "Content-Encoding is not identity, zstd or gzip."),
                    "422": _error("Not {\"results\": [...]}, or an empty batch."),
                    "429": _error("Over the probe's rate limit; see Retry-After."),
                },
            },
        },
        "/api/v1/gaps": {
            "post": {
                "summary": "A gap record: results the probe dropped before delivery, "
                           "plain or signed by the probe's key.",
                "security": BEARER,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"oneOf": [
                        {"$ref": "#/components/schemas/GapRecord"},
                        {"$ref": "#/components/schemas/SignedGapRecord"}]}}}},
                "responses": {"201": _json(gap_stored),
                              "200": _json(gap_stored),
                              "400": _error("Body is not JSON."),
                              "401": _error("Missing, unknown or revoked token."),
                              "403": _error("The gap belongs to another probe."),
                              "409": _error("The same gap_id with other content."),
                              "422": _error("The document breaks the schema; or a signed "
                                            "record is malformed, does not verify, or is "
                                            "signed with a key revoked, replaced before "
                                            "it was recorded, or not the probe's."),
                              "429": _error("Over the probe's rate limit.")},
            },
            "get": {"summary": "Gap records overlapping the scope.",
                    "parameters": SCOPE_PARAMETERS,
                    "responses": {"200": _json({"type": "object"}), "400": bad_request}},
        },
        "/api/v1/completeness": {
            "get": {"summary": "Per probe per UTC day: sessions delivered / expected, the "
                               "missing session_seq numbers no gap record explains, and "
                               "those it does; the signed results and the chain breaks "
                               "(issue 27), per day and per probe (\"chains\").",
                    "parameters": SCOPE_PARAMETERS,
                    "responses": {"200": _json({"type": "object"}), "400": bad_request}},
        },
        spec.RESULTS_PATH + "/{result_id}": {
            "get": {
                "summary": "One stored result, as ingested (canonical JSON).",
                "parameters": [{"name": "result_id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json(result_ref), "404": _error("No such result.")},
            },
        },
        spec.WHOAMI_PATH: {
            "get": {"summary": "The probe a token belongs to.", "security": BEARER,
                    "responses": {"200": _json({"type": "object", "required": ["probe_id"],
                                                "properties": {"probe_id": {"type": "string"}}}),
                                  "401": _error("Missing, unknown or revoked token.")}},
        },
        "/api/v1/probe/key": KEY_PUT,
        "/.well-known/bbprobe-keys.json": {
            "get": {"summary": "The JWK Set (RFC 7517): the collector's evidence key and "
                               "every probe key ever bound (current, past, revoked), in "
                               "member 'bbprobe'. Cached for 60 s.",
                    "security": PUBLIC,
                    "responses": {"200": {"description": "The JWK Set.", "content": {
                        "application/jwk-set+json": {"schema": {
                            "type": "object", "required": ["keys"],
                            "properties": {"keys": {"type": "array",
                                                    "items": {"type": "object"}}}}}}}}},
        },
        "/api/v1/probes": {
            "post": {
                "summary": "Admin: register a probe with its line metadata; the reply holds "
                           "its token (shown once).",
                "security": ADMIN,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["probe_id"], "additionalProperties": False,
                    "properties": {"probe_id": {"type": "string"},
                                   **{k: {"type": ["string", "null"]} for k in (
                                       "operator", "offer", "region", "technology")},
                                   **{k: {"type": ["number", "null"], "minimum": 0} for k in (
                                       "download_nominal_kbps", "download_min_kbps",
                                       "upload_nominal_kbps", "upload_min_kbps",
                                       "max_delay_ms", "max_loss_ratio",
                                       "download_normal_kbps", "upload_normal_kbps")}}}}}},
                "responses": {"201": _json({"type": "object"}),
                              "400": _error("Body is not JSON."),
                              "401": _error("Missing, unknown or revoked token."),
                              "403": _error("Not an admin token."),
                              "409": _error("A probe of that name exists."),
                              "422": _error("A field is missing or wrong.")},
            },
            "get": {"summary": "Registered probes with their line metadata (JSON or CSV).",
                    "parameters": [_query("format", "json (default) or csv.",
                                          {"enum": ["json", "csv"]})],
                    "responses": {"200": {"description": "Probes.", "content": {
                        "application/json": {"schema": {"type": "object"}},
                        "text/csv": {"schema": {"type": "string"}}}},
                        "400": bad_request}},
        },
        "/api/v1/probes/{name}/revoke": _probe_action(
            "Admin: revoke a probe's token at once (its results stay).",
            "No active probe of that name."),
        "/api/v1/probes/{name}/rotate": _probe_action(
            "Admin: a new token for a probe, returned this once; the old one is refused at "
            "once; name, metadata and results stay; a revoked probe is re-enabled.",
            "No probe of that name."),
        "/api/v1/probes/{name}/contract": {
            **_probe_action(
                "Admin: change some of a probe's line metadata (the fields of POST "
                "/api/v1/probes; \"from\": when it applies, default now) as a new "
                "version of its contract, recorded with the admin token's name.",
                "No probe of that name."),
            "get": {"summary": "The probe's contract history: every version, oldest "
                               "first, with from when it applies and who changed it.",
                    "parameters": [{"name": "name", "in": "path", "required": True,
                                    "schema": {"type": "string"}}],
                    "responses": {"200": _json({"type": "object"}),
                                  "404": _error("No probe of that name.")}},
        },
        "/api/v1/samples": {
            "get": {"summary": "Per-test samples of a scope as CSV (probe_id, timestamp, kind, "
                               "value, ok, unit): the input of `evaluate --samples`.",
                    "parameters": [*SCOPE_PARAMETERS,
                                   _query("format", "csv (the only format).",
                                          {"enum": ["csv"]}),
                                   _query("include_invalid", "Also sessions flagged invalid.",
                                          {"enum": ["true", "false"]})],
                    "responses": {"200": {"description": "CSV.", "content": {
                        "text/csv": {"schema": {"type": "string"}}}},
                        "400": bad_request, "404": no_probe}},
        },
        "/api/v1/report": {
            "get": {"summary": "Compliance report against the configured Allegato 2 targets.",
                    "parameters": [*SCOPE_PARAMETERS,
                                   _query("format", "json (default), csv (one row per "
                                          "indicator) or html (the page with plots).",
                                          {"enum": ["json", "csv", "html"]}),
                                   _query("timezone", "Local time of the plots (html)."),
                                   *customer_parameters,
                                   _query("include_invalid", "Count sessions flagged invalid "
                                          "(default false: shown apart).",
                                          {"enum": ["true", "false"]}),
                                   _query("by", "One report per group (repeatable): "
                                          "line metadata and/or semester (json, csv).",
                                          {"type": "array", "items": {
                                              "enum": ["operator", "offer", "region",
                                                       "technology", "semester",
                                                       "family"]}}),
                                   _query("layout", "standard (default), or semester: "
                                          "AGCOM's semester tables, a row per region and "
                                          "technology for each semester and the year, "
                                          "each figure with its 95 % interval and samples "
                                          "(csv or html; needs a period; no by).",
                                          {"enum": ["standard", "semester"]})],
                    "responses": {"200": {"description": "The report.", "content": {
                        "application/json": {"schema": {
                            "$ref": "#/components/schemas/Report"}},
                        "text/csv": {"schema": {"type": "string"}},
                        "text/html": {"schema": {"type": "string"}}}},
                        "400": bad_request, "404": no_probe}},
        },
        "/report": {
            "get": {"summary": "HTML report with plots for the scope in the query.",
                    "parameters": [*SCOPE_PARAMETERS,
                                   _query("timezone", "Local time of the plots."),
                                   *customer_parameters,
                                   _query("include_invalid", "Count sessions flagged invalid.",
                                          {"enum": ["true", "false"]})],
                    "responses": {"200": {"description": "A standalone HTML page.",
                                          "content": {"text/html": {"schema": {
                                              "type": "string"}}}},
                                  "400": bad_request}},
        },
        "/": {
            "get": {"summary": "Front page: probes, their lines, links to their reports.",
                    "responses": {"200": {"description": "HTML.", "content": {
                        "text/html": {"schema": {"type": "string"}}}}}},
        },
        "/api/v1/certificate": {
            "get": {"summary": "Line certificate of one probe against its contract.",
                    "parameters": [
                        _query("probe", "The line's probe.", required=True),
                        _query("since", "Campaign start, inclusive."),
                        _query("until", "Campaign end, exclusive."),
                        _query("rule", "Completeness rule.", {"enum": list(spec.CAMPAIGN_RULES)}),
                        _query("timezone", "Local time zone of the hourly bands."),
                        _query("format", "json (default), html (a printable certificate) "
                               "or csv (one row per check, the line and verdict on each).",
                               {"enum": ["json", "html", "csv"]}),
                    ],
                    "responses": {"200": {"description": "The certificate.", "content": {
                        "application/json": {"schema": {
                            "$ref": "#/components/schemas/Certificate"}},
                        "text/html": {"schema": {"type": "string"}},
                        "text/csv": {"schema": {"type": "string"}}}},
                        "400": bad_request,
                        "404": _error("No probe of that name (the nearest are named).")}},
        },
        "/api/v1/probes/{name}/certificate/evidence.zip": {
            "get": {"summary": "The line certificate's evidence bundle, as a zip: the "
                               "certificate signed by the collector's evidence key, every "
                               "session as its probe signed it, the keys, and VERIFY.txt "
                               "(check it offline: bbprobe verify).",
                    "parameters": [
                        {"name": "name", "in": "path", "required": True,
                         "schema": {"type": "string"}, "description": "The line's probe."},
                        _query("since", "Campaign start, inclusive."),
                        _query("until", "Campaign end, exclusive."),
                        _query("rule", "Completeness rule.", {"enum": list(spec.CAMPAIGN_RULES)}),
                        _query("timezone", "Local time zone of the hourly bands."),
                        _query("family", "The address family of a dual-stack line's campaign.",
                               {"enum": ["ipv4", "ipv6"]}),
                    ],
                    "responses": {"200": {"description": "The bundle.", "content": {
                        "application/zip": {"schema": {"type": "string",
                                                       "format": "binary"}}}},
                        "400": bad_request,
                        "404": _error("No probe of that name (the nearest are named)."),
                        "503": _error("The collector's evidence key is unusable.")}},
        },
        OPENAPI_PATH: {"get": {"summary": "This document.", "security": PUBLIC,
                               "responses": {"200": _json({"type": "object"})}}},
        "/healthz": {"get": {"summary": "Liveness: {\"status\": \"ok\"} and nothing else.",
                             "security": PUBLIC,
                             "responses": {"200": _json({"type": "object"})}}},
        "/api/v1/health": {"get": {
            "summary": "Analysts: version, measurement slots in use, the InfluxDB copy "
                       "(state, outbox, dead letters); status 'degraded' when the sink is "
                       "not running.",
            "responses": {"200": _json({"type": "object"})}}},
        spec.DOWNLOAD_PATH: {
            "get": {"summary": "Download source: N random bytes, or S seconds then close.",
                    "security": PUBLIC,
                    "parameters": [_query("bytes", "Bytes to send.", {"type": "integer",
                                                                      "minimum": 1}),
                                   _query("duration_s", "Seconds to send.",
                                          {"type": "number", "exclusiveMinimum": 0}),
                                   TICKET],
                    "responses": {"200": {"description": "Incompressible payload.", "content": {
                        "application/octet-stream": {"schema": {"type": "string",
                                                                "format": "binary"}}}},
                        "400": bad_request, **TICKET_RESPONSES}},
        },
        spec.UPLOAD_PATH: {
            "post": {"summary": "Upload sink: counts the body, reports (t, bytes) samples.",
                     "security": PUBLIC,
                     "parameters": [_query("bytes", "Expected body size.",
                                           {"type": "integer", "minimum": 1}),
                                    _query("duration_s", "Longest the sink reads.",
                                           {"type": "number", "exclusiveMinimum": 0}),
                                    _query("sample_interval_s", "Sample spacing.",
                                           {"type": "number", "minimum": 0.01,
                                            "maximum": 1}),
                                    TICKET],
                     "requestBody": {"content": {"application/octet-stream": {
                         "schema": {"type": "string", "format": "binary"}}}},
                     "responses": {"200": _json(upload_ref), "400": bad_request,
                                   **TICKET_RESPONSES,
                                   "413": _error("Over the byte or time limit (the "
                                                 "request's; its ticket's time is a "
                                                 "403).")}},
        },
        spec.ECHO_PATH: {"get": {
            "summary": "HTTP echo for round-trip times; with capacity=1, whether a transfer "
                       "from this client (its ticket, else its address) would be admitted "
                       "now (no slot is taken).",
            "security": PUBLIC,
            "parameters": [_query("capacity", "1: answer the refusal a transfer would get "
                                  "now, if any (0 or absent: a plain echo). A few asks a "
                                  "second per client address (429, per_client, beyond).",
                                  {"enum": ["0", "1"]}), TICKET],
            "responses": {"200": {"description": "ok"}, "400": bad_request,
                          **TICKET_RESPONSES}}},
    }
    paths["/speedtest"] = {"get": {
        "summary": "Browser speed test page (LibreSpeed protocol against this server).",
        "security": PUBLIC, "responses": {"200": {"description": "HTML.", "content": {
            "text/html": {"schema": {"type": "string"}}}}}}}
    paths["/speedtest/{asset}"] = {"get": {
        "summary": "The speed-test page's style sheet or script (named by a digest of its "
                   "content; cached for good).",
        "security": PUBLIC, "parameters": [{"name": "asset", "in": "path", "required": True,
                                            "schema": {"type": "string"}}],
        "responses": {"200": {"description": "CSS or JavaScript."},
                      "404": {"description": "No such file."}}}}
    paths["/speedtest/result/{link}"] = {"get": {
        "summary": "A saved browser result's page: its figures and time (never the "
                   "client's address or user agent). The link is the POST's answer.",
        "security": PUBLIC, "parameters": [{"name": "link", "in": "path", "required": True,
                                            "schema": {"type": "string"}}],
        "responses": {"200": {"description": "HTML.", "content": {
            "text/html": {"schema": {"type": "string"}}}},
                      "404": {"description": "No stored result has this link (HTML)."}}}}
    paths["/api/v1/browser-results"] = {
        "post": {"summary": "An anonymous browser speed test's result (kept apart from "
                            "probe results, never in compliance).",
                 "security": PUBLIC,
                 "requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"type": "object", "additionalProperties": False,
                                "properties": {
                                    "method": {"type": "object"},
                                    "user_agent": {"type": "string"},
                                    "rtts_ms": {"type": "array", "maxItems": 100,
                                                "items": {"type": "number", "minimum": 0}},
                                    **{k: {"type": ["number", "null"], "minimum": 0}
                                       for k in ("rtt_min_ms", "rtt_mean_ms", "jitter_ms",
                                                 "download_bps", "download_bytes",
                                                 "upload_bps", "upload_bytes")}}}}}},
                 "responses": {"201": _json({"type": "object", "properties": {
                     "id": {"type": "integer"},
                     "link": {"type": "string", "description": "The result's link name."},
                     "url": {"type": "string", "description": "Its page, relative to the "
                             "server's root: speedtest/result/<link>."}}}),
                               "400": _error("Body is not JSON."),
                               "413": _error("Body over 64 KiB."),
                               "422": _error("A field is unknown or not a number >= 0."),
                               "429": _error("Too many results from this address.")}},
        "get": {"summary": "Browser speed-test results.",
                "parameters": [_query("since", "Received at or after (ISO 8601)."),
                               _query("until", "Received before (ISO 8601).")],
                "responses": {"200": _json({"type": "object"}), "400": bad_request}},
    }
    for test, what in (("download", "the server sends random binary messages"),
                       ("upload", "the client sends binary messages, counted")):
        paths[f"/ndt/v7/{test}"] = {"get": {
            "summary": f"ndt7 {test} subtest (WebSocket, subprotocol "
                       f"net.measurementlab.ndt.v7): {what} for 10 s, with TCP_INFO "
                       "measurements as text messages.",
            "security": PUBLIC,
            "parameters": [_query("early_exit", "Stop a download at 250 MB (the only "
                                  "value accepted).", {"enum": ["250"]}), TICKET],
            "responses": {"101": {"description": "Switching to the WebSocket."},
                          "400": _error("No WebSocket upgrade, no ndt7 subprotocol, or a "
                                        "bad query."),
                          **TICKET_RESPONSES}}}
    paths["/api/v1/ndt7-results"] = {"get": {
        "summary": "ndt7 subtests clients ran against this server (ndt-server's archive "
                   "shape; kept apart from probe results).",
        "parameters": [_query("since", "Started at or after (ISO 8601)."),
                       _query("until", "Started before (ISO 8601)."),
                       _query("measurements", "Include every server and client "
                              "measurement (default false).", {"enum": ["true", "false"]})],
        "responses": {"200": _json({"type": "object"}), "400": bad_request}}}
    empty_reply = {"200": {"description": "Empty body (LibreSpeed: exactly 0 bytes)."}}
    preflight = {"summary": "CORS preflight.", "security": PUBLIC,
                 "responses": {"200": {"description": "CORS headers."}}}
    for path in librespeed.paths("garbage"):
        paths[path] = {
            "get": {"summary": "LibreSpeed download: ckSize x 1 MiB of random data.",
                    "security": PUBLIC,
                    "parameters": [_query("ckSize", "Chunks of 1 MiB (default 4, "
                                          "1..1024)."), TICKET],
                    "responses": {"200": {"description": "Random bytes.", "content": {
                        "application/octet-stream": {"schema": {"type": "string",
                                                                "format": "binary"}}}},
                                  **TICKET_RESPONSES}},
            "options": preflight}
    for path in librespeed.paths("empty"):
        paths[path] = {
            "get": {"summary": "LibreSpeed ping target.", "security": PUBLIC,
                    "responses": empty_reply},
            "post": {"summary": "LibreSpeed upload sink: the body is drained.",
                     "security": PUBLIC, "parameters": [TICKET],
                     "requestBody": {"content": {"application/octet-stream": {
                         "schema": {"type": "string", "format": "binary"}}}},
                     "responses": {**empty_reply, **TICKET_RESPONSES,
                                   "413": _error("Body over measurement.max_bytes.")}},
            "options": preflight}
    for path in librespeed.paths("getIP"):
        paths[path] = {
            "get": {"summary": "LibreSpeed client address.", "security": PUBLIC,
                    "responses": {"200": _json({"type": "object", "properties": {
                        "processedString": {"type": "string"},
                        "rawIspInfo": {"type": "string"}}})}},
            "options": preflight}
    paths.update(fleet_paths(json_schema(HealthReport, schemas), bad_request))
    return {
        "openapi": "3.1.0",
        "info": {"title": "bbprobe collector", "version": __version__,
                 "description": "Ingestion, analyst queries, compliance against Allegato 2 "
                                "(delibere 131/06/CSP, 244/08/CSP) and measurement "
                                "endpoints."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "probeToken": {"type": "http", "scheme": "bearer",
                               "description": "The probe's token from `probe add`."},
                "analystToken": {"type": "http", "scheme": "bearer",
                                 "description": "An analyst or admin token from `token "
                                                "add` (or HTTP Basic with the token as "
                                                "password, for browsers)."},
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "An admin token from `token add --role "
                                              "admin`."},
            },
        },
        # Queries, reports and pages: an analyst or admin token (unless
        # server.query_auth = false); routes that differ say so.
        "security": [{"analystToken": []}],
    }
