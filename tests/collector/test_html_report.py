"""HTML reports with plots: what the page holds (pure), the CLI file and the served pages,
and a real headless Chromium laying the plots out (required under CI=true). The page's
queries run on each backend; the CLI and served-page tests use the collector's SQLite file
(`--db PATH` names one)."""

from __future__ import annotations

import re
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from agent.schema import format_utc
from collector.cli.main import main
from collector.compliance import targets
from collector.config import StorageConfig
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.reports import plots, service
from collector.reports.report_plots import hour_profile, time_buckets
from collector.scope import resolve_scope
from collector.server.testing import RunningCollector
from collector.storage.model import HourRow
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from tests.browser import render_in_chromium
from tests.factories import attempt, session, store_result
from tests.httpclient import request

ROOT = Path(__file__).resolve().parents[2]
TABLE = targets.load("")
ROME = ZoneInfo("Europe/Rome")
PLOTS = ("speed-download", "speed-upload", "hour-profile", "delay", "jitter", "loss")


def _fill(store: Store, days: int = 2, probe: str = "line-1") -> None:
    if store.probe(probe) is None:
        register_probe(store, probe, LineMetadata(operator="BT Italia"))
    start = datetime(2026, 1, 14, 23, 0, tzinfo=UTC)
    for i in range(24 * days):
        moment = format_utc(start + timedelta(hours=i))
        store_result(store, session(
            probe, started_at=moment, rtts=[18.0 + i % 5, None if i % 7 == 0 else 19.0],
            transfers=[attempt("download", bps=(60 + i % 24) * 1e6),
                       attempt("upload", bps=(10 + i % 3) * 1e6)]))


def _fill_file(db: Path, days: int = 2) -> None:
    """Fill the SQLite file a `--db PATH` command will read."""
    with closing(open_store(StorageConfig(path=str(db)))) as store:
        _fill(store, days)


def _fill_collector(collector: RunningCollector, days: int = 2) -> None:
    with closing(collector.open_store()) as store:
        _fill(store, days)


def _plots(page: str) -> dict[str, str]:
    return dict(re.findall(r'<svg class="plot" data-plot="([^"]+)"(.*?)</svg>', page, re.S))


def _page(store: Store) -> str:
    from agent.schema import utc_now
    from collector.reports import html as html_report

    view = service.report_view(store, resolve_scope(None, None, None), TABLE)
    return html_report.render_view(view, "Europe/Rome", utc_now())


def test_page_has_every_plot_with_its_data(store: Store) -> None:
    """Six plots, each drawing marks; the speed plots carry the Allegato 2 targets and
    the observed percentiles; the indicator table and verdict are on the page, with
    jitter as information (no target in this table)."""
    _fill(store)
    page = _page(store)
    found = _plots(page)
    assert set(found) == set(PLOTS)
    bars = found["speed-download"].count('<rect class="mark"')
    assert 5 <= bars <= 30
    assert "target banda minima (p5): 2.2<" in found["speed-download"]  # 2,200 kbit/s
    assert "observed p95" in found["speed-upload"]
    assert found["hour-profile"].count('<circle class="mark"') == 48  # 24 bands x 2 ways
    assert found["delay"].count('<circle class="mark"') == 48  # hourly over two days
    # Every 7th session lost its second echo: one answered RTT, no pair, no jitter.
    assert found["jitter"].count('<circle class="mark"') == 48 - 7
    assert found["loss"].count('<rect class="mark"') == 48
    assert "<code>jitter_mean_ms</code>" in page and "(none in the table)" in page
    assert "download_p5_kbps" in page and 'class="verdict verdict-' in page
    assert "48 session(s)" in page


def test_empty_scope_says_so(store: Store) -> None:
    """No data: every plot says so in words and draws nothing."""
    page = _page(store)
    found = _plots(page)
    assert set(found) == set(PLOTS)
    for body in found.values():
        assert 'class="mark"' not in body
        assert 'class="empty"' in body
    assert "INCOMPLETE" in page


def test_hour_bands_are_local_time() -> None:
    """23:00 UTC in January is the 00 band in Rome; 22:00 UTC in July is too (DST)."""
    rows = [HourRow("2026-01-14T23", download_n=1, download_kbps_sum=5000.0),
            HourRow("2026-07-14T22", download_n=1, download_kbps_sum=7000.0),
            HourRow("2026-07-14T23", upload_n=2, upload_kbps_sum=800.0)]
    profile = hour_profile(rows, ROME)
    assert profile["download"] == [(0, 6000.0, 2)]
    assert profile["upload"] == [(1, 400.0, 2)]


def test_long_spans_are_bucketed_by_local_day() -> None:
    """Over 14 days the delay and loss plots use local days, summing the hours."""
    rows = [HourRow(format_utc(datetime(2026, 3, 1, tzinfo=UTC) + timedelta(hours=h))[:13],
                    pings_sent=10, pings_lost=1, rtt_n=9, rtt_sum_ms=90.0)
            for h in range(0, 24 * 20, 6)]
    rows.append(HourRow("2026-03-20T23", pings_sent=10))  # 00:00 on the 21st in Rome
    kind, buckets = time_buckets(rows, ROME)
    assert kind == "day"
    assert len(buckets) == 21
    assert buckets[-1].start.day == 21 and buckets[-1].pings_sent == 10
    assert all(b.start.hour == 0 for b in buckets)
    assert sum(b.pings_sent for b in buckets) == 10 * len(rows)
    assert buckets[0].rtt_n == 36  # four 6-hourly rows


def test_time_ticks_stay_on_local_hours_across_dst() -> None:
    """Ticks fall on whole local hours at a step that divides the day, also on the day
    clocks go forward in Rome (2026-03-29)."""
    lo = datetime(2026, 3, 28, 5, 17, tzinfo=UTC).timestamp()
    hi = datetime(2026, 3, 30, 2, 0, tzinfo=UTC).timestamp()
    ticks, step = plots.time_ticks(lo, hi, ROME)
    assert ticks[0] <= lo and ticks[-1] >= hi
    local = [datetime.fromtimestamp(t, ROME) for t in ticks]
    assert all(m.minute == 0 and m.hour % step == 0 for m in local), local


def test_nice_ticks_cover_the_range() -> None:
    """Axis ticks are round steps (1, 2 or 5 times a power of ten) covering the data; an
    empty range still gets a 0-1 axis."""
    assert plots.nice_ticks(0, 93.2, 5) == [0, 20, 40, 60, 80, 100]
    assert plots.nice_ticks(0, 0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_cli_writes_standalone_html_and_csv(tmp_path: Path) -> None:
    """--format html writes one file with the plots inline (no external resources);
    --format csv gives one row per indicator with the scope on each row."""
    db = tmp_path / "c.sqlite3"
    _fill_file(db)
    out = tmp_path / "r.html"
    result = CliRunner().invoke(main, ["--db", str(db), "report", "--probe", "line-1",
                                       "--format", "html", "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert set(_plots(page)) == set(PLOTS)
    assert not re.search(r'(src|href)="(https?:)?//', page)
    result = CliRunner().invoke(main, ["--db", str(db), "report", "--format", "csv"])
    lines = result.output.splitlines()
    assert lines[0].startswith("id,name,unit,comparison,target,observed,samples,passed")
    # Every measurable indicator of the table, then jitter as information (no target).
    assert len(lines) == 1 + len(TABLE.measurable) + 1
    assert lines[1].startswith("download_p95_kbps,")
    assert lines[-1].startswith("jitter_mean_ms,") and ",ms,,," in lines[-1]


def test_cli_html_errors_are_clear(tmp_path: Path) -> None:
    """An unknown time zone and an unwritable output name the problem, no traceback."""
    db = tmp_path / "c.sqlite3"
    _fill_file(db, days=1)
    result = CliRunner().invoke(main, ["--db", str(db), "report", "--format", "html",
                                       "--timezone", "Mars/Olympus", "-o",
                                       str(tmp_path / "x.html")])
    assert result.exit_code == 2
    assert "timezone: unknown time zone 'Mars/Olympus'" in result.output
    result = CliRunner().invoke(main, ["--db", str(db), "report", "--format", "html", "-o",
                                       str(tmp_path / "missing" / "x.html")])
    assert result.exit_code == 1
    assert "--output: cannot write" in result.output and "Traceback" not in result.output


def test_served_pages_and_formats(collector: RunningCollector) -> None:
    """/ lists the probes with links; /report and ?format=html serve the page; csv and a
    bad format answer as documented."""
    _fill_collector(collector)
    status, body, headers = request("GET", collector.url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert 'href="report?probe=line-1"' in body.decode()
    assert 'href="report?operator=BT%20Italia"' in body.decode()
    for path in ("/report?probe=line-1", "/api/v1/report?operator=BT%20Italia&format=html"):
        status, body, _ = request("GET", collector.url + path)
        assert status == 200
        assert set(_plots(body.decode())) == set(PLOTS)
    status, body, headers = request("GET", collector.url + "/api/v1/report?format=csv")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert body.decode().count("\n") == 1 + len(TABLE.measurable) + 1  # and jitter
    status, body, _ = request("GET", collector.url + "/api/v1/report?format=pdf")
    assert (status, body["field"]) == (400, "format")


def _drawn(dom: str) -> dict[str, tuple[int, str]]:
    out = {}
    for tag in re.findall(r"<svg [^>]*>", dom):
        name = re.search(r'data-plot="([^"]+)"', tag)
        marks = re.search(r'data-drawn-marks="(\d+)"', tag)
        size = re.search(r'data-drawn-size="([^"]+)"', tag)
        if name:
            out[name.group(1)] = (int(marks.group(1)) if marks else -1,
                                  size.group(1) if size else "")
    return out


@pytest.mark.slow
def test_chromium_renders_the_plots(collector: RunningCollector, tmp_path: Path) -> None:
    """Served page and standalone file: in a real browser every plot is laid out at full
    size and every datum drawn has a size (the page's own check, read back from the DOM)."""
    _fill_collector(collector)
    drawn = _drawn(render_in_chromium(collector.url + "/report?probe=line-1", tmp_path))
    assert set(drawn) == set(PLOTS)
    for name, (marks, size) in drawn.items():
        assert marks > 0, (name, marks)
        width, height = (int(v) for v in size.split("x"))
        assert width >= 600 and height >= 240, (name, size)
    out = tmp_path / "r.html"
    result = CliRunner().invoke(main, ["--db", str(collector.db_path), "report", "--format",
                                       "html", "-o", str(out)])
    assert result.exit_code == 0
    standalone = _drawn(render_in_chromium(out.as_uri(), tmp_path))
    assert {k: v[0] > 0 for k, v in standalone.items()} == dict.fromkeys(PLOTS, True)


def test_invalid_sessions_shown_apart_in_every_format(collector: RunningCollector) -> None:
    """Text, JSON and HTML reports say how many sessions were flagged invalid and why;
    include_invalid=true counts them; a bad value is refused naming the parameter."""
    with closing(collector.open_store()) as store:
        _fill(store, days=1)
        store_result(store, session("line-1", started_at="2026-01-15T12:30:00.000000Z",
                                    invalid=["cross_traffic"]))
    status, body, _ = request("GET", collector.url + "/api/v1/report")
    assert body["invalid"] == {"sessions": 1, "reasons": {"cross_traffic": 1},
                               "included": False}
    assert body["sessions"] == 24
    status, body, _ = request("GET", collector.url + "/api/v1/report?include_invalid=true")
    assert (body["sessions"], body["invalid"]["included"]) == (25, True)
    status, body, _ = request("GET", collector.url + "/report")
    assert ("1 session flagged invalid (reasons: cross_traffic in 1 session); left out of "
            "every indicator" in body.decode())
    result = CliRunner().invoke(main, ["--db", str(collector.db_path), "report"])
    assert "Invalid:  1 session flagged invalid (reasons: cross_traffic in 1 session)" in \
        result.output
    status, body, _ = request("GET", collector.url + "/api/v1/report?include_invalid=yes")
    assert (status, body["field"]) == (400, "include_invalid")


def test_samples_export_re_evaluates_to_the_same_report(tmp_path: Path,
                                                        collector: RunningCollector) -> None:
    """`samples` writes the `evaluate --samples` format; evaluating that file gives the
    report of the scope, indicator for indicator. The API serves the same CSV; probes
    export as CSV too."""
    import json

    with closing(collector.open_store()) as store:
        _fill(store, days=2)
        store_result(store, session("line-1", started_at="2026-01-15T12:30:00.000000Z",
                                    invalid=["wifi"]))
    db = str(collector.db_path)
    out = tmp_path / "samples.csv"
    result = CliRunner().invoke(main, ["--db", db, "samples", "--period", "2026", "-o",
                                       str(out)])
    assert result.exit_code == 0, result.output
    header, first = out.read_text().splitlines()[:2]
    assert header == "probe_id,timestamp,kind,value,ok,unit"
    assert first == "line-1,2026-01-14T23:00:00Z,download,60000.0,true,kbit/s"
    offline = CliRunner().invoke(main, ["--db", db, "evaluate", "--samples", str(out),
                                        "--format", "json"])
    online = CliRunner().invoke(main, ["--db", db, "report", "--period", "2026",
                                       "--format", "json"])
    got = {i["id"]: (i["observed"], i["samples"]) for i in
           json.loads(offline.output)["indicators"]}
    want = {i["id"]: (i["observed"], i["samples"]) for i in
            json.loads(online.output)["indicators"]}
    assert got.keys() == want.keys()
    for key, (observed, samples) in want.items():
        assert got[key][1] == samples
        assert got[key][0] == pytest.approx(observed, rel=1e-12), key
    status, body, _ = request("GET", collector.url + "/api/v1/samples?period=2026")
    assert status == 200 and body.decode() == out.read_text()
    status, body, _ = request("GET", collector.url + "/api/v1/samples?include_invalid=true")
    assert body.decode().count("\n") > out.read_text().count("\n")
    status, body, _ = request("GET", collector.url + "/api/v1/probes?format=csv")
    assert body.decode().splitlines()[1].startswith("line-1,")
