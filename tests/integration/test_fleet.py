"""A fleet run from the collector, with real processes: ``bbprobe-collector
serve`` and its CLI, the agent's daemon (``bbprobe daemon``) and one-shot runs, a
measurement-only server, and headless Chromium for the fleet page.

The daemon runs its campaign clock 900 times faster than real time (``--time-scale``, a
hidden lab option: a quarter hour lasts one second), so slots come every second or so;
its measurements and timestamps stay real.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.schema import SCHEMA_VERSION, parse_utc
from collector.server.testing import serve_process
from tests.browser import render_in_chromium
from tests.httpclient import request

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # daemons on a sped-up clock, real processes, Chromium


def _collector(db: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "collector", "--db", str(db), *args],
                          check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@contextmanager
def serving(tmp_path: Path, extra: str = "") -> Iterator[tuple[str, Path]]:
    """A collector process on 127.0.0.1, port 0, reads open (the Chromium test): (url,
    database)."""
    db = tmp_path / "collector.sqlite3"
    config = tmp_path / "collector.toml"
    config.write_text('[server]\nhost = "127.0.0.1"\nport = 0\nquery_auth = false\n'
                      f'\n[storage]\npath = "{db}"\n{extra}')
    _collector(db, "init")
    with serve_process(config, cwd=ROOT) as (url, server):
        yield url, db
    assert server.returncode == 0


def _agent_config(fast_config: Path, url: str, token: str) -> Path:
    path = fast_config.with_name("fleet-agent.toml")
    path.write_text(fast_config.read_text()
                    + f'\n[collector]\nurl = "{url}"\ntoken = "{token}"\n')
    return path


def _results(url: str, db: Path) -> list[dict[str, Any]]:
    """Every stored result, as the collector's CLI lists it in JSON."""
    with sqlite3.connect(db) as conn:
        ids = [r[0] for r in conn.execute("SELECT result_id FROM results ORDER BY started_at")]
    out = []
    for rid in ids:
        status, doc, _ = request("GET", url + f"/api/v1/results/{rid}")
        assert status == 200
        out.append(doc)
    return out


def _until(what: Callable[[], Any], timeout_s: float, why: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout_s:g} s: {why}")


@contextmanager
def daemon(config: Path, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(config), "daemon",
         "--time-scale", "900", "--report-every", "1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
        assert proc.returncode == 0, (tmp_path / "daemon.log").read_text()[-3000:]


def test_the_daemon_follows_instructions_and_suppressions(tmp_path: Path,
                                                          fast_config: Path) -> None:
    """An instruction set while the daemon waits is what its next session runs with (and
    records); a suppression window set centrally stops it starting sessions until the
    window ends, it says so in its health report, and it measures again after."""
    with serving(tmp_path) as (url, db):
        token = _collector(db, "probe", "add", "p1", "--region", "Lazio").strip()
        config = _agent_config(fast_config, url, token)
        with daemon(config, tmp_path):
            first = _until(lambda: _results(url, db), 90, "a first session from the daemon")
            assert first[0]["schema_version"] == SCHEMA_VERSION
            # No rules: the empty instruction, whose version every probe shares.
            empty = first[0]["instruction_version"]
            assert empty is not None and first[0]["method"]["ping"]["count"] == 5
            out = _collector(db, "instruction", "set", "--region", "Lazio",
                             "ping.count=7", "download.streams=1")
            assert "ping.count" in out
            shown = json.loads(_collector(db, "instruction", "show", "--probe", "p1",
                                          "--format", "json"))
            version = shown["version"]
            assert version != empty and shown["sources"]["ping.count"] == "--region Lazio"

            def under_new() -> list[dict[str, Any]]:
                return [r for r in _results(url, db) if r["instruction_version"] == version]

            followed = _until(under_new, 90, "a session under the new instruction")[0]
            assert followed["method"]["ping"]["count"] == 7
            assert followed["ping"]["summary"]["packets_sent"] == 7
            assert all(t["streams"] == 1 for t in followed["transfers"]
                       if t["direction"] == "download")

            # A maintenance window from now for 8 s.
            start = datetime.now(UTC)
            end = start + timedelta(seconds=8)
            _collector(db, "suppress", "--probe", "p1", "--from", start.isoformat(),
                       "--until", end.isoformat(), "--reason", "maintenance 42")
            # The window is in the store from here: the command takes a second or two to
            # start on a busy machine, and a session the daemon began meanwhile could not
            # have known of it.
            stored = datetime.now(UTC)

            def reported_suppressed() -> bool:
                status, doc, _ = request("GET", url + "/api/v1/fleet")
                return status == 200 and doc["probes"][0]["suppressed_until"] is not None

            _until(reported_suppressed, 8, "a health report naming the suppression")
            time.sleep(max(0.0, (end - datetime.now(UTC)).total_seconds()))
            after = _until(lambda: [r for r in _results(url, db)
                                    if parse_utc(r["started_at"]) >= end], 60,
                           "a session after the window")
            assert after
            started = [parse_utc(r["started_at"]) for r in _results(url, db)]
            # A session that started before the window was stored may still have been
            # running in it; none started inside it after that.
            assert not [s for s in started if stored + timedelta(seconds=0.5) <= s < end]
            campaign = json.loads((tmp_path / "state" / "campaign.json").read_text())
            assert campaign["rule"] == "96in24h"
        status, doc, _ = request("GET", url + "/api/v1/fleet")
        assert status == 200
        row = doc["probes"][0]
        assert row["probe_id"] == "p1" and row["instruction_version"] == version
        # The window over, the instruction is again the one set before it (an ended
        # window is no longer sent), and the probe reports running it.
        assert row["instruction_current"] is True
        assert row["silent"] is False and row["bands_filled"] is not None


def test_a_dead_candidate_fails_over_to_a_live_one(tmp_path: Path,
                                                   fast_config: Path) -> None:
    """Candidates given centrally: the first listed is a port nothing listens on, the
    second a measurement-only server. Both hosts answer pings equally (ties keep the
    list's order), so the dead one is tried first, passed over, and the session measures
    against the live one; the result records every candidate's RTT, the choice and the
    failover."""
    with serving(tmp_path) as (url, db):
        token = _collector(db, "probe", "add", "p1").strip()
        config = _agent_config(fast_config, url, token)
        mconf = tmp_path / "measure.toml"
        mconf.write_text('[server]\nhost = "127.0.0.1"\nport = 0\nrole = "measurement"\n')
        # A port bound but not listening: a connection to it is refused, and no other
        # process can take it while the test runs.
        with serve_process(mconf, cwd=ROOT) as (live, _), socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
            _collector(db, "instruction", "set", "--probe", "p1",
                       f"server.candidates={json.dumps([dead, live])}")
            done = subprocess.run([sys.executable, "-m", "agent", "--config", str(config),
                                   "run", "--json"], check=False, cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        chosen = result["server_selection"]
        assert [c["url"] for c in chosen["candidates"]] == [dead, live]
        assert all(c["rtt_median_ms"] is not None for c in chosen["candidates"])
        assert chosen["chosen_url"] == live and result["server"]["url"] == live
        assert [f["url"] for f in chosen["failovers"]] == [dead]
        assert "refused" in chosen["failovers"][0]["error"].lower() or \
            "failed" in chosen["failovers"][0]["error"]
        assert all(t["status"] == "ok" for t in result["transfers"])
        # As stored: the collector kept the selection with the result.
        stored = _results(url, db)[-1]
        assert stored["server_selection"] == chosen


def test_a_silent_probe_is_flagged_and_the_fleet_page_renders(tmp_path: Path,
                                                              fast_config: Path) -> None:
    """p1 reports (a run, then its health report); p2 never does. With silent_after_s =
    4, p2 is silent at once and p1 only after 4 s without word, in the API, the CLI, CSV
    and the page headless Chromium renders."""
    with serving(tmp_path, "\n[fleet]\nsilent_after_s = 4.0\n") as (url, db):
        token = _collector(db, "probe", "add", "p1", "--operator", "Op").strip()
        _collector(db, "probe", "add", "p2", "--operator", "Op")
        config = _agent_config(fast_config, url, token)
        done = subprocess.run([sys.executable, "-m", "agent", "--config", str(config),
                               "run", "--quiet"], check=False, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        status, doc, _ = request("GET", url + "/api/v1/fleet")
        rows = {r["probe_id"]: r for r in doc["probes"]}
        assert rows["p1"]["silent"] is False and rows["p2"]["silent"] is True
        assert rows["p2"]["problems"] == ["never seen"]
        assert rows["p1"]["agent_version"] and rows["p1"]["spool_results"] == 0
        assert rows["p1"]["sessions"] == 1 and rows["p1"]["validity_rate"] is not None
        assert doc["summary"]["silent"] == 1
        time.sleep(4.5)
        listed = json.loads(_collector(db, "--config", str(tmp_path / "collector.toml"),
                                       "fleet", "--format", "json"))
        assert {r["probe_id"] for r in listed["probes"] if r["silent"]} == {"p1", "p2"}
        csv_text = _collector(db, "--config", str(tmp_path / "collector.toml"), "fleet",
                              "--format", "csv")
        assert csv_text.splitlines()[0].startswith("probe_id,operator,region")
        assert len(csv_text.splitlines()) == 3
        dom = render_in_chromium(url + "/fleet", tmp_path)
        assert 'data-probe="p1"' in dom and 'data-probe="p2"' in dom
        assert dom.count('class="silent"') == 2
        assert "2</strong> silent" in dom
        status, home, _ = request("GET", url + "/")
        assert status == 200 and b'href="fleet"' in home


def test_a_one_shot_run_warns_inside_a_suppression_and_measures(tmp_path: Path,
                                                                fast_config: Path) -> None:
    """A person asked for this measurement: `bbprobe run` says the probe is suppressed,
    and until when, then measures and delivers."""
    with serving(tmp_path) as (url, db):
        token = _collector(db, "probe", "add", "p1").strip()
        config = _agent_config(fast_config, url, token)
        now = datetime.now(UTC)
        _collector(db, "suppress", "--all", "--from", now.isoformat(),
                   "--until", (now + timedelta(hours=1)).isoformat(), "--reason", "works")
        done = subprocess.run([sys.executable, "-m", "agent", "--config", str(config),
                               "run", "--quiet"], check=False, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "warning: this probe is suppressed until" in done.stderr
        assert "(works); measuring anyway" in done.stderr
        assert len(_results(url, db)) == 1
