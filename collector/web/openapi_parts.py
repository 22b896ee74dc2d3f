"""Pieces of the OpenAPI document (collector/web/openapi.py): the small builders, the shared
parameters and security, and the fleet-control and ticket paths."""

from __future__ import annotations

from typing import Any

from agent import spec


def error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}


def json_body(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def query(name: str, description: str, schema: dict[str, Any] | None = None,
          required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": schema or {"type": "string"}}


SCOPE_PARAMETERS = [
    query("probe", "Probe name (repeatable). One not registered is a 404 naming the "
          "nearest names."),
    query("operator", "Only probes of this operator (any case; the metadata filters "
          "together, and a value no probe has is a 404 naming the nearest)."),
    query("offer", "Only probes on this offer (any case)."),
    query("region", "Only probes in this region (any case)."),
    query("technology", "Only probes on this access technology (any case)."),
    query("family", "Only sessions measured over this IP version (schema 6; sessions "
          "of older agents have none and match neither).",
          {"type": "string", "enum": ["ipv4", "ipv6"]}),
    query("period", "Calendar period: YYYY, YYYY-H1 or YYYY-H2.",
          {"type": "string", "pattern": "^[0-9]{4}(-[Hh][12])?$"}),
    query("since", "Start, inclusive: ISO 8601 date or timestamp."),
    query("until", "End, exclusive: ISO 8601 date or timestamp."),
]
BEARER: list[dict[str, list[str]]] = [{"probeToken": []}]
ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]
PUBLIC: list[dict[str, list[str]]] = []
TICKET = {"name": spec.TICKET_HEADER, "in": "header", "required": False,
          "description": "A measurement ticket the probe's collector signed: "
                         "the transfer is counted per ticket, not per client address. A "
                         "server that accepts no tickets serves the transfer as anonymous.",
          "schema": {"type": "string", "maxLength": 4096}}
# A capacity refusal is marked as the server's own (a proxy on the path may answer 429 or
# 503 too): spec.REFUSED_HEADER carries its reason.
REFUSED_MARK = {spec.REFUSED_HEADER: {
    "schema": {"type": "string", "enum": ["busy", "per_client", "anonymous_share",
                                          "ticket_streams", "ledger_full"]},
    "description": "Why this server refused the transfer for capacity."}}


def capacity_error(description: str) -> dict[str, Any]:
    """A 429 or 503 of the measurement endpoints, with the marker header."""
    return {**error(description), "headers": REFUSED_MARK}


TICKET_RESPONSES = {
    "403": {"description": "The ticket is refused; the code (also in the JSON body) is "
                           "one of malformed, unknown_key, bad_signature, wrong_issuer, "
                           "not_yet_valid, expired, wrong_server, allowance_bytes, "
                           "allowance_duration (also: the transfer asks for more bytes or "
                           "seconds than the ticket has left), too_many_tickets (its probe "
                           "uses as many tickets at this server as one may).",
            "headers": {spec.TICKET_REFUSED_HEADER: {"schema": {"type": "string"},
                                                      "description": "The refusal's code."}},
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
    "429": capacity_error("This client's share of the slots is taken (per address, or "
                          "the ticket's streams, or its probe's tickets' together); see "
                          "Retry-After."),
    "503": capacity_error("Too many transfers running (busy), the slots open to "
                          "transfers without a ticket taken (anonymous_share), or too many "
                          "tickets in use here (ledger_full); see Retry-After."),
}
SENT_AT = {"name": "X-Bbprobe-Sent-At", "in": "header", "required": False,
           "description": "The probe's wall clock when sending (UTC); the collector stores "
                          "the skew from its own clock with each result.",
           "schema": {"type": "string", "format": "date-time"}}


def fleet_paths(health_ref: dict[str, Any], bad_request: dict[str, Any]
                ) -> dict[str, Any]:
    """Fleet control: instructions, suppressions, health, the fleet view; and
    measurement tickets."""
    selector = {"type": "object", "additionalProperties": False, "properties": {
        "all": {"type": "boolean"}, **{f: {"type": "string", "minLength": 1,
                                           "maxLength": 200}
                                       for f in ("probe", "operator", "offer", "region",
                                                 "technology")}}}
    refused = error("A key, value or selector is refused; field names it.")
    ticket_header = {spec.TICKET_HEADER: {
        "schema": {"type": "string"},
        "description": f"A measurement ticket (a JWT), when {spec.TICKET_REQUEST_HEADER} "
                       "asked for one and the collector issues tickets."}}
    return {
        spec.TICKETS_PATH: {"post": {
            "summary": "Probes: a measurement ticket, a JWT signed with the "
                       "collector's Ed25519 key, for the measurement servers it names.",
            "security": BEARER,
            "requestBody": {"required": False, "description": "Ignored (at most 4 KiB).",
                            "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {
                "200": json_body({
                    "type": "object", "additionalProperties": False,
                    "required": ["ticket", "ticket_id", "expires_at", "servers"],
                    "properties": {
                        "ticket": {"type": "string"},
                        "ticket_id": {"type": "string"},
                        "expires_at": {"type": "string", "format": "date-time"},
                        "servers": {"type": "array", "items": {"type": "string"}}}}),
                "401": error("Missing, unknown or revoked token."),
                "404": error("Tickets are not issued here (tickets.enabled = false)."),
                "409": error("No measurement server to name (this collector serves none "
                             "and tickets.servers is empty)."),
                "413": error("Body over 4 KiB."),
                "429": error("Over the probe's rate limit; see Retry-After."),
                "503": error("The signing key is unusable (the log says why).")}}},
        spec.INSTRUCTION_PATH: {"get": {
            "summary": "Probes: their own effective instruction (settings and suppression "
                       "windows) and its version, also the ETag.",
            "security": BEARER,
            "parameters": [
                {"name": "If-None-Match", "in": "header", "required": False,
                 "schema": {"type": "string"}, "description": "The ETag held."},
                {"name": spec.TICKET_REQUEST_HEADER, "in": "header", "required": False,
                 "schema": {"type": "string"},
                 "description": "Any value: send a measurement ticket in the "
                                f"{spec.TICKET_HEADER} response header, on a 304 too. "
                                "Asking takes a request from the probe's rate limit: "
                                "beyond it, the instruction comes without a ticket."},
                query("probe", "Only the token's own probe may be named.")],
            "responses": {"200": {**json_body({"type": "object", "required": [
                "version", "settings", "suppressions"]}), "headers": ticket_header},
                "304": {"description": "The instruction held is current.",
                        "headers": ticket_header},
                "401": error("Missing, unknown or revoked token."),
                "403": error("Another probe's instruction.")}}},
        spec.HEALTH_PATH: {"post": {
            "summary": "Probes: their health report (agent version, instruction, campaign, "
                       "spool, dead letters, clock); kept as the latest.",
            "security": BEARER, "parameters": [SENT_AT],
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": health_ref}}},
            "responses": {"200": json_body({"type": "object"}),
                          "400": error("Not JSON."),
                          "401": error("Missing, unknown or revoked token."),
                          "413": error("Larger than 16 KiB."),
                          "415": error("Not application/json, or an unknown encoding."),
                          "422": error("The report breaks the schema; field names it.")}}},
        "/api/v1/instructions": {
            "get": {"summary": "Admins: every instruction rule, least specific first.",
                    "security": ADMIN, "responses": {"200": json_body({"type": "object"})}},
            "post": {"summary": "Admins: set and unset keys in the rule of a selector "
                                "(the agent's --set keys; measurement settings only).",
                     "security": ADMIN,
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"type": "object", "required": ["selector"],
                                    "additionalProperties": False, "properties": {
                                        "selector": selector,
                                        "set": {"type": "object"},
                                        "unset": {"type": "array",
                                                  "items": {"type": "string"}}}}}}},
                     "responses": {"200": json_body({"type": "object"}), "400": bad_request,
                                   "404": error("No such probe."), "422": refused}}},
        "/api/v1/instructions/effective": {"get": {
            "summary": "Admins: a probe's effective instruction, each key with its rule.",
            "security": ADMIN, "parameters": [query("probe", "The probe.", required=True)],
            "responses": {"200": json_body({"type": "object"}), "400": bad_request,
                          "404": error("No such probe.")}}},
        "/api/v1/suppressions": {
            "get": {"summary": "Suppression windows.",
                    "responses": {"200": json_body({"type": "object"})}},
            "post": {"summary": "Admins: pause the selected probes' daemons in [from, "
                                "until).",
                     "security": ADMIN,
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"type": "object", "additionalProperties": False,
                                    "required": ["selector", "from", "until", "reason"],
                                    "properties": {"selector": selector,
                                                   "from": {"type": "string"},
                                                   "until": {"type": "string"},
                                                   "reason": {"type": "string"}}}}}},
                     "responses": {"201": json_body({"type": "object"}), "400": bad_request,
                                   "404": error("No such probe."), "422": refused}}},
        "/api/v1/suppressions/{id}/delete": {"post": {
            "summary": "Admins: delete a suppression window.", "security": ADMIN,
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": json_body({"type": "object"}),
                          "404": error("No such window.")}}},
        "/api/v1/fleet": {"get": {
            "summary": "One row per probe: last seen, silent, versions, backlog, bands, "
                       "validity rate, problems.",
            "parameters": [query("format", "json (default) or csv.",
                                 {"enum": ["json", "csv"]})],
            "responses": {"200": {"description": "The fleet.", "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/csv": {"schema": {"type": "string"}}}}, "400": bad_request}}},
        "/fleet": {"get": {"summary": "The fleet page (HTML).",
                           "responses": {"200": {"description": "HTML", "content": {
                               "text/html": {"schema": {"type": "string"}}}}}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text format 0.0.4): ingestion, request "
                       "latency by route, "
                       "measurement slots, the InfluxDB outbox, the fleet and each probe's "
                       "last session. A metrics token (`token add --role metrics`: "
                       "this route only), or an analyst or admin token. Also open, with "
                       "no token, on [metrics] listen.",
            "responses": {"200": {"description": "The exposition.", "content": {
                "text/plain": {"schema": {"type": "string"}}}}}}},
    }


# A result as its probe signed it (issue 27; collector/intake/signed.py): either result
# route takes it in place of the plain document.
SIGNED_RESULT: dict[str, Any] = {
    "type": "object", "required": ["protected", "payload", "signature"],
    "additionalProperties": False,
    "description": "A result as its probe signed it: a JWS in the flattened JSON "
                   "serialization (RFC 7515 §7.2.2), alg EdDSA (RFC 8037), by the "
                   "probe's key. The payload is the result's canonical JSON "
                   "(SessionResult; probe_id \"\" when spooled before the probe knew "
                   "its name: the collector names it). The protected header holds alg, "
                   "kid (the key's RFC 7638 thumbprint), typ \"bbprobe-result\" and prev "
                   "(the SHA-256, hex, of the canonical JSON of the result the probe "
                   "signed before it, or null). Verified against the keys bound to the "
                   "token's probe: with none bound it is kept unverified; a signature "
                   "that does not verify, a revoked key, a key replaced more than an "
                   "hour before the session ended or another probe's key is refused "
                   "(422); so is a signed result without session_seq.",
    "properties": {name: {"type": "string", "pattern": "^[A-Za-z0-9_-]*$",
                          "description": f"The {what}, base64url without padding."}
                   for name, what in (("protected", "protected header (JSON)"),
                                      ("payload", "result's canonical JSON"),
                                      ("signature", "Ed25519 signature"))},
}


# A gap record as its probe signed it (issue 27 review H1): the gap route takes it in
# place of the plain record.
SIGNED_GAP: dict[str, Any] = {
    "type": "object", "required": ["protected", "payload", "signature"],
    "additionalProperties": False,
    "description": "A gap record as its probe signed it: a JWS in the flattened JSON "
                   "serialization (RFC 7515 §7.2.2), alg EdDSA (RFC 8037), by the "
                   "probe's key, over the record's canonical JSON (GapRecord; probe_id "
                   "\"\" when recorded before the probe knew its name: the collector "
                   "names it). The protected header holds alg, kid and typ "
                   "\"bbprobe-gap\". Judged as a signed result, the key covering the "
                   "record's recorded_at: with no key bound it is kept unverified; a "
                   "signature that does not verify, a revoked, replaced or other "
                   "probe's key is refused (422). Only a signed record documents a hole "
                   "in the probe's chain in an evidence bundle.",
    "properties": {name: {"type": "string", "pattern": "^[A-Za-z0-9_-]*$",
                          "description": f"The {what}, base64url without padding."}
                   for name, what in (("protected", "protected header (JSON)"),
                                      ("payload", "gap record's canonical JSON"),
                                      ("signature", "Ed25519 signature"))},
}


def _key_document(what: str) -> dict[str, Any]:
    """A key statement (agent/keydocs.py): a flattened JWS (RFC 7515 §7.2.2), EdDSA."""
    return {"type": "object", "required": ["protected", "payload", "signature"],
            "additionalProperties": False, "description": what,
            "properties": {m: {"type": "string", "pattern": "^[A-Za-z0-9_-]*$"}
                           for m in ("protected", "payload", "signature")}}


# PUT /api/v1/probe/key (collector/web/keys_routes.py): enrolment with proof of
# possession, or rotation signed by the current key (issue 27, design 8).
KEY_REPLY: dict[str, Any] = {
    "type": "object", "required": ["kid", "status"],
    "properties": {"kid": {"type": "string"},
                   "status": {"enum": ["enrolled", "known", "rotated"]},
                   "previous_kid": {"type": "string",
                                    "description": "Only with \"rotated\": the kid of the "
                                                   "key that signed the rotation."}}}
KEY_PUT: dict[str, Any] = {"put": {
    "summary": "Probe: enrol its Ed25519 public key (RFC 8037 JWK) with its proof of "
               "possession (JWS typ bbprobe-key-enrolment, required), or rotate "
               "to a new key with a statement signed by the current one (JWS typ "
               "bbprobe-key-rotation). The first key is bound on first use (time and "
               "address recorded), even when another probe holds it (one device on "
               "several lines); a different key is refused while one is bound (an admin "
               "binds a new one: `probe key set`).",
    "security": BEARER,
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["jwk", "proof"], "additionalProperties": False,
        "properties": {
            "jwk": {"type": "object", "required": ["kty", "crv", "x"],
                    "properties": {"kty": {"const": "OKP"}, "crv": {"const": "Ed25519"},
                                   "x": {"type": "string"}}},
            "proof": _key_document("Proof of possession: signed by the key in jwk "
                                   "(typ bbprobe-key-enrolment) over {jwk, at}."),
            "rotation": _key_document("Rotation: signed by the probe's current key "
                                      "(typ bbprobe-key-rotation) over {new_jwk, "
                                      "new_kid, at}; new_jwk is jwk.")}}}}},
    "responses": {
        "201": json_body(KEY_REPLY, "Enrolled, or rotated."),
        "200": json_body(KEY_REPLY, "Known: bound already (a retry)."),
        "400": error("Body is not JSON."),
        "401": error("Missing, unknown or revoked token."),
        "409": error("Another key is bound to the probe (bound_kid names it), this key "
                     "was bound before or revoked, or the rotation is signed by a past "
                     "key."),
        "413": error("Body larger than 8192 bytes."),
        "422": error("Not an Ed25519 public JWK (field jwk); a missing or bad proof (field proof); "
                     "a rotation that is malformed, does not verify, or is signed by a "
                     "key the probe does not hold or holds revoked (field rotation)."),
        "429": error("Over the probe's rate limit.")},
}}


# The 95 % confidence interval of a published figure (collector/exports.py ``ci95_dict``
# of an uncertainty.Interval): null when none was computed for it.
CI95 = {
    "type": "object", "required": ["low", "high", "method", "samples", "enough_data"],
    "additionalProperties": False,
    "description": "The figure's 95 % confidence interval (collector/compliance/"
                   "uncertainty.py): percentiles distribution-free from order statistics, "
                   "ratios Wilson score, mean delay Student t, delay stdev chi-square, "
                   "jitter normal with a bounded spread. enough_data false: fewer samples "
                   "than min_samples, or no interval exists; the figure is then shown as "
                   "not enough data (its verdict is unchanged).",
    "properties": {
        "low": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "high": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "method": {"type": "string", "description": "How it was computed, in words a "
                                                    "reader can reproduce."},
        "samples": {"type": "integer", "minimum": 0},
        "enough_data": {"type": "boolean"},
    },
}
CI95_OR_NULL = {"anyOf": [{"$ref": "#/components/schemas/CI95"}, {"type": "null"}]}
MIN_SAMPLES = {"type": "integer", "minimum": 1,
               "description": "The minimum-sample rule ([reports] min_samples) behind "
                              "each figure's ci95.enough_data."}
# The certificate (reports/text.py ``certificate_dict``): its checks as listed; the rest
# of the document is open (the campaign, its sessions and bands).
CERTIFICATE = {
    "type": "object", "required": ["probe_id", "verdict", "checks", "min_samples"],
    "properties": {
        "probe_id": {"type": "string"},
        "verdict": {"enum": ["breach", "no_breach", "incomplete"]},
        "min_samples": MIN_SAMPLES,
        "checks": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["id", "name", "unit", "comparison", "threshold", "observed",
                         "samples", "breach", "informational", "ci95"],
            "properties": {
                "id": {"type": "string"}, "name": {"type": "string"},
                "unit": {"type": "string"},
                "comparison": {"type": "string", "description": "The comparison that is "
                                                                "a breach."},
                "threshold": {"anyOf": [{"type": "number"}, {"type": "null"}]},
                "observed": {"anyOf": [{"type": "number"}, {"type": "null"}]},
                "samples": {"type": "integer", "minimum": 0},
                "breach": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
                "informational": {"type": "boolean"},
                "ci95": CI95_OR_NULL}}},
    },
}
