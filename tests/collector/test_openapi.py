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
