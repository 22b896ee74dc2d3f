"""The OpenAPI document: every route is described, and the published result schema
accepts what the collector accepts and refuses what it refuses."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from collector.server.testing import RunningCollector
from collector.web.openapi import document
from tests.factories import session_dict
from tests.httpclient import request


def _validator() -> jsonschema.Draft202012Validator:
    doc = document()
    schema = {"$ref": "#/components/schemas/SessionResult", **doc}
    return jsonschema.Draft202012Validator(schema)


def test_served_and_covers_every_route(collector: RunningCollector) -> None:
    """GET /api/v1/openapi.json describes every method and path the app routes."""
    status, doc, _ = request("GET", collector.url + "/api/v1/openapi.json")
    assert status == 200
    assert doc["openapi"] == "3.1.0"
    from collector.config import CollectorConfig
    from collector.server.app import create_app

    app = create_app(CollectorConfig())
    routed = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.method not in ("HEAD", "*")}
    described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routed == described


def test_schema_accepts_a_valid_result() -> None:
    """A real result document validates against the published schema."""
    _validator().validate(session_dict())


@pytest.mark.parametrize(
    ("path", "value"),
    [(("summary", "loss_ratio"), 1.5), (("probe_id",), "bad id"),
     (("transfers", 0, "status"), "maybe"), (("summary", "extra_bps"), 1)],
)
def test_schema_refuses_what_the_collector_refuses(path: tuple[object, ...],
                                                   value: object) -> None:
    """The same bad documents the decoder refuses break the published schema too."""
    doc = copy.deepcopy(session_dict())
    node = doc
    for key in path[:-1]:
        node = node[key]  # type: ignore[index]
    node[path[-1]] = value  # type: ignore[index]
    with pytest.raises(jsonschema.ValidationError):
        _validator().validate(json.loads(json.dumps(doc)))


def test_key_route_documents_proof_rotation_and_replies() -> None:
    """PUT /api/v1/probe/key: the published body takes what the agent sends (a proof, a
    rotation), refuses an extra member, and names the real size limit and reply set."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent import jose, keydocs
    from collector.web.keys_routes import MAX_REQUEST_BYTES

    doc = document()
    op = doc["paths"]["/api/v1/probe/key"]["put"]
    body_schema = {**op["requestBody"]["content"]["application/json"]["schema"], **doc}
    body = jsonschema.Draft202012Validator(body_schema)
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    sent = {"jwk": jose.jwk_of(new.public_key()),
            "proof": keydocs.enrolment_proof(new, "2026-12-07T12:00:00Z"),
            "rotation": keydocs.rotation(old, new.public_key(), "2026-12-07T12:00:00Z")}
    body.validate(sent)
    for bad in ({**sent, "extra": 1}, {**sent, "proof": {"protected": "x"}},
                {**sent, "rotation": {**sent["rotation"], "x5c": "y"}}):
        with pytest.raises(jsonschema.ValidationError):
            body.validate(bad)
    assert str(MAX_REQUEST_BYTES) in op["responses"]["413"]["description"]
    assert "proof" in op["responses"]["422"]["description"]
    assert "rotation" in op["responses"]["422"]["description"]
    reply = jsonschema.Draft202012Validator(
        {**op["responses"]["201"]["content"]["application/json"]["schema"], **doc})
    reply.validate({"kid": "k2", "status": "rotated", "previous_kid": "k1"})
    with pytest.raises(jsonschema.ValidationError):
        reply.validate({"kid": "k2", "status": "replaced"})


def _component(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                           **document()})


def test_report_and_certificate_schemas_describe_their_intervals() -> None:
    """A real report's and certificate's JSON validate, each figure with its ci95 and
    the min_samples rule; an interval missing a field or the old ``interval`` name
    breaks the schema."""
    from collector.compliance import targets
    from collector.compliance.certify import certify
    from collector.compliance.evaluate import evaluate, observe
    from collector.reports.text import certificate_dict, report_dict
    from collector.scope import resolve_scope
    from tests.collector.test_certify import CONTRACT, campaign, facts

    sessions = campaign()
    report = json.loads(json.dumps(report_dict(
        evaluate(observe(sessions), targets.load(""), min_samples=50),
        resolve_scope(None, None, None))))
    assert report["min_samples"] == 50
    assert report["indicators"][0]["ci95"]["enough_data"] is True
    _component("Report").validate(report)
    cert = json.loads(json.dumps(certificate_dict(certify("p1", CONTRACT,
                                                          facts(sessions)))))
    assert cert["checks"][0]["ci95"]["samples"] == 96
    _component("Certificate").validate(cert)
    for bad in (lambda d: d["indicators"][0]["ci95"].pop("enough_data"),
                lambda d: d["indicators"][0].update(interval=None),
                lambda d: d.update(min_samples=0)):
        broken = copy.deepcopy(report)
        bad(broken)
        with pytest.raises(jsonschema.ValidationError):
            _component("Report").validate(broken)
    broken = copy.deepcopy(cert)
    broken["checks"][0]["ci95"]["low"] = "12"
    with pytest.raises(jsonschema.ValidationError):
        _component("Certificate").validate(broken)
