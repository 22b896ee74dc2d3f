"""One convention for every CSV the collector writes (collector/exports.py): booleans
true/false, speeds in kbit/s named *_kbps, times UTC to the second with Z, the probe as
probe_id; the report CSV carries its verdict, a certificate has a CSV (CLI and API), and
`-o -` is stdout. Against a real collector on 127.0.0.1 (port 0) and its SQLite file."""

from __future__ import annotations

import csv
import io
import json
import re
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector import exports
from collector.cli.main import main
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector
from tests.factories import attempt, session, store_result
from tests.httpclient import request

ROOT = Path(__file__).resolve().parents[2]
UTC_SECOND = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
CONTRACT = LineMetadata(operator="BT Italia", region="Lazio", download_min_kbps=20_000,
                        upload_min_kbps=1_000, max_delay_ms=50, max_loss_ratio=0.01)


@pytest.fixture
def filled(collector: RunningCollector, monkeypatch: pytest.MonkeyPatch
           ) -> RunningCollector:
    monkeypatch.chdir(ROOT)  # the default targets table (configs/targets)
    with closing(collector.open_store()) as store:
        register_probe(store, "roma-01", CONTRACT)
        for hour in range(3):
            store_result(store, session("roma-01",
                                        started_at=f"2026-03-01T{hour:02d}:00:00.123456Z",
                                        transfers=[attempt("download", bps=30e6),
                                                   attempt("upload", bps=2e6)]))
    return collector


def _cli(collector: RunningCollector, *args: str, stdin: str | None = None
         ) -> tuple[int, str, str]:
    done = CliRunner().invoke(main, ["--db", str(collector.db_path), *args], input=stdin)
    if done.exception and not isinstance(done.exception, SystemExit):
        raise done.exception
    return done.exit_code, done.stdout, done.stderr


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _follows_the_convention(name: str, text: str) -> list[dict[str, str]]:
    rows = _rows(text)
    header = text.splitlines()[0].split(",")
    assert "probe" not in header, name  # the probe is probe_id in every CSV
    assert not [c for c in header if c.endswith("_bps")], name
    for row in rows:
        for column, value in row.items():
            assert value not in ("True", "False", "None"), (name, column)
            if exports.is_time(column) and value:
                assert UTC_SECOND.fullmatch(value), (name, column, value)
    return rows


def test_every_csv_follows_one_convention(filled: RunningCollector) -> None:
    """Each CSV of the CLI and the API: no True/False, no bit/s, times to the second in
    UTC with Z, the probe as probe_id; the API's CSV equals the CLI's."""
    cli = {
        "results": ["results", "--format", "csv"],
        "report": ["report", "--format", "csv"],
        "breakdown": ["report", "--format", "csv", "--by", "region"],
        "samples": ["samples"],
        "completeness": ["completeness", "--format", "csv"],
        "probes": ["probe", "list", "--format", "csv"],
        "fleet": ["fleet", "--format", "csv"],
        "certificate": ["certify", "--probe", "roma-01", "--format", "csv"],
    }
    texts = {}
    for name, args in cli.items():
        code, out, err = _cli(filled, *args)
        assert code == 0, (name, err)
        texts[name] = out
        _follows_the_convention(name, out)
    listing = _rows(texts["results"])
    assert {"download_kbps", "upload_kbps", "valid", "clock_synchronized"} <= set(listing[0])
    assert (listing[0]["download_kbps"], listing[0]["valid"]) == ("30000.0", "true")
    assert listing[0]["started_at"] == "2026-03-01T00:00:00Z"  # truncated, not rounded
    fleet = _rows(texts["fleet"])[0]
    assert fleet["silent"] in ("true", "false") and fleet["healthy"] in ("true", "false")
    # Sessions without sequence numbers (agents before schema 4): no rows, the header.
    assert texts["completeness"].splitlines()[0].startswith("probe_id,day,")
    for path, name in (("/api/v1/results?format=csv", "results"),
                       ("/api/v1/report?format=csv", "report"),
                       ("/api/v1/report?format=csv&by=region", "breakdown"),
                       ("/api/v1/samples", "samples"),
                       ("/api/v1/probes?format=csv", "probes"),
                       ("/api/v1/certificate?probe=roma-01&format=csv", "certificate")):
        status, body, headers = request("GET", filled.url + path)
        assert status == 200 and headers["content-type"].startswith("text/csv"), path
        assert body.decode() == texts[name], path
    status, body, _ = request("GET", filled.url + "/api/v1/fleet?format=csv")
    _follows_the_convention("fleet (API)", body.decode())


def test_the_report_csv_carries_its_verdict(filled: RunningCollector) -> None:
    """report.csv used to have no verdict: each row now carries the report's (and each
    group's, by region), the one the JSON gives; passed is true/false."""
    _, out, _ = _cli(filled, "report", "--format", "json")
    verdict = json.loads(out)["verdict"]
    _, out, _ = _cli(filled, "report", "--format", "csv")
    rows = _rows(out)
    assert {r["verdict"] for r in rows} == {verdict}
    assert {r["passed"] for r in rows} <= {"true", "false", ""}
    _, out, _ = _cli(filled, "report", "--format", "csv", "--by", "region")
    assert {(r["region"], r["verdict"]) for r in _rows(out)} == {("Lazio", verdict)}


def test_a_certificate_has_a_csv(filled: RunningCollector) -> None:
    """One row per check with the line, the campaign and the verdict on every row: the
    JSON's figures, booleans true/false, the comparison that is a breach."""
    _, out, _ = _cli(filled, "certify", "--probe", "roma-01", "--format", "json")
    doc = json.loads(out)
    _, out, _ = _cli(filled, "certify", "--probe", "roma-01", "--format", "csv")
    rows = _rows(out)
    assert list(rows[0]) == list(exports.CERTIFICATE_COLUMNS)
    assert [r["id"] for r in rows] == [c["id"] for c in doc["checks"]]
    assert {r["verdict"] for r in rows} == {doc["verdict"]}
    first = rows[0]
    check = doc["checks"][0]
    assert (first["id"], first["breach_if"], float(first["threshold"]),
            float(first["observed"])) == ("download_p5_kbps", "<", 20_000.0,
                                          check["observed"])
    assert first["breach"] == "false" and first["informational"] == "false"
    assert first["sessions"] == "3" and first["first_session_at"] == "2026-03-01T00:00:00Z"


def test_dash_is_stdout_and_stdin(filled: RunningCollector, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`-o -` writes to stdout, as curl and tar do (it wrote a file named "-"), even for
    the HTML report whose default is a file; `evaluate --samples -` reads stdin, so an
    export pipes into its evaluation."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    code, out, err = _cli(filled, "samples", "-o", "-")
    assert (code, err) == (0, "") and out.startswith("probe_id,timestamp,kind,value,ok,unit")
    code, page, _ = _cli(filled, "report", "--format", "html", "-o", "-")
    assert code == 0 and page.lstrip().lower().startswith("<!doctype html")
    code, cert, _ = _cli(filled, "certify", "--probe", "roma-01", "--format", "csv", "-o",
                         "-")
    assert code == 0 and cert.startswith("probe_id,family,id,")
    assert list(here.iterdir()) == []  # no file named "-", no bbprobe-report.html
    code, out, err = _cli(filled, "evaluate", "--samples", "-", "--format", "json",
                          stdin=_cli(filled, "samples")[1])
    assert code == 0, (out, err)
    _, online, _ = _cli(filled, "report", "--format", "json")
    assert json.loads(out)["verdict"] == json.loads(online)["verdict"]


def test_samples_files_with_and_without_unit(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A samples file of an earlier release (no unit column) still evaluates; a unit that
    is not the kind's is refused naming the row."""
    from collector.compliance import samples_csv

    legacy = ("probe_id,timestamp,kind,value,ok\n"
              "p,2026-03-01T00:00:00Z,download,30000,true\n"
              "p,2026-03-01T00:00:00Z,ping,10.5,true\n")
    parsed = samples_csv.parse(legacy, "old.csv")
    assert parsed.errors == [] and parsed.observations.download_kbps == [30000.0]
    wrong = ("probe_id,timestamp,kind,value,ok,unit\n"
             "p,2026-03-01T00:00:00Z,download,30,true,Mbit/s\n"
             "p,2026-03-01T00:00:00Z,ping,10.5,true,ms\n")
    assert samples_csv.parse(wrong, "new.csv").errors == [
        "new.csv:2: unit: must be kbit/s for download, got 'Mbit/s'"]


def test_the_convention_itself() -> None:
    """Pure: booleans, missing values, bit/s to kbit/s, times truncated to the second
    (an offset converted to UTC), lists, formulas quoted."""
    text = exports.to_csv(
        [{"download_bps": 1_234_567, "ok": False, "valid": True, "note": None,
          "started_at": "2026-03-01T01:59:59.999999+01:00", "problems": ["a", "b c"],
          "operator": "=HYPERLINK(1)"}],
        ("download_bps", "ok", "valid", "note", "started_at", "problems", "operator"))
    assert text == ("download_kbps,ok,valid,note,started_at,problems,operator\n"
                    "1234.567,false,true,,2026-03-01T00:59:59Z,a; b c,'=HYPERLINK(1)\n")
    assert exports.to_csv([], ("probe_id",)) == "probe_id\n"
    assert exports.utc_second("not a time") == "not a time"
