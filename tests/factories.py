"""Builders of realistic schema objects for tests (valid unless told otherwise)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from agent import summary
from agent.decoding import parse_result
from agent.schema import (
    SCHEMA_VERSION,
    InvalidReason,
    Method,
    PingMethod,
    PingSample,
    PingTest,
    Server,
    SessionResult,
    TransferAttempt,
    TransferMethod,
    Validity,
    to_dict,
    utc_now,
)

TRANSFER = TransferMethod(mode="duration", streams=2, warmup_s=2.0, window_s=10.0,
                          file_size_bytes=None, tests=1, attempts=3, sample_interval_s=0.1,
                          timeout_s=17.0)
METHOD = Method(profile="test", ping=PingMethod(count=10, interval_s=1.0, payload_bytes=56,
                                                timeout_s=2.0),
                download=TRANSFER, upload=TRANSFER)


def canonical_json(result: SessionResult) -> str:
    """A result's canonical JSON, as the agent sends it and the store keeps it."""
    from collector.storage import codec

    return codec.canonical(result).decode()


def attempt(direction: str, test_index: int = 0, number: int = 1, *, ok: bool = True,
            bps: float = 50e6) -> TransferAttempt:
    window_bytes = int(bps * 10 / 8)
    return TransferAttempt(
        direction=direction,  # type: ignore[arg-type]
        test_index=test_index, attempt=number,
        status="ok" if ok else "failed",
        failure_reason=None if ok else "connect_error",
        error=None if ok else "cannot connect: refused",
        http_status=200 if ok else None,
        started_at="2026-11-21T10:00:00.000000Z", duration_s=12.0, streams=2,
        bytes_total=window_bytes if ok else 0,
        window_bytes=window_bytes if ok else None, window_s=10.0 if ok else None,
        throughput_bps=bps if ok else None,
        measured_at="client" if direction == "download" else "server",
        stream_samples=(((0.0, 0), (12.0, window_bytes)),) if ok else (),
    )


def attempt_with_samples(direction: str, bps: float, streams: int = 4,
                         interval_s: float = 0.1, seconds: float = 12.0) -> TransferAttempt:
    """A successful attempt with per-stream samples every ``interval_s``, as the engine
    records them (for realistic body sizes in benchmarks)."""
    import dataclasses

    per_stream = bps / 8 / streams
    ticks = int(seconds / interval_s)
    samples = tuple(
        tuple((round(k * interval_s, 6), int(per_stream * k * interval_s))
              for k in range(ticks + 1))
        for _ in range(streams)
    )
    base = attempt(direction, bps=bps)
    total = sum(s[-1][1] for s in samples)
    return dataclasses.replace(base, streams=streams, stream_samples=samples,
                               bytes_total=total)


def ping_test(rtts: Sequence[float | None]) -> PingTest:
    samples = tuple(
        PingSample(seq=i, sent_offset_s=float(i), rtt_ms=r, error=None if r is not None
                   else "timeout")
        for i, r in enumerate(rtts)
    )
    return PingTest(status="ok", error=None, target="198.18.0.1", address="198.18.0.1",
                    privileged=True, started_at="2026-11-21T10:00:00.000000Z", samples=samples,
                    summary=summary.ping_summary(samples))


def session(probe_id: str = "p1", *, started_at: str = "2026-11-21T10:00:00.000000Z",
            rtts: Sequence[float | None] = (10.0, 11.0, 12.0),
            transfers: Sequence[TransferAttempt] | None = None,
            result_id: str | None = None, invalid: Sequence[str] = ()) -> SessionResult:
    """A session; ``invalid`` reason codes make the agent flag it invalid."""
    if transfers is None:
        transfers = [attempt("download"), attempt("upload", bps=10e6)]
    ping = ping_test(rtts) if rtts else None
    validity = Validity(valid=not invalid, reasons=tuple(
        InvalidReason(code, f"{code} (test)") for code in invalid))
    return SessionResult(
        schema_version=SCHEMA_VERSION,
        result_id=result_id or str(uuid.uuid4()),
        probe_id=probe_id, agent_version="test",
        started_at=started_at, ended_at=started_at.replace("10:00:00", "10:00:40"),
        duration_s=40.0, method=METHOD, server=Server(url="http://198.18.0.1:8080",
                                                      ping_target="198.18.0.1"),
        ping=ping, transfers=tuple(transfers),
        summary=summary.session_summary(ping.summary if ping else None, transfers),
        validity=validity,
    )


def session_dict(**kwargs: Any) -> dict[str, Any]:
    """A session as decoded JSON (lists, not tuples), ready to be broken by a test."""
    result: dict[str, Any] = json.loads(json.dumps(to_dict(session(**kwargs))))
    return result


def insert_result(store: Any, **item: Any) -> str:
    """Store one result, given as the fields of a NewResult, through the store's own call
    (``insert_results``); its outcome: stored, duplicate or conflict."""
    from collector.storage.model import NewResult

    outcome: str = store.insert_results([NewResult(**item)])[0]
    return outcome


def day_rollups(store: Any, probes: Sequence[str] | None = None, day_lo: str | None = None,
                day_hi: str | None = None) -> list[Any]:
    """The stored day rollups of [day_lo, day_hi) (YYYY-MM-DD), by probe and day, read as
    a copy reads them (the store's ``dump``), on either backend."""
    from collector.storage.sql.facts import day_rollup

    return [day_rollup(row) for row in store.dump("day_facts", None, 10**9)
            if (probes is None or row[0] in probes) and (day_lo is None or row[1] >= day_lo)
            and (day_hi is None or row[1] < day_hi)]


def store_result(store: Any, result: SessionResult) -> None:
    """Insert ``result`` into a store (either backend) exactly as ingestion would."""
    from collector.intake import ingest

    accepted = ingest.parse_body(canonical_json(result).encode())
    insert_result(
        store, result_id=result.result_id, probe_name=result.probe_id,
        schema_version=result.schema_version, started_at=accepted.started_at,
        ended_at=accepted.ended_at, received_at="2026-01-01T00:00:00.000000Z",
        body=accepted.body, body_sha256=accepted.body_sha256, facts=accepted.facts,
    )


def store_as_before(collector: Any, doc: dict[str, Any],
                    facts_started_at: str | None = None) -> str:
    """Store ``doc`` straight into ``collector``'s store, past the ingest checks of today, as a
    release before the plausible-time checks let it in (a result dated 2300 or 9999, whose InfluxDB
    points cannot be written); ``facts_started_at`` also writes its times as such a release spelled
    them ("999-06-01T..."). Queued for InfluxDB when the collector copies there. Returns its
    result_id."""
    from dataclasses import replace

    from collector.intake import ingest
    from collector.storage.model import NewResult
    from collector.storage.sql.backends import open_store

    accepted = ingest._accepted(parse_result(json.loads(json.dumps(doc))))
    started = facts_started_at or accepted.started_at
    facts = replace(accepted.facts, started_at=started)
    store = open_store(collector.config.storage, outbox=collector.config.influxdb.enabled)
    try:
        store.insert_results([NewResult(
            result_id=accepted.result.result_id, probe_name=accepted.result.probe_id,
            schema_version=accepted.result.schema_version, started_at=started,
            ended_at=facts_started_at or accepted.ended_at, received_at=utc_now(),
            body=accepted.body, body_sha256=accepted.body_sha256, facts=facts,
            clock_skew_s=None, session_seq=None, packed=accepted.packed)])
    finally:
        store.close()
    return accepted.result.result_id


def version_1_database(path: Any, results: Sequence[SessionResult]) -> None:
    """Write an SQLite file as the first collector release left it (migration 1 only: no
    facts tables, user_version 1), holding probe p1 and ``results``: what every later
    migration must upgrade without losing a figure."""
    import sqlite3

    from collector.intake import ingest
    from collector.storage.sql.sqlite_migrations import MIGRATIONS

    db = sqlite3.connect(path)
    try:
        assert isinstance(MIGRATIONS[0], str)
        db.executescript(MIGRATIONS[0])
        db.execute("INSERT INTO probes (name, token_sha256, created_at) "
                   "VALUES ('p1', 'x', 'y')")
        for r in results:
            accepted = ingest.parse_body(canonical_json(r).encode())
            db.execute("INSERT INTO results VALUES (?, 'p1', ?, ?, ?, 'z', ?, ?)",
                       (r.result_id, r.schema_version, accepted.started_at,
                        accepted.ended_at, accepted.body_sha256, accepted.body))
        db.execute("PRAGMA user_version = 1")
        db.commit()
    finally:
        db.close()
