"""Central instructions on the agent's side: which keys an instruction may set, precedence, the
cached copy for an offline probe, suppression windows in the campaign planner, and the
ranking of candidate servers."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent import config, control
from agent.app.daemon import CampaignStore, Control, Plan, run_campaigns
from agent.client import CollectorClient
from agent.errors import ConfigError
from agent.instruction import (
    Instruction,
    InstructionError,
    check,
    key_problem,
    parse_document,
    parse_pairs,
)
from agent.probes.select import rank
from agent.schedule import Campaign, next_free_slot
from agent.schema import ServerCandidate
from collector.server.testing import running_collector

ROME = "Europe/Rome"


def to_document(inst: Instruction) -> dict[str, Any]:
    """The inverse of ``parse_document``: an instruction as the collector sends it."""
    return {"version": inst.version, "settings": inst.settings,
            "suppressions": [{"id": s.id, "starts_at": s.starts_at.isoformat(),
                              "ends_at": s.ends_at.isoformat(), "reason": s.reason}
                             for s in inst.suppressions]}


def test_only_measurement_settings_may_be_set_centrally() -> None:
    """Central instructions may set measurement keys only: the collector's address, the token,
    delivery and identity stay in the probe's own file, and anything else is an unknown key."""
    for key in ("profile", "ping.count", "download.streams", "upload.window_s",
                "checks.scan_lan", "server.url", "server.candidates", "campaign.rule"):
        assert key_problem(key) is None, key
    for key in ("collector.url", "collector.token", "delivery.spool_max_bytes",
                "state_dir", "probe_id"):
        assert "stays in the probe's own file" in (key_problem(key) or ""), key
    for key in ("ping", "ping.bogus", "bogus.key", "ping.count.x", ""):
        assert key_problem(key) == "unknown key", key


@pytest.mark.parametrize(("settings", "message"), [
    ({"ping.count": 0}, "ping.count: must be >= 1, got 0"),
    ({"ping.count": "many"}, "ping.count: expected an integer"),
    ({"campaign.rule": "weekly"}, "campaign.rule: must be one of"),
    ({"campaign.timezone": "Mars/Olympus"}, "campaign.timezone: not a known time zone"),
    ({"server.candidates": ["gopher://x"]}, "server.candidates[0]: must be an http"),
    ({"server.candidates": [f"http://h{i}" for i in range(17)]},
     "server.candidates: at most 16"),
    ({"download.timeout_s": 1.0}, "download.timeout_s: is shorter than"),
    ({"collector.url": "http://elsewhere"}, "collector.url: stays in the probe"),
])
def test_bad_settings_are_refused_naming_the_key(settings: dict[str, object],
                                                 message: str) -> None:
    """Each bad central setting is refused with an InstructionError naming the key and the rule
    it breaks."""
    with pytest.raises(InstructionError) as caught:
        check(settings)
    assert message in str(caught.value)


# Each value within its own range, three weeks a session all together (the session
# plan's limit, agent/budget.py).
TOO_LONG = {"download.tests": 1000, "download.window_s": 600, "ping.count": 10000}


def test_an_instruction_planning_too_long_a_session_is_refused_naming_the_figure() -> None:
    """Not one key's fault: the message is whole, the computed figure and the limit."""
    with pytest.raises(InstructionError) as caught:
        check(TOO_LONG)
    assert caught.value.key == ""
    text = str(caught.value)
    assert text.startswith("session: would last up to 21.2 days = 1833054 s (ping 2.8 h: ")
    assert "download 21.1 days: 1000 tests x 3 attempts x 607 s" in text
    assert "over the 900 s limit (one 15-minute slot of a 96-a-day campaign)" in text
    assert text.endswith(DEFAULTS_NOTE)
    assert check({"download.tests": 3, "download.window_s": 15})  # 4.6 min, 225 GB


# What the collector says it assumed when it refuses a plan (it cannot read the probe's
# own file).
DEFAULTS_NOTE = ("(planned on the built-in defaults for every key the instruction does "
                 "not set; a probe whose own file sets other values plans again, and over "
                 "a limit keeps its previous instruction and reports why)")


def test_a_setting_assumed_from_the_probe_is_planned_where_the_instruction_is_silent(
        ) -> None:
    """file-131-06 plans 731 s, within the limit; for a probe whose own file runs dual
    stack, 1462 s, refused saying so; an instruction that sets the family itself is
    planned with its own value, and the assumption is never part of what it returns."""
    both = {"server.address_family": "both"}
    assert check({"profile": "file-131-06"}) == {"profile": "file-131-06"}
    with pytest.raises(InstructionError) as caught:
        check({"profile": "file-131-06"}, both)
    assert caught.value.key == ""
    assert str(caught.value) == (
        "session: would last up to 24.4 min = 1462 s (2 sessions, IPv4 then IPv6, of ping "
        "11 s: 10 echo requests 1 s apart + 2 s; download 6.0 min: 3 tests x 1 attempt x "
        "120 s; upload 6.0 min: 3 tests x 1 attempt x 120 s), over the 900 s limit (one "
        "15-minute slot of a 96-a-day campaign); lower tests, attempts, window_s, "
        "timeout_s or ping.count (planned on the built-in defaults for every key the "
        'instruction does not set, except server.address_family = "both" as the probe\'s '
        "last session ran; a probe whose own file sets other values plans again, and over "
        "a limit keeps its previous instruction and reports why)")
    mine = {"profile": "file-131-06", "server.address_family": "ipv4"}
    assert check(mine, both) == mine
    assert check({"ping.count": 20}, both) == {"ping.count": 20}  # 254 s dual stack


def test_the_agent_refuses_an_instruction_over_the_limit_that_slipped_through(
        tmp_path: Path) -> None:
    """A collector that does not bound sessions (an older release; here the
    rule is written to the store past the check) serves one: the agent measures under
    its own file, and its health report says why, which the fleet view shows."""
    from agent import health
    from agent.schema import to_dict, utc_now
    from agent.spool import Spool
    from collector.fleet.rules import Selector
    from tests.httpclient import request

    state = tmp_path / "state"
    with running_collector(tmp_path / "c") as running:
        token = running.add_probe("p1")
        store = running.open_store()
        try:
            store.update_instruction_rule(Selector(probe="p1").key(),
                                          lambda _: dict(TOO_LONG), utc_now())
        finally:
            store.close()
        client = CollectorClient(running.url, token, 10)
        fetched = asyncio.run(control.fetch(client, str(state)))
        assert fetched.instruction is not None and fetched.instruction.settings == {}
        applied = control.apply(fetched, lambda c: config.load(
            None, {"HOME": str(tmp_path)}, central=c))
        assert applied.version is None
        assert (applied.cfg.download.tests, applied.cfg.ping.count) == (1, 10)
        assert applied.error == (f"instruction {fetched.instruction.version} not applied: "
                                 f"{fetched.instruction.settings_error}")
        assert "session: would last up to 21.2 days = 1833054 s" in applied.error
        report = health.build(Spool(state), mode="run", campaign=None,
                              instruction_version=applied.version,
                              instruction_error=applied.error)
        asyncio.run(client.report_health(json.dumps(to_dict(report)).encode()))
        status, doc, _ = request("GET", running.url + "/api/v1/fleet?format=json")
        (row,) = doc["probes"]
        assert status == 200 and "instruction not applied" in row["problems"]
        assert "21.2 days" in row["last_error"]


def test_an_instruction_over_the_limit_only_with_the_local_file_is_not_applied(
        tmp_path: Path) -> None:
    """Within the limit on the defaults (the collector accepts it), over it with this
    probe's 5 tests: this probe measures under its own file and says why."""
    path = tmp_path / "agent.toml"
    path.write_text("[download]\ntests = 5\n")
    settings = {"download.window_s": 60.0}
    assert check(settings) == settings
    doc = {"version": "0123456789abcdef", "settings": settings, "suppressions": []}
    applied = control.apply(control.Fetched(parse_document(doc), "collector"),
                            lambda central: config.load(path, {"HOME": str(tmp_path)},
                                                        central=central))
    assert applied.version is None and applied.cfg.download.window_s == 10.0
    assert applied.error is not None and applied.error.startswith(
        f"instruction 0123456789abcdef not applied: {path}: session: would last up to ")


def test_values_are_json_or_toml_or_text() -> None:
    """--set KEY=VALUE reads the value as JSON, else TOML, else plain text; a pair without '='
    is refused."""
    parsed = parse_pairs(['server.candidates=["http://a", "http://b"]', "ping.count=20",
                          "campaign.rule=24in72h", "checks.scan_lan=false",
                          "ping.interval_s=0.5"])
    assert parsed == {"server.candidates": ["http://a", "http://b"], "ping.count": 20,
                      "campaign.rule": "24in72h", "checks.scan_lan": False,
                      "ping.interval_s": 0.5}
    with pytest.raises(InstructionError, match="expected KEY=VALUE"):
        parse_pairs(["ping.count"])


def test_precedence_defaults_file_central_command_line(tmp_path: Path) -> None:
    """Precedence: the profile's preset, then the file, then the central instruction, then the
    command line; without a central instruction the file's values stand."""
    path = tmp_path / "agent.toml"
    path.write_text('profile = "quick"\n[ping]\ncount = 11\ninterval_s = 0.5\n'
                    '[download]\nstreams = 3\n')
    central = {"ping.count": 21, "download.streams": 4, "upload.streams": 5}
    cfg = config.load(path, {"HOME": str(tmp_path)}, {"download.streams": 6},
                      central=central)
    assert cfg.ping.count == 21  # central over the file
    assert cfg.ping.interval_s == 0.5  # the file over the profile's preset
    assert cfg.download.streams == 6  # the command line over central
    assert cfg.upload.streams == 5
    assert cfg.download.window_s == 4.0  # the file's profile fills what nobody set
    local = config.load(path, {"HOME": str(tmp_path)})
    assert local.ping.count == 11


def test_an_instruction_that_does_not_fit_the_local_file_is_not_applied(
        tmp_path: Path) -> None:
    """Valid on its own, but not with this probe's file: the probe measures under its
    own file and says why."""
    path = tmp_path / "agent.toml"
    path.write_text("[download]\nwarmup_s = 10.0\nwindow_s = 20.0\n")
    doc = {"version": "0123456789abcdef", "settings": {"download.timeout_s": 20.0},
           "suppressions": []}
    fetched = control.Fetched(parse_document(doc), "collector")
    applied = control.apply(fetched, lambda central: config.load(
        path, {"HOME": str(tmp_path)}, central=central))
    assert applied.version is None and applied.cfg.download.timeout_s == 0.0
    assert applied.error is not None and "0123456789abcdef not applied" in applied.error
    assert "download.timeout_s" in applied.error


def test_documents_round_trip_and_bad_ones_are_refused() -> None:
    """An instruction document survives JSON both ways and answers which suppression window
    covers a moment; a bad version or window is refused naming it, and a local-only key
    empties the settings (keeping the windows) with the reason recorded."""
    doc = {"version": "00112233aabbccdd", "settings": {"ping.count": 3},
           "suppressions": [{"id": 4, "starts_at": "2026-12-01T01:00:00Z",
                             "ends_at": "2026-12-01T03:00:00Z", "reason": "works"}]}
    inst = parse_document(doc)
    assert parse_document(json.loads(json.dumps(to_document(inst)))) == inst
    moment = datetime(2026, 12, 1, 2, tzinfo=UTC)
    window = inst.suppression_at(moment)
    assert window is not None and window.reason == "works"
    assert inst.suppression_at(moment + timedelta(hours=1)) is None
    for bad, why in (({**doc, "version": "x"}, "version"),
                     ({**doc, "suppressions": [{"id": 1}]}, "suppressions[0]")):
        with pytest.raises(ValueError, match=why.replace("[", r"\[")):
            parse_document(bad)
    local_only = parse_document({**doc, "settings": {"state_dir": "/"}})
    assert local_only.settings == {} and local_only.suppressions == inst.suppressions
    assert "state_dir: stays in the probe's own file" in (local_only.settings_error or "")


def test_an_offline_probe_keeps_its_last_instruction(tmp_path: Path) -> None:
    """Fetched from a real collector (then 304 with If-None-Match), kept in state_dir;
    with the collector gone, the kept one applies and the error is said."""
    from collector.fleet import control as central
    from collector.fleet.rules import Selector

    state = tmp_path / "state"
    with running_collector(tmp_path / "c") as running:
        token = running.add_probe("p1")
        store = running.open_store()
        try:
            central.set_instruction(store, Selector(probe="p1"), {"ping.count": 9})
        finally:
            store.close()
        client = CollectorClient(running.url, token, 10)
        first = asyncio.run(control.fetch(client, str(state)))
        assert first.source == "collector" and first.error is None
        assert first.instruction is not None
        assert first.instruction.settings == {"ping.count": 9}
        cached = control.InstructionCache(state).load()
        assert cached is not None and cached[0] == f'"{first.instruction.version}"'
        again = asyncio.run(client.instruction(cached[0]))
        assert again is None  # 304: not modified
        second = asyncio.run(control.fetch(client, str(state)))
        assert second.instruction == first.instruction and second.source == "collector"
    offline = asyncio.run(control.fetch(CollectorClient(running.url, token, 2), str(state)))
    assert offline.source == "cache" and offline.instruction == first.instruction
    assert offline.error is not None and "instruction not fetched" in offline.error
    applied = control.apply(offline, lambda c: config.load(None, {"HOME": "/x"},
                                                           central=c))
    assert applied.cfg.ping.count == 9


def test_a_suppression_window_is_planned_around_and_its_bands_refilled() -> None:
    """No slot inside a window; the bands it covered are planned again on the next day
    (inside the campaign window), so the campaign still completes."""
    start = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)  # 01:00 in Rome
    campaign = Campaign(started_at=start, rule="24in72h", timezone=ROME)
    window = (start + timedelta(hours=1), start + timedelta(hours=5))
    rng = random.Random(7)
    now = start
    planned = []
    while (at := next_free_slot(campaign, now, rng, [window])) is not None:
        assert not window[0] <= at < window[1], at
        planned.append(at)
        campaign.record(at + timedelta(minutes=1), True, started=at)
        now = at + timedelta(minutes=1)
    assert campaign.complete
    # The bands 02h-05h Rome were first reachable only on the next day.
    covered = {h.astimezone(ROME_ZONE).hour for h in planned if h >= window[1]
               and h < start + timedelta(days=1)}
    later = [h for h in planned if h >= start + timedelta(days=1)]
    assert {h.astimezone(ROME_ZONE).hour for h in later} >= {2, 3, 4, 5}
    assert not covered & {2, 3, 4, 5}


ROME_ZONE = __import__("zoneinfo").ZoneInfo(ROME)


def test_the_daemon_skips_a_slot_suppressed_while_it_waited(tmp_path: Path) -> None:
    """The window appears after the slot was planned: at the slot the daemon asks again,
    measures nothing, counts the suppression, and plans after the window."""
    now = [datetime(2026, 12, 1, 8, 0, tzinfo=UTC)]
    windows: list[tuple[datetime, datetime]] = []
    measured: list[datetime] = []
    planned_at: list[datetime] = []

    async def plan() -> Plan:
        return Plan("24in72h", ROME, 3, tuple(windows))

    async def wait(at: datetime, _: Control) -> None:
        planned_at.append(at)
        if len(planned_at) == 1:
            # While waiting for the first slot, an operator suppresses the next 2 hours.
            windows.append((now[0], at + timedelta(hours=2)))
        now[0] = max(now[0], at)

    async def measure(_: Plan) -> tuple[datetime, bool]:
        measured.append(now[0])
        now[0] += timedelta(minutes=2)
        return now[0], True

    store = CampaignStore(tmp_path)
    done = asyncio.run(run_campaigns(Control(), store, measure, clock=lambda: now[0],
                                     wait=wait, plan=plan, max_sessions=3,
                                     rng=random.Random(1)))
    assert done == 3
    assert measured[0] >= windows[0][1]  # the first session waited for the window's end
    campaign = store.load()
    assert campaign is not None and campaign.suppressed == 1
    assert sum(campaign.attempted) == 3


def test_the_daemon_reports_while_idle(tmp_path: Path) -> None:
    """Between sessions the campaign loop still sends health reports, every report_every_s (600
    s here) and never more than an hour apart."""
    now = [datetime(2026, 12, 1, 8, 0, tzinfo=UTC)]
    reports: list[tuple[datetime, datetime | None]] = []

    async def wait(at: datetime, _: Control) -> None:
        now[0] = max(now[0], at)

    async def measure(_: Plan) -> tuple[datetime, bool]:
        return now[0], True

    async def report(campaign: object, until: datetime | None,
                     next_at: datetime | None) -> None:
        assert campaign is not None and next_at is not None
        reports.append((now[0], until))

    asyncio.run(run_campaigns(Control(), CampaignStore(tmp_path), measure,
                              clock=lambda: now[0], wait=wait, rule="24in72h",
                              report=report, report_every_s=600, max_sessions=4,
                              rng=random.Random(3)))
    gaps = [(b[0] - a[0]).total_seconds() for a, b in itertools.pairwise(reports)]
    assert reports and all(g <= 3600 for g in gaps)
    assert any(g == pytest.approx(600) for g in gaps)


def test_candidates_rank_by_median_rtt_unanswered_last_ties_in_order() -> None:
    """Server candidates are ranked by median RTT, those that never answered last, and equal
    ones keep their configured order."""
    def c(url: str, rtt: float | None) -> ServerCandidate:
        return ServerCandidate(url=url, rtts_ms=() if rtt is None else (rtt,),
                               rtt_median_ms=rtt, error=None)

    got = rank([c("a", None), c("b", 5.0), c("c", 2.0), c("d", 5.0), c("e", None)])
    assert got == [2, 1, 3, 0, 4]


def test_check_config_refuses_a_bad_campaign_key(tmp_path: Path) -> None:
    """A campaign window over 30 days is refused at config load, naming campaign.window_days."""
    with pytest.raises(ConfigError, match=r"campaign.window_days: must be <= 30"):
        config.parse({"campaign": {"window_days": 31}})


def test_a_fully_suppressed_daemon_waits_reports_and_survives_a_reload_and_bad_plans(
        tmp_path: Path) -> None:
    """A window longer than the campaign: the daemon waits (never spins), keeps
    reporting, handles a SIGHUP, and a plan or a report that raises is logged, not
    fatal; after the window it measures."""
    start = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    now = [start]
    window = (start, start + timedelta(days=5))
    control_ = Control()
    waits: list[datetime] = []
    reports: list[datetime | None] = []
    errors: list[str] = []
    calls = [0]

    async def plan() -> Plan:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("collector answered nonsense")
        return Plan("24in72h", ROME, 3, (window,))

    async def wait(at: datetime, ctl: Control) -> None:
        waits.append(at)
        assert len(waits) < 500, "the daemon spins"
        if len(waits) == 3:
            ctl.reload.set()  # SIGHUP while suppressed
        now[0] = max(now[0], at)

    async def report(campaign: object, until: datetime | None,
                     next_at: datetime | None) -> None:
        reports.append(until)
        if len(reports) == 2:
            raise OSError("disk gone")

    async def measure(_: Plan) -> tuple[datetime, bool]:
        return now[0], True

    reloads: list[int] = []
    done = asyncio.run(run_campaigns(
        control_, CampaignStore(tmp_path), measure, clock=lambda: now[0], wait=wait,
        plan=plan, report=report, report_every_s=3600, max_sessions=1,
        on_reload=lambda: reloads.append(1), on_error=errors.append,
        rng=random.Random(5)))
    assert done == 1 and now[0] >= window[1]
    assert reloads == [1] and not control_.reload.is_set()
    assert any(u == window[1] for u in reports)  # it said it is suppressed, and until when
    assert len(waits) < 5 * 24 + 10  # about one wait an hour, not a spin
    assert any("planning failed" in e for e in errors)
    assert any("health report failed" in e for e in errors)


def test_settings_refused_keep_their_suppressions() -> None:
    """Settings this agent refuses (a newer collector's key, say) are not applied, but
    the maintenance window that came with them is honoured."""
    doc = {"version": "00112233aabbccdd", "settings": {"ping.count": -1},
           "suppressions": [{"id": 1, "starts_at": "2026-12-01T01:00:00Z",
                             "ends_at": "2026-12-01T03:00:00Z", "reason": "works"}]}
    inst = parse_document(doc)
    assert inst.settings == {} and "ping.count" in (inst.settings_error or "")
    assert inst.suppression_at(datetime(2026, 12, 1, 2, tzinfo=UTC)) is not None
    applied = control.apply(control.Fetched(inst, "collector"),
                            lambda c: config.load(None, {"HOME": "/x"}, central=c))
    assert applied.version is None and applied.instruction is inst
    assert applied.error is not None and "not applied" in applied.error


def test_odd_values_are_refused_in_one_line() -> None:
    """A time zone that is not one (a region name, 300 characters) and a value JSON cannot carry
    (a date) are each refused in one line."""
    for settings, message in (({"campaign.timezone": "Europe"}, "not a known time zone"),
                              ({"campaign.timezone": "x" * 300}, "not a known time zone"),
                              ({"ping.count": datetime(1979, 5, 27).date()},
                               "not a JSON value")):
        with pytest.raises(InstructionError, match=message):
            check(settings)


def test_the_command_line_server_beats_candidates(tmp_path: Path) -> None:
    """--server on the command line replaces the configured server candidates: check-config
    shows that one server and no candidates."""
    from click.testing import CliRunner

    from agent.app.cli import main

    path = tmp_path / "agent.toml"
    path.write_text('[server]\ncandidates = ["http://a.example:1", "http://b.example:1"]\n')
    done = CliRunner().invoke(main, ["--config", str(path), "--server",
                                     "http://127.0.0.1:9", "--set",
                                     f"state_dir={tmp_path / 's'}", "check-config"])
    assert done.exit_code == 0, done.output
    assert "measurement server: http://127.0.0.1:9" in done.output
    assert "candidates" not in done.output
