"""The fleet view says what matters: a suppressed probe is shown so, with the window's
reason and end; each row links to the probe's report and certificate; the columns have
a legend; the instruction is a readable summary (the hash a tooltip and a short
secondary); durations read as people say them; and one key, [fleet] silent_after_s,
sets who is silent for the view and the alert alike. Real collector on 127.0.0.1."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent import spec
from agent.schema import SCHEMA_VERSION, format_utc, utc_now
from collector.cli.main import main
from collector.config import AlertsConfig, load
from collector.errors import ConfigError
from collector.fleet import control
from collector.fleet.rules import Selector
from collector.fleet.view import elapsed
from collector.lines import LineMetadata
from collector.server.testing import running_collector
from tests.factories import session_dict
from tests.httpclient import post_json, request

ROOT = Path(__file__).resolve().parents[2]
OLD_VERSION = "0123456789abcdef"


def _health(**changes: object) -> dict[str, object]:
    now = datetime.now(UTC)
    doc: dict[str, object] = {
        "schema_version": SCHEMA_VERSION, "agent_version": "0.1.0", "reported_at": utc_now(),
        "mode": "daemon", "instruction_version": OLD_VERSION, "instruction_error": None,
        "campaign": {"rule": "96in24h", "started_at": format_utc(now - timedelta(hours=5)),
                     "deadline_at": format_utc(now + timedelta(days=2)), "bands_filled": 5,
                     "sessions_counted": 20, "sessions_needed": 96, "complete": False,
                     "sessions_suppressed": 0},
        "spool_results": 0, "spool_bytes": 0, "dead_letters": 0, "gaps_waiting": 0,
        "dropped_total": 0, "clock": None, "last_error": None, "failing_checks": [],
        "suppressed_until": None, "next_session_at": None}
    doc.update(changes)
    return doc


def test_durations_read_as_people_say_them() -> None:
    """63 s is "1 min 3 s", never "0.0 h"; hours for long ones, days for longer."""
    assert [elapsed(s) for s in (0.4, 45, 63, 120, 3599, 3600, 15_120, 86_400 + 60,
                                 3 * 86_400 + 4 * 3600 + 59)] == [
        "0 s", "45 s", "1 min 3 s", "2 min", "59 min 59 s", "1 h", "4 h 12 min",
        "24 h 1 min", "3 days 4 h"]


def test_the_fleet_view_shows_suppression_links_legend_and_a_readable_instruction(
        tmp_path: Path) -> None:
    """p1 reports, runs an older instruction and has 5 bands of its campaign; p2 is in
    a suppression window now ("router swap"). JSON, CSV, the page and the CLI say so."""
    with running_collector(tmp_path) as c:
        token = c.add_probe("p1", LineMetadata(operator="OpX", region="Lazio"))
        c.add_probe("p2", LineMetadata(operator="OpX", region="Lazio"))
        now = datetime.now(UTC)
        store = c.open_store()
        try:
            control.set_instruction(store, Selector(), {"ping.count": 12})
            window = control.add_window(store, Selector(probe="p2"),
                                        format_utc(now - timedelta(hours=1)),
                                        format_utc(now + timedelta(hours=2)), "router swap")
        finally:
            store.close()
        assert post_json(c.url + spec.HEALTH_PATH, _health(), token)[0] == 200
        recent = session_dict(probe_id="p1", started_at=utc_now())
        recent["ended_at"] = recent["started_at"]
        assert post_json(c.url + spec.RESULTS_PATH, recent, token)[0] == 201

        status, doc, _ = request("GET", c.url + "/api/v1/fleet")
        assert status == 200
        rows = {r["probe_id"]: r for r in doc["probes"]}
        p1, p2 = rows["p1"], rows["p2"]
        assert p1["instruction_summary"] == "ping.count = 12 (--all)"
        assert p1["instruction_settings"] == {"ping.count": {"value": 12, "rule": "--all"}}
        assert p1["instruction_current"] is False and p1["suppressed"] is False
        assert p2["instruction_summary"] == "ping.count = 12 (--all); 1 suppression window"
        assert (p2["suppressed"], p2["suppression_reason"], p2["suppressed_until"]) == (
            True, "router swap", window.ends_at)
        assert doc["summary"]["suppressed"] == 1

        status, text, _ = request("GET", c.url + "/api/v1/fleet?format=csv")
        table = {r["probe_id"]: r for r in csv.DictReader(io.StringIO(text.decode()))}
        assert table["p2"]["suppressed"] == "true"
        assert table["p2"]["suppression_reason"] == "router swap"
        assert table["p1"]["instruction_summary"] == "ping.count = 12 (--all)"

        status, page, _ = request("GET", c.url + "/fleet")
        html = page.decode()
        assert status == 200
        # Each row links to the probe's report and certificate (relative: behind a proxy).
        assert '<a href="report?probe=p1">p1</a>' in html
        assert 'href="api/v1/certificate?probe=p2&amp;format=html">certificate</a>' in html
        # The suppressed probe is marked and says until when and why.
        p2_row = html.split('data-probe="p2"', 1)[1].split("</tr>", 1)[0]
        assert html.count('class="silent suppressed"') == 1  # p2: never seen, suppressed
        until = window.ends_at[:16].replace("T", " ")
        assert f"suppressed until {until} UTC (router swap)" in p2_row
        # The instruction: its summary, the version a tooltip and a short secondary, and
        # that p1 still runs an older one.
        p1_row = html.split('data-probe="p1"', 1)[1].split("</tr>", 1)[0]
        assert "ping.count = 12 (--all) (not applied yet: runs 01234567)" in p1_row
        assert f'title="version {OLD_VERSION}' in p1_row and "<small>01234567</small>" in p1_row
        assert "5/24" in p1_row and "% of 1" in p1_row
        # The legend explains every column.
        legend = html.split('<dl id="legend">', 1)[1].split("</dl>", 1)[0]
        for column in ("last seen", "agent", "instruction", "backlog", "bands", "valid",
                       "state"):
            assert f"<dt>{column}</dt>" in legend, column
        assert "of the 24 a campaign fills" in legend
        assert "received in the last 7 days that are valid" in legend
        assert "1</strong>\nsuppressed" in html

        done = CliRunner().invoke(main, ["--db", str(c.db_path), "fleet"],
                                  catch_exceptions=False)
        assert done.exit_code == 0, done.stderr
        out = done.stdout
        assert f"suppressed until {until} UTC (router swap)" in out
        assert "ping.count = 12 (--all) (not applied yet: runs 01234567)" in out
        assert "1 suppressed" in out and "(no report or result for over 3 h)" in out
        assert "bands: hour bands of the running campaign" in out
        assert " s ago" in out  # p1 was seen seconds ago, in seconds, not "0.0 h"


def test_one_silence_key(tmp_path: Path) -> None:
    """[fleet] silent_after_s sets the threshold. The former [alerts] one is still read
    (an upgrade must not stop the collector: check-config is the units' ExecStartPre),
    with one warning line naming [fleet] silent_after_s, as that threshold when [fleet]
    does not set it; both set to different values are refused naming both (only the
    operator knows which was meant)."""
    moved = tmp_path / "moved.toml"
    moved.write_text("[alerts]\nenabled = true\nsilent_after_s = 600.0\n")
    warned: list[str] = []
    cfg = load(moved, warn=warned.append)
    assert (cfg.fleet.silent_after_s, cfg.alerts.enabled) == (600.0, True)
    assert warned == [f"{moved}: alerts.silent_after_s is deprecated: set [fleet] "
                      "silent_after_s instead (read as fleet.silent_after_s = 600.0)"]
    # Every command prints it once on stderr, and check-config passes.
    done = CliRunner().invoke(main, ["--config", str(moved), "check-config"])
    assert done.exit_code == 0, done.stderr
    assert done.stderr == f"bbprobe-collector: warning: {warned[0]}\n"
    same = tmp_path / "same.toml"
    same.write_text("[alerts]\nsilent_after_s = 600\n[fleet]\nsilent_after_s = 600.0\n")
    assert load(same, warn=warned.append).fleet.silent_after_s == 600.0
    both = tmp_path / "both.toml"
    both.write_text("[alerts]\nsilent_after_s = 3600\n[fleet]\nsilent_after_s = 10800.0\n")
    message = (f"{both}: alerts.silent_after_s = 3600 and fleet.silent_after_s = 10800.0 "
               "differ, and one threshold now says who is silent (fleet view, /metrics, "
               "probe_silent alert): keep the value you mean in [fleet] and delete "
               "alerts.silent_after_s")
    with pytest.raises(ConfigError) as refused:
        load(both, warn=warned.append)
    assert str(refused.value) == message
    done = CliRunner().invoke(main, ["--config", str(both), "check-config"])
    assert (done.exit_code, done.stderr) == (2, f"bbprobe-collector: {message}\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[alerts]\nsilent_after_s = -1\n")
    with pytest.raises(ConfigError) as refused:
        load(bad, warn=warned.append)
    assert str(refused.value) == f"{bad}: alerts.silent_after_s: must be > 0, got -1"
    kept = tmp_path / "kept.toml"
    kept.write_text("[fleet]\nsilent_after_s = 600.0\n")
    assert load(kept).fleet.silent_after_s == 600.0
    assert not hasattr(AlertsConfig(), "silent_after_s")
    example = (ROOT / "configs" / "collector.example.toml").read_text()
    alerts_section = example.split("\n[alerts]\n", 1)[1]
    assert "silent_after_s =" not in alerts_section.split("\n[", 1)[0]
