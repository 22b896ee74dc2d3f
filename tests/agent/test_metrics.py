"""The agent's Prometheus metrics: what they say of a session and a health
report, read back with prometheus-client's parser; the textfile written whole; the
config refusing what node_exporter or a socket would not take."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import config, instruction
from agent import metrics as m
from agent.errors import ConfigError
from agent.schema import SCHEMA_VERSION, CampaignState, ClockState, HealthReport
from tests import factories


def parsed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


REPORT = HealthReport(
    schema_version=SCHEMA_VERSION, agent_version="test",
    reported_at="2026-11-21T10:05:00.000000Z", mode="daemon", instruction_version=None,
    instruction_error=None,
    campaign=CampaignState(rule="96in24h", started_at="2026-11-21T00:00:00.000000Z",
                           deadline_at="2026-11-24T00:00:00.000000Z", bands_filled=3,
                           sessions_counted=14, sessions_needed=96, complete=False,
                           sessions_suppressed=2),
    spool_results=4, spool_bytes=90_000, dead_letters=1, gaps_waiting=0, dropped_total=7,
    clock=ClockState(synchronized=False, max_error_ms=None, source="adjtimex"),
    last_error=None, failing_checks=("wifi", "cpu_busy"), suppressed_until=None,
    next_session_at="2026-11-21T10:15:00.000000Z")


def test_session_and_report_figures() -> None:
    """The agent's exposition counts sessions by outcome (complete, invalid, incomplete), gives
    the last session's own summary (median download of the successful tests, RTT mean,
    jitter, loss) in base units, and the health report's spool, clock, campaign and check
    figures."""
    state = m.AgentMetrics("9.9", sessions={})
    result = factories.session(
        "roma-01", rtts=(10.0, 14.0, None, 12.0),
        transfers=[factories.attempt("download", bps=80e6),
                   factories.attempt("download", 1, bps=100e6),
                   factories.attempt("download", 2, bps=30e6),
                   factories.attempt("upload", bps=20e6)])
    state.session(result)
    state.session(factories.session("roma-01", invalid=["wifi"]))
    state.session(factories.session("roma-01", transfers=[
        factories.attempt("download"), factories.attempt("upload", ok=False)]))
    state.session(replace(result, ping=None))  # no ping train in the method: complete
    state.session(result)
    state.report = REPORT
    got = parsed(m.exposition(state).decode())
    assert got[("bbprobe_agent_info", (("probe", "roma-01"), ("version", "9.9")))] == 1
    assert got[("bbprobe_agent_sessions_total", (("outcome", "complete"),))] == 3
    assert got[("bbprobe_agent_sessions_total", (("outcome", "invalid"),))] == 1
    assert got[("bbprobe_agent_sessions_total", (("outcome", "incomplete"),))] == 1
    # The result's own summary: median of the successful tests (80 of 80, 100, 30; the
    # mean would be 70), RTT mean, jitter from the same train (mean |difference| of
    # consecutive answered RTTs), loss.
    assert got[("bbprobe_agent_last_session_download_bytes_per_second", ())] == \
        pytest.approx(80e6 / 8)
    assert got[("bbprobe_agent_last_session_upload_bytes_per_second", ())] == \
        pytest.approx(20e6 / 8)
    assert got[("bbprobe_agent_last_session_rtt_seconds", ())] == pytest.approx(0.012)
    assert got[("bbprobe_agent_last_session_jitter_seconds", ())] == pytest.approx(0.003)
    assert got[("bbprobe_agent_last_session_loss_ratio", ())] == pytest.approx(0.25)
    assert got[("bbprobe_agent_spool_results", ())] == 4
    assert got[("bbprobe_agent_dead_letters", ())] == 1
    assert got[("bbprobe_agent_spool_dropped_total", ())] == 7
    assert got[("bbprobe_agent_clock_synchronized", ())] == 0
    assert got[("bbprobe_agent_campaign_bands_filled", ())] == 3
    assert got[("bbprobe_agent_campaign_sessions_suppressed", ())] == 2
    assert got[("bbprobe_agent_host_check_failing", (("check", "wifi"),))] == 1
    assert got[("bbprobe_agent_host_check_failing", (("check", "cpu_busy"),))] == 1
    assert got[("bbprobe_agent_next_session_timestamp_seconds", ())] == \
        datetime(2026, 11, 21, 10, 15, tzinfo=UTC).timestamp()


def test_a_one_shot_run_counts_nothing_and_a_fresh_daemon_shows_only_what_it_knows() -> None:
    """A one-shot run exports the last session but no session counter; a daemon before its first
    session exports only its info and the (zero) counter."""
    run = m.AgentMetrics("9.9")
    run.session(factories.session("p1"))
    names = {name for name, _ in parsed(m.exposition(run).decode())}
    assert "bbprobe_agent_sessions_total" not in names
    assert "bbprobe_agent_last_session_valid" in names
    fresh = parsed(m.exposition(m.AgentMetrics("9.9", sessions={})).decode())
    assert {n for n, _ in fresh} == {"bbprobe_agent_info", "bbprobe_agent_sessions_total"}


def test_textfile_is_written_whole(tmp_path: Path) -> None:
    """Whole (no temp file left) and readable by node_exporter's user under the unit's
    UMask=0077."""
    path = tmp_path / "collector" / "bbprobe.prom"
    state = m.AgentMetrics("9.9", sessions={})
    state.session(factories.session("p1"))
    old = os.umask(0o077)
    try:
        m.write_textfile(str(path), state)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    state.session(factories.session("p1"))
    m.write_textfile(str(path), state)
    assert [p.name for p in path.parent.iterdir()] == ["bbprobe.prom"]
    assert parsed(path.read_text())[("bbprobe_agent_sessions_total",
                                     (("outcome", "complete"),))] == 2


def test_config_checks_and_no_central_control() -> None:
    """metrics.textfile must end in .prom (node_exporter reads only those) and metrics.listen
    must be HOST:PORT with a valid port; a central instruction cannot set metrics.listen."""
    ok = config.parse({"metrics": {"textfile": "/var/lib/x/bbprobe.prom",
                                   "listen": "[::1]:9465"}})
    assert ok.metrics.listen == "[::1]:9465"
    with pytest.raises(ConfigError, match=r"metrics\.textfile: node_exporter reads only"):
        config.parse({"metrics": {"textfile": "/var/lib/x/bbprobe.txt"}})
    for bad in ("9465", "::1:9465", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match=r"metrics\.listen"):
            config.parse({"metrics": {"listen": bad}})
    # An instruction cannot open a port on a probe, nor move its files.
    with pytest.raises(instruction.InstructionError, match=r"metrics\.listen"):
        instruction.check({"metrics.listen": "0.0.0.0:9465"})
