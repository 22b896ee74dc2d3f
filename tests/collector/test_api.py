"""Ingestion and query API of a real collector on 127.0.0.1 (real TCP, real SQLite)."""

from __future__ import annotations

import json

import pytest

from agent import spec
from collector.intake import signed
from collector.server.testing import RunningCollector
from tests.factories import session_dict
from tests.httpclient import post_json, request


def _url(c: RunningCollector, path: str = spec.RESULTS_PATH) -> str:
    return c.url + path


def test_ingest_is_idempotent(collector: RunningCollector) -> None:
    """201 on first push, 200 duplicate on the second, one row; other content -> 409."""
    token = collector.add_probe("p1")
    doc = session_dict(probe_id="p1")
    status, body = post_json(_url(collector), doc, token)
    assert (status, body["stored"]) == (201, True)
    status, body = post_json(_url(collector), doc, token)
    assert (status, body["duplicate"]) == (200, True)
    assert collector.count_results() == 1
    doc["duration_s"] = 41.0
    status, body = post_json(_url(collector), doc, token)
    assert status == 409
    assert body["error"] == f"result {doc['result_id']} was already stored with other content"
    assert collector.count_results() == 1


@pytest.mark.parametrize(
    ("token_kind", "status", "message"),
    [
        ("none", 401, "missing bearer token (Authorization: Bearer <token>)"),
        ("unknown", 401, "unknown or revoked token"),
        ("other_probe", 403, "result is for probe 'p1' but the token belongs to 'p2'"),
    ],
)
def test_auth_refusals(collector: RunningCollector, token_kind: str, status: int,
                       message: str) -> None:
    """No token, an unknown token, and another probe's token are each refused by name."""
    collector.add_probe("p1")
    other = collector.add_probe("p2")
    token = {"none": None, "unknown": "bbp_nope", "other_probe": other}[token_kind]
    got_status, body = post_json(_url(collector), session_dict(probe_id="p1"), token)
    assert (got_status, body["error"]) == (status, message)
    assert collector.count_results() == 0


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"{not json", {}, 400, "body is not valid JSON: Expecting property name enclosed in "
         "double quotes: line 1 column 2 (char 1)"),
        (b"\xff\xfe", {}, 400, "body is not UTF-8: byte 0"),
        (b'{"schema_version": 1}', {}, 422, "result_id: missing required field"),
        (b"[]", {}, 422, "expected a JSON object, got an array"),
        (b'{"a": NaN}', {}, 400, "body is not valid JSON: NaN is not a JSON number"),
        (b"{}", {"Content-Type": "text/plain"}, 415,
         "Content-Type must be application/json, got 'text/plain'"),
        (b"{}", {"Content-Encoding": "br"}, 415,
         "Content-Encoding 'br' is not accepted; send one of identity, zstd, gzip"),
        (b"{}", {"Content-Encoding": "gzip"}, 400,
         "gzip body cannot be inflated: Error -3 while decompressing data: incorrect "
         "header check"),
    ],
)
def test_malformed_bodies(collector: RunningCollector, body: bytes, headers: dict[str, str],
                          status: int, message: str) -> None:
    """Each malformed body gets its 4xx and a message naming the problem."""
    token = collector.add_probe("p1")
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {token}", **headers}
    got, data, _ = request("POST", _url(collector), body, h)
    assert (got, data["error"]) == (status, message)


def test_schema_error_names_field(collector: RunningCollector) -> None:
    """A wrong value deep in the document: 422 with the field path."""
    token = collector.add_probe("p1")
    doc = session_dict(probe_id="p1")
    doc["ping"]["samples"][0]["rtt_ms"] = -3
    status, body = post_json(_url(collector), doc, token)
    assert status == 422
    assert body == {"error": "ping.samples[0].rtt_ms: must be >= 0, got -3",
                    "field": "ping.samples[0].rtt_ms"}


def test_oversized_body_then_still_serving(collector: RunningCollector) -> None:
    """2 MiB body: 413 naming the limit; the collector keeps serving afterwards."""
    token = collector.add_probe("p1")
    big = b'{"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    status, data, _ = request("POST", _url(collector), big, {
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    assert status == 413
    # The wire limit: a result's own (1 MiB) in its signed form (intake/signed.py).
    assert data["error"] == (f"body of {len(big)} bytes exceeds the "
                             f"{signed.wire_limit(1048576)}-byte limit")
    status, health, _ = request("GET", collector.url + "/healthz")
    assert (status, health["status"]) == (200, "ok")
    status, _ = post_json(_url(collector), session_dict(probe_id="p1"), token)
    assert status == 201


def test_whoami(collector: RunningCollector) -> None:
    """The token tells the agent which probe it is."""
    token = collector.add_probe("roma-1")
    status, body, _ = request("GET", collector.url + spec.WHOAMI_PATH,
                              headers={"Authorization": f"Bearer {token}"})
    assert (status, body) == (200, {"probe_id": "roma-1"})


def test_queries(collector: RunningCollector) -> None:
    """Results by probe and time (JSON, CSV, one document) and the compliance report."""
    token = collector.add_probe("p1")
    docs = [session_dict(probe_id="p1", started_at=f"2026-11-2{d}T10:00:00.000000Z")
            for d in (1, 2)]
    for doc in docs:
        assert post_json(_url(collector), doc, token)[0] == 201
    status, body, _ = request("GET", _url(collector) + "?probe=p1&since=2026-11-22")
    assert status == 200
    assert [r["result_id"] for r in body["results"]] == [docs[1]["result_id"]]
    assert body["results"][0]["download_bps"] == pytest.approx(50e6)
    status, csv_text, headers = request("GET", _url(collector) + "?format=csv")
    lines = csv_text.decode().splitlines()
    assert headers["content-type"].startswith("text/csv")
    assert lines[0].startswith("result_id,probe_id,started_at")
    assert len(lines) == 3
    status, one, _ = request("GET", _url(collector) + "/" + docs[0]["result_id"])
    assert one == json.loads(json.dumps(docs[0]))
    status, report, _ = request("GET", collector.url + "/api/v1/report?probe=p1")
    assert status == 200
    assert report["sessions"] == 2
    assert report["verdict"] == "pass"
    assert {i["id"] for i in report["indicators"]} >= {"download_p5_kbps", "loss_ratio"}
    status, probes, _ = request("GET", collector.url + "/api/v1/probes")
    assert [p["probe_id"] for p in probes["probes"]] == ["p1"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("since=last-week", "since: expected an ISO 8601 date or timestamp, got 'last-week'"),
        ("format=xml", "format: expected one of json, csv, got 'xml'"),
        ("limit=0", "limit: expected an integer within 1..1000000, got '0'"),
    ],
)
def test_bad_query_parameters(collector: RunningCollector, query: str, message: str) -> None:
    """A bad query parameter gets 400 naming it."""
    status, body, _ = request("GET", _url(collector) + "?" + query)
    assert (status, body["error"]) == (400, message)


def test_unknown_path_is_json_404(collector: RunningCollector) -> None:
    """Even a 404 is a JSON error body."""
    status, body, _ = request("GET", collector.url + "/nope")
    assert status == 404
    assert body["error"] == "Not Found"
