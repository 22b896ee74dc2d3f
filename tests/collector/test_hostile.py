"""Hostile and unlucky input (reliability.md C2, C4): a table of malformed, oversized,
wrong-type, wrong-version and compression-bomb payloads; Hypothesis-driven ingestion with
duplicates, reordering and dropped replies; schemathesis against our OpenAPI document.
Always: 4xx, never 5xx, and the collector keeps serving."""

from __future__ import annotations

import copy
import gzip
import json
import os
import random
import struct
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.config import CollectorConfig, MeasurementConfig, ServerConfig
from collector.server.testing import RunningCollector, running_collector
from collector.web.openapi import document
from tests.factories import session_dict
from tests.httpclient import request

EXAMPLES = int(os.environ.get("BBPROBE_FUZZ_EXAMPLES", "40"))
# Small measurement caps, so generated downloads stay small; no rate limit, so generated
# requests reach the handlers instead of the limiter.
FUZZ_CONFIG = replace(
    CollectorConfig(),
    server=replace(ServerConfig(), probe_requests_per_min=0, body_timeout_s=5),
    measurement=replace(MeasurementConfig(), max_bytes=1_000_000, max_duration_s=1.0),
)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningCollector, str]]:
    with running_collector(tmp_path_factory.mktemp("hostile"), FUZZ_CONFIG) as collector:
        yield collector, collector.add_probe("p1")


@pytest.fixture(scope="module")
def admin(target: tuple[RunningCollector, str]) -> str:
    return target[0].add_token("fuzz-admin", "admin")


def _post(url: str, body: bytes, headers: dict[str, str],
          path: str = "/api/v1/results") -> tuple[int, Any]:
    status, data, _ = request("POST", url + path, body, headers)
    return status, data


def _broken(mutate) -> bytes:  # type: ignore[no-untyped-def]
    doc = session_dict(probe_id="p1")
    mutate(doc)
    return json.dumps(doc).encode()


JSON = {"Content-Type": "application/json"}
BOMB = gzip.compress(b"{" + b" " * 50_000_000 + b"}")  # 50 MB of JSON in ~50 kB
ZBOMB = zstandard.ZstdCompressor().compress(b"{" + b" " * 50_000_000 + b"}")  # ~2 kB
# A frame whose header declares 2**40 bytes (1 TB) and holds two: refused on its header,
# where a reader that trusted it would allocate a terabyte (zstd format, RFC 8878
# §3.1.1: single segment, 8-byte content size, one raw last block).
ZSTD_HUGE = (struct.pack("<IB", 0xFD2FB528, 0xE0) + (2**40).to_bytes(8, "little")
             + (1 | 2 << 3).to_bytes(3, "little") + b"{}")


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


HOSTILE = [
    ("not json", b"{{{", JSON, 400),
    ("not utf-8", b'{"a": "\xff"}', JSON, 400),
    ("nan", b'{"x": NaN}', JSON, 400),
    ("deeply nested", _deep(100_000), JSON, 400),
    ("array", b"[]", JSON, 422),
    ("empty object", b"{}", JSON, 422),
    ("wrong type", _broken(lambda d: d.update(duration_s="long")), JSON, 422),
    ("negative rtt", _broken(lambda d: d["ping"]["samples"][0].update(rtt_ms=-1)), JSON, 422),
    ("unknown field", _broken(lambda d: d.update(admin=True)), JSON, 422),
    ("future version", _broken(lambda d: d.update(schema_version=99)), JSON, 422),
    ("version zero", _broken(lambda d: d.update(schema_version=0)), JSON, 422),
    ("huge number", _broken(lambda d: d.update(duration_s=1e400)), JSON, 400),
    # Numbers inside JSON's range but past any physical one were once stored and then
    # broke sums, SQLite and InfluxDB; every number now has a limit by its unit.
    ("rtt near float max", _broken(lambda d: [s.update(rtt_ms=1.7e308)
                                              for s in d["ping"]["samples"]]), JSON, 422),
    ("ping offset 1e18 s", _broken(lambda d: d["ping"]["samples"][0].update(
        sent_offset_s=1e18)), JSON, 422),
    ("400-digit count", _broken(lambda d: d["ping"]["summary"].update(
        packets_sent=10**400)), JSON, 422),
    ("sample time 1e300", _broken(lambda d: d["transfers"][0].update(
        stream_samples=[[[0.0, 0], [1e300, 5]]])), JSON, 422),
    ("400-digit float field", _broken(lambda d: d.update(duration_s=10**400)), JSON, 422),
    ("400-digit sample time", _broken(lambda d: d["transfers"][0].update(
        stream_samples=[[[10**400, 0]]])), JSON, 422),
    ("negative sample bytes", _broken(lambda d: d["transfers"][0].update(
        stream_samples=[[[0.0, 0], [1.0, -5]]])), JSON, 422),
    ("other probe", _broken(lambda d: d.update(probe_id="p2")), JSON, 403),
    ("oversized", b'{"a": "' + b"x" * 2_000_000 + b'"}', JSON, 413),
    # A probe may compress its body; inflation stops at max_body_bytes.
    ("gzip bomb", BOMB, {**JSON, "Content-Encoding": "gzip"}, 413),
    ("zstd bomb", ZBOMB, {**JSON, "Content-Encoding": "zstd"}, 413),
    ("zstd frame declaring 1 TB", ZSTD_HUGE, {**JSON, "Content-Encoding": "zstd"}, 413),
    ("truncated zstd", zstandard.ZstdCompressor().compress(b'{"a": 1}' * 100)[:-3],
     {**JSON, "Content-Encoding": "zstd"}, 400),
    ("two zstd frames", zstandard.ZstdCompressor().compress(b"{}") * 2,
     {**JSON, "Content-Encoding": "zstd"}, 400),
    ("truncated gzip", gzip.compress(b'{"a": 1}' * 100)[:-5],
     {**JSON, "Content-Encoding": "gzip"}, 400),
    ("gzip bomb's first kilobyte", BOMB[:1000], {**JSON, "Content-Encoding": "gzip"}, 413),
    ("two encodings", b"x", {**JSON, "Content-Encoding": "gzip, zstd"}, 415),
    ("deflate", b"x", {**JSON, "Content-Encoding": "deflate"}, 415),
    ("form", b"a=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("no content type", b"{}", {}, 415),
]


@pytest.mark.parametrize(("body", "headers", "status"), [h[1:] for h in HOSTILE],
                         ids=[h[0] for h in HOSTILE])
def test_hostile_payloads_get_4xx(target: tuple[RunningCollector, str], body: bytes,
                                  headers: dict[str, str], status: int) -> None:
    """Each payload: the documented 4xx with a message (never a 5xx, never a traceback),
    and the collector still answers a good request afterwards."""
    collector, token = target
    got, data = _post(collector.url, body, {**headers, "Authorization": f"Bearer {token}"})
    assert got == status, data
    assert isinstance(data, dict) and data["error"]
    ok, _ = _post(collector.url, json.dumps(session_dict(probe_id="p1")).encode(),
                  {**JSON, "Authorization": f"Bearer {token}"})
    assert ok == 201


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(plan=st.lists(st.tuples(st.integers(0, 7), st.sampled_from(["send", "batch", "lost"])),
                     min_size=1, max_size=25),
       seed=st.integers(0, 2**32 - 1))
def test_at_least_once_in_exactly_once_stored(plan: list[tuple[int, str]],
                                              seed: int) -> None:
    """Any sequence of sends of 8 results (repeats, any order, in batches, some replies
    "lost", i.e. sent again later): the stored rows are exactly the distinct ids sent,
    each with the content first sent, and no send is refused."""
    docs = [session_dict(probe_id="p1") for _ in range(8)]
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="bbprobe-hyp-") as tmp, \
            running_collector(Path(tmp), FUZZ_CONFIG) as collector:
        token = collector.add_probe("p1")
        headers = {**JSON, "Authorization": f"Bearer {token}"}
        sent: set[str] = set()
        redo: list[int] = []
        for index, how in plan:
            chosen = [index] + ([redo.pop()] if redo and rng.random() < 0.5 else [])
            if how == "batch":
                chosen += rng.sample(range(8), 2)
                status, body, _ = request("POST", collector.url + "/api/v1/results/batch",
                                          json.dumps({"results": [docs[i] for i in chosen]})
                                          .encode(), headers)
                assert status == 200
                assert {i["status"] for i in body["items"]} <= {200, 201}
            else:
                for i in chosen:
                    status, _ = _post(collector.url, json.dumps(docs[i]).encode(), headers)
                    assert status in (200, 201)
            sent.update(str(docs[i]["result_id"]) for i in chosen)
            if how == "lost":
                redo.append(index)
        for i in redo:  # the "lost" replies are retried at the end
            assert _post(collector.url, json.dumps(docs[i]).encode(), headers)[0] == 200
        reader = collector.add_token("reader")
        _, listing, _ = request("GET", collector.url + "/api/v1/results?probe=p1",
                                headers={"Authorization": f"Bearer {reader}"})
        stored = [r["result_id"] for r in listing["results"]]
        assert sorted(stored) == sorted(sent)
        assert collector.count_results() == len(sent)


def test_same_id_other_content_is_a_conflict(target: tuple[RunningCollector, str]) -> None:
    """The same result_id posted again with other content is a 409 naming result_id."""
    collector, token = target
    doc = session_dict(probe_id="p1")
    headers = {**JSON, "Authorization": f"Bearer {token}"}
    assert _post(collector.url, json.dumps(doc).encode(), headers)[0] == 201
    other = copy.deepcopy(doc)
    other["agent_version"] = "tampered"
    status, data = _post(collector.url, json.dumps(other).encode(), headers)
    assert (status, data["field"]) == (409, "result_id")  # type: ignore[index]


SCHEMA = schemathesis.openapi.from_dict(document())


def _probe_routes() -> set[tuple[str, str]]:
    """(method, path) of every route declared for probes where it is registered."""
    from collector.config import CollectorConfig
    from collector.routing import ROLES
    from collector.server.app import create_app

    app = create_app(CollectorConfig())
    return {(r.method, r.resource.canonical) for r in app.router.routes()
            if r.resource is not None and
            app[ROLES].get((id(r.resource), r.method)) == "probe"}


PROBE_ROUTES = _probe_routes()


@pytest.mark.slow
@SCHEMA.parametrize()
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_5xx(case: schemathesis.Case,
                                   target: tuple[RunningCollector, str], admin: str) -> None:
    """Every operation of our OpenAPI document, with generated parameters and bodies and
    a valid token (the probe's where a probe writes, else an admin's): never a 5xx."""
    collector, token = target
    probe_route = (case.method.upper(), case.path) in PROBE_ROUTES
    bearer = token if probe_route else admin
    response = case.call(base_url=collector.url, headers={"Authorization": f"Bearer {bearer}"},
                         timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.text[:500])


def test_gap_record_with_an_absurd_count_is_refused(target: tuple[RunningCollector, str]
                                                     ) -> None:
    """`dropped: 10**30` was once a 500 (too large for SQLite), which the agent
    retries forever; now a 422 naming the field, and a sane gap record still goes in."""
    collector, token = target
    gap = {"schema_version": 3, "gap_id": str(uuid.uuid4()), "probe_id": "p1",
           "recorded_at": "2026-11-21T10:00:00.000000Z", "reason": "spool_full",
           "dropped": 10**30, "first_started_at": "2026-11-20T10:00:00.000000Z",
           "last_started_at": "2026-11-21T09:00:00.000000Z"}
    headers = {**JSON, "Authorization": f"Bearer {token}"}
    status, data = _post(collector.url, json.dumps(gap).encode(), headers,
                         path="/api/v1/gaps")
    assert status == 422 and "dropped" in data["error"], data
    gap["dropped"] = 3
    status, data = _post(collector.url, json.dumps(gap).encode(), headers,
                         path="/api/v1/gaps")
    assert status in (200, 201), data
