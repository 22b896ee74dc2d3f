"""AGCOM's semester tables (collector/reports/semester.py): a row per region and access
technology for each semester and the year, every figure the report's own for that scope
with its 95 % interval and samples, "n.d." where the minimum-sample rule says not enough
data; the CSV and the HTML page; the CLI's --layout semester and the API's layout."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from collector.cli.main import main
from collector.compliance import targets as targets_mod
from collector.compliance.evaluate import IndicatorResult
from collector.config import StorageConfig
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.reports import semester, service
from collector.scope import Scope, period_bounds, resolve_scope
from collector.server.testing import running_collector
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from tests.factories import attempt, session, store_result
from tests.httpclient import request

TABLE = targets_mod.load("")

# Two regions x two technologies. rm-ftth measures enough in each semester for every
# figure to be published (120 speeds a direction: a distribution-free 95 % interval of
# p5 needs about 90); the others one session each (n.d.); mi-fwa nothing in H1.
PROBES = {("Lazio", "FTTH"): "rm-ftth", ("Lazio", "FWA"): "rm-fwa",
          ("Lombardia", "FTTH"): "mi-ftth", ("Lombardia", "FWA"): "mi-fwa"}


def _fill(store: Store) -> None:
    for (region, technology), name in PROBES.items():
        register_probe(store, name, LineMetadata(region=region, technology=technology))
    for month, base in (("03", 50e6), ("09", 40e6)):
        for k in range(6):
            transfers = [attempt("download", test_index=i, bps=base + i * 1e6 + k * 1e5)
                         for i in range(20)]
            transfers += [attempt("upload", test_index=i, bps=base / 5 + i * 1e5 + k * 1e4)
                          for i in range(20)]
            store_result(store, session(
                "rm-ftth", started_at=f"2026-{month}-0{k + 1}T10:00:00.000000Z",
                transfers=transfers,
                rtts=[10.0 + (i * 7 + k) % 5 if (i + k) % 9 else None for i in range(12)]))
        for name in ("rm-fwa", "mi-ftth", "mi-fwa"):
            if name == "mi-fwa" and month == "03":
                continue
            store_result(store, session(name, started_at=f"2026-{month}-02T12:00:00.000000Z",
                                        transfers=[attempt("download", bps=30e6),
                                                   attempt("upload", bps=3e6)]))


def _gather(store: Store, where: Scope) -> tuple[list[semester.Row], Any]:
    return semester.gather(where, lambda scope, by: service.breakdown(store, scope, TABLE, by))


YEAR = resolve_scope(None, None, None, "2026")


def test_rows_are_each_scopes_own_report(store: Store) -> None:
    """Each (region, technology, period) row holds, figure by figure, what
    service.compliance gives for that region's and technology's probes over that
    semester or year: value, interval and samples; a figure the rule marks not enough
    data has no number."""
    _fill(store)
    rows, sample = _gather(store, YEAR)
    assert sample is not None
    assert [(r.period, r.region, r.technology) for r in rows] == [
        (period, region, technology) for period in ("2026-H1", "2026-H2", "2026")
        for region in ("Lazio", "Lombardia") for technology in ("FTTH", "FWA")]
    published = withheld = 0
    for r in rows:
        since, until = period_bounds(r.period)
        assert (r.since, r.until) == (since, until)
        want = service.compliance(store, Scope((PROBES[r.region, r.technology],), since,
                                               until), TABLE)
        assert (r.probes, r.sessions) == (1, want.sessions)
        indicators = {i.id: i for i in (*want.indicators, *want.informational)}
        for f in r.figures:
            ind = indicators[f.id]
            assert ind.interval is not None
            assert (f.samples, f.enough, f.method) == (ind.samples, ind.interval.enough,
                                                       ind.interval.method)
            if ind.interval.enough:
                assert (f.value, f.low, f.high) == (ind.observed, ind.interval.low,
                                                    ind.interval.high)
                published += 1
            else:
                assert (f.value, f.low, f.high) == (None, None, None)
                withheld += 1
    assert published and withheld
    cell = {(r.period, r.region, r.technology): {f.id: f for f in r.figures} for r in rows}
    rich = cell["2026", "Lazio", "FTTH"]
    assert rich["download_p5_kbps"].enough and rich["download_p5_kbps"].samples == 240
    low, high = rich["download_p5_kbps"].low, rich["download_p5_kbps"].high
    assert low is not None and high is not None
    assert low <= (rich["download_p5_kbps"].value or 0) <= high
    # One session: every figure n.d., its samples still shown.
    sparse = cell["2026-H1", "Lombardia", "FTTH"]
    assert all(f.value is None and f.enough is False for f in sparse.values())
    assert sparse["download_p5_kbps"].samples == 1
    assert cell["2026-H1", "Lombardia", "FWA"]["delay_mean_ms"].samples == 0


def test_year_is_computed_not_merged(store: Store) -> None:
    """The year's p5 is the p5 of the year's speeds, which no mean of the semesters'
    gives (here the halves' speeds differ by 10 Mbit/s)."""
    _fill(store)
    rows, _ = _gather(store, YEAR)
    p5 = {r.period: next(f for f in r.figures if f.id == "download_p5_kbps").value
          for r in rows if (r.region, r.technology) == ("Lazio", "FTTH")}
    h1, h2, year = p5["2026-H1"], p5["2026-H2"], p5["2026"]
    assert h1 is not None and h2 is not None and year is not None
    assert year != pytest.approx((h1 + h2) / 2) and min(h1, h2) <= year <= max(h1, h2)


def test_a_clipped_scope_is_said(store: Store) -> None:
    """A scope inside one year: its semesters and year are clipped to it (the CSV says
    from when to when), and a scope with an open end is refused."""
    _fill(store)
    where = resolve_scope(None, "2026-03-01", "2026-10-01")
    rows, _ = _gather(store, where)
    assert {(r.period, r.since, r.until) for r in rows} == {
        ("2026-H1", where.since, "2026-07-01T00:00:00.000000Z"),
        ("2026-H2", "2026-07-01T00:00:00.000000Z", where.until),
        ("2026", where.since, where.until)}
    from collector.errors import BadParameter

    with pytest.raises(BadParameter, match="period: the semester layout needs a period"):
        _gather(store, resolve_scope(None, "2026-03-01", None))


class Tables(HTMLParser):
    """Each <table class=semester>'s period and cells (text per row)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.current: list[list[str]] | None = None
        self.cell: list[str] | None = None
        self.dts: list[str] = []
        self.in_dt = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("class") == "semester":
            self.current = self.tables.setdefault(a["data-period"] or "", [])
        elif tag == "tr" and self.current is not None:
            self.current.append([])
        elif tag in ("td", "th") and self.current is not None:
            self.cell = []
        self.in_dt = tag == "dt"

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.current = None
        elif tag in ("td", "th") and self.current is not None and self.cell is not None:
            self.current[-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)
        if self.in_dt:
            self.dts.append(data)
            self.in_dt = False


def test_csv_and_html(store: Store) -> None:
    """The CSV: kbit/s, ratios 0-1, UTC times, an empty figure with enough_data false
    where not enough data. The page: a table per period in order, rows by region then
    technology, Mbit/s with the interval, n.d. where the CSV is empty, and the method."""
    _fill(store)
    rows, sample = _gather(store, YEAR)
    parsed = list(csv.DictReader(io.StringIO(semester.to_csv(rows))))
    header = semester.to_csv([]).strip().split(",")
    assert header[:8] == ["region", "technology", "period", "scope_since", "scope_until",
                          "scope_family", "probes", "sessions"]
    assert header[8:14] == ["download_p5_kbps", "download_p5_ci95_low_kbps",
                            "download_p5_ci95_high_kbps", "download_p5_ci_method",
                            "download_p5_samples", "download_p5_enough_data"]
    assert "loss_ci95_high_ratio" in header and "jitter_mean_enough_data" in header
    by_key = {(p["period"], p["region"], p["technology"]): p for p in parsed}
    rich = next(r for r in rows if (r.period, r.region, r.technology) ==
                ("2026-H2", "Lazio", "FTTH"))
    f = {x.id: x for x in rich.figures}
    line = by_key["2026-H2", "Lazio", "FTTH"]
    assert line["scope_since"] == "2026-07-01T00:00:00Z"
    assert float(line["download_p95_kbps"]) == f["download_p95_kbps"].value
    assert float(line["download_p95_ci95_low_kbps"]) == f["download_p95_kbps"].low
    assert line["download_p95_samples"] == "120" and line["download_p95_enough_data"] == "true"
    assert "order statistics" in line["download_p95_ci_method"]
    sparse = by_key["2026-H2", "Lombardia", "FWA"]
    assert (sparse["download_p5_kbps"], sparse["download_p5_ci95_low_kbps"],
            sparse["download_p5_samples"], sparse["download_p5_enough_data"]) == (
        "", "", "1", "false")

    page = Tables()
    page.feed(semester.render(rows, YEAR, sample, "2027-01-02T10:00:00.000000Z"))
    assert list(page.tables) == ["2026-H1", "2026-H2", "2026"]
    h2 = page.tables["2026-H2"]
    assert h2[0][:4] == ["Region", "Technology", "Probes", "Sessions"]
    assert h2[0][4] == "Download, banda minima (p5), Mbit/s"
    body = h2[2:]
    assert [r[:2] for r in body] == [["Lazio", "FTTH"], ["Lazio", "FWA"],
                                     ["Lombardia", "FTTH"], ["Lombardia", "FWA"]]
    p95 = f["download_p95_kbps"]
    assert p95.value is not None and p95.low is not None and p95.high is not None
    # Columns: 4, then value, interval, n per figure; download p95 is the second.
    assert body[0][7:10] == [f"{p95.value / 1000:.2f}",
                             f"[{p95.low / 1000:.2f}, {p95.high / 1000:.2f}]", "120"]
    assert body[0][3] == "6"
    assert body[3][4:7] == ["n.d.", "", "1"]
    assert "minimum-sample rule" in page.dts and "ci95" in page.dts


def test_no_interval_is_not_a_rule_applied() -> None:
    """An indicator without an interval (a caller before intervals existed) keeps its
    value with no interval and enough_data unknown; names are escaped on the page."""
    from collector.compliance.evaluate import evaluate, observe

    report = evaluate(observe([session("p1")]), TABLE)
    bare = replace(report, indicators=tuple(replace(i, interval=None)
                                            for i in report.indicators))
    f = semester.figure(bare, "download_p5_kbps")
    i: IndicatorResult = next(x for x in report.indicators if x.id == "download_p5_kbps")
    assert (f.value, f.low, f.high, f.enough, f.samples) == (i.observed, None, None, None, 1)
    assert semester.figure(report, "download_p5_kbps").value is None  # the rule: n.d.
    row = semester.row({"region": "<b>Lazio</b>", "technology": "FTTH", "semester": "2026-H1"},
                       Scope(("p1",), "2026-01-01T00:00:00.000000Z",
                             "2026-07-01T00:00:00.000000Z"), bare, "2026-H1")
    page = semester.render([row], YEAR, bare, "2027-01-02T10:00:00.000000Z")
    assert "<b>Lazio" not in page and "&lt;b&gt;Lazio&lt;/b&gt;" in page
    parser = Tables()
    parser.feed(page)
    assert parser.tables["2026-H1"][2][4:7] == [f"{(i.observed or 0) / 1000:.2f}", "—", "1"]


def test_cli_layout_semester(tmp_path: Path) -> None:
    """report --layout semester: csv to stdout, html to its default file; refused in one
    line without a csv/html format, with --by, with customer tests, or with no period."""
    db = tmp_path / "c.sqlite3"
    opened = open_store(StorageConfig(path=str(db)))
    try:
        _fill(opened)
    finally:
        opened.close()
    base = ["--db", str(db), "report", "--layout", "semester"]
    run = CliRunner().invoke
    out = run(main, [*base, "--period", "2026", "--format", "csv"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == ",".join(semester.COLUMNS) and len(lines) == 13
    csv_out = out.output
    target = tmp_path / "tables.html"
    out = run(main, [*base, "--period", "2026-H2", "--region", "lazio", "--format", "html",
                     "-o", str(target)])
    assert out.exit_code == 0, out.output
    page = Tables()
    page.feed(target.read_text(encoding="utf-8"))
    assert list(page.tables) == ["2026-H2", "2026"]
    assert [r[:2] for r in page.tables["2026"][2:]] == [["Lazio", "FTTH"], ["Lazio", "FWA"]]
    # No --format: CSV (the layout has no text form), as the API does.
    default = run(main, [*base, "--period", "2026"])
    assert default.exit_code == 0 and default.output == csv_out
    for extra, words in ((["--format", "text"],
                          "format: the semester layout is csv or html, got text"),
                         (["--format", "json"], "got json"),
                         (["--format", "csv", "--by", "region"], "by: the semester layout"),
                         (["--format", "csv", "--include-customer"], "include_customer:")):
        refused = run(main, [*base, "--period", "2026", *extra])
        assert refused.exit_code == 2 and words in refused.output
        assert refused.output.count("\n") == 1
    open_ended = run(main, [*base, "--since", "2026-01-01", "--format", "csv"])
    assert open_ended.exit_code == 2 and "needs a period" in open_ended.output


def test_api_layout_semester(tmp_path: Path) -> None:
    """/api/v1/report?layout=semester: CSV (also when no format is given) and HTML; a
    layout it does not know, json, or by is a 400 naming the parameter."""
    with running_collector(tmp_path) as c:
        opened = c.open_store()
        try:
            _fill(opened)
        finally:
            opened.close()
        url = c.url + "/api/v1/report?period=2026&layout=semester"
        status, body, headers = request("GET", url + "&format=csv", raw=True)
        assert status == 200 and headers["content-type"].startswith("text/csv")
        assert body.decode().splitlines()[0] == ",".join(semester.COLUMNS)
        status, body, _ = request("GET", url + "&format=html&region=Lombardia", raw=True)
        page = Tables()
        page.feed(body.decode())
        assert status == 200 and list(page.tables) == ["2026-H1", "2026-H2", "2026"]
        base = c.url + "/api/v1/report?period=2026"
        # No format: CSV (the layout has no JSON, the API's default).
        status, body, headers = request("GET", url, raw=True)
        assert status == 200 and headers["content-type"].startswith("text/csv")
        assert body.decode().splitlines()[0] == ",".join(semester.COLUMNS)
        for query, field in (("&layout=annual&format=csv", "layout"),
                             ("&layout=semester&format=json", "format"),
                             ("&layout=semester&format=csv&by=region", "by")):
            status, reply, _ = request("GET", base + query)
            assert status == 400 and reply["field"] == field, reply


def test_the_delay_is_named_for_what_the_table_judges(store: Store) -> None:
    """A targets table judging the round trip (delay_basis "rtt") gets a round-trip
    column, the default (RTT / 2) a one-way one: the names the compliance report gives."""
    _fill(store)
    rtt = replace(TABLE, options=replace(TABLE.options, delay_basis="rtt"))
    for table, want in ((TABLE, "One-way delay (RTT / 2), mean, ms"),
                        (rtt, "Round-trip time, mean, ms")):
        rows, sample = semester.gather(YEAR, lambda scope, by, t=table: service.breakdown(
            store, scope, t, by))
        page = Tables()
        page.feed(semester.render(rows, YEAR, sample, "2027-01-02T10:00:00.000000Z"))
        heads = page.tables["2026"][0]
        assert heads[4 + semester.FIGURES.index("delay_mean_ms")] == want
        assert sum("delay" in h.lower() or "round-trip" in h.lower() for h in heads) == 1


def test_small_ratios_read_without_an_exponent() -> None:
    """Ratios in % to three significant digits in positional notation: a loss of 1.2e-7
    is 0.000012 %, never "1.2e-05"; below 1e-6 % the page says so."""
    assert [semester.number(v, "ratio") for v in (1.2e-7, 0.0123, 0.005, 0.0, 1.0,
                                                  0.123456, 1e-11)] == [
        "0.000012", "1.23", "0.5", "0", "100", "12.3", "< 0.000001"]
    tiny = semester.Figure("loss_ratio", "ratio", 1.2e-7, 1e-8, 4.5e-7, 5000, True, "Wilson")
    row = semester.Row("Lazio", "FTTH", "2026", "2026-01-01T00:00:00.000000Z",
                       "2027-01-01T00:00:00.000000Z", None, 1, 40, (tiny,))
    page = Tables()
    page.feed(semester.render([row], YEAR, None, "2027-01-02T10:00:00.000000Z"))
    assert page.tables["2026"][2][4:7] == ["0.000012", "[0.000001, 0.000045]", "5,000"]
