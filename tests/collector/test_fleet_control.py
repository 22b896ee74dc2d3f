"""Fleet control on the collector's side, against a real collector on 127.0.0.1 (port 0) and
its CLI: instruction rules and their precedence, the admin and probe APIs (who may
read what, ETags, refusals naming the key), suppression windows, health reports, and
the certificate's note of a suppression."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from agent import spec
from agent.schema import SCHEMA_VERSION, utc_now
from collector.cli.main import main
from collector.fleet.rules import Rule, Selector, Window, effective
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector
from collector.storage.model import Probe
from tests.factories import session_dict
from tests.httpclient import post_json, request

LAZIO = LineMetadata(operator="Op", region="Lazio", technology="FTTH")


def _probe(name: str, line: LineMetadata = LAZIO) -> Probe:
    return Probe(name=name, created_at="2026-01-01T00:00:00Z", revoked_at=None, line=line)


def test_the_most_specific_rule_wins_and_each_key_names_its_rule() -> None:
    """Per key, the most specific selector wins (probe, then operator with region, region, all)
    and the effective settings name the rule each came from; equal instructions give equal
    versions, and an active suppression window changes the document and its version while an
    expired one is left out."""
    rules = [
        Rule(Selector(probe="p1"), {"ping.count": 40}, "2026-01-01T00:00:00Z"),
        Rule(Selector(region="Lazio", operator="Op"), {"ping.count": 30,
                                                        "upload.streams": 2}, "2026-01-03Z"),
        Rule(Selector(region="Lazio"), {"ping.count": 20, "download.streams": 4,
                                        "upload.streams": 1}, "2026-01-02T00:00:00Z"),
        Rule(Selector(), {"ping.count": 10, "profile": "quick"}, "2026-01-04T00:00:00Z"),
        Rule(Selector(region="Umbria"), {"profile": "rmbt"}, "2026-01-01T00:00:00Z"),
    ]
    mine = effective(rules, [], _probe("p1"), utc_now())
    assert mine.settings == {"ping.count": 40, "profile": "quick", "download.streams": 4,
                             "upload.streams": 2}
    assert mine.sources == {"ping.count": "--probe p1", "profile": "--all",
                            "download.streams": "--region Lazio",
                            "upload.streams": "--operator Op --region Lazio"}
    other = effective(rules, [], _probe("p2", LineMetadata(region="Umbria")), utc_now())
    assert other.settings == {"ping.count": 10, "profile": "rmbt"}
    # Equal instructions, equal versions; a different one, a different version.
    again = effective(list(reversed(rules)), [], _probe("p1"), utc_now())
    assert again.document["version"] == mine.document["version"]
    assert other.document["version"] != mine.document["version"]
    windows = [Window(1, Selector(region="Lazio"), "2000-01-01T00:00:00Z",
                      "2000-01-02T00:00:00Z", "over", "x"),
               Window(2, Selector(region="Lazio"), "2000-01-01T00:00:00Z",
                      "2999-01-01T00:00:00Z", "long", "x")]
    suppressed = effective(rules, windows, _probe("p1"), utc_now())
    assert [w["id"] for w in suppressed.document["suppressions"]] == [2]
    assert suppressed.document["version"] != mine.document["version"]


def _cli(collector: RunningCollector, *args: str) -> tuple[int, str]:
    done = CliRunner().invoke(main, ["--db", str(collector.db_path), *args])
    return done.exit_code, done.output


def test_cli_refuses_bad_keys_values_and_selectors(collector: RunningCollector) -> None:
    """`instruction set` refuses unknown and local-only keys, bad values, a missing or
    conflicting selector, an unknown probe and a pair without '=', each naming it; set, unset
    and show then work."""
    collector.add_probe("p1", LAZIO)
    for args, message in (
            (["--all", "ping.bogus=1"], "ping.bogus: unknown key"),
            (["--all", "collector.url=http://x"], "collector.url: stays in the probe"),
            (["--all", "delivery.compression=none"], "delivery.compression: stays"),
            (["--all", "ping.count=0"], "ping.count: must be >= 1, got 0"),
            (["--all", "ping.count=lots"], "ping.count: expected an integer"),
            (["--region", "Lazio", "server.candidates=[1]"], "server.candidates[0]"),
            (["ping.count=3"], "give --all, or one or more of"),
            (["--all", "--probe", "p1", "ping.count=3"], "give --all, or one or more"),
            (["--probe", "nobody", "ping.count=3"], "no probe named 'nobody'"),
            (["--all", "ping.count"], "expected KEY=VALUE")):
        code, out = _cli(collector, "instruction", "set", *args)
        assert code != 0 and message in out, (args, out)
    code, out = _cli(collector, "instruction", "set", "--all", "ping.count=12")
    assert code == 0, out
    code, out = _cli(collector, "instruction", "unset", "--all", "ping.count")
    assert code == 0 and "(deleted)" in out
    code, out = _cli(collector, "instruction", "show", "--probe", "p1")
    assert code == 0 and "no settings" in out


def test_the_probe_reads_only_its_own_instruction(collector: RunningCollector) -> None:
    """A probe's token reads its own instruction only (with an ETag and 304 on If-None-Match);
    asking for another probe's is 403 without its settings; the effective view is for admins;
    no token is 401."""
    t1 = collector.add_probe("p1", LAZIO)
    t2 = collector.add_probe("p2")
    admin = collector.add_token("ops", "admin")
    analyst = collector.add_token("ana", "analyst")
    code, _ = _cli(collector, "instruction", "set", "--probe", "p2", "ping.count=33")
    assert code == 0
    url = collector.url + spec.INSTRUCTION_PATH

    def get(token: str, suffix: str = "", **headers: str) -> tuple[int, object, dict]:
        return request("GET", url + suffix, headers={"Authorization": f"Bearer {token}",
                                                     **headers})

    status, doc, headers = get(t1)
    assert status == 200 and doc["settings"] == {}  # type: ignore[index]
    assert headers["etag"] == f'"{doc["version"]}"'  # type: ignore[index]
    assert get(t1, If_None_Match=headers["etag"])[0] in (200, 304)
    status, _, _ = request("GET", url, headers={"Authorization": f"Bearer {t1}",
                                                "If-None-Match": headers["etag"]})
    assert status == 304
    status, doc, _ = get(t2)
    assert status == 200 and doc["settings"] == {"ping.count": 33}  # type: ignore[index]
    # p1's token asking for p2's: refused, and p2's settings are not in the answer.
    status, doc, _ = get(t1, "?probe=p2")
    assert status == 403 and "33" not in json.dumps(doc)
    effective_url = collector.url + "/api/v1/instructions/effective?probe=p2"
    for token, want in ((t1, 403), (analyst, 403), (admin, 200)):
        status, _, _ = request("GET", effective_url,
                               headers={"Authorization": f"Bearer {token}"})
        assert status == want, token
    assert request("GET", url)[0] == 401


def test_admin_api_sets_rules_and_windows_and_names_what_is_wrong(
        collector: RunningCollector) -> None:
    """The admin API stores rules and suppression windows, turning local times into UTC; each
    bad body (key, value, selector, times, empty reason, unknown field) is a 422 naming the
    field; a window is deleted once, then 404."""
    collector.add_probe("p1", LAZIO)
    admin = collector.add_token("ops", "admin")
    url = collector.url + "/api/v1/instructions"
    ok = post_json(url, {"selector": {"region": "Lazio"},
                         "set": {"ping.count": 15, "server.candidates": ["http://a:1"]}},
                   admin)
    assert ok[0] == 200 and ok[1]["selects"] == "--region Lazio"
    for body, field in (
            ({"selector": {"region": "Lazio"}, "set": {"ping.nope": 1}}, "ping.nope"),
            ({"selector": {"region": "Lazio"}, "set": {"ping.count": -2}}, "ping.count"),
            ({"selector": {"region": "Lazio"}, "set": {"probe_id": "x"}}, "probe_id"),
            ({"selector": {"planet": "Mars"}, "set": {}}, "selector"),
            ({"selector": {}, "set": {}}, "selector"),
            ({"set": {"ping.count": 3}}, "selector"),
            ({"selector": {"all": True}, "set": [1]}, "set"),
            ({"selector": {"all": True}, "bogus": 1}, "bogus")):
        status, reply = post_json(url, body, admin)
        assert status == 422 and reply["field"] == field, (body, reply)
    status, doc, _ = request("GET", collector.url + "/api/v1/instructions",
                             headers={"Authorization": f"Bearer {admin}"})
    assert status == 200 and doc["rules"][0]["settings"]["ping.count"] == 15
    windows = collector.url + "/api/v1/suppressions"
    for body, field in (({"selector": {"all": True}, "from": "2030-01-01T00:00",
                          "until": "2030-01-01T02:00Z", "reason": "x"}, "from"),
                        ({"selector": {"all": True}, "from": "2030-01-01T02:00Z",
                          "until": "2030-01-01T01:00Z", "reason": "x"}, "until"),
                        ({"selector": {"all": True}, "from": "2030-01-01T00:00Z",
                          "until": "2030-03-01T00:00Z", "reason": "x"}, "until"),
                        ({"selector": {"all": True}, "from": "2030-01-01T00:00Z",
                          "until": "2030-01-01T01:00Z", "reason": ""}, "reason")):
        status, reply = post_json(windows, body, admin)
        assert status == 422 and reply["field"] == field, (body, reply)
    status, made = post_json(windows, {"selector": {"probe": "p1"},
                                       "from": "2030-01-01T00:00+01:00",
                                       "until": "2030-01-01T03:00+01:00",
                                       "reason": "fibre works"}, admin)
    assert status == 201 and made["starts_at"] == "2029-12-31T23:00:00.000000Z"
    code, out = _cli(collector, "instruction", "show", "--probe", "p1", "--format", "json")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["suppressions"][0]["reason"] == "fibre works"
    assert shown["sources"]["ping.count"] == "--region Lazio"
    delete = f"{windows}/{made['id']}/delete"
    assert post_json(delete, {}, admin)[0] == 200
    assert post_json(delete, {}, admin)[0] == 404
    assert post_json(f"{windows}/x1/delete", {}, admin)[0] == 404


def _health(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "schema_version": SCHEMA_VERSION, "agent_version": "0.1.0",
        "reported_at": utc_now(), "mode": "daemon", "instruction_version": None,
        "instruction_error": None, "campaign": None, "spool_results": 3,
        "spool_bytes": 4096, "dead_letters": 1, "gaps_waiting": 0, "dropped_total": 0,
        "clock": None, "last_error": None, "failing_checks": ["wireless"],
        "suppressed_until": None, "next_session_at": None}
    doc.update(changes)
    return doc


def test_health_reports_are_validated_and_shown(collector: RunningCollector) -> None:
    """Health reports are checked field by field (422 naming it), capped in size (413) and need
    the probe's token (401); the fleet view and its CSV show each probe's problems, and a
    probe never heard from as never seen."""
    token = collector.add_probe("p1", LAZIO)
    collector.add_probe("p2")
    url = collector.url + spec.HEALTH_PATH
    for bad, field in ((_health(spool_results=-1), "spool_results"),
                       (_health(mode="cron"), "mode"),
                       (_health(failing_checks=["Not A Code"]), "failing_checks[0]"),
                       (_health(extra=1), "extra"),
                       (_health(last_error="x" * 600), "last_error"),
                       (_health(schema_version=4), "schema_version")):
        status, reply = post_json(url, bad, token)
        assert status == 422 and reply["field"] == field, (field, reply)
    big = _health(last_error="x" * 20_000)
    assert post_json(url, big, token)[0] == 413
    assert post_json(url, _health(), None)[0] == 401
    assert post_json(url, _health(), token)[0] == 200
    recent = session_dict(probe_id="p1", started_at=utc_now())
    recent["ended_at"] = recent["started_at"]
    assert post_json(collector.url + spec.RESULTS_PATH, recent, token)[0] == 201
    status, doc, _ = request("GET", collector.url + "/api/v1/fleet")
    rows = {r["probe_id"]: r for r in doc["probes"]}
    assert rows["p1"]["problems"] == ["1 dead letter(s)", "failing checks: wireless"]
    assert rows["p1"]["healthy"] is False and rows["p1"]["spool_results"] == 3
    assert rows["p1"]["sessions"] == 1 and rows["p2"]["problems"] == ["never seen"]
    status, text, headers = request("GET", collector.url + "/api/v1/fleet?format=csv")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert text.decode().splitlines()[1].startswith("p1,Op,Lazio,FTTH,")
    assert request("GET", collector.url + "/api/v1/fleet?format=xml")[0] == 400


def test_the_certificate_shows_a_suppression(collector: RunningCollector,
                                             tmp_path: Path) -> None:
    """A suppression window for the probe appears in its certificate (text, JSON with the bands
    it covers, HTML), and another probe's window does not."""
    token = collector.add_probe("p1", LAZIO)
    doc = session_dict(probe_id="p1")
    assert post_json(collector.url + spec.RESULTS_PATH, doc, token)[0] == 201
    started = doc["started_at"]
    store = collector.open_store()
    try:
        store.add_suppression(Selector(probe="p1").key(), "2000-01-01T00:00:00Z",
                              "2999-01-01T00:00:00Z", "works on the cabinet", utc_now())
        store.add_suppression(Selector(probe="p9").key(), "2000-01-01T00:00:00Z",
                              "2999-01-01T00:00:00Z", "another probe's", utc_now())
    finally:
        store.close()
    code, out = _cli(collector, "certify", "--probe", "p1")
    assert code == 0, out
    assert "works on the cabinet" in out and "another probe's" not in out
    code, out = _cli(collector, "certify", "--probe", "p1", "--format", "json")
    cert = json.loads(out)
    assert cert["suppressions"][0]["bands"] == list(range(24))
    assert started  # the session is inside the window's span
    page = tmp_path / "certificate.html"
    code, out = _cli(collector, "certify", "--probe", "p1", "--format", "html", "-o",
                     str(page))
    assert code == 0, out
    assert 'class="suppressed"' in page.read_text()


def test_rules_that_break_together_are_refused(collector: RunningCollector) -> None:
    """A timeout for every probe and a longer window for a region: each fine alone,
    together too short for Lazio's probes. The second is refused naming the key and the
    probe; a region with no probe in it takes it."""
    collector.add_probe("p1", LAZIO)
    code, out = _cli(collector, "instruction", "set", "--all", "download.timeout_s=20")
    assert code == 0, out
    code, out = _cli(collector, "instruction", "set", "--region", "Lazio",
                     "download.window_s=30")
    assert code != 0 and "download.timeout_s: is shorter than" in out
    assert "probe p1's instruction" in out
    code, out = _cli(collector, "instruction", "set", "--region", "Umbria",
                     "download.window_s=30")
    assert code == 0, out


# Each value within its own range, three weeks a session all together.
TOO_LONG = {"download.tests": 1000, "download.window_s": 600, "ping.count": 10000}
FIGURE = "session: would last up to 21.2 days = 1833054 s (ping 2.8 h: "
LIMIT = "over the 900 s limit (one 15-minute slot of a 96-a-day campaign)"


def test_an_instruction_planning_too_long_a_session_is_refused_naming_the_figure(
        collector: RunningCollector) -> None:
    """Through the admin API (422) and `instruction set`, with the computed figure and
    the limit; nothing is stored, and a session within the limits is taken."""
    collector.add_probe("p1", LAZIO)
    admin = collector.add_token("ops", "admin")
    url = collector.url + "/api/v1/instructions"
    status, reply = post_json(url, {"selector": {"region": "Lazio"}, "set": TOO_LONG},
                              admin)
    assert status == 422 and reply["field"] is None, reply
    assert reply["error"].startswith(FIGURE) and LIMIT in reply["error"], reply
    assert "download 21.1 days: 1000 tests x 3 attempts x 607 s" in reply["error"]
    code, out = _cli(collector, "instruction", "set", "--all",
                     *(f"{k}={v}" for k, v in TOO_LONG.items()))
    assert code != 0 and FIGURE in out and LIMIT in out, out
    status, doc, _ = request("GET", url, headers={"Authorization": f"Bearer {admin}"})
    assert status == 200 and doc["rules"] == []
    good = {"download.tests": 3, "download.window_s": 15, "ping.count": 100}
    status, reply = post_json(url, {"selector": {"region": "Lazio"}, "set": good}, admin)
    assert status == 200 and reply["settings"] == good, reply
    code, out = _cli(collector, "instruction", "set", "--all", "upload.tests=2")
    assert code == 0, out


def test_rules_within_the_limit_alone_but_over_it_together_are_refused(
        collector: RunningCollector) -> None:
    """5 downloads for everyone, a 40 s window in Lazio: 833 GB for p1 at 10 Gbit/s,
    over the 300 GB a session may plan; refused naming the probe."""
    collector.add_probe("p1", LAZIO)
    code, out = _cli(collector, "instruction", "set", "--all", "download.tests=5")
    assert code == 0, out
    code, out = _cli(collector, "instruction", "set", "--region", "Lazio",
                     "download.window_s=40")
    assert code != 0 and "session: would move up to 833 GB" in out, out
    assert "over the 300 GB limit of a session" in out and "probe p1's instruction" in out


def test_a_probe_running_dual_stack_of_its_own_accord_is_planned_dual_stack(
        collector: RunningCollector) -> None:
    """file-131-06 plans 731 s, 1462 s dual stack. p1's last session ran dual stack with
    no rule saying so (its own file): a rule giving it the profile is refused (422 and
    `instruction set`), naming p1 and the assumption; p2, single stack, takes it; so
    does p1 when the instruction sets the family itself."""
    tokens = {name: collector.add_probe(name, LAZIO) for name in ("p1", "p2")}
    for name, requested in (("p1", "both"), ("p2", "any")):
        doc = session_dict(probe_id=name)
        doc["address_family"], doc["address_family_requested"] = "ipv4", requested
        assert post_json(collector.url + spec.RESULTS_PATH, doc, tokens[name])[0] == 201
    admin = collector.add_token("ops", "admin")
    url = collector.url + "/api/v1/instructions"
    status, reply = post_json(url, {"selector": {"region": "Lazio"},
                                    "set": {"profile": "file-131-06"}}, admin)
    assert status == 422 and reply["field"] is None, reply
    assert reply["error"].startswith("session: would last up to 24.4 min = 1462 s (2 "
                                     "sessions, IPv4 then IPv6, of "), reply
    assert reply["error"].endswith(
        'except server.address_family = "both" as the probe\'s last session ran; a probe '
        "whose own file sets other values plans again, and over a limit keeps its "
        "previous instruction and reports why) (in probe p1's instruction, with the "
        "other rules it follows)"), reply
    code, out = _cli(collector, "instruction", "set", "--all", "profile=file-131-06")
    assert code != 0 and "1462 s" in out and "probe p1's instruction" in out, out
    code, out = _cli(collector, "instruction", "set", "--probe", "p2",
                     "profile=file-131-06")
    assert code == 0, out
    code, out = _cli(collector, "instruction", "set", "--region", "Lazio",
                     "profile=file-131-06", "server.address_family=ipv4")
    assert code == 0, out


def test_only_a_family_no_rule_set_is_taken_from_the_last_session() -> None:
    """A dual-stack last session shows the probe's own file only when no rule in force
    set server.address_family (a rule's "both" being unset leaves the file unknown)."""
    from collector.fleet.control import _own_dual_stack

    p1, p2, p3 = _probe("p1"), _probe("p2"), _probe("p3", LineMetadata(region="Umbria"))
    before = [Rule(Selector(probe="p2"), {"server.address_family": "both"}, "x"),
              Rule(Selector(region="Umbria"), {"ping.count": 5}, "x")]
    assert _own_dual_stack({"p1", "p2", "p3"}, before, [p1, p2, p3]) == {"p1", "p3"}
    assert _own_dual_stack({"p2"}, before, [p1, p2, p3]) == set()


def test_fleet_exports_are_safe_for_spreadsheets_and_terminals(
        collector: RunningCollector) -> None:
    """A health report's text with a formula and terminal escapes is quoted in the fleet CSV and
    stripped in the CLI; a delete of a window id that is not a number is a 404."""
    token = collector.add_probe("p1", LAZIO)
    hostile = _health(last_error="=HYPERLINK(\"http://x\")\x1b[2J", dead_letters=0,
                      failing_checks=[])
    assert post_json(collector.url + spec.HEALTH_PATH, hostile, token)[0] == 200
    status, text, _ = request("GET", collector.url + "/api/v1/fleet?format=csv")
    assert status == 200 and ',"\'=HYPERLINK(' in text.decode()
    code, out = _cli(collector, "fleet")
    assert code == 0 and "\x1b" not in out
    assert post_json(collector.url + "/api/v1/suppressions/%C2%B2/delete", {},
                     collector.add_token("ops", "admin"))[0] == 404
