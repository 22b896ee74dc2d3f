"""A silent probe heard again resolves its silence: the alerter raises the same kind of
alert with status "resolved" (Alertmanager's word), to the notifiers the silence went
to, once per silence; and an alert's durations read as people say them ("1 min 3 s",
never "0.0 h"). Pure triggers, then a real collector on 127.0.0.1 delivering to a real
webhook receiver on loopback while a probe falls silent, returns, falls silent and
returns again."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from agent import spec
from agent.schema import SCHEMA_VERSION, format_utc, utc_now
from collector.alerts import rules as alerts
from collector.cli.main import main
from collector.config import (
    AlertsConfig,
    CollectorConfig,
    FleetConfig,
    ServerConfig,
    WebhookConfig,
)
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector, running_collector
from collector.storage.model import Probe
from tests.collector.test_alerts import _until, receiver
from tests.httpclient import post_json

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
PROBE = Probe("roma-01", "2026-11-01T00:00:00Z", None,
              LineMetadata(operator="OpX", region="Lazio", technology="FTTH"))


def test_a_silence_is_said_in_minutes_and_seconds() -> None:
    """63 s without word: "silent for 1 min 3 s" (the threshold here is a minute); the
    details keep the exact figure and say the alert is firing."""
    seen = format_utc(NOW - timedelta(seconds=63))
    alert = alerts.silent(PROBE, seen, NOW, 60)
    assert alert is not None
    assert alert.subject == ("roma-01: silent for 1 min 3 s (last seen 2026-11-21 "
                             "11:58:57 UTC)")
    assert alert.details["silent_s"] == 63.0 and alert.status == "firing"
    long = alerts.silent(PROBE, format_utc(NOW - timedelta(hours=4, minutes=12)), NOW, 60)
    assert long is not None and "silent for 4 h 12 min" in long.subject


def test_the_resolution_is_keyed_on_the_silence() -> None:
    """Heard since the silence began: a "resolved" alert of the same kind, keyed on the
    silence's key; not before; not for an alert raised before resolutions existed (an
    upgrade must not announce every old silence as over)."""
    before = format_utc(NOW - timedelta(hours=2))
    firing = alerts.silent(PROBE, before, NOW, 3600)
    assert firing is not None
    assert alerts.back(PROBE, firing.key, firing.details, before) is None  # not heard
    back = alerts.back(PROBE, firing.key, firing.details, format_utc(NOW))
    assert back is not None
    assert (back.kind, back.key, back.status, back.severity) == (
        "probe_silent", firing.key + ":resolved", "resolved", "info")
    assert back.subject == ("roma-01: heard again at 2026-11-21 12:00:00 UTC, after 2 h "
                            "without word (last seen before: 2026-11-21 10:00:00 UTC)")
    assert back.details["resolves"] == firing.key and back.details["silent_s"] == 7200.0
    old_style = {k: v for k, v in firing.details.items() if k != "status"}
    assert alerts.back(PROBE, firing.key, old_style, format_utc(NOW)) is None
    doc = alerts.payload(7, utc_now(), back)
    assert doc["status"] == "resolved" and alerts.payload(6, utc_now(), firing)["status"] \
        == "firing"
    assert alerts.title(back) == "[bbprobe resolved] probe silent: roma-01"
    assert alerts.title(firing) == "[bbprobe warning] probe silent: roma-01"


def _health() -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "agent_version": "test",
            "reported_at": utc_now(), "mode": "daemon", "instruction_version": None,
            "instruction_error": None, "campaign": None, "spool_results": 0,
            "spool_bytes": 0, "dead_letters": 0, "gaps_waiting": 0, "dropped_total": 0,
            "clock": None, "last_error": None, "failing_checks": [],
            "suppressed_until": None, "next_session_at": None}


def _bodies(hook: Any, status: str) -> list[dict[str, Any]]:
    with hook.lock:
        return [a["body"] for a in hook.accepted if a["body"].get("status") == status]


def _report(c: RunningCollector, token: str) -> None:
    assert post_json(c.url + spec.HEALTH_PATH, _health(), token)[0] == 200


def test_a_returning_probe_resolves_its_silence_once_per_silence(tmp_path: Path) -> None:
    """With [fleet] silent_after_s = 2: p1 reports, falls silent (firing, said in
    seconds), reports again (resolved, once, naming the silence), falls silent again
    and returns again (a second resolution for the second silence); more ticks resolve
    nothing twice. `alerts list` marks the resolutions."""
    with receiver() as hook:
        cfg = replace(CollectorConfig(), server=ServerConfig(query_auth=False),
                      fleet=FleetConfig(silent_after_s=2.0),
                      alerts=AlertsConfig(enabled=True, interval_s=0.2, retry_min_s=0.3,
                                          retry_max_s=1.0, timeout_s=5.0,
                                          webhooks=(WebhookConfig(
                                              name="ops", url=hook.url + "/ops",
                                              triggers=("probe_silent",)),)))
        with running_collector(tmp_path, cfg) as c:
            token = c.add_probe("p1")
            _report(c, token)
            (first,) = _until(lambda: _bodies(hook, "firing"), 20, "the first silence")
            assert first["kind"] == "probe_silent" and first["probe"] == "p1"
            assert re.search(r": silent for \d+ s \(last seen ", first["subject"]), first
            assert not _bodies(hook, "resolved")  # still silent: nothing resolved
            _report(c, token)
            (resolved,) = _until(lambda: _bodies(hook, "resolved"), 20, "the resolution")
            assert resolved["kind"] == "probe_silent" and resolved["severity"] == "info"
            assert resolved["details"]["resolves"] == \
                f"probe_silent:p1:{first['details']['last_seen']}"
            assert "p1: heard again at " in resolved["subject"]
            # Silent once more, then back once more: a second pair, nothing repeated.
            _until(lambda: len(_bodies(hook, "firing")) == 2, 20, "the second silence")
            _report(c, token)
            _until(lambda: len(_bodies(hook, "resolved")) == 2, 20, "the second resolution")
            time.sleep(1.0)  # five more ticks: no resolution again
            firings, resolutions = _bodies(hook, "firing"), _bodies(hook, "resolved")
            done = CliRunner().invoke(main, ["--db", str(c.db_path), "alerts", "list"],
                                      catch_exceptions=False)
    # (A slow machine may see a third silence begin: it is a new one, not yet resolved.)
    assert len(firings) >= 2 and len(resolutions) == 2
    assert [r["details"]["resolves"] for r in resolutions] == [
        f"probe_silent:p1:{f['details']['last_seen']}" for f in firings[:2]]
    assert len({a["body"]["id"] for a in hook.accepted}) == len(hook.accepted)  # once each
    assert done.exit_code == 0
    assert done.stdout.count("RESOLVED p1: heard again at") == 2
