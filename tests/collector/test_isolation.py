"""Poison isolation: what one probe, one health report, one instruction or one
anonymous client writes never makes a read about anyone else fail. One test per finding
(each failed before its fix), then the property on both backends."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from agent import spec
from agent.schema import SCHEMA_VERSION, format_utc, utc_now
from collector import safetext
from collector.alerts import worker as alerter
from collector.cli.main import main
from collector.config import CollectorConfig, ServerConfig, StorageConfig
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector, running_collector
from tests.factories import session_dict, store_as_before
from tests.httpclient import post_json, request

LINE = LineMetadata(operator="OpX", offer="Fibra 1G", region="Lazio", technology="FTTH",
                    download_min_kbps=60_000.0)
JSON = {"Content-Type": "application/json"}


def _cfg(**server: Any) -> CollectorConfig:
    return replace(CollectorConfig(), server=replace(ServerConfig(), query_auth=False,
                                                     probe_requests_per_min=0, **server))


def _cli(c: RunningCollector, *args: str) -> tuple[int, str]:
    db = c.config.storage.url if c.config.storage.backend == "postgresql" else str(c.db_path)
    done = CliRunner().invoke(main, ["--db", db, *args])
    return done.exit_code, done.output


def _raw_post(url: str, body: bytes, token: str | None) -> tuple[int, Any]:
    headers = {**JSON, **({"Authorization": f"Bearer {token}"} if token else {})}
    status, data, _ = request("POST", url, body, headers)
    return status, data


# --- finding 1: timestamps ------------------------------------------------------------------


def test_format_utc_pads_the_year() -> None:
    """format_utc writes a four-digit year (0999) and microseconds, so stored times sort as
    text."""
    assert format_utc(datetime(999, 6, 1, tzinfo=UTC)) == "0999-06-01T00:00:00.000000Z"
    assert format_utc(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)) == \
        "2026-01-02T03:04:05.000006Z"


def test_implausible_timestamps_are_refused_naming_the_field(tmp_path: Path) -> None:
    """0999, 1999 and two days ahead: 422 naming the field, one result alone or in a
    batch, at the top or nested (a transfer's start); a gap record and a health report
    too. A good result still goes in."""
    ahead = format_utc(datetime.now(UTC) + timedelta(days=2))
    with running_collector(tmp_path, _cfg()) as c:
        token = c.add_probe("p1")
        url = c.url + spec.RESULTS_PATH
        for when, where in (("0999-06-01T00:00:00.000000Z", "started_at"),
                            ("1999-12-31T23:00:00.000000Z", "started_at"),
                            (ahead, "started_at")):
            doc = session_dict(probe_id="p1", started_at=when)
            doc["ended_at"] = when
            status, reply = post_json(url, doc, token)
            assert (status, reply["field"]) == (422, where), reply
            assert "plausible window" in reply["error"]
            status, reply = post_json(url + "/batch", {"results": [doc]}, token)
            assert status == 200 and reply["items"][0]["status"] == 422
        nested = session_dict(probe_id="p1")
        nested["transfers"][0]["started_at"] = "0999-01-01T00:00:00.000000Z"
        status, reply = post_json(url, nested, token)
        assert (status, reply["field"]) == (422, "transfers[0].started_at"), reply
        gap = {"schema_version": 4, "gap_id": "6f1c2c9e-7d3c-4e0a-9d1e-4b9b7c1e2f30",
               "probe_id": "p1", "recorded_at": "0999-01-01T00:00:00Z",
               "reason": "spool_full", "dropped": 1,
               "first_started_at": "2026-11-20T10:00:00Z",
               "last_started_at": "2026-11-20T10:00:00Z"}
        status, reply = post_json(c.url + "/api/v1/gaps", gap, token)
        assert (status, reply["field"]) == (422, "recorded_at"), reply
        status, reply = post_json(c.url + spec.HEALTH_PATH,
                                  _health(reported_at="0999-01-01T00:00:00Z"), token)
        assert (status, reply["field"]) == (422, "reported_at"), reply
        assert post_json(url, session_dict(probe_id="p1"), token)[0] == 201
        assert c.count_results() == 1


def _health(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "agent_version": "0.1.0", "reported_at": utc_now(),
        "mode": "daemon", "instruction_version": None, "instruction_error": None,
        "campaign": None, "spool_results": 0, "spool_bytes": 0, "dead_letters": 0,
        "gaps_waiting": 0, "dropped_total": 0, "clock": None, "last_error": None,
        "failing_checks": [], "suppressed_until": None, "next_session_at": None}
    doc.update(changes)
    return doc


def _metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}" if want else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_poisoned_row_costs_its_own_probe_never_the_fleet(tmp_path: Path) -> None:
    """A row an older release stored with "999-06-01T..." (it sorted as the attacker's
    newest session): the scrape is up with the victim's series, the alerter's tick
    raises the victim's alert, every report and certificate answers; the row is counted
    as unreadable; `result delete` removes it, audited."""
    cfg = replace(_cfg(), alerts=replace(CollectorConfig().alerts, enabled=False))
    with running_collector(tmp_path, cfg) as c:
        victim = c.add_probe("victim", LINE)
        attacker = c.add_probe("attacker", LINE)
        for name, token in (("victim", victim), ("attacker", attacker)):
            assert post_json(c.url + spec.RESULTS_PATH, session_dict(probe_id=name),
                             token)[0] == 201
        poisoned = store_as_before(c, session_dict(probe_id="attacker"),
                                   "999-06-01T00:00:00.000000Z")

        status, body, _ = request("GET", c.url + "/metrics")
        assert status == 200
        text = body if isinstance(body, str) else body.decode()
        assert _metric(text, "bbprobe_collector_state_up") == 1.0
        assert _metric(text, "bbprobe_probe_last_session_valid", probe="victim") == 1.0
        assert (_metric(text, "bbprobe_collector_unreadable_rows_total", table="results")
                or 0) >= 1
        for path in ("/api/v1/report?probe=victim", "/api/v1/report",
                     "/api/v1/report?format=csv", "/report", "/report?probe=attacker",
                     "/api/v1/certificate?probe=victim",
                     "/api/v1/certificate?probe=attacker", "/api/v1/completeness",
                     "/api/v1/fleet", "/api/v1/fleet?format=csv", "/fleet",
                     "/api/v1/results?probe=attacker"):
            status, reply, _ = request("GET", c.url + path)
            assert status == 200, (path, reply)
        # The alerter's tick goes on: the victim is silent (seen long ago) and alerts.
        later = datetime.now(UTC) + timedelta(days=30)
        tick_cfg = replace(cfg, alerts=replace(cfg.alerts, enabled=True))
        store = c.open_store()
        try:
            found, _final = alerter.evaluate(store, tick_cfg, later, False, {})
        finally:
            store.close()
        assert {a.probe for a in found if a.kind == "probe_silent"} >= {"victim"}

        code, out = _cli(c, "result", "delete", poisoned, "--reason", "dated 0999 by 0.15")
        assert code == 0 and poisoned in out, out
        code, out = _cli(c, "result", "deleted", "--format", "json")
        assert code == 0 and json.loads(out)[0]["reason"] == "dated 0999 by 0.15", out
        assert _cli(c, "result", "delete", poisoned, "--reason", "again")[0] != 0
        assert c.count_results() == 2


# --- finding 2: lone surrogates and escapes in health reports -------------------------------


def test_lone_surrogates_are_refused_and_escapes_never_reach_a_terminal(
        tmp_path: Path) -> None:
    """A health report with a lone surrogate is a 400 and a control character in the version a
    422; free text with terminal escapes is stored but never reaches the fleet page, API
    text, CSV or CLI raw."""
    with running_collector(tmp_path, _cfg()) as c:
        token = c.add_probe("p1", LINE)
        c.add_probe("p2", LINE)
        url = c.url + spec.HEALTH_PATH
        raw = json.dumps(_health(last_error="X")).replace('"X"', '"\\ud800"').encode()
        status, reply = _raw_post(url, raw, token)
        assert status == 400 and "Unicode" in reply["error"], reply
        raw = json.dumps(_health()).replace('"0.1.0"', '"\\udcff"').encode()
        assert _raw_post(url, raw, token)[0] == 400
        status, reply = post_json(url, _health(agent_version="0.1\x1b[2J"), token)
        assert (status, reply["field"]) == (422, "agent_version"), reply
        # Free text may hold an escape; no output lets it through raw.
        hostile = "\x1b]0;pwned\x07\x1b[31m=HYPERLINK(\"x\")"
        assert post_json(url, _health(last_error=hostile), token)[0] == 200
        for path in ("/fleet", "/api/v1/fleet", "/api/v1/fleet?format=csv"):
            status, body, _ = request("GET", c.url + path)
            assert status == 200, path
            text = body.decode() if isinstance(body, bytes) else \
                body if isinstance(body, str) else json.dumps(body)
            # JSON carries it escaped ("\u001b"), which is JSON's business.
            assert "\x1b" not in text and "\x07" not in text, path
        for fmt in ("text", "csv"):
            code, out = _cli(c, "fleet", "--format", fmt)
            assert code == 0 and "\x1b" not in out and "\x07" not in out, out
    assert safetext.csv_cell("=1+1\x1b") == "'=1+1?"
    assert safetext.unicode("a\ud800b") == "a\ufffdb"
    assert json.loads(safetext.dumps({"k\udc80": ["\ud800"]})) == {"k\ufffd": ["\ufffd"]}


# --- finding 3: alert keys ----------------------------------------------------------------


def _campaign(probe: str, day: str, bps: float) -> list[Any]:
    from tests import factories

    start = datetime.fromisoformat(f"{day}T00:00:00+01:00").astimezone(UTC)
    return [factories.session(probe, started_at=format_utc(
        start + timedelta(minutes=15 * q + 1)), transfers=[
        factories.attempt("download", bps=bps), factories.attempt("upload", bps=bps / 5)])
        for q in range(96)]


def test_a_campaign_spelt_twenty_ways_makes_one_breach(tmp_path: Path) -> None:
    """20 reports of one completed campaign, its start 1 µs apart (and once with an
    offset): one contract_breach, not 19 (finding 3)."""
    cfg = replace(_cfg(), alerts=replace(CollectorConfig().alerts, enabled=True))
    with running_collector(tmp_path, cfg) as c:
        token = c.add_probe("roma-01", LINE)
        sessions = _campaign("roma-01", "2026-11-18", 50e6)
        for start in range(0, 96, 48):
            batch = {"results": [json.loads(json.dumps(_doc(s)))
                                 for s in sessions[start:start + 48]]}
            assert post_json(c.url + spec.RESULTS_PATH + "/batch", batch, token)[0] == 200
        first = datetime.fromisoformat(sessions[0].started_at)
        moment = first + timedelta(days=3, hours=1)  # the campaign just over
        store = c.open_store()
        try:
            for i in range(20):
                began = first - timedelta(microseconds=i)
                text = format_utc(began) if i else began.astimezone(
                    datetime.now().astimezone().tzinfo).isoformat()
                report = _health(campaign={
                    "rule": "96in24h", "started_at": text,
                    "deadline_at": "2026-11-21T00:00:00.000000Z", "bands_filled": 24,
                    "sessions_counted": 96, "sessions_needed": 96, "complete": True,
                    "sessions_suppressed": 0})
                alerter.on_report(store, cfg, "roma-01", report, moment)
            kinds = [a["kind"] for a in store.alerts(100)]
        finally:
            store.close()
    assert kinds == ["contract_breach"]


def _doc(result: Any) -> dict[str, Any]:
    from tests import factories

    return factories.to_dict(result)


# --- findings 4 and 6: batches ----------------------------------------------------------------


def test_every_result_is_capped_however_it_arrives(tmp_path: Path) -> None:
    """A 2 MiB result: 413 alone and inside a batch (where it was stored), while the
    batch's good results are stored; a 12.6 MiB one is refused too."""
    with running_collector(tmp_path, _cfg()) as c:
        token = c.add_probe("p1")
        big = session_dict(probe_id="p1")
        big["agent_version"] = "x"
        big["transfers"][0]["error"] = "y" * 2_000_000
        assert post_json(c.url + spec.RESULTS_PATH, big, token)[0] == 413
        good = session_dict(probe_id="p1")
        status, reply = post_json(c.url + spec.RESULTS_PATH + "/batch",
                                  {"results": [big, good]}, token)
        assert status == 200, reply
        assert [i["status"] for i in reply["items"]] == [413, 201], reply
        assert reply["items"][0]["result_id"] == big["result_id"]
        huge = session_dict(probe_id="p1")
        huge["transfers"][0]["error"] = "z" * 12_600_000
        status, reply = post_json(c.url + spec.RESULTS_PATH + "/batch",
                                  {"results": [huge]}, token)
        assert status == 200 and reply["items"][0]["status"] == 413, reply
        assert c.count_results() == 1


def test_a_deeply_nested_batch_is_a_400(tmp_path: Path) -> None:
    """A batch nested 100,000 deep is refused as a 4xx, and one deep item gives no 5xx (no
    recursion error)."""
    with running_collector(tmp_path, _cfg()) as c:
        token = c.add_probe("p1")
        deep = b'{"results": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}"
        status, reply = _raw_post(c.url + spec.RESULTS_PATH + "/batch", deep, token)
        assert status in (400, 422), reply
        deep_item = b'{"results": [{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}"
        status, reply = _raw_post(c.url + spec.RESULTS_PATH + "/batch", deep_item, token)
        assert status < 500, reply


# --- finding 5: instructions ------------------------------------------------------------------


def test_an_instruction_value_that_is_not_unicode_is_refused_and_old_ones_skipped(
        tmp_path: Path) -> None:
    """An instruction value with a lone surrogate is refused by the API and the CLI; one already
    stored is left out of the probe's instruction while the other rules are still served and
    every fleet view answers."""
    cfg = replace(CollectorConfig(), server=replace(ServerConfig(), query_auth=False))
    with running_collector(tmp_path, cfg) as c:
        token = c.add_probe("p1", LINE)
        admin = c.add_token("admin", "admin")
        url = c.url + "/api/v1/instructions"
        raw = json.dumps({"selector": {"all": True}, "set": {"profile": "X"}}) \
            .replace('"X"', '"\\ud800"').encode()
        status, reply, _ = request("POST", url, raw, {**JSON,
                                                      "Authorization": f"Bearer {admin}"})
        assert status == 400, reply
        # As a Latin-1 terminal types it: click reads the byte into a lone surrogate.
        code, out = _cli(c, "instruction", "set", "--all", "profile=caf\udce9")
        assert code != 0 and "Unicode" in out, out
        code, out = _cli(c, "instruction", "set", "--all", "ping.count=5")
        assert code == 0, out
        # A rule stored before the check: left out (and counted), the rest still served.
        store = c.open_store()
        try:
            store.update_instruction_rule('{"region": "Lazio"}',
                                          lambda _old: {"profile": "caf\udce9"}, utc_now())
        finally:
            store.close()
        status, doc, _ = request("GET", c.url + spec.INSTRUCTION_PATH,
                                 headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and doc["settings"] == {"ping.count": 5}, doc
        for path in ("/fleet", "/api/v1/fleet", "/api/v1/fleet?format=csv"):
            assert request("GET", c.url + path)[0] == 200, path
        code, out = _cli(c, "instruction", "show", "--probe", "p1")
        assert code == 0 and "ping.count" in out, out


# --- finding 7: NUL on both backends ----------------------------------------------------------


def test_nul_and_control_characters_are_4xx_on_both_backends(storage: StorageConfig,
                                                              tmp_path: Path) -> None:
    """NUL and control characters in paths, query parameters and suppression fields, and bounds
    at the ends of the calendar, are 4xx on SQLite and PostgreSQL alike, never a 500."""
    cfg = replace(_cfg(), storage=storage)
    with running_collector(tmp_path, cfg) as c:
        c.add_probe("p1", LINE)
        admin = c.add_token("admin", "admin")
        for path in ("/api/v1/report?probe=p1%00", "/api/v1/results/abc%00def",
                     "/api/v1/certificate?probe=p%00", "/api/v1/fleet?x%00=1",
                     "/api/v1/report?region=La%01zio",
                     # Found by the fuzzer's 10-minute run: the next midnight overflowed.
                     "/api/v1/report?since=9999-12-31T23:59:59.999999Z",
                     "/api/v1/certificate?probe=p1&until=0001-01-01"):
            status, reply, _ = request("GET", c.url + path,
                                       headers={"Authorization": f"Bearer {admin}"})
            assert 400 <= status < 500, (path, status, reply)
        now = datetime.now(UTC)
        window = {"selector": {"probe": "p1"}, "from": format_utc(now),
                  "until": format_utc(now + timedelta(hours=1)), "reason": "works\u0000"}
        status, reply = post_json(c.url + "/api/v1/suppressions", window, admin)
        assert status == 422 and reply["field"] == "reason", reply
        window.update(reason="works", selector={"region": "La\u0000zio"})
        status, reply = post_json(c.url + "/api/v1/suppressions", window, admin)
        assert status == 422, reply
        window.update(selector={"probe": "p1"})
        assert post_json(c.url + "/api/v1/suppressions", window, admin)[0] == 201


# --- finding 8: identifiers end where they end --------------------------------------------------


def test_a_trailing_newline_makes_no_look_alike_identifier(tmp_path: Path) -> None:
    """An identifier with a trailing newline (probe name, probe_id, a validity code) is refused,
    so no look-alike of an existing one can be made."""
    with running_collector(tmp_path, _cfg()) as c:
        code, out = _cli(c, "probe", "add", "p5\n")
        assert code != 0, out
        token = c.add_probe("p1")
        for field, value in (("probe_id", "p1\n"),):
            doc = session_dict(probe_id="p1")
            doc[field] = value
            status, reply = post_json(c.url + spec.RESULTS_PATH, doc, token)
            assert status in (403, 422) and reply["field"] == field, reply
        doc = session_dict(probe_id="p1")
        doc["validity"] = {"valid": False, "reasons": [{"code": "wifi\n", "detail": "x"}]}
        status, reply = post_json(c.url + spec.RESULTS_PATH, doc, token)
        assert status == 422, reply


def test_result_delete_is_audited_and_leaves_the_rest_exact(storage: StorageConfig,
                                                            tmp_path: Path) -> None:
    """Three numbered sessions of one day; the middle one removed: the report counts two,
    completeness calls its number documented (not missing), the audit is appended (a
    resent, stored again and deleted again, makes a second row), on both backends."""
    cfg = replace(_cfg(), storage=storage)
    with running_collector(tmp_path, cfg) as c:
        token = c.add_probe("p1", LINE)
        docs = [session_dict(probe_id="p1", started_at=f"2026-11-20T1{i}:00:00.000000Z")
                for i in range(3)]
        for i, doc in enumerate(docs):
            doc.update(ended_at=doc["started_at"], session_seq=i + 1)
            assert post_json(c.url + spec.RESULTS_PATH, doc, token)[0] == 201
        scope = "?probe=p1&since=2026-11-20&until=2026-11-21"
        before = request("GET", c.url + "/api/v1/report" + scope)[1]
        assert before["sessions"] == 3, before
        gone = docs[1]["result_id"]
        code, out = _cli(c, "result", "delete", gone, "--reason", "withdrawn")
        assert code == 0 and "deleted by" in out, out
        after = request("GET", c.url + "/api/v1/report" + scope)[1]
        assert after["sessions"] == 2, after
        assert request("GET", c.url + f"{spec.RESULTS_PATH}/{gone}")[0] == 404
        (day,) = request("GET", c.url + "/api/v1/completeness?probe=p1")[1]["completeness"]
        assert (day["delivered"], day["documented"], day["missing_ranges"]) == (2, 1, []), day
        # Sent again from a spool: judged as new, stored; deleted again: a second row.
        assert post_json(c.url + spec.RESULTS_PATH, docs[1], token)[0] == 201
        assert _cli(c, "result", "delete", gone, "--reason", "withdrawn again")[0] == 0
        code, out = _cli(c, "result", "deleted", "--format", "json")
        rows = json.loads(out)
        assert [r["reason"] for r in rows] == ["withdrawn again", "withdrawn"], rows
        assert all(r["session_seq"] == 2 and r["deleted_by"] for r in rows), rows
        code, out = _cli(c, "result", "delete", gone, "--reason", "x\x1b[2J")
        assert code == 2 and "--reason" in out, out
