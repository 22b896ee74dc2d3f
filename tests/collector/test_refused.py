"""A transfer the measurement server refused (for capacity: HTTP 429, or a
bbprobe server's 503; or its ticket) is not the line's failure, and nothing else on the
path makes one. The rule, old agents' way of recording it, the same failure rate with
and without refusals, refusals counted per server in every report, both scope paths and
both backends alike, and the migration that takes the refusals stored before out of the
failure rate, logged and listed."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.schema import Server, SessionResult, TransferAttempt, utc_now
from agent.spec import CAMPAIGN_RULES as RULES
from collector.cli.main import main
from collector.compliance import samples_csv, targets
from collector.compliance.certify import certify
from collector.compliance.evaluate import Observations, evaluate, observe
from collector.compliance.facts import TransferFact, is_refusal, of_result, server_key
from collector.config import StorageConfig
from collector.fleet.probes import register_probe
from collector.intake import ingest
from collector.lines import LineMetadata
from collector.reports import html as html_report
from collector.reports.text import (
    REPORT_COLUMNS,
    Scope,
    certificate_dict,
    format_certificate,
    format_csv,
    format_text,
    listing_row,
    report_dict,
    report_rows,
    sample_rows,
)
from collector.storage.model import NewResult
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from tests.factories import (
    attempt,
    canonical_json,
    day_rollups,
    session,
    store_result,
    version_1_database,
)

ROOT = Path(__file__).resolve().parents[2]
TABLE = targets.load("")
SERVER = "http://198.18.0.1:8080"  # the factories' server, as its origin
OTHER = Server(url="https://mlab.example/ndt", ping_target="mlab.example")


# The error texts an agent before schema 7 recorded (agent/probes/wire.py then): an
# upload's refusal with the body's reason, a download's with the reason phrase only.
BUSY_503 = "HTTP 503: server busy: 20 transfers already running"
PER_CLIENT_429 = ("HTTP 429: too many transfers from 198.51.100.7: 20 running (limit 20 "
                  "per client)")
DOWNLOAD_503 = "HTTP 503 Service Unavailable from 198.18.0.1:8080/measure/v1/download"
PROXY_503 = "HTTP 503: <html><body>Service temporarily overloaded</body></html>"
LEGACY_TEXT = {429: PER_CLIENT_429, 503: BUSY_503}


def refused(direction: str, test_index: int = 0, number: int = 1, *,
            reason: str = "server_refused", status: int | None = 429) -> TransferAttempt:
    """An attempt the server refused: schema 7's reasons, or (reason "http_status") as an
    agent before schema 7 recorded a bbprobe server's refusal."""
    error = ("ticket refused (expired): HTTP 403" if status is None else
             LEGACY_TEXT[status] if reason == "http_status" else
             f"refused for capacity: {LEGACY_TEXT[status]}")
    return replace(attempt(direction, test_index, number, ok=False),
                   failure_reason=reason, http_status=status,  # type: ignore[arg-type]
                   error=error)


def line_503(direction: str, test_index: int = 0, number: int = 1, *,
             error: str = PROXY_503) -> TransferAttempt:
    """A 503 that is the line's failure: a proxy's or captive portal's, or an old agent's
    download refused with no reason recorded."""
    return replace(attempt(direction, test_index, number, ok=False),
                   failure_reason="http_status", http_status=503, error=error)


def with_refusals(base: SessionResult, extra: Sequence[TransferAttempt]) -> SessionResult:
    return replace(base, transfers=(*extra, *base.transfers))


# --- the rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "reason", "http", "error", "want"), [
    # Schema 7: trusted as recorded (its agent says server_refused only for a refusal
    # the bbprobe server marked with its own header).
    ("failed", "server_refused", 429, "refused for capacity: HTTP 429", True),
    ("failed", "server_refused", 503, None, True),
    ("failed", "ticket_refused", 401, None, True),
    ("failed", "ticket_refused", None, None, True),
    # Agents before schema 7: a 429 is the origin server's own rate limit (RFC 6585).
    ("failed", "http_status", 429, PER_CLIENT_429, True),
    ("failed", "http_status", 429, None, True),
    # A 503 only with a bbprobe server's own text, in every form it took.
    ("failed", "http_status", 503, BUSY_503, True),
    ("failed", "http_status", 503, "HTTP 503: server busy: 2 transfers without a ticket "
     "already running (2 of 4 slots are kept for ticketed probes)", True),
    # Anything else answering 503 on the path is the line's failure.
    ("failed", "http_status", 503, PROXY_503, False),
    ("failed", "http_status", 503, DOWNLOAD_503, False),  # no reason recorded
    ("failed", "http_status", 503, "HTTP 503 from http://198.18.0.1:8080/x", False),
    ("failed", "http_status", 503, "HTTP 503: Server Busy", False),
    ("failed", "http_status", 503, "a proxy said HTTP 503: server busy: 2 transfers ", False),
    ("failed", "http_status", 503, None, False),
    ("failed", "http_status", 500, "HTTP 500: server busy: 2 transfers ", False),
    ("failed", "http_status", 404, None, False),
    ("failed", "http_status", None, None, False),
    ("failed", "connect_error", None, None, False),
    ("failed", "timeout", 503, BUSY_503, False),
    ("failed", "timeout", 429, None, False),
    ("ok", None, 200, None, False),
    ("ok", "server_refused", 429, None, False),
])
def test_which_attempts_are_refusals(status: str, reason: str | None, http: int | None,
                                     error: str | None, want: bool) -> None:
    """Refusals: schema 7's server_refused and ticket_refused; of older agents' records
    (failure_reason http_status), a 429, and a 503 whose error text is a bbprobe server's
    "server busy". Any other failure is the line's: a captive portal's or a proxy's 503,
    an old agent's download 503 (no reason recorded), a 500."""
    assert is_refusal(status, reason, http, error) is want


def test_an_old_agent_still_tells_todays_refusals() -> None:
    """An agent before schema 7 measuring against today's server records its refusals as
    "HTTP <status>: <the body's reason>" (an upload): each capacity refusal the server
    gives an anonymous client reads as a refusal by the legacy rule, so the server's
    texts cannot drift from it unnoticed."""
    from collector.errors import ApiError
    from collector.measurement.slots import TransferSlots

    slots = TransferSlots(4, 2, reserved=1)
    messages = []
    for running, held in ((4, 0), (3, 0), (0, 2)):  # busy, anonymous share, per client
        slots.running, slots.by_client = running, {"198.51.100.7": held}
        with pytest.raises(ApiError) as caught:
            slots.check("198.51.100.7")
        messages.append((caught.value.status, caught.value.message))
    assert [status for status, _ in messages] == [503, 503, 429]
    for status, message in messages:
        assert is_refusal("failed", "http_status", status, f"HTTP {status}: {message}")


def test_a_503_from_the_path_stays_the_line_failure() -> None:
    """The facts of a session with a proxy's 503 and an old agent's download 503: both
    failures of the line, in the failure rate; a bbprobe server's 503 beside them is
    counted apart."""
    result = session("p1", transfers=[line_503("download"),
                                      line_503("download", 0, 2, error=DOWNLOAD_503),
                                      refused("download", 0, 3, reason="http_status",
                                              status=503),
                                      attempt("download", 0, 4), attempt("upload")])
    facts = of_result(result, result.started_at)
    assert [t.ok for t in facts.transfers] == [False, False, True, True]
    assert (facts.refused_attempts, facts.refused_server) == (1, SERVER)
    ratio = {i.id: i for i in evaluate(observe([result]), TABLE).indicators}[
        "download_failure_ratio"]
    assert (ratio.observed, ratio.samples) == pytest.approx((2 / 3, 3))


@pytest.mark.parametrize(("url", "key"), [
    ("http://198.18.0.1:8080", SERVER),
    ("https://Mlab.Example/ndt", "https://mlab.example:443"),
    ("http://[2001:db8::1]/", "http://[2001:db8::1]:80"),
    ("not a url", "not a url"),
    (None, ""),
])
def test_server_key_is_the_origin(url: str | None, key: str) -> None:
    """Refusals are counted per server origin (scheme://host:port, as tickets name
    servers), so one server's URLs count together."""
    assert server_key(url) == key


# --- the figures: as if the refused attempts never were ----------------------------------


def _pairs() -> tuple[list[SessionResult], list[SessionResult]]:
    """Sessions without refusals, and the same sessions with refused attempts added: new
    reasons, old agents' 429 and bbprobe 503, retried tests that then ran, a refused test
    that never ran; one session at another server, one flagged invalid, and a proxy's 503
    (the line's) in both."""
    plain = [
        session("p1", started_at="2026-05-01T10:00:00.000000Z",
                transfers=[attempt("download", bps=40e6), attempt("download", 0, 2, ok=False),
                           attempt("upload", bps=5e6)]),
        session("p1", started_at="2026-05-01T11:00:00.000000Z",
                transfers=[line_503("download"), attempt("download", 0, 2, bps=60e6),
                           attempt("upload", bps=7e6)]),
        replace(session("p1", started_at="2026-05-01T12:00:00.000000Z",
                        transfers=[attempt("download", bps=30e6)]), server=OTHER),
        session("p1", started_at="2026-05-01T13:00:00.000000Z", invalid=["wifi"],
                transfers=[attempt("download", bps=1e6), attempt("upload", ok=False)]),
    ]
    extras: list[list[TransferAttempt]] = [
        [refused("download"), refused("download", reason="http_status", status=503)],
        [refused("upload", reason="ticket_refused", status=None),
         refused("upload", reason="http_status", status=429),
         refused("download", 1, 1), refused("download", 1, 2)],  # test 1 never ran
        [refused("download", reason="http_status", status=429)],
        [refused("download")],
    ]
    return plain, [with_refusals(p, e) for p, e in zip(plain, extras, strict=True)]


WANT_REFUSED = ((SERVER, 7), ("https://mlab.example:443", 1))


def _same_figures(a: Any, b: Any) -> None:
    assert a.sessions == b.sessions
    assert (a.invalid_sessions, a.invalid_reasons) == (b.invalid_sessions, b.invalid_reasons)
    for x, y in zip((*a.indicators, *a.informational), (*b.indicators, *b.informational),
                    strict=True):
        assert (x.id, x.observed, x.samples, x.passed) == (y.id, y.observed, y.samples,
                                                           y.passed), x.id


@pytest.mark.parametrize("include_invalid", [False, True])
def test_refusals_leave_the_failure_rate_as_it_was(include_invalid: bool) -> None:
    """The same failure rates, speeds and samples with the refused attempts as without
    them; the refusals are counted per server, of every session (valid or not)."""
    plain, mixed = _pairs()
    want = evaluate(observe(plain, include_invalid), TABLE)
    got = evaluate(observe(mixed, include_invalid), TABLE)
    _same_figures(got, want)
    ratio = {i.id: i for i in got.indicators}["download_failure_ratio"]
    assert (ratio.observed, ratio.samples) == pytest.approx(
        (2 / 6, 6) if include_invalid else (2 / 5, 5))
    assert want.refused_by_server == ()
    assert got.refused_by_server == WANT_REFUSED
    assert got.refused_attempts == 8
    assert "not in the failure rate" in got.method["failure_ratio"]


def test_facts_keep_refusals_apart() -> None:
    """A session's facts: refused attempts are no transfer facts, counted apart with the
    server; a test retried after a refusal is the line's sample as if run first time."""
    retried = session("p1", transfers=[refused("download"), attempt("download", 0, 2),
                                       attempt("upload", bps=10e6)])
    facts = of_result(retried, retried.started_at)
    assert facts.transfers == (TransferFact("download", True, 50_000.0),
                               TransferFact("upload", True, 10_000.0))
    assert (facts.refused_attempts, facts.refused_server) == (1, SERVER)
    assert facts.completed
    clean = of_result(session("p1"), "2026-11-21T10:00:00.000000Z")
    assert (clean.refused_attempts, clean.refused_server) == (0, None)


def test_certificate_counts_refusals_per_server() -> None:
    """The 244/08 certificate: the same checks and bands with refusals as without; each
    session says how many attempts were refused; the campaign counts them per server."""
    plain, mixed = _pairs()
    line = LineMetadata(download_min_kbps=20_000.0, upload_min_kbps=2_000.0)
    want = certify("p1", line, [of_result(r, r.started_at) for r in plain], RULES["96in24h"])
    got = certify("p1", line, [of_result(r, r.started_at) for r in mixed], RULES["96in24h"])
    assert got.checks == want.checks and got.band_counts == want.band_counts
    assert got.refused_by_server == WANT_REFUSED
    assert [s.refused_attempts for s in got.sessions] == [2, 4, 1, 1]
    text = format_certificate(got)
    assert ("Refused:  8 transfer attempt(s) refused by the measurement server "
            f"({SERVER} 7, https://mlab.example:443 1)") in text
    assert "; 4 refused by the server" in text
    assert certificate_dict(got)["refused_by_server"] == dict(WANT_REFUSED)
    page = html_report.certificate_page(got, utc_now())
    assert "4 refused by the server" in page and "Refused by the measurement server" in page


def test_report_outputs_say_what_the_server_refused() -> None:
    """Text, JSON, CSV and HTML reports give the refused attempts per server and the
    method; a scope without refusals says so."""
    _, mixed = _pairs()
    obs = observe(mixed)
    report = evaluate(obs, TABLE)
    where = Scope(("p1",), None, None)
    text = format_text(report, where)
    assert (f"Refused:  8 transfer attempt(s) refused by the measurement server ({SERVER} 7, "
            "https://mlab.example:443 1): for capacity (HTTP 429, or 503 from a bbprobe "
            "server) or its ticket; counted apart, not in the failure rate") in text
    assert ("failure ratio: failed attempts / all attempts; attempts the measurement server "
            "refused for capacity (HTTP 429, or 503 from a bbprobe server) or whose ticket it "
            "refused are counted apart and not in the failure rate") in text
    doc = report_dict(report, where)
    assert doc["server_refusals"] == {"attempts": 8, "attempts_by_server": dict(WANT_REFUSED),
                                      "recorded": True}
    rows = report_rows(report, where)
    assert {(r["refused_attempts"], r["refused_by_server"]) for r in rows} == {
        (8, f"{SERVER}=7 https://mlab.example:443=1")}
    # The interval's columns (issue 28) are appended after the verdict.
    assert format_csv(rows, REPORT_COLUMNS).splitlines()[0].endswith(
        ",refused_attempts,refused_by_server,verdict,ci95_low,ci95_high,ci_method,enough_data")
    page = html_report.render(report, where, obs, [], "Europe/Rome", utc_now())
    assert "Refused by the measurement server:</b> 8 transfer attempt(s)" in page
    assert "2 of 5 download and 0 of 2 upload attempts failed" in page
    none = evaluate(observe(_pairs()[0]), TABLE)
    assert "Refused:  no transfer attempt in scope was refused" in format_text(none, where)
    assert report_dict(none, where)["server_refusals"]["attempts"] == 0


def test_listing_counts_refusals_and_leaves_them_out_of_the_ratios() -> None:
    """A result listing row of an old agent's body that counted 429s as failures: the
    failure ratios without them, and the refused attempts in their own column."""
    result = with_refusals(session("p1", transfers=[
        attempt("download"), attempt("download", 0, 2, ok=False), attempt("upload")]),
        [refused("download", reason="http_status", status=429),
         refused("upload", reason="http_status", status=503),
         line_503("upload", 0, 2)])  # a proxy's: the line's
    # Its summary as the agent computed it then: every failed attempt a failure.
    result = replace(result, summary=replace(result.summary, download_failure_ratio=2 / 3,
                                             upload_failure_ratio=2 / 3))
    body = json.loads(canonical_json(result))
    assert body["summary"]["download_failure_ratio"] == pytest.approx(2 / 3)  # the agent's
    row = listing_row(result.result_id, "p1", result.started_at, result.ended_at,
                      result.ended_at, body)
    assert (row["download_failure_ratio"], row["upload_failure_ratio"]) == (0.5, 0.5)
    assert row["refused_attempts"] == 2
    plain = listing_row("r", "p1", "s", "e", "r", json.loads(canonical_json(
        session("p1"))))
    assert plain["refused_attempts"] == 0
    assert plain["download_failure_ratio"] == 0.0


def test_samples_export_agrees_and_says_refusals_are_not_in_it() -> None:
    """The samples file exported from facts holds no refused attempt, so evaluating it
    gives the same failure rate; its report says refusals are not recorded in it."""
    _, mixed = _pairs()
    facts = [of_result(r, r.started_at) for r in mixed if r.valid]
    text = format_csv(sample_rows(facts), samples_csv.COLUMNS)
    parsed = samples_csv.parse(text)
    assert parsed.errors == []
    from_file = evaluate(parsed.observations, TABLE)
    from_facts = evaluate(observe(mixed), TABLE)
    ratios = ("download_failure_ratio", "upload_failure_ratio")
    assert [(i.observed, i.samples) for i in from_file.indicators if i.id in ratios] == [
        (i.observed, i.samples) for i in from_facts.indicators if i.id in ratios]
    assert not from_file.refusals_known
    assert "Refused:  not recorded in this input" in format_text(
        from_file, Scope(None, None, None))
    assert report_dict(from_file, Scope(None, None, None))["server_refusals"] == {
        "attempts": None, "attempts_by_server": {}, "recorded": False}


# --- the store: both scope paths, both backends ----------------------------------------


def _campaign() -> list[SessionResult]:
    """Three UTC days of p1 and p2 sessions, some with refusals of each kind, some at the
    other server, some flagged invalid, some with real failures."""
    out = []
    for d, day in enumerate(("01", "02", "03")):
        for hour in range(0, 24, 4):
            k = d * 6 + hour // 4
            for probe in ("p1", "p2"):
                transfers = [attempt("download", bps=(20 + k) * 1e6),
                             attempt("upload", bps=(2 + k % 3) * 1e6)]
                if k % 3 == 0:  # the line's own failure, with or without refusals
                    transfers.append(attempt("download", 1, 1, ok=False))
                if k % 5 == 1:  # a 503 of the line's: a proxy's, an old download's
                    transfers.append(line_503("upload", 1, 1) if k % 2 else line_503(
                        "download", 2, 1, error=DOWNLOAD_503))
                extra = [[], [refused("download")],
                         [refused("upload", reason="http_status", status=503),
                          refused("download", reason="ticket_refused", status=None)],
                         [refused("download", reason="http_status", status=429)]][k % 4]
                result = session(probe, started_at=f"2026-05-{day}T{hour:02d}:10:00.000000Z",
                                 transfers=[*extra, *transfers],
                                 invalid=["cpu_busy"] if k % 5 == 2 else [],
                                 result_id=f"00000000-0000-4000-8000-{probe[1]}{d}{hour:010d}")
                out.append(replace(result, server=OTHER) if k % 3 == 2 else result)
    return out


SCOPES = [
    (None, None),
    ("2026-05-02T00:00:00.000000Z", "2026-05-03T00:00:00.000000Z"),  # a whole day
    ("2026-05-01T07:00:00.000000Z", "2026-05-03T13:00:00.000000Z"),  # partial ends
    ("2026-05-02T03:00:00.000000Z", "2026-05-02T17:00:00.000000Z"),  # inside one day
]


def _check_scopes(store: Store, results: list[SessionResult]) -> None:
    for since, until in SCOPES:
        chosen = [r for r in results if (since is None or r.started_at >= since)
                  and (until is None or r.started_at < until)]
        for include_invalid in (False, True):
            got = store.observations(None, since, until, include_invalid)
            want = observe(chosen, include_invalid)
            assert (got.download_attempts, got.download_failed, got.upload_attempts,
                    got.upload_failed) == (want.download_attempts, want.download_failed,
                                           want.upload_attempts, want.upload_failed)
            assert got.refused_by_server == want.refused_by_server and got.refused_by_server
            _same_figures(evaluate(got, TABLE), evaluate(want, TABLE))


def _fill(store: Store, results: list[SessionResult],
          put: Callable[[Store, SessionResult], None] = store_result) -> None:
    """Probes p1 and p2, and ``results`` stored with ``put``."""
    for name in ("p1", "p2"):
        register_probe(store, name, LineMetadata())
    for r in results:
        put(store, r)


def test_store_scope_paths_agree(store: Store) -> None:
    """Whole days from the day rollups and partial days from session rows give the
    bodies' failure rates and refusals per server, on either backend, with and without
    invalid sessions; a deleted result's day is rebuilt with its refusals."""
    results = _campaign()
    _fill(store, results)
    _check_scopes(store, results)
    facts = {f.result_id: f for f in store.facts()}
    assert facts == {r.result_id: of_result(r, r.started_at) for r in results}
    gone = next(r for r in results if r.started_at.startswith("2026-05-02")
                and of_result(r, r.started_at).refused_attempts)
    assert store.delete_result(gone.result_id, "test", utc_now(), "tester")
    _check_scopes(store, [r for r in results if r is not gone])


# --- the migration: refusals stored before as failures -----------------------------------


def store_as_older_collector(store: Store, result: SessionResult) -> None:
    """Store ``result`` with the facts a collector before refusals were told apart derived: every
    attempt a transfer fact (refusals as failed ones), no refusal counted."""
    accepted = ingest.parse_body(canonical_json(result).encode())
    legacy = tuple(TransferFact(a.direction, a.status == "ok",
                                a.throughput_bps / 1000 if a.status == "ok"
                                and a.throughput_bps is not None else None)
                   for a in result.transfers)
    facts = replace(accepted.facts, transfers=legacy, refused_attempts=0, refused_server=None)
    store.insert_results([NewResult(
        result_id=result.result_id, probe_name=result.probe_id,
        schema_version=result.schema_version, started_at=accepted.started_at,
        ended_at=accepted.ended_at, received_at=utc_now(), body=accepted.body,
        body_sha256=accepted.body_sha256, facts=facts, packed=accepted.packed)])


def as_old_agent(result: SessionResult) -> SessionResult:
    """``result`` as an agent before schema 7 sent it, when its refusals are all HTTP
    429 or a bbprobe 503 (reason "http_status"); else as schema 7 (a collector before this change
    stored its server_refused and ticket_refused attempts as failures too)."""
    reasons = {a.failure_reason for a in result.transfers if a.status == "failed"}
    return replace(result, schema_version=6) if not reasons & {"server_refused",
                                                               "ticket_refused"} else result


def test_packed_body_reads_without_its_samples() -> None:
    """What the migration decodes of a packed body: the result with every transfer's
    stream samples empty, and the very facts of the whole result."""
    import orjson

    from agent.decoding import parse_result
    from collector.storage import codec
    from tests.factories import attempt_with_samples

    whole = session("p1", transfers=[refused("download"),
                                     attempt_with_samples("download", 50e6),
                                     attempt_with_samples("upload", 9e6)])
    bare = parse_result(orjson.loads(codec.without_samples(codec.pack(whole))))
    assert bare == replace(whole, transfers=tuple(replace(t, stream_samples=())
                                                  for t in whole.transfers))
    assert of_result(bare, whole.started_at) == of_result(whole, whole.started_at)
    with pytest.raises(codec.CodecError):
        codec.without_samples(b"BBZ1not zstd")


def _migrations(storage: StorageConfig) -> int:
    """How many migrations the backend of ``storage`` has (its latest schema version)."""
    if storage.backend == "sqlite":
        from collector.storage.sql.sqlite_migrations import MIGRATIONS as LITE

        return len(LITE)
    from collector.storage.sql.postgres_migrations import MIGRATIONS as PG

    return len(PG)


def _back_one_migration(storage: StorageConfig) -> None:
    """The database as it was before the reclassifying migration (and the ones after
    it, which run again too)."""
    from collector.storage.sql import refusals

    if storage.backend == "sqlite":
        from collector.storage.sql.sqlite_migrations import MIGRATIONS as LITE

        with sqlite3.connect(storage.path) as db:
            db.execute(f"PRAGMA user_version = {LITE.index(refusals.reclassify)}")
        return
    import psycopg

    from collector.storage.sql.postgres_migrations import MIGRATIONS as PG

    with psycopg.connect(storage.url, autocommit=True) as conn:
        conn.execute("UPDATE bbprobe_schema SET version = %s",
                     (PG.index(refusals.reclassify),))


def test_migration_takes_stored_refusals_out(storage: StorageConfig,
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Results an older collector stored with refusals as failed attempts (an old agent's
    429 and bbprobe 503, and schema 7's reasons): the migration reads only the sessions
    with a failed transfer fact, decodes those whose body can hold a refusal (not one
    whose only failures are a timeout or a proxy's 503), re-derives their facts and
    rebuilds their days, so both scope paths give the bodies' figures and the refusals
    per server. It says so in one log line, and lists each session it changed."""
    results = [as_old_agent(r) for r in _campaign()]
    store = open_store(storage)
    try:
        _fill(store, results, store_as_older_collector)
        before: Observations = store.observations(None, None, None)
        assert before.refused_by_server == {}
        assert before.download_failed > observe(results).download_failed
    finally:
        store.close()
    _back_one_migration(storage)
    from collector.storage.sql import refusals

    decoded: list[str] = []
    decode = refusals.decode_body

    def counting(raw: bytes) -> SessionResult:
        result = decode(raw)
        decoded.append(result.result_id)
        return result

    monkeypatch.setattr(refusals, "decode_body", counting)
    caplog.set_level(logging.INFO, "bbprobe.collector")
    store = open_store(storage)
    try:
        assert store.schema_version == _migrations(storage)
        refused_in = {r.result_id: of_result(r, r.started_at) for r in results
                      if of_result(r, r.started_at).refused_attempts}
        # Sessions whose only failures are the line's (connect_error, a proxy's 503, an
        # old download's 503) are read, not decoded.
        assert sorted(decoded) == sorted(refused_in)
        line_only = [a for r in results if r.result_id not in refused_in
                     for a in r.transfers if a.status == "failed"]
        assert {a.failure_reason for a in line_only} == {"connect_error", "http_status"}
        # One line for the run: sessions, attempts, days; a warning, as figures changed.
        days = {(r.probe_id, r.started_at[:10]) for r in results if r.result_id in refused_in}
        attempts = sum(f.refused_attempts for f in refused_in.values())
        said = [r for r in caplog.records if "storage migration (capacity refusals)" in r.message]
        assert [r.levelno for r in said] == [logging.WARNING]
        assert (f"{len(refused_in)} stored session(s) had {attempts} transfer attempt(s) "
                "the measurement server refused counted as the line's failures; reclassified "
                f"as refusals (not in the failure rate), {len(days)} day rollup(s) rebuilt"
                ) in said[0].message
        # And a row per session changed, for an analyst to list.
        listed = store.dump("refusal_reclassifications", None, 10_000)
        assert sorted((row[1], row[2], row[3], row[4], row[5]) for row in listed) == sorted(
            (f.result_id, f.probe_id, f.started_at, f.refused_attempts, f.refused_server)
            for f in refused_in.values())
        assert len({row[6] for row in listed}) == 1
        _check_scopes(store, results)
        day = day_rollups(store, ["p1"], "2026-05-02", "2026-05-03")[0]
        want = observe([r for r in results if r.probe_id == "p1"
                        and r.started_at.startswith("2026-05-02")])
        assert (day.download_failed, json.loads(day.refused_servers)) == (
            want.download_failed, want.refused_by_server)
    finally:
        store.close()


def test_version_1_database_counts_refusals_apart(tmp_path: Path) -> None:
    """An SQLite file from before the facts tables (written by hand, as that release left
    it): the facts backfill (as of then) and the reclassifying migration give the bodies'
    figures and refusals."""
    from collector.storage.sql.sqlite import SqliteStore

    path = tmp_path / "old.sqlite3"
    results = [as_old_agent(r) for r in _campaign() if r.probe_id == "p1"]
    results = [r for r in results if r.schema_version == 6]
    version_1_database(path, results)
    store = SqliteStore(path)
    try:
        _check_scopes(store, results)
    finally:
        store.close()


def test_cli_report_shows_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bbprobe-collector report`: the refused attempts per server, text and JSON (on the
    SQLite file that `--db` names)."""
    monkeypatch.chdir(ROOT)
    db = tmp_path / "c.sqlite3"
    with closing(open_store(StorageConfig(path=str(db)))) as store:
        register_probe(store, "p1", LineMetadata())
        for r in _pairs()[1]:
            store_result(store, r)
    out = CliRunner().invoke(main, ["--db", str(db), "report", "--probe", "p1"])
    assert out.exit_code == 0, out.stderr
    assert f"8 transfer attempt(s) refused by the measurement server ({SERVER} 7, " in out.stdout
    out = CliRunner().invoke(main, ["--db", str(db), "report", "--format", "json"])
    assert json.loads(out.stdout)["server_refusals"]["attempts_by_server"] == {
        SERVER: 7, "https://mlab.example:443": 1}


def test_refusal_sentence_names_a_few_servers_printably() -> None:
    """The most refused servers first, at most ten named; a key that is no URL shows
    without the characters that act on a terminal; an unnamed server is said so."""
    from collector.reports.text import refused_sentence

    many = [(f"http://s{i:02d}.example:80", i + 1) for i in range(12)]
    text = refused_sentence(many)
    assert text.startswith("78 transfer attempt(s) refused by the measurement server "
                           "(http://s11.example:80 12, http://s10.example:80 11, ")
    assert "http://s01.example:80" not in text and "and 2 more server(s)" in text
    assert "(bad?key 3, server not recorded 1)" in refused_sentence([("bad\x1bkey", 3),
                                                                     ("", 1)])
