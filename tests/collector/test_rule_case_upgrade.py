"""Rules stored before selectors ignored case: a rule kept as --region lazio (its probes
are in Lazio) matched nothing then and applies now; every lookup of a stored rule by its
selector (set, unset, over the CLI and the admin API) compares selectors folded, as
matching does, so that rule is found, updated and removed whatever case it is typed in,
and never doubled. Two stored rules that fold alike are refused naming both, except a
removal spelt exactly as one of them, and `instruction list` flags them. Real stores on
both backends, the CLI on an SQLite file, a real collector on 127.0.0.1 (port 0)."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.schema import utc_now
from collector.cli.main import main
from collector.config import StorageConfig
from collector.errors import Unacceptable
from collector.fleet import control
from collector.fleet.probes import register_probe
from collector.fleet.rules import Selector
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from tests.httpclient import post_json, request

LAZIO = LineMetadata(operator="Op", region="Lazio", technology="FTTH")


def _store_rule(store: Store, selector: dict[str, str], settings: dict[str, object],
                updated_at: str | None = None) -> None:
    """A rule written as an older version wrote it: its selector's key as typed."""
    store.update_instruction_rule(json.dumps(selector, sort_keys=True),
                                  lambda _current: dict(settings), updated_at or utc_now())


def _keys(store: Store) -> list[str]:
    return [key for key, _settings, _at in store.instruction_rules()]


def test_a_rule_stored_in_another_case_is_found_updated_and_removed(store: Store) -> None:
    """A rule stored as --region lazio now reaches the Lazio probe; set in any case
    updates it (one rule, its stored spelling kept), unset in any case removes it."""
    register_probe(store, "roma-01", LAZIO)
    _store_rule(store, {"region": "lazio"}, {"ping.count": 3})
    assert control.effective_for(store, "roma-01").settings == {"ping.count": 3}
    for typed in ("lazio", "Lazio", "LAZIO", " lazio "):
        assert control.stored_selector(store, Selector(region=typed)) == \
            Selector(region="lazio"), typed
    settings = control.set_instruction(store, Selector(region="Lazio"), {"ping.count": 7})
    assert settings == {"ping.count": 7}
    assert _keys(store) == ['{"region": "lazio"}']
    assert control.set_instruction(store, Selector(region="LAZIO"), {},
                                   ["ping.count"]) == {}
    assert _keys(store) == []
    # Stored again, an unset in the stored spelling removes it too.
    _store_rule(store, {"region": "lazio"}, {"ping.count": 3})
    control.set_instruction(store, Selector(region="lazio"), {}, ["ping.count"])
    assert _keys(store) == []
    # A new rule is still kept in the probes' own spelling.
    control.set_instruction(store, Selector(region="LAZIO"), {"ping.count": 5})
    assert _keys(store) == ['{"region": "Lazio"}']


def test_two_rules_that_fold_alike_are_refused_naming_both(store: Store) -> None:
    """--region lazio beside --region Lazio (possible only from before): a change is
    refused with one line naming both and the command that removes the stray one; an
    unset spelt exactly as one of them removes that one; the listing flags them."""
    register_probe(store, "roma-01", LAZIO)
    _store_rule(store, {"region": "Lazio"}, {"ping.count": 20}, "2026-01-01T00:00:00Z")
    _store_rule(store, {"region": "lazio"}, {"ping.count": 3, "profile": "quick"},
                "2026-01-02T00:00:00Z")
    expected = ("rules --region Lazio and --region lazio select the same probes "
                "(selectors ignore case); remove one, spelt exactly as stored: "
                "`bbprobe-collector instruction unset --region lazio ping.count profile`")
    for typed, put, remove in (("lazio", {"ping.count": 5}, []),
                               ("Lazio", {"ping.count": 5}, []),
                               ("LAZIO", {}, ["ping.count"])):
        with pytest.raises(Unacceptable) as refused:
            control.set_instruction(store, Selector(region=typed), put, remove)
        assert (str(refused.value), refused.value.field) == (expected, "selector"), typed
    rules = control.rules(store)
    assert control.twins(rules) == {'{"region": "Lazio"}': ["--region lazio"],
                                    '{"region": "lazio"}': ["--region Lazio"]}
    assert len(_keys(store)) == 2
    control.set_instruction(store, Selector(region="lazio"), {}, ["ping.count", "profile"])
    assert _keys(store) == ['{"region": "Lazio"}']
    assert control.twins(control.rules(store)) == {}
    assert control.set_instruction(store, Selector(region="lazio"), {"ping.count": 9}) == \
        {"ping.count": 9}
    assert _keys(store) == ['{"region": "Lazio"}']


def _cli(db: Path, *args: str) -> tuple[int, str, str]:
    done = CliRunner().invoke(main, ["--db", str(db), *args])
    return done.exit_code, done.stdout, done.stderr


def test_the_cli_finds_an_old_rule_in_any_case(tmp_path: Path) -> None:
    """The reviewer's case: `instruction unset --region lazio ping.count` exited 2 "no
    rule --region Lazio" for a rule stored as --region lazio, and `set` added a second
    rule beside it. Now both find it; `show --probe` says it applies, and from which rule."""
    db = tmp_path / "c.sqlite3"
    assert _cli(db, "init")[0] == 0
    with closing(_open(db)) as store:
        register_probe(store, "roma-01", LAZIO)
        _store_rule(store, {"region": "lazio"}, {"ping.count": 3})
    code, out, _ = _cli(db, "instruction", "show", "--probe", "roma-01")
    assert code == 0 and "ping.count = 3    (from --region lazio)" in out
    for typed in ("lazio", "LAZIO", "Lazio"):
        code, out, err = _cli(db, "instruction", "unset", "--region", typed, "ping.count")
        assert (code, out, err) == (0, "rule --region lazio: (deleted)\n", ""), typed
        with closing(_open(db)) as store:
            assert _keys(store) == []
            _store_rule(store, {"region": "lazio"}, {"ping.count": 3})
    code, out, err = _cli(db, "instruction", "set", "--region", "lazio", "ping.count=5")
    assert (code, out, err) == (0, 'rule --region lazio: {"ping.count": 5}\n', "")
    code, out, err = _cli(db, "instruction", "set", "--region", "LAZIO", "profile=quick")
    assert (code, out, err) == (
        0, 'rule --region lazio: {"ping.count": 5, "profile": "quick"}\n', "")
    code, out, _ = _cli(db, "instruction", "list", "--format", "json")
    listed = json.loads(out)
    assert [(r["selects"], r["settings"], r["same_probes_as"]) for r in listed] == [
        ("--region lazio", {"ping.count": 5, "profile": "quick"}, [])]


def test_the_cli_refuses_and_flags_twin_rules(tmp_path: Path) -> None:
    """Two stored rules folding alike: `instruction list` flags both, `set` exits 1 with
    one line naming both, and the command it names removes the stray one."""
    db = tmp_path / "c.sqlite3"
    assert _cli(db, "init")[0] == 0
    with closing(_open(db)) as store:
        register_probe(store, "roma-01", LAZIO)
        _store_rule(store, {"region": "Lazio"}, {"ping.count": 20}, "2026-01-01T00:00:00Z")
        _store_rule(store, {"region": "lazio"}, {"ping.count": 3}, "2026-01-02T00:00:00Z")
    code, out, _ = _cli(db, "instruction", "list")
    assert code == 0
    assert [line.split("  ", 1)[0] + " " + line.rsplit("  ", 1)[1]
            for line in out.splitlines()] == [
        "--region Lazio [selects the same probes as --region lazio: remove one]",
        "--region lazio [selects the same probes as --region Lazio: remove one]"]
    code, out, err = _cli(db, "instruction", "set", "--region", "LAZIO", "ping.count=5")
    # Refused as a rule over the budget is (Unacceptable: exit 1, 422 over the API).
    assert (code, out) == (1, "")
    assert err == ("bbprobe-collector: rules --region Lazio and --region lazio select the "
                   "same probes (selectors ignore case); remove one, spelt exactly as "
                   "stored: `bbprobe-collector instruction unset --region lazio "
                   "ping.count`\n")
    code, out, err = _cli(db, "instruction", "unset", "--region", "lazio", "ping.count")
    assert (code, out, err) == (0, "rule --region lazio: (deleted)\n", "")
    code, out, _ = _cli(db, "instruction", "list", "--format", "json")
    assert [(r["selects"], r["same_probes_as"]) for r in json.loads(out)] == [
        ("--region Lazio", [])]


def _open(db: Path) -> Store:
    return open_store(StorageConfig(path=str(db)))


def test_the_admin_api_finds_an_old_rule_in_any_case(collector: RunningCollector) -> None:
    """POST /api/v1/instructions compares selectors folded too: it updates and removes
    the rule stored as --region lazio and answers with its stored selector; twin rules
    are a 422 naming both (field selector), and GET lists them with same_probes_as."""
    collector.add_probe("roma-01", LAZIO)
    admin = collector.add_token("ops", "admin")
    url = collector.url + "/api/v1/instructions"
    with closing(collector.open_store()) as store:
        _store_rule(store, {"region": "lazio"}, {"ping.count": 3})
    status, reply = post_json(url, {"selector": {"region": "Lazio"},
                                    "set": {"ping.count": 6}}, admin)
    assert (status, reply["selector"], reply["settings"]) == (
        200, {"region": "lazio"}, {"ping.count": 6})
    status, doc, _ = request("GET", url, headers={"Authorization": f"Bearer {admin}"})
    assert [(r["selects"], r["same_probes_as"]) for r in doc["rules"]] == [
        ("--region lazio", [])]
    status, reply = post_json(url, {"selector": {"region": "LAZIO"},
                                    "unset": ["ping.count"]}, admin)
    assert (status, reply["settings"]) == (200, {})
    with closing(collector.open_store()) as store:
        assert _keys(store) == []
        _store_rule(store, {"region": "Lazio"}, {"ping.count": 20}, "2026-01-01T00:00:00Z")
        _store_rule(store, {"region": "lazio"}, {"ping.count": 3}, "2026-01-02T00:00:00Z")
    status, reply = post_json(url, {"selector": {"region": "lazio"},
                                    "set": {"ping.count": 6}}, admin)
    assert (status, reply["field"]) == (422, "selector")
    assert reply["error"].startswith("rules --region Lazio and --region lazio select the "
                                     "same probes")
    status, doc, _ = request("GET", url, headers={"Authorization": f"Bearer {admin}"})
    assert sorted((r["selects"], r["same_probes_as"]) for r in doc["rules"]) == [
        ("--region Lazio", ["--region lazio"]), ("--region lazio", ["--region Lazio"])]
