"""Selectors name what exists: a probe name that is not registered, or line metadata no
probe has, is an error with the nearest names (exit 2 on the CLI, 404 on the API, never an
empty report that looks normal); metadata matches in any case; an instruction rule or a
suppression window on metadata no probe has today is kept, with a warning. Against a real
collector on 127.0.0.1 (port 0) with its SQLite file."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector.cli.main import main
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.scope import as_stored, fold, nearest
from collector.server.testing import RunningCollector
from collector.storage.model import Probe
from collector.storage.store import Store
from tests.factories import attempt, session, store_result
from tests.httpclient import request

ROOT = Path(__file__).resolve().parents[2]


def _populate(store: Store) -> None:
    register_probe(store, "roma-fttc-01", LineMetadata(operator="BT Italia", region="Lazio",
                                                       technology="FTTC"))
    register_probe(store, "milano-ftth-01", LineMetadata(operator="BT Italia",
                                                         region="Lombardia",
                                                         technology="FTTH"))
    register_probe(store, "napoli-fwa-01", LineMetadata(operator="Other", region="Campania",
                                                        technology="FWA"))
    for probe in ("roma-fttc-01", "milano-ftth-01", "napoli-fwa-01"):
        store_result(store, session(probe, started_at="2026-03-01T10:00:00.000000Z",
                                    transfers=[attempt("download", bps=10e6),
                                               attempt("upload", bps=1e6)]))


@pytest.fixture
def fleet(collector: RunningCollector, monkeypatch: pytest.MonkeyPatch) -> RunningCollector:
    monkeypatch.chdir(ROOT)  # the default targets table (configs/targets)
    with closing(collector.open_store()) as store:
        _populate(store)
    return collector


def _cli(collector: RunningCollector, *args: str) -> tuple[int, str, str]:
    done = CliRunner().invoke(main, ["--db", str(collector.db_path), *args])
    return done.exit_code, done.stdout, done.stderr


def test_a_typo_in_a_probe_name_is_an_error_with_a_suggestion(
        fleet: RunningCollector) -> None:
    """`report --probe roma-ftt-01` used to print an INCOMPLETE report and exit 0: now one
    line naming the probe and the nearest registered one, exit 2; every scoped command."""
    expected = ("bbprobe-collector: no probe named 'roma-ftt-01' (did you mean "
                "'roma-fttc-01'?)\n")
    for command in (["report"], ["report", "--format", "csv"], ["results"], ["samples"],
                    ["completeness"], ["report", "--by", "region"]):
        code, out, err = _cli(fleet, *command, "--probe", "roma-ftt-01")
        assert (code, out, err) == (2, "", expected), command
    code, _, err = _cli(fleet, "certify", "--probe", "roma-ftt-01")
    assert (code, err) == (2, expected)
    code, _, err = _cli(fleet, "instruction", "show", "--probe", "roma-ftt-01")
    assert (code, err) == (2, expected)
    # Nothing near: no suggestion, still an error.
    code, _, err = _cli(fleet, "results", "--probe", "zzz")
    assert (code, err) == (2, "bbprobe-collector: no probe named 'zzz'\n")


def test_metadata_matches_in_any_case_and_a_near_miss_is_refused(
        fleet: RunningCollector) -> None:
    """--operator "BT italia" selects BT Italia's probes (case and spacing are not a
    different operator); "BT Itlia" or a region no probe has is an error naming the
    nearest value; two fields that each match but not together say so."""
    code, out, err = _cli(fleet, "report", "--operator", "BT italia", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["scope"]["probes"] == ["milano-ftth-01", "roma-fttc-01"]
    code, out, _ = _cli(fleet, "results", "--region", " lazio ", "--technology", "fttc",
                        "--format", "json")
    assert [r["probe_id"] for r in json.loads(out)["results"]] == ["roma-fttc-01"]
    for args, message in (
            (["--operator", "BT Itlia"],
             "no probe has operator 'BT Itlia' (did you mean 'BT Italia'?)"),
            (["--region", "Lazo"], "no probe has region 'Lazo' (did you mean 'Lazio'?)"),
            (["--offer", "Fibra"], "no probe has offer 'Fibra'"),
            (["--operator", "Other", "--region", "Lazio"],
             "no probe has operator 'Other' and region 'Lazio' together"),
            (["--probe", "roma-fttc-01", "--region", "Campania"],
             "none of the probes roma-fttc-01 has region 'Campania'")):
        for command in ("report", "samples", "results"):
            code, out, err = _cli(fleet, command, *args)
            assert (code, out, err) == (2, "", f"bbprobe-collector: {message}\n"), args


def test_the_api_answers_404_naming_the_selector(fleet: RunningCollector) -> None:
    """The analyst API takes the same selectors: an unknown probe or metadata no probe has
    is a 404 with the message and the parameter, on every scoped route, never a 500 or
    an empty 200; metadata in any case selects."""
    for path in ("/api/v1/report", "/api/v1/report?format=csv&x=1",
                 "/api/v1/results?format=csv", "/api/v1/samples", "/api/v1/completeness",
                 "/api/v1/gaps", "/report"):
        sep = "&" if "?" in path else "?"
        status, body, _ = request("GET", fleet.url + path + sep + "probe=roma-ftt-01")
        assert (status, body["error"], body["field"]) == (
            404, "no probe named 'roma-ftt-01' (did you mean 'roma-fttc-01'?)", "probe"), path
        status, body, _ = request("GET", fleet.url + path + sep + "operator=BT+Itlia")
        assert (status, body["error"], body["field"]) == (
            404, "no probe has operator 'BT Itlia' (did you mean 'BT Italia'?)",
            "operator"), path
    status, body, _ = request("GET", fleet.url + "/api/v1/certificate?probe=roma-ftt-01")
    assert (status, body["error"]) == (
        404, "no probe named 'roma-ftt-01' (did you mean 'roma-fttc-01'?)")
    status, doc, _ = request("GET", fleet.url + "/api/v1/report?operator=bt+italia")
    assert (status, doc["scope"]["probes"]) == (200, ["milano-ftth-01", "roma-fttc-01"])


def test_a_rule_in_another_case_is_the_rule_of_the_stored_spelling(
        fleet: RunningCollector) -> None:
    """`instruction set --region lazio` selects the Lazio probe and is kept as the rule of
    --region Lazio (one rule, not two of equal rank), without a warning; unset finds it in
    any case too."""
    code, out, err = _cli(fleet, "instruction", "set", "--region", "lazio", "ping.count=20")
    assert (code, err) == (0, "")
    assert out == 'rule --region Lazio: {"ping.count": 20}\n'
    code, out, err = _cli(fleet, "instruction", "set", "--region", "Lazio",
                          "ping.interval_s=0.5")
    assert code == 0, err
    code, out, _ = _cli(fleet, "instruction", "list", "--format", "json")
    assert [r["selects"] for r in json.loads(out)] == ["--region Lazio"]
    code, out, _ = _cli(fleet, "instruction", "show", "--probe", "roma-fttc-01", "--format",
                        "json")
    assert json.loads(out)["settings"] == {"ping.count": 20, "ping.interval_s": 0.5}
    code, out, err = _cli(fleet, "instruction", "unset", "--region", "LAZIO", "ping.count")
    assert (code, out) == (0, 'rule --region Lazio: {"ping.interval_s": 0.5}\n'), err


def test_a_rule_or_window_that_selects_no_probe_warns(fleet: RunningCollector) -> None:
    """A rule on metadata no probe has today is kept (a probe registered later may have
    it) and a warning on stderr names the nearest value; unset of a rule that does not
    exist is an error, not "(deleted)"."""
    code, out, err = _cli(fleet, "instruction", "set", "--region", "Lazo", "ping.count=20")
    assert code == 0 and out == 'rule --region Lazo: {"ping.count": 20}\n'
    assert err == ("bbprobe-collector: warning: the rule --region Lazo selects no probe "
                   "today (no probe has region 'Lazo' (did you mean 'Lazio'?)); it applies "
                   "to probes registered later with that metadata\n")
    code, out, err = _cli(fleet, "suppress", "--operator", "BT Italia", "--region",
                          "Campania", "--from", "2999-01-01T00:00Z", "--until",
                          "2999-01-02T00:00Z", "--reason", "works")
    assert code == 0 and out.startswith("suppression window"), err
    assert "warning: the window --operator BT Italia --region Campania selects no probe " \
           "today (no probe has operator 'BT Italia' and region 'Campania' together)" in err
    code, out, err = _cli(fleet, "instruction", "set", "--region", "Campania",
                          "ping.count=20")
    assert (code, err) == (0, "")
    code, _, err = _cli(fleet, "instruction", "unset", "--region", "Sicilia", "ping.count")
    assert (code, err) == (2, "bbprobe-collector: no rule --region Sicilia (`instruction "
                              "list` shows the rules)\n")


def test_pure_helpers() -> None:
    """fold ignores case and spacing; nearest compares folded; as_stored keeps a spelling
    no probe has, and takes the probes' one when they agree."""
    assert fold("  BT   italia ") == fold("BT Italia") == "bt italia"
    assert nearest("bt itlia", ["BT Italia", "Other"]) == ["BT Italia"]
    probes = [Probe("a", "", None, LineMetadata(region="Lazio")),
              Probe("b", "", None, LineMetadata(region="Lazio"))]
    assert as_stored({"region": "LAZIO", "probe": "x"}, probes) == {"region": "Lazio",
                                                                    "probe": "x"}
    assert as_stored({"region": "Umbria"}, probes) == {"region": "Umbria"}
