"""Scopes: calendar periods (semesters, year) and probes selected by line metadata; through
the CLI (on the SQLite file `--db` names) and the API."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector.cli.main import main
from collector.config import StorageConfig
from collector.errors import BadParameter
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.scope import parse_time, period_bounds
from collector.server.testing import RunningCollector
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from tests.factories import attempt, session, store_result
from tests.httpclient import request

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("period", "bounds"),
    [
        ("2026", ("2026-01-01T00:00:00.000000Z", "2027-01-01T00:00:00.000000Z")),
        ("2026-H1", ("2026-01-01T00:00:00.000000Z", "2026-07-01T00:00:00.000000Z")),
        ("2026-h2", ("2026-07-01T00:00:00.000000Z", "2027-01-01T00:00:00.000000Z")),
    ],
)
def test_period_bounds(period: str, bounds: tuple[str, str]) -> None:
    """Years and semesters of 131/06 reporting, until exclusive."""
    assert period_bounds(period) == bounds


@pytest.mark.parametrize("period", ["26", "2026-Q1", "2026-H3", "last year"])
def test_bad_period(period: str) -> None:
    """Anything but YYYY, YYYY-H1, YYYY-H2 is refused, naming the parameter."""
    with pytest.raises(BadParameter, match="period: expected YYYY, YYYY-H1 or YYYY-H2"):
        period_bounds(period)


def _populate(store: Store) -> None:
    """Two operators' probes; sessions in both semesters of 2026."""
    register_probe(store, "bt-1", LineMetadata(operator="BT Italia", region="Lazio"))
    register_probe(store, "bt-2", LineMetadata(operator="BT Italia", region="Lombardia"))
    register_probe(store, "other-1", LineMetadata(operator="Other"))
    plan = [("bt-1", "2026-03-01", 10e6), ("bt-1", "2026-09-01", 1e6),
            ("bt-2", "2026-03-02", 20e6), ("other-1", "2026-03-03", 1e6)]
    for probe, day, bps in plan:
        store_result(store, session(probe, started_at=f"{day}T10:00:00.000000Z",
                                    transfers=[attempt("download", bps=bps),
                                               attempt("upload", bps=1e6)]))


def _populate_file(db: Path) -> None:
    with closing(open_store(StorageConfig(path=str(db)))) as store:
        _populate(store)


def test_cli_report_by_operator_and_semester(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """--operator selects the operator's probes; --period 2026-H1 the first semester."""
    monkeypatch.chdir(ROOT)
    db = tmp_path / "c.sqlite3"
    _populate_file(db)
    result = CliRunner().invoke(main, ["--db", str(db), "report", "--operator", "BT Italia",
                                       "--period", "2026-H1", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["scope"]["probes"] == ["bt-1", "bt-2"]
    assert doc["sessions"] == 2
    got = {i["id"]: i for i in doc["indicators"]}
    # H1 BT downloads: 10 000 and 20 000 kbit/s -> p5 = 10 000 + .05 * 10 000
    assert got["download_p5_kbps"]["observed"] == pytest.approx(10_500)
    result = CliRunner().invoke(main, ["--db", str(db), "results", "--operator", "BT Italia",
                                       "--region", "Lazio", "--format", "json"])
    assert [r["probe_id"] for r in json.loads(result.stdout)["results"]] == ["bt-1", "bt-1"]


def test_period_and_range_are_exclusive(tmp_path: Path) -> None:
    """Giving both a period and since/until is refused."""
    db = tmp_path / "c.sqlite3"
    _populate_file(db)
    result = CliRunner().invoke(main, ["--db", str(db), "results", "--period", "2026",
                                       "--since", "2026-01-01"])
    assert (result.exit_code, result.stderr) == (
        2, "bbprobe-collector: period: give either period or since/until, not both\n")


def test_api_scope_by_metadata(collector: RunningCollector) -> None:
    """The report API takes the same selectors; no match is a 404 naming the parameter
    (tests/collector/test_selectors.py), never an empty report that looks normal."""
    with closing(collector.open_store()) as store:
        _populate(store)
    status, doc, _ = request("GET", collector.url +
                             "/api/v1/report?operator=Other&period=2026")
    assert status == 200
    assert doc["scope"]["probes"] == ["other-1"]
    assert doc["sessions"] == 1
    status, doc, _ = request("GET", collector.url + "/api/v1/report?operator=Nobody")
    assert (status, doc["error"], doc["field"]) == (
        404, "no probe has operator 'Nobody'", "operator")
    status, doc, _ = request("GET", collector.url + "/api/v1/results?period=2026-H3")
    assert (status, doc["error"]) == (400, "period: expected YYYY, YYYY-H1 or YYYY-H2, "
                                           "got '2026-H3'")


def test_out_of_range_bound_is_a_400() -> None:
    """A bound that falls before year 1 once converted to UTC is refused, not a 500."""
    import pytest

    from collector.errors import BadParameter

    with pytest.raises(BadParameter, match="since: expected an ISO 8601 date or timestamp"):
        parse_time("0001-01-01T00:00:00+14:00", "since")
