"""The daemon's log answers "is this probe measuring?": one line per slot (band, verdict,
Mbit/s and ms, delivered or spooled, next slot in local time and UTC), a line when
delivery fails and when it recovers, a line per instruction change; journald's format
under systemd; a level switch."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest

from agent import config, logline
from agent.app.daemonlog import DaemonLog
from agent.delivery import DeliveryReport
from agent.schedule import Campaign
from collector.server.testing import running_collector
from tests import factories

ROME = ZoneInfo("Europe/Rome")
ROOT = Path(__file__).resolve().parents[2]


def test_session_line_says_band_verdict_figures_delivery_and_next_slot() -> None:
    """A valid slot and an invalid one, each in one line with the reasons' codes."""
    good = factories.session(rtts=(10.0, 12.0, 14.0))
    bad = factories.session(invalid=("cross_traffic", "wifi"))
    at = datetime(2026, 12, 7, 14, 7, tzinfo=UTC)
    now = datetime(2026, 12, 7, 13, 50, tzinfo=UTC)
    line = logline.session_line([good], band=(14, 3, 4), counted=True,
                                delivery=logline.delivery_text(True, 0),
                                next_slot=logline.when(at, ROME, now))
    assert line == ("session done, band 14h 3/4: valid, down 50.00 Mbit/s, up 10.00 "
                    "Mbit/s, rtt 12.00 ms, loss 0.0 %; delivered, spool empty; "
                    "next slot 15:07 CET (14:07 UTC)")
    line = logline.session_line([bad], band=(14, 2, 4), counted=False,
                                delivery=logline.delivery_text(False, 3, "connection "
                                                               "refused"),
                                next_slot=logline.when(at, ROME))
    assert line.startswith("session done, band 14h 2/4: invalid (cross_traffic, wifi), "
                           "down 50.00 Mbit/s")
    assert "(not counted: retried in its band); spooled, 3 in the spool (connection " \
           "refused); next slot Mon 07 Dec 15:07 CET (14:07 UTC)" in line


def test_a_valid_session_that_cannot_count_says_what_it_lacks() -> None:
    """Valid but the upload failed: "but no upload", not counted."""
    lame = factories.session(transfers=[factories.attempt("download"),
                                        factories.attempt("upload", ok=False)])
    assert logline.result_text(lame, False).startswith("valid but no upload, down 50.00 "
                                                       "Mbit/s, up —, rtt ")


def _captured(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "bbprobe.daemon"]


def test_delivery_failure_and_recovery_are_said_once_each(
        caplog: pytest.LogCaptureFixture) -> None:
    """Failing: one warning (not one per slot); each slot's line counts the spool;
    recovered: one line."""
    caplog.set_level(logging.INFO, logger="bbprobe.daemon")
    warned: list[str] = []
    said = DaemonLog(lambda t: t, warned.append)
    campaign = Campaign(started_at=datetime(2026, 12, 7, 13, 0, tzinfo=UTC), rule="24in72h")
    result = factories.session()
    for n in (1, 2):
        said.delivering()
        said.delivered(DeliveryReport(pending=n, error="cannot connect: refused"))
        said.slot([result], True, None)
        campaign.record(datetime(2026, 12, 7, 12 + n, n, tzinfo=UTC), True)
        said.planned(campaign, datetime(2026, 12, 7, 14 + n, 7, tzinfo=UTC), None)
    assert warned == ["delivery failing: cannot connect: refused; 1 result(s) wait in the "
                      "spool, sent again after every slot"]
    lines = [m for _, m in _captured(caplog)]
    assert "spooled, 2 in the spool (cannot connect: refused)" in lines[-1]
    assert lines[-1].startswith("session done, band 15h 1/1: valid")
    said.delivering()
    said.delivered(DeliveryReport(delivered=[result.result_id, "older", "oldest"]))
    said.slot([result], True, None)
    said.planned(campaign, datetime(2026, 12, 7, 18, 7, tzinfo=UTC), None)
    lines = [m for _, m in _captured(caplog)]
    assert lines[-2] == "delivery recovered: 3 result(s) delivered, 0 left in the spool"
    assert "; delivered, spool empty; next slot" in lines[-1]
    assert len(warned) == 1


def test_instruction_changes_are_said(caplog: pytest.LogCaptureFixture) -> None:
    """A new instruction version: its keys and windows; withdrawn: said; unchanged:
    nothing."""
    caplog.set_level(logging.INFO, logger="bbprobe.daemon")
    said = DaemonLog(lambda t: t, lambda m: None)
    cfg = config.parse({})
    inst = SimpleNamespace(settings={"ping.count": 20, "download.streams": 8},
                           suppressions=())
    first = cast(Any, SimpleNamespace(cfg=cfg, version="ab12cd34", instruction=inst))
    said.instruction(first, None)
    said.instruction(first, first)
    gone = cast(Any, SimpleNamespace(cfg=cfg, version=None, instruction=None))
    said.instruction(gone, first)
    assert [m for _, m in _captured(caplog)] == [
        "running under central instruction ab12cd34: sets download.streams, ping.count; "
        "0 suppression window(s)",
        "no central instruction any more: running under the local configuration"]


def test_journald_format_and_level_switch(tmp_path: Path) -> None:
    """Under journald (stderr is $JOURNAL_STREAM's): "<6>" and no timestamp; elsewhere a
    timestamp and "warning:"; at level warning the INFO lines are gone."""
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        log = logline.configure("info", {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
                                stream, name="bbprobe.test")
        log.info("session done")
        log.warning("delivery failing")
    assert path.read_text() == "<6>session done\n<4>delivery failing\n"
    out = io.StringIO()
    log = logline.configure("warning", {"JOURNAL_STREAM": "1:2"}, out, name="bbprobe.test")
    log.info("session done")
    log.warning("delivery failing")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d warning: delivery failing\n",
                        out.getvalue())


def test_the_real_daemon_logs_each_slot(tmp_path: Path, fast_config: Path) -> None:
    """``bbprobe daemon --first-now`` against a real collector, under journald's stream:
    it says its next slot at start, then the slot's line (band, verdict, figures,
    delivered, next slot in local time and UTC), then its stop; the token never."""
    with running_collector(tmp_path) as c:
        token = c.add_probe("p1")
        stderr = tmp_path / "daemon.log"
        with stderr.open("w") as err:
            st = os.fstat(err.fileno())
            env = {**os.environ, "BBPROBE_TOKEN": token,
                   "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(fast_config),
                 "--collector", c.url, "--probe-id", "p1", "daemon", "--first-now",
                 "--rule", "24in72h", "--time-scale", "60", "--log-level", "info"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
            try:
                deadline = time.monotonic() + 120
                while "session done" not in stderr.read_text():
                    assert proc.poll() is None, stderr.read_text()
                    assert time.monotonic() < deadline, stderr.read_text()
                    time.sleep(0.2)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    text = stderr.read_text()
    assert proc.returncode == 0, text
    lines = text.splitlines()
    assert lines[0] == "<6>daemon running as probe p1, rule 24in72h"
    zone = r"[A-Z]{3,4} \(\d\d:\d\d UTC\)"
    assert re.fullmatch(rf"<6>next slot \d\d:\d\d {zone}; campaign 24in72h started "
                        rf"\w{{3}} \d\d \w{{3}} \d\d:\d\d {zone}, 0/24 sessions counted",
                        lines[1]), lines[1]
    done = next(x for x in lines if "session done" in x)
    assert re.fullmatch(
        r"<6>session done, band \d\dh [01]/1: (valid|invalid \([a-z_, ]+\)), down [\d.]+ "
        r"Mbit/s, up [\d.]+ Mbit/s, rtt [\d.]+ ms, loss [\d.]+ %( \(not counted: "
        rf"retried in its band\))?; delivered, spool empty; next slot .*{zone}", done), done
    assert lines[-1] == "<6>daemon stopped; unacknowledged results stay in the spool"
    assert token not in text
    assert not any(re.match(r"\d{4}-\d\d-\d\d ", x) for x in lines)  # journald stamps
