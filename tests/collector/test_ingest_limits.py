"""Batched ingestion, limits and clock skew at the collector (reliability.md C2, C3, A9)."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest

from collector.config import CollectorConfig, ServerConfig
from collector.limits import RateLimiter
from collector.server.testing import RunningCollector, running_collector
from tests.factories import session_dict
from tests.httpclient import request


def _post(url: str, path: str, doc: object, token: str,
          headers: dict[str, str] | None = None) -> tuple[int, object, dict[str, str]]:
    return request("POST", url + path, json.dumps(doc).encode(),
                   {"Content-Type": "application/json", "Authorization": f"Bearer {token}",
                    **(headers or {})})


def test_batch_gives_an_outcome_per_result(collector: RunningCollector) -> None:
    """One request, one transaction: stored, duplicate within the batch, conflict, another
    probe's, and an invalid one (with the field), in order."""
    token = collector.add_probe("p1")
    collector.add_probe("p2")
    a = session_dict(probe_id="p1")
    b = session_dict(probe_id="p1")
    conflicting = json.loads(json.dumps(a))
    conflicting["agent_version"] = "other"
    stranger = session_dict(probe_id="p2")
    broken = session_dict(probe_id="p1")
    broken["summary"]["loss_ratio"] = 2
    status, body, _ = _post(collector.url, "/api/v1/results/batch",
                            {"results": [a, b, a, conflicting, stranger, broken, 5]}, token)
    assert status == 200
    got = [(i["status"], i.get("field")) for i in body["items"]]  # type: ignore[index]
    assert got == [(201, None), (201, None), (200, None), (409, None), (403, "probe_id"),
                   (422, "summary.loss_ratio"), (422, None)]
    # Each reply names its result, refused ones too (items take the fast path
    # by their own bytes, and a refused one is read again for its id).
    assert [i["result_id"] for i in body["items"]] == [  # type: ignore[index]
        a["result_id"], b["result_id"], a["result_id"], a["result_id"],
        stranger["result_id"], broken["result_id"], None]
    assert collector.count_results() == 2


@pytest.mark.parametrize(("doc", "status", "message"), [
    ({"results": []}, 422, "results: empty batch"),
    ({"items": []}, 422, 'body must be {"results": [result, ...]}'),
    ([], 422, 'body must be {"results": [result, ...]}'),
])
def test_batch_shape_errors(collector: RunningCollector, doc: object, status: int,
                            message: str) -> None:
    """A batch body that is empty or not {"results": [...]} is a 422 with the exact message."""
    token = collector.add_probe("p1")
    got, body, _ = _post(collector.url, "/api/v1/results/batch", doc, token)
    assert (got, body["error"]) == (status, message)  # type: ignore[index]


def test_batch_over_the_cap_is_413(tmp_path: Path) -> None:
    """A batch over server.max_batch_results is a 413 naming the count and the limit, and
    nothing of it is stored."""
    cfg = replace(CollectorConfig(), server=replace(ServerConfig(), max_batch_results=3))
    with running_collector(tmp_path, cfg) as collector:
        token = collector.add_probe("p1")
        docs = [session_dict(probe_id="p1") for _ in range(4)]
        status, body, _ = _post(collector.url, "/api/v1/results/batch", {"results": docs},
                                token)
        assert status == 413
        assert body["error"] == "results: 4 results exceed the per-batch limit of 3"  # type: ignore[index]
        assert collector.count_results() == 0


def test_rate_limit_is_429_with_retry_after(tmp_path: Path) -> None:
    """Past the burst, a probe gets 429 with Retry-After; another probe is not affected."""
    cfg = replace(CollectorConfig(), server=replace(ServerConfig(), probe_requests_per_min=6,
                                                    probe_burst=2))
    with running_collector(tmp_path, cfg) as collector:
        token = collector.add_probe("p1")
        other = collector.add_probe("p2")
        codes = [_post(collector.url, "/api/v1/results", session_dict(probe_id="p1"),
                       token)[0] for _ in range(3)]
        assert codes == [201, 201, 429]
        status, body, headers = _post(collector.url, "/api/v1/results",
                                      session_dict(probe_id="p1"), token)
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert "over its rate of 6 requests a minute" in body["error"]  # type: ignore[index]
        assert _post(collector.url, "/api/v1/results", session_dict(probe_id="p2"),
                     other)[0] == 201


def test_token_bucket_refills() -> None:
    """The per-client token bucket allows its burst, then says how long to wait (1 s at 60 a
    minute), refills with time, and keeps each client apart."""
    now = [0.0]
    limiter = RateLimiter(60, 2, clock=lambda: now[0])
    assert [limiter.take("a"), limiter.take("a")] == [None, None]
    assert limiter.take("a") == pytest.approx(1.0)
    now[0] = 1.0
    assert limiter.take("a") is None
    assert limiter.take("b") is None


def test_slow_body_gets_408_and_others_are_served(tmp_path: Path) -> None:
    """A client that sends headers and then trickles the body is cut off after
    body_timeout_s; meanwhile a normal post succeeds."""
    cfg = replace(CollectorConfig(), server=replace(ServerConfig(), body_timeout_s=1.0))
    with running_collector(tmp_path, cfg) as collector:
        token = collector.add_probe("p1")
        host, port = collector.url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)), timeout=10)
        slow.sendall(b"POST /api/v1/results HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n"
                     b"Authorization: Bearer " + token.encode() + b"\r\n\r\n{")
        assert _post(collector.url, "/api/v1/results", session_dict(probe_id="p1"),
                     token)[0] == 201
        started = time.monotonic()
        reply = slow.recv(4096)
        slow.close()
        assert reply.startswith(b"HTTP/1.1 408")
        assert b"request body not received within 1 s" in reply
        assert time.monotonic() - started < 10


def test_clock_skew_is_stored_and_flagged(collector: RunningCollector) -> None:
    """X-Bbprobe-Sent-At an hour ahead: the listing shows the skew; a malformed header is
    a 400 naming it."""
    token = collector.add_probe("p1")
    from datetime import UTC, datetime, timedelta

    from agent.schema import format_utc

    ahead = format_utc(datetime.now(UTC) + timedelta(hours=1))
    doc = session_dict(probe_id="p1")
    assert _post(collector.url, "/api/v1/results", doc, token,
                 {"X-Bbprobe-Sent-At": ahead})[0] == 201
    _, listing, _ = request("GET", collector.url + "/api/v1/results?probe=p1")
    skew = listing["results"][0]["clock_skew_s"]  # type: ignore[index]
    assert 3590 < skew < 3610
    from click.testing import CliRunner

    from collector.cli.main import main

    text = CliRunner().invoke(main, ["--db", str(collector.db_path), "results"]).output
    assert "[CLOCK +3600 s]" in text or "[CLOCK +3599 s]" in text
    status, body, _ = _post(collector.url, "/api/v1/results", session_dict(probe_id="p1"),
                            token, {"X-Bbprobe-Sent-At": "yesterday"})
    assert (status, body["field"]) == (400, "X-Bbprobe-Sent-At")  # type: ignore[index]


def test_gap_records(collector: RunningCollector) -> None:
    """Stored once (idempotent on gap_id), listed by scope; another probe's is 403."""
    import uuid

    token = collector.add_probe("p1")
    gap = {"schema_version": 3, "gap_id": str(uuid.uuid4()), "probe_id": "p1",
           "recorded_at": "2026-11-22T00:00:00Z", "reason": "spool_full", "dropped": 4,
           "first_started_at": "2026-11-20T00:00:00Z",
           "last_started_at": "2026-11-20T01:00:00Z"}
    assert _post(collector.url, "/api/v1/gaps", gap, token)[0] == 201
    assert _post(collector.url, "/api/v1/gaps", gap, token)[0] == 200
    status, body, _ = _post(collector.url, "/api/v1/gaps", {**gap, "probe_id": "p9"}, token)
    assert status == 403
    status, body, _ = _post(collector.url, "/api/v1/gaps", {**gap, "dropped": 0}, token)
    assert (status, body["field"]) == (422, "dropped")  # type: ignore[index]
    _, listing, _ = request("GET", collector.url + "/api/v1/gaps?since=2026-11-20")
    assert [(g["dropped"], g["reason"]) for g in listing["gaps"]] == [(4, "spool_full")]  # type: ignore[index]
