"""Alerts: the triggers as pure functions; and with real components, a
collector on 127.0.0.1 delivering to a real webhook receiver on loopback (signed,
retried, exactly once across a restart) and to Apprise's JSON transport, from real
sessions (the agent's ``bbprobe run``) and real ingestion."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web

from agent.schema import SCHEMA_VERSION, format_utc, utc_now
from agent.spec import CAMPAIGN_RULES as RULES
from collector.alerts import rules as alerts
from collector.compliance.certify import certify
from collector.compliance.facts import of_result
from collector.config import (
    AlertsConfig,
    AppriseConfig,
    CollectorConfig,
    ServerConfig,
    WebhookConfig,
)
from collector.lines import LineMetadata
from collector.server.testing import running_collector, serve_in_thread
from collector.storage.model import Probe
from tests import factories
from tests.httpclient import post_json

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cret-for-hmac"
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def _probe(name: str = "roma-01", **line: Any) -> Probe:
    return Probe(name, "2026-11-01T00:00:00Z", None,
                 LineMetadata(operator="OpX", region="Lazio", technology="FTTH", **line))


# --- pure ---------------------------------------------------------------------------------


def test_below_minimum_is_rate_limited_by_its_key() -> None:
    """Median of the successful tests against the contracted minimum; one key per
    direction and time bucket; an invalid session never alerts."""
    probe = _probe(download_min_kbps=60_000.0, upload_min_kbps=5_000.0)
    slow = factories.session("roma-01", transfers=[
        factories.attempt("download", 0, bps=50e6), factories.attempt("download", 1, bps=70e6),
        factories.attempt("download", 2, bps=20e6), factories.attempt("upload", bps=6e6)])
    found = alerts.below_minimum(probe, of_result(slow, slow.started_at), 3600)
    assert [(a.kind, a.details["direction"], a.details["speed_kbps"]) for a in found] == [
        ("below_minimum", "download", 50_000.0)]  # median 50, not mean 46.7
    later = replace(slow, started_at="2026-11-21T10:59:00.000000Z")
    assert alerts.below_minimum(probe, of_result(later, later.started_at), 3600)[0].key == \
        found[0].key  # the same hour: the same alert
    next_hour = replace(slow, started_at="2026-11-21T11:00:00.000000Z")
    assert alerts.below_minimum(probe, of_result(next_hour, next_hour.started_at),
                                3600)[0].key != found[0].key
    invalid = factories.session("roma-01", invalid=["wifi"], transfers=[
        factories.attempt("download", bps=1e6)])
    assert alerts.below_minimum(probe, of_result(invalid, invalid.started_at), 3600) == []


def test_silence_and_campaign_triggers() -> None:
    """Silence once per silence (never-seen probes are not silent); a campaign that
    cannot fill its bands, by counting hours or, near the deadline, by which bands; the
    completed campaign's bounds; dead letters keyed by their count."""
    probe = _probe()
    assert alerts.silent(probe, None, NOW, 3600) is None  # never set up: not silent
    assert alerts.silent(probe, "2026-11-21T11:30:00Z", NOW, 3600) is None
    gone = alerts.silent(probe, "2026-11-21T10:00:00Z", NOW, 3600)
    assert gone is not None and gone.key == "probe_silent:roma-01:2026-11-21T10:00:00Z"

    def report(filled: int, deadline: str, complete: bool = False) -> dict[str, Any]:
        return {"campaign": {"rule": "96in24h", "started_at": "2026-11-20T12:00:00Z",
                             "deadline_at": deadline, "bands_filled": filled,
                             "sessions_counted": filled * 4, "sessions_needed": 96,
                             "complete": complete, "sessions_suppressed": 0}}

    # 5 bands unfilled: 5 whole hours left is enough, 4.9 is not (counting hours).
    assert alerts.campaign_incomplete(probe, report(19, "2026-11-21T17:00:00Z"), NOW) is None
    late = alerts.campaign_incomplete(probe, report(19, "2026-11-21T16:54:00Z"), NOW)
    assert late is not None and late.details["bands_unfilled"] == 5
    assert alerts.campaign_incomplete(probe, report(24, "2026-11-21T12:00:00Z", True),
                                      NOW) is None
    # Exactly, from which bands are unfilled: 12:00-17:00 UTC is 13-17h in Rome.
    rome = ZoneInfo("Europe/Rome")
    assert alerts.bands_ahead(NOW, datetime(2026, 11, 21, 17, tzinfo=UTC), rome) == {
        13, 14, 15, 16, 17}
    deadline = "2026-11-21T17:00:00Z"
    assert alerts.campaign_incomplete(probe, report(19, deadline), NOW,
                                      {13, 14, 15, 16, 17}, rome) is None
    missed = alerts.campaign_incomplete(probe, report(19, deadline), NOW,
                                        {2, 3, 4, 5, 6}, rome)
    assert missed is not None and missed.details["bands_missed"] == [2, 3, 4, 5, 6]
    # In the collector's own spelling (keys and queries never take the probe's).
    assert alerts.completed_campaign(report(24, "2026-11-23T12:00:00Z", True), NOW) == (
        "96in24h", "2026-11-20T12:00:00.000000Z", "2026-11-23T12:00:00.000000Z")
    # Only campaigns plausible by our clock: begun, at most 31 days long, ended within
    # 45 days (a probe cannot make us certify campaigns dated where it likes).
    for when in ("2026-11-23T12:00:00Z", "2026-12-25T12:00:00Z"):
        moved = report(24, when, True)
        moved["campaign"]["started_at"] = "2026-11-22T12:00:00Z" if when < "2026-12" \
            else "2026-11-20T12:00:00Z"
        assert alerts.completed_campaign(moved, NOW) is None
    assert alerts.completed_campaign(report(24, "2026-11-23T12:00:00Z", True),
                                     NOW + timedelta(days=50)) is None
    assert alerts.agent_dead_letters(probe, {"dead_letters": 0}) is None
    # Keyed by the count's power of two: a probe writing another count in every report
    # makes no alert a report.
    key = [alerts.agent_dead_letters(probe, {"dead_letters": n}).key  # type: ignore[union-attr]
           for n in (2, 3, 4)]
    assert key[0] == key[1] != key[2]


def _campaign(probe: str, day: str, bps: float, started: str | None = None
              ) -> list[Any]:
    """96 sessions, 4 in every local hour band of ``day`` (Europe/Rome), at ``bps``."""
    out = []
    start = datetime.fromisoformat(f"{day}T00:00:00+01:00").astimezone(UTC)
    for quarter in range(96):
        at = format_utc(start + timedelta(minutes=15 * quarter + 1))
        out.append(factories.session(probe, started_at=at, transfers=[
            factories.attempt("download", bps=bps), factories.attempt("upload", bps=bps / 5)]))
    return out


def test_breach_from_a_certificate() -> None:
    """A complete campaign under the contracted minimum is a breach naming the check; the
    same campaign above it is none."""
    probe = _probe(download_min_kbps=60_000.0)
    sessions = _campaign("roma-01", "2026-11-18", 50e6)
    cert = certify("roma-01", probe.line, [of_result(s, s.started_at) for s in sessions],
                   RULES["96in24h"], "Europe/Rome")
    found = alerts.breach(probe, "2026-11-18T00:00:00Z", cert)
    assert found is not None and found.severity == "critical"
    assert [c["id"] for c in found.details["checks"]] == ["download_p5_kbps"]
    assert "Banda minima in download" in found.subject
    fine = certify("roma-01", probe.line,
                   [of_result(s, s.started_at) for s in _campaign("roma-01", "2026-11-18",
                                                                   80e6)],
                   RULES["96in24h"], "Europe/Rome")
    assert alerts.breach(probe, "2026-11-18T00:00:00Z", fine) is None


def test_signature_and_backoff() -> None:
    """The HMAC covers the timestamp (no replay under a new one) and the key; backoff
    doubles within +-50 % and stays under its ceiling; routing by trigger."""
    body = b'{"id": 1}'
    mark = alerts.signature(SECRET.encode(), "1764500000", body)
    assert alerts.verify(SECRET.encode(), "1764500000", body, mark)
    assert not alerts.verify(SECRET.encode(), "1764500001", body, mark)  # replayed later
    assert not alerts.verify(b"other", "1764500000", body, mark)
    import random

    rng = random.Random(1)
    delays = [alerts.retry_delay_s(n, 30, 3600, rng) for n in range(1, 12)]
    assert 15 <= delays[0] <= 45 and all(d <= 5400 for d in delays)
    assert alerts.routed("probe_silent", [("a", ()), ("b", ("contract_breach",)),
                                          ("c", ("probe_silent",))]) == ["a", "c"]


# --- with a real receiver -------------------------------------------------------------------


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: answers each request with the next status of
    ``script`` (then 200), and keeps what it accepted."""

    script: list[int] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self.lock:
            self.requests.append(({k.lower(): v for k, v in request.headers.items()}, body))
            status = self.script.pop(0) if self.script else 200
            if status == 200:
                self.accepted.append({"path": request.path, "headers": dict(request.headers),
                                      "body": json.loads(body)})
        return web.Response(status=status)


@contextmanager
def receiver(script: list[int] | None = None) -> Iterator[Receiver]:
    r = Receiver(list(script or []))

    async def start() -> tuple[web.AppRunner, str]:
        app = web.Application()
        app.router.add_post("/{tail:.*}", r.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return runner, f"http://{host}:{port}"

    with serve_in_thread(start, "test-webhook-receiver") as url:
        r.url = url
        yield r


def _until(what: Callable[[], Any], timeout_s: float, why: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if got := what():
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {why}")


def _cfg(tmp: Path, **alerts_cfg: Any) -> CollectorConfig:
    base = AlertsConfig(enabled=True, interval_s=0.2, retry_min_s=0.3, retry_max_s=1.0,
                        timeout_s=5.0)
    return replace(CollectorConfig(), server=ServerConfig(query_auth=False),
                   alerts=replace(base, **alerts_cfg))


@pytest.mark.slow
def test_signed_alert_retried_arrives_once_across_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session below the contracted minimum raises one alert. The receiver fails
    (503) the first delivery, the collector stops, a new one starts on the same
    database and delivers it: the receiver accepts it once, signed; the alert is not
    raised again, nor delivered again, however long the collector runs."""
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET)
    with receiver([503]) as hook:
        # The retry waits 30 s or more: none happens before the restart.
        cfg = _cfg(tmp_path, webhooks=(WebhookConfig(
            name="ops", url=hook.url + "/hooks/bbprobe", secret_env="TEST_WEBHOOK_SECRET",
            triggers=("below_minimum",)),), retry_min_s=60.0, retry_max_s=60.0)
        with running_collector(tmp_path, cfg) as c:
            token = c.add_probe("roma-01", LineMetadata(download_min_kbps=1e9))
            assert post_json(c.url + "/api/v1/results",
                             factories.session_dict(probe_id="roma-01"), token)[0] == 201
            _until(lambda: _deliveries(c) == [("ops", "pending", 1)], 20,
                   "the first delivery refused and recorded")
        assert not hook.accepted and len(hook.requests) == 1
        # The retry falls due (as if its minute had passed while the collector was down).
        import sqlite3

        with sqlite3.connect(tmp_path / "collector.sqlite3") as db:
            db.execute("UPDATE alert_deliveries SET next_at = '2000-01-01T00:00:00.000000Z'")
        with running_collector(tmp_path, cfg) as c:
            _until(lambda: hook.accepted, 20, "the delivery after the restart")
            time.sleep(2.0)  # ten more evaluations and delivery rounds
            store = c.open_store()
            try:
                (row,) = store.alerts(10)
            finally:
                store.close()
    assert len(hook.accepted) == 1 and len(hook.requests) == 2
    got = hook.accepted[0]
    headers = {k.lower(): v for k, v in got["headers"].items()}
    raw = hook.requests[1][1]
    assert alerts.verify(SECRET.encode(), headers["x-bbprobe-timestamp"], raw,
                         headers["x-bbprobe-signature"])
    assert got["path"] == "/hooks/bbprobe"
    assert got["body"]["kind"] == "below_minimum" and got["body"]["probe"] == "roma-01"
    assert headers["x-bbprobe-alert-id"] == str(got["body"]["id"]) == str(row["id"])
    (delivery,) = row["deliveries"]
    assert (delivery["notifier"], delivery["state"], delivery["attempts"]) == (
        "ops", "delivered", 2)
    assert delivery["last_error"] is None or "503" in delivery["last_error"]


def test_a_refusing_receiver_is_given_up(tmp_path: Path) -> None:
    """A 4xx (other than 408/429) is final: failed after one attempt, not retried."""
    with receiver([404, 404, 404]) as hook:
        cfg = _cfg(tmp_path, webhooks=(WebhookConfig(name="gone", url=hook.url + "/x"),))
        with running_collector(tmp_path, cfg) as c:
            token = c.add_probe("p1", LineMetadata(upload_min_kbps=1e9))
            assert post_json(c.url + "/api/v1/results", factories.session_dict(
                probe_id="p1"), token)[0] == 201

            def failed() -> Any:
                store = c.open_store()
                try:
                    rows = store.alerts(10)
                finally:
                    store.close()
                return rows and rows[0]["deliveries"][0]["state"] == "failed" and rows

            (row,) = _until(failed, 20, "the delivery to be given up")
            time.sleep(1.0)
    assert len(hook.requests) == 1
    assert row["deliveries"][0]["last_error"] == "HTTP 404"


def _deliveries(c: Any) -> list[tuple[str, str, int]]:
    store = c.open_store()
    try:
        return [(d["notifier"], d["state"], d["attempts"])
                for r in store.alerts(10) for d in r["deliveries"]]
    finally:
        store.close()


def _health(campaign: dict[str, Any] | None) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "agent_version": "test",
            "reported_at": utc_now(), "mode": "daemon", "instruction_version": None,
            "instruction_error": None, "campaign": campaign, "spool_results": 0,
            "spool_bytes": 0, "dead_letters": 0, "gaps_waiting": 0, "dropped_total": 0,
            "clock": None, "last_error": None, "failing_checks": [],
            "suppressed_until": None, "next_session_at": None}


@pytest.mark.slow
def test_breach_on_a_completed_campaign_and_silence_through_apprise(
        tmp_path: Path, fast_config: Path) -> None:
    """A real session from the agent (``bbprobe run``) makes a probe seen; once it falls
    silent, Apprise's JSON transport delivers probe_silent to a receiver. Another probe
    delivers a whole campaign through the API (96 sessions, 4 in every band, below its
    contracted minimum) and reports it complete: contract_breach goes to the webhook.
    Each notifier gets only its triggers."""
    with receiver() as hook, receiver() as chat:
        host = chat.url.removeprefix("http://")
        cfg = _cfg(tmp_path,
                   webhooks=(WebhookConfig(name="ops", url=hook.url + "/breach",
                                           triggers=("contract_breach",)),),
                   apprise=(AppriseConfig(name="chat", url=f"json://{host}/apprise",
                                          triggers=("probe_silent",)),))
        cfg = replace(cfg, fleet=replace(cfg.fleet, silent_after_s=4.0))
        with running_collector(tmp_path, cfg) as c:
            live = c.add_probe("live-01")
            agent = fast_config.with_name("alerts-agent.toml")
            agent.write_text(fast_config.read_text() +
                             f'\n[collector]\nurl = "{c.url}"\ntoken = "{live}"\n')
            done = subprocess.run([sys.executable, "-m", "agent", "--config", str(agent),
                                   "run", "--quiet"], cwd=ROOT, capture_output=True,
                                  text=True, timeout=120, check=False)
            assert done.returncode == 0, done.stderr

            line = LineMetadata(operator="OpX", region="Lazio", technology="FTTH",
                                download_min_kbps=60_000.0)
            token = c.add_probe("roma-01", line)
            # Recent, by today's clock: only campaigns that ended within 45 days are
            # certified.
            day = (datetime.now(UTC) - timedelta(days=4)).date().isoformat()
            sessions = _campaign("roma-01", day, 50e6)
            for start in range(0, 96, 48):
                batch = {"results": [json.loads(json.dumps(factories.to_dict(s)))
                                     for s in sessions[start:start + 48]]}
                status, reply = post_json(c.url + "/api/v1/results/batch", batch, token)
                assert status == 200 and {i["status"] for i in reply["items"]} == {201}
            campaign = {"rule": "96in24h", "started_at": sessions[0].started_at,
                        "deadline_at": format_utc(datetime.fromisoformat(
                            sessions[0].started_at) + timedelta(days=3)), "bands_filled": 24,
                        "sessions_counted": 96, "sessions_needed": 96, "complete": True,
                        "sessions_suppressed": 0}
            assert post_json(c.url + "/api/v1/reported-state", _health(campaign),
                             token)[0] == 200
            _until(lambda: hook.accepted, 20, "the breach at the webhook")
            _until(lambda: chat.accepted, 30, "the silent probe through Apprise")
            time.sleep(1.0)
    assert [a["body"]["kind"] for a in hook.accepted] == ["contract_breach"]
    breach = hook.accepted[0]["body"]
    assert breach["probe"] == "roma-01" and breach["severity"] == "critical"
    assert breach["details"]["checks"][0]["threshold"] == 60_000.0
    # Apprise's json:// transport: {"version", "title", "message", "type"}.
    silent = [a["body"] for a in chat.accepted]
    assert {"live-01", "roma-01"} >= {s["title"].rsplit(": ", 1)[-1] for s in silent}
    assert any(s["title"].endswith(": live-01") and "silent" in s["message"]
               for s in silent)
    assert all("probe silent" in s["title"] for s in silent)


def _cli(config: Path, *args: str, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "collector", "--config", str(config), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_alerts_test_and_list_commands(tmp_path: Path) -> None:
    """``alerts test`` delivers now to every notifier (or the one named) and exits 1 if
    one refused; ``alerts list`` shows each alert with its deliveries."""
    db = tmp_path / "c.sqlite3"
    with receiver([410]) as hook:
        config = tmp_path / "collector.toml"
        config.write_text(
            f'[storage]\npath = "{db}"\n\n[alerts]\nenabled = true\n\n'
            f'[[alerts.webhooks]]\nname = "ops"\nurl = "{hook.url}/ops"\n'
            f'secret_env = "T_SECRET"\ntriggers = ["probe_silent"]\n\n'
            f'[[alerts.webhooks]]\nname = "noc"\nurl = "{hook.url}/noc"\n')
        assert _cli(config, "init").returncode == 0
        missing = _cli(config, "alerts", "test")
        assert missing.returncode == 2 and "T_SECRET is not set" in missing.stderr
        first = _cli(config, "alerts", "test", env={"T_SECRET": SECRET})
        assert first.returncode == 1, first.stdout + first.stderr  # one refused (410)
        assert "-> ops: failed" in first.stdout or "-> noc: failed" in first.stdout
        assert "delivered" in first.stdout
        # A real alert waiting for "noc" (the running collector's business): a test of
        # "ops" leaves it alone.
        from collector.config import StorageConfig
        from collector.storage.sql.backends import open_store

        store = open_store(StorageConfig(path=str(db)))
        try:
            backlog = store.add_alert("probe_silent:x:1", "probe_silent", None, "warning",
                                      "2026-01-01T00:00:00.000000Z", "x silent", "{}",
                                      ["noc"])
        finally:
            store.close()
        second = _cli(config, "alerts", "test", "--notifier", "ops",
                      env={"T_SECRET": SECRET})
        assert second.returncode == 0, second.stdout + second.stderr
        assert "-> ops: delivered" in second.stdout and "noc" not in second.stdout
        unknown = _cli(config, "alerts", "test", "--notifier", "nope", env={"T_SECRET": "x"})
        assert unknown.returncode == 2 and "no notifier named nope" in unknown.stderr
        listed = _cli(config, "alerts", "list", "--format", "json")
        assert listed.returncode == 0
        rows = json.loads(listed.stdout)
    assert [r["kind"] for r in rows] == ["test", "probe_silent", "test"]
    assert [d["notifier"] for d in rows[0]["deliveries"]] == ["ops"]
    assert rows[1]["id"] == backlog and rows[1]["deliveries"][0]["state"] == "pending"
    assert rows[1]["deliveries"][0]["attempts"] == 0
    assert sorted(d["state"] for d in rows[2]["deliveries"]) == ["delivered", "failed"]
    assert len(hook.accepted) == 2
    text = _cli(config, "alerts", "list").stdout
    assert "test" in text and "-> ops: delivered" in text


def test_reports_without_a_campaign_are_stored_with_alerts_on(tmp_path: Path) -> None:
    """A one-shot run's report (campaign null) and an open campaign's: 200 with alerts
    enabled (the completed-campaign check must not trip over them)."""
    with running_collector(tmp_path, _cfg(tmp_path)) as c:
        token = c.add_probe("p1")
        assert post_json(c.url + "/api/v1/reported-state", _health(None), token)[0] == 200
        open_campaign = {"rule": "96in24h", "started_at": "2026-11-20T00:00:00.000000Z",
                         "deadline_at": "2026-11-23T00:00:00.000000Z", "bands_filled": 3,
                         "sessions_counted": 12, "sessions_needed": 96, "complete": False,
                         "sessions_suppressed": 0}
        assert post_json(c.url + "/api/v1/reported-state", _health(open_campaign),
                         token)[0] == 200
