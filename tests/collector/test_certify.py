"""Line certification: hourly-band completeness and the verdict against the contract (pure);
the CLI on the SQLite file `--db` names, and the API (the certificate through the store on
both backends is in test_conformance.py)."""

from __future__ import annotations

import json
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.schema import SessionResult, format_utc
from agent.spec import CAMPAIGN_RULES as RULES
from collector.cli.main import main
from collector.compliance.certify import certify
from collector.compliance.facts import SessionFacts, of_result
from collector.config import StorageConfig
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector
from collector.storage.sql.backends import open_store
from tests.factories import attempt, session, store_result
from tests.httpclient import request

CONTRACT = LineMetadata(operator="BT Italia", offer="Fibra", download_min_kbps=2200,
                        upload_min_kbps=150, max_delay_ms=70, max_loss_ratio=0.004)
# Midnight in Rome on a winter day is 23:00 UTC the day before.
ROME_MIDNIGHT = datetime(2026, 1, 14, 23, 0, tzinfo=UTC)


def facts(results: list[SessionResult]) -> list[SessionFacts]:
    return [of_result(r, r.started_at) for r in results]


def campaign(count: int = 96, step_min: int = 15, down: float = 50e6, up: float = 10e6,
             skip_band: int | None = None) -> list[SessionResult]:
    out = []
    for i in range(count):
        moment = ROME_MIDNIGHT + timedelta(minutes=step_min * i)
        if skip_band is not None and (moment + timedelta(hours=1)).hour == skip_band and \
                moment.minute == 0:
            continue  # one session short in that (Rome) band
        out.append(session("p1", started_at=format_utc(moment), rtts=[10.0, 11.0, 12.0],
                           transfers=[attempt("download", bps=down),
                                      attempt("upload", bps=up)]))
    return out


def test_complete_campaign_without_breach() -> None:
    """96 sessions, 4 in every Rome hour band, fast clean line: no breach."""
    cert = certify("p1", CONTRACT, facts(campaign()))
    assert cert.band_counts == (4,) * 24
    assert cert.complete
    assert cert.verdict == "no_breach"
    got = {c.id: c for c in cert.checks}
    assert got["download_p5_kbps"].observed == pytest.approx(50_000)
    assert got["delay_p95_ms"].observed == pytest.approx(12.0)  # RTT basis
    assert got["loss_ratio"].observed == 0.0
    assert len(cert.sessions) == 96


def test_one_band_short_is_incomplete_never_a_verdict() -> None:
    """Band 07 has 3 of 4: incomplete, even though the speeds breach the contract."""
    cert = certify("p1", CONTRACT, facts(campaign(up=100e3, skip_band=7)))
    assert cert.band_counts[7] == 3
    assert not cert.complete
    assert cert.verdict == "incomplete"


def test_breach_of_guaranteed_minimum_upload() -> None:
    """Upload at 100 kbit/s < 150 guaranteed: breach, and only that check breaches."""
    cert = certify("p1", CONTRACT, facts(campaign(up=100e3)))
    assert cert.verdict == "breach"
    assert [c.id for c in cert.checks if c.breach] == ["upload_p5_kbps"]


def test_legacy_rule_one_per_band() -> None:
    """24in72h: one session an hour for 24 hours completes the campaign."""
    cert = certify("p1", CONTRACT, facts(campaign(count=24, step_min=60)), RULES["24in72h"])
    assert cert.complete
    assert cert.verdict == "no_breach"
    assert certify("p1", CONTRACT, facts(campaign(count=24, step_min=60))).verdict == "incomplete"


def test_failed_sessions_do_not_count_and_absent_contract_terms_are_not_judged() -> None:
    """A session whose download failed does not fill its band; a contract with no
    maximum delay leaves that check unjudged."""
    results = campaign()
    results[0] = session("p1", started_at=results[0].started_at,
                         transfers=[attempt("download", ok=False), attempt("upload")])
    line = LineMetadata(download_min_kbps=2200)
    cert = certify("p1", line, facts(results))
    assert cert.band_counts[0] == 3
    assert cert.verdict == "incomplete"
    got = {c.id: c for c in cert.checks}
    assert (got["delay_p95_ms"].threshold, got["delay_p95_ms"].breach) == (None, None)


def _store(db: Path, results: list[SessionResult]) -> None:
    with closing(open_store(StorageConfig(path=str(db)))) as store:
        register_probe(store, "p1", CONTRACT)
        for r in results:
            store_result(store, r)


def test_invalid_sessions_are_listed_but_neither_fill_a_band_nor_count() -> None:
    """A session the agent flagged invalid (say, measured over Wi-Fi) leaves its band a
    session short and adds no sample, however slow it was; it stays on the list."""
    results = campaign()
    results[5] = session("p1", started_at=results[5].started_at, rtts=[900.0],
                         transfers=[attempt("download", bps=1e3), attempt("upload", bps=1e3)],
                         invalid=["wifi"])
    cert = certify("p1", CONTRACT, facts(results))
    assert cert.band_counts[1] == 3 and cert.verdict == "incomplete"
    got = {c.id: c for c in cert.checks}
    assert got["download_p5_kbps"].samples == 95
    assert got["download_p5_kbps"].breach is False
    listed = cert.sessions[5]
    assert (listed.valid, listed.invalid_codes, listed.counted) == (False, ("wifi",), False)
    from collector.reports.text import format_certificate

    assert "INVALID (wifi), not counted" in format_certificate(cert)


def test_cli_certificate(tmp_path: Path) -> None:
    """The certificate lists the line, the contract, every band, every session, the
    verdict; JSON carries the same."""
    db = tmp_path / "c.sqlite3"
    _store(db, campaign(up=100e3))
    result = CliRunner().invoke(main, ["--db", str(db), "certify", "--probe", "p1"])
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "Line:     probe p1; operator BT Italia; offer Fibra" in text
    assert "00h 4/4" in text and "23h 4/4" in text
    assert "Verdict:  BREACH" in text
    assert text.count("band ") == 96
    result = CliRunner().invoke(main, ["--db", str(db), "certify", "--probe", "p1",
                                       "--format", "json"])
    doc = json.loads(result.stdout)
    assert (doc["verdict"], doc["rule"]["sessions_per_band"]) == ("breach", 4)


def test_api_certificate_errors(collector: RunningCollector) -> None:
    """Unknown probe: 404; bad rule or time zone: 400, each naming the parameter."""
    collector.add_probe("p1")
    for query, status, message in (
        ("probe=nope", 404, "no probe named 'nope'"),
        ("probe=p1&rule=7in7", 400, "rule: expected one of 96in24h, 24in72h, got '7in7'"),
        ("probe=p1&timezone=Mars/Olympus", 400, "timezone: unknown time zone 'Mars/Olympus'"),
        ("", 400, "probe: required"),
    ):
        got, body, _ = request("GET", collector.url + "/api/v1/certificate?" + query)
        assert (got, body["error"]) == (status, message)
    got, body, _ = request("GET", collector.url + "/api/v1/certificate?probe=p1")
    assert (got, body["verdict"]) == (200, "incomplete")


def test_certificate_as_a_page_to_hand_over(tmp_path: Path,
                                            collector: RunningCollector) -> None:
    """certify --format html writes a printable page: 24 band cells, the four checks with
    thresholds, the verdict in words and every session; the API serves the same page."""
    import re

    collector.add_probe("p1", CONTRACT)
    results = campaign(up=100e3)
    results[3] = session("p1", started_at=results[3].started_at, invalid=["wifi"])
    with closing(collector.open_store()) as store:
        for r in results:
            store_result(store, r)
    out = tmp_path / "cert.html"
    result = CliRunner().invoke(main, ["--db", str(collector.db_path), "certify", "--probe",
                                       "p1", "--format", "html", "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert len(re.findall(r'<td class="(?:pass|fail)">\d\dh<br>', page)) == 24
    assert page.count('<td class="fail">00h<br>3/4</td>') == 1  # the invalid session's band
    assert "Banda minima in upload (percentile 5%)" in page and "&gt;= 0.15 Mbit/s" in page
    assert "INCOMPLETE: the campaign does not cover every hourly band" in page
    assert page.count("<tr><td>2026-01-") == 96  # local time (Europe/Rome)
    assert "INVALID (wifi)" in page
    status, body, headers = request(
        "GET", collector.url + "/api/v1/certificate?probe=p1&format=html")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "INVALID (wifi)" in body.decode()
