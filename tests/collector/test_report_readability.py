"""A report and a certificate of one line say what each judges, against which targets,
with which statistic and over what coverage, and point at each other; the front page
answers per line "does it meet its contract?"; pages read as MisuraInternet's do (Mbit/s,
local time to the second beside local bands, sessions counted as sessions) and plots
count in whole numbers with every label inside the plot. A real collector on 127.0.0.1
with its SQLite file; one headless Chromium check (slow)."""

from __future__ import annotations

import json
import re
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urljoin

import pytest
from click.testing import CliRunner

from agent.schema import format_utc
from collector.cli.main import main
from collector.lines import LineMetadata
from collector.reports import plots
from collector.server.testing import RunningCollector
from tests.browser import render_in_chromium
from tests.factories import attempt, session, store_result
from tests.httpclient import request

CONTRACT = LineMetadata(operator="BT Italia", download_min_kbps=20_000,
                        upload_min_kbps=2_000, max_delay_ms=30, max_loss_ratio=0.01)
SEVEN_AT = datetime(2026, 1, 15, 13, 0, tzinfo=UTC)  # 14:00 in Rome


def _seven_in_ten_minutes(collector: RunningCollector, probe: str = "p1") -> None:
    """The analyst's line: 7 sessions taken within 10 minutes."""
    collector.add_probe(probe, CONTRACT)
    with closing(collector.open_store()) as store:
        for i in range(7):
            store_result(store, session(probe, started_at=format_utc(
                SEVEN_AT + timedelta(seconds=90 * i)), rtts=[20.0, 21.0, 22.0],
                transfers=[attempt("download", bps=95e6), attempt("upload", bps=9.5e6)]))


def _full_day(collector: RunningCollector, probe: str, up_bps: float = 9.5e6) -> None:
    """96 sessions, 4 in every Rome hour band."""
    collector.add_probe(probe, CONTRACT)
    midnight = datetime(2026, 1, 14, 23, 0, tzinfo=UTC)
    with closing(collector.open_store()) as store:
        for i in range(96):
            store_result(store, session(probe, started_at=format_utc(
                midnight + timedelta(minutes=15 * i)), rtts=[20.0, 21.0, 22.0],
                transfers=[attempt("download", bps=95e6), attempt("upload", bps=up_bps)]))


def _cli(collector: RunningCollector, *args: str) -> str:
    result = CliRunner().invoke(main, ["--db", str(collector.db_path), *args])
    assert result.exit_code == 0, result.output
    return result.output


def _get(url: str) -> str:
    status, body, _ = request("GET", url, raw=True)
    assert status == 200, (url, status)
    return body.decode()


def test_report_warns_on_thin_coverage_and_names_what_it_judges(
        collector: RunningCollector) -> None:
    """7 sessions within 10 minutes: the report still judges (its method is the
    standard's) but says it covers 1 of 24 hour bands, that the verdict holds for those
    hours only, what it judges (generic targets, the mean one-way delay) and where the
    line's contract is judged; the JSON says the same."""
    _seven_in_ten_minutes(collector)
    text = _cli(collector, "report", "--probe", "p1")
    flat = " ".join(text.split())
    assert "7 sessions within one hour (2026-01-15 14:00 to 2026-01-15 15:00 CET), in 1 " \
        "of 24 local hour bands (Europe/Rome). WARNING: too little to represent" in flat
    assert "on sessions in 1 of 24 hour bands only, see Coverage" in flat
    assert "operator's generic Allegato 2 figures, not a line's contract" in flat
    assert "delay on the mean one-way delay (RTT / 2)" in flat
    assert "`bbprobe-collector certify --probe p1`" in flat
    assert "One-way delay (RTT / 2), mean" in text
    doc = json.loads(_cli(collector, "report", "--probe", "p1", "--format", "json"))
    assert doc["coverage"]["bands"] == [14] and doc["coverage"]["representative"] is False
    assert doc["coverage"]["sessions"] == 7

    cert = _cli(collector, "certify", "--probe", "p1")
    flat = " ".join(cert.split())
    assert "delay on the 95th percentile of the round-trip time (RTT)" in flat
    assert "`bbprobe-collector report --probe p1`" in flat
    assert "Ritardo massimo: percentile 95% del tempo di andata e ritorno (RTT)" in cert


def test_a_full_day_has_no_coverage_warning(collector: RunningCollector) -> None:
    _full_day(collector, "p2")
    text = _cli(collector, "report", "--probe", "p2")
    flat = " ".join(text.split())
    assert "in 24 of 24 local hour bands" in flat and "WARNING" not in text


def test_pages_link_each_other_and_the_front_page_answers_per_line(
        collector: RunningCollector) -> None:
    """Served pages: the report links the line's certificate and the certificate the
    line's report (relative links that resolve from where each is served); the front
    page answers per line with the certificate's verdict and links it."""
    _seven_in_ten_minutes(collector, "thin")
    _full_day(collector, "slow-up", up_bps=1e6)  # upload p5 1 < 2 Mbit/s guaranteed
    _full_day(collector, "good")
    for path in ("/report?probe=thin", "/api/v1/report?probe=thin&format=html"):
        page = _get(collector.url + path)
        assert 'class="coverage warning"' in page
        href = re.search(r'<a href="([^"]*certificate[^"]*)">the certificate of thin', page)
        assert href is not None
        target = urljoin(collector.url + path, href.group(1).replace("&amp;", "&"))
        cert = _get(target)
        assert "What this certificate judges" in cert
        back = re.search(r'<a href="([^"]*)">Allegato 2 compliance report</a>', cert)
        assert back is not None
        assert "What this report judges" in _get(urljoin(target, back.group(1)))
    front = _get(collector.url + "/")
    rows = {name: row for name, row in re.findall(r'<tr><td><a href="report\?probe=([^"]+)"'
                                                  r'(.*?)</tr>', front)}
    assert "INCOMPLETE, no verdict yet: 1 of 24 bands filled" in rows["thin"]
    assert "BREACH: upload_p5_kbps" in rows["slow-up"]
    assert "NO BREACH: meets it" in rows["good"]
    assert 'href="api/v1/certificate?probe=good&amp;format=html"' in rows["good"]


def test_human_pages_use_mbits_local_time_and_count_sessions(
        collector: RunningCollector) -> None:
    """Speeds in Mbit/s (two decimals), certificate times in Europe/Rome to the second,
    and a session that gave one reason twice counted once, on the day-rollup path (whole
    days) and the session path (part of a day) alike."""
    _seven_in_ten_minutes(collector)
    with closing(collector.open_store()) as store:
        store_result(store, session("p1", started_at=format_utc(SEVEN_AT + timedelta(
            minutes=30)), invalid=["cross_traffic", "cross_traffic"]))
    page = _get(collector.url + "/report?probe=p1")
    cert = _get(collector.url + "/api/v1/certificate?probe=p1&format=html")
    for html in (page, cert):
        assert "kbit/s" not in html and "95.00 Mbit/s" in html
    assert "2026-01-15 14:00:00 CET" in cert
    assert not re.search(r"\d\d:\d\d:\d\d\.\d{6}", cert)
    for since, until in (("2026-01-15", "2026-01-16"), ("2026-01-15T12:00:00Z", None)):
        args = ["report", "--probe", "p1", "--since", since, *(["--until", until]
                                                              if until else [])]
        text = _cli(collector, *args)
        assert "1 session flagged invalid (reasons: cross_traffic in 1 session)" in text
        doc = json.loads(_cli(collector, *args, "--format", "json"))
        assert doc["invalid"]["reasons"] == {"cross_traffic": 1}


def _svg_texts(svg: str) -> list[tuple[float, str, str]]:
    return [(float(x), anchor, label) for x, anchor, label in re.findall(
        r'<text class="tick" x="([\d.]+)" y="[\d.]+" text-anchor="(\w+)">([^<]*)</text>',
        svg)]


def test_count_axes_are_whole_numbers_and_tick_labels_stay_inside() -> None:
    """A histogram of 7 tests ticks 0, 1, 2 (never 0.5 tests); a time axis's last label
    at the plot's right edge is anchored inside it."""
    svg = plots.histogram("h", "seven tests", [95.0, 95.5, 104.5, 114.0, 123.5, 133.0, 95.0],
                          "Mbit/s")
    y_labels = [label for x, anchor, label in _svg_texts(svg) if anchor == "end"
                and x < plots.LEFT + 1]
    assert y_labels and all(re.fullmatch(r"\d+", label) for label in y_labels)
    assert plots.nice_ticks(0, 3, 4, integer=True) == [0, 1, 2, 3]
    line = plots.lines_plot("t", "time", [plots.Series("s", ((0.0, 1.0), (100.0, 2.0)),
                                                       "#000")], "x", "y",
                            xticks=[0.0, 50.0, 100.0], xfmt=lambda v: f"{v:.0f} Feb")
    for x, anchor, label in _svg_texts(line):
        half = plots.CHAR_PX * len(label)
        left = {"start": x, "middle": x - half / 2, "end": x - half}[anchor]
        assert left >= 0 and left + half <= plots.WIDTH, (label, anchor, x)


@pytest.mark.slow
def test_chromium_finds_no_label_cut_by_a_plot(collector: RunningCollector,
                                                tmp_path: Path) -> None:
    """Laid out by a real browser: no text of any plot falls outside its viewBox (the
    page's own check), over a span of three weeks (daily ticks to the right edge)."""
    collector.add_probe("p1", CONTRACT)
    start = datetime(2026, 1, 15, 4, 0, tzinfo=UTC)
    with closing(collector.open_store()) as store:
        for i in range(90):
            store_result(store, session("p1", started_at=format_utc(
                start + timedelta(hours=6 * i)), rtts=[18.0 + i % 5, None if i % 7 else 19.0],
                transfers=[attempt("download", bps=940e6), attempt("upload", bps=94e6)]))
    dom = render_in_chromium(collector.url + "/report?probe=p1", tmp_path)
    clipped = re.findall(r'data-clipped-labels="([^"]*)"', dom)
    assert len(clipped) == 6 and not any(clipped), clipped


def test_front_page_certifies_lines_within_a_session_budget(
        collector: RunningCollector) -> None:
    """A big fleet's front page stays quick: past the budget of sessions read, lines
    link to their certificate unanswered, saying so."""
    from collector.reports import html, service

    _full_day(collector, "a-line")
    _full_day(collector, "b-line")
    with closing(collector.open_store()) as store:
        answers = service.line_answers(store, budget=96)
        assert list(answers) == ["a-line"]
        page = html.index(store.probes(), answers)
    assert "not computed on this page (a big fleet): open the certificate" in page
