"""bbprobe-collector commands on a real SQLite file: `--db PATH` names one, so these tests
fill it through `open_store` with that path (the CLI on PostgreSQL is in
test_conformance.py)."""

from __future__ import annotations

import json
import re
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector import auth
from collector.cli.main import main
from collector.config import StorageConfig
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from tests.factories import attempt, session, store_result

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)  # the default targets path is relative to the repository
    return tmp_path / "c.sqlite3"


def _store_sessions(db: Path) -> None:
    with closing(open_store(StorageConfig(path=str(db)))) as store:
        for n, bps in enumerate((1e6, 9e6)):
            store_result(store, session("p1", started_at=f"2026-11-2{n + 1}T10:00:00.000000Z",
                                        transfers=[attempt("download", bps=bps),
                                                   attempt("upload", bps=1e6)]))


def test_probe_add_prints_token_once(db: Path) -> None:
    """probe add prints only the token on stdout; list shows the line metadata."""
    code, out, err = _run("--db", str(db), "probe", "add", "p1", "--operator", "BT Italia",
                          "--download-min-kbps", "2200")
    assert code == 0
    token = out.strip()
    assert token.startswith("bbp_") and len(token) > 40
    assert "shown once" in err
    code, out, _ = _run("--db", str(db), "probe", "list")
    assert out.startswith("p1  (active; created ")
    assert "operator=BT Italia" in out and "download_min_kbps=2200.0" in out
    code, out, err = _run("probe", "add", "p1", "--db", str(db))  # options after, too
    assert (code, err) == (1, "bbprobe-collector: a probe named 'p1' already exists (a "
                              "new token for it: `probe rotate p1`)\n")


def test_probe_revoke(db: Path) -> None:
    """Revoking twice: the second time names the probe that is not active."""
    _run("--db", str(db), "probe", "add", "p1")
    assert _run("--db", str(db), "probe", "revoke", "p1")[1] == "probe 'p1' revoked\n"
    code, _, err = _run("--db", str(db), "probe", "revoke", "p1")
    assert (code, err) == (1, "bbprobe-collector: no active probe named 'p1'\n")


def test_report_text_and_json(db: Path) -> None:
    """The report compares each indicator with Allegato 2; JSON carries the same numbers."""
    _run("--db", str(db), "probe", "add", "p1")
    _store_sessions(db)
    code, out, _ = _run("--db", str(db), "report", "--probe", "p1")
    assert code == 0
    assert "BT Italia — Allegato 2, obiettivi 2013" in out
    # download 1000 and 9000 kbit/s: p5 = 1000 + 0.05 * 8000 = 1400 < 2200 -> FAIL
    assert "Download, banda minima (p5)" in out and "1.40 Mbit/s" in out
    assert "Verdict:  FAIL" in out
    code, out, _ = _run("--db", str(db), "report", "--format", "json", "--since", "2026-11-22")
    doc = json.loads(out)
    assert doc["sessions"] == 1
    got = {i["id"]: i for i in doc["indicators"]}
    assert got["download_p5_kbps"]["observed"] == pytest.approx(9000)
    assert doc["verdict"] == "pass"


def test_results_csv(db: Path) -> None:
    """CSV export has a header and one row per result."""
    _run("--db", str(db), "probe", "add", "p1")
    _store_sessions(db)
    _code, out, _ = _run("--db", str(db), "results", "--format", "csv")
    lines = out.splitlines()
    assert lines[0].split(",")[:3] == ["result_id", "probe_id", "started_at"]
    assert len(lines) == 3
    # Speeds in kbit/s with the unit in the name (collector/exports.py).
    assert lines[0].split(",")[5] == "download_kbps"
    assert lines[1].split(",")[5] == "1000.0"


def test_example_config_and_check_config(db: Path) -> None:
    """The shipped example config validates together with its targets table."""
    code, out, _ = _run("--config", "configs/collector.example.toml", "check-config")
    assert code == 0
    assert out == ("config OK; targets: BT Italia — Allegato 2, obiettivi 2013 (accesso a "
                   "internet da postazione fissa) (9 measurable of 25 indicators)\n")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[server]\nprot = 1\n",
         "bbprobe-collector: {path}: server.prot: unknown key (did you mean server.port?)\n"),
        ("[server]\nport = 70000\n",
         "bbprobe-collector: {path}: server.port: must be <= 65535, got 70000\n"),
        ("[storage]\nbackend = \"mysql\"\n",
         "bbprobe-collector: {path}: storage.backend: must be one of 'sqlite', "
         "'postgresql', got 'mysql'\n"),
        ("[compliance]\ntargets = \"missing.toml\"\n",
         "bbprobe-collector: targets: missing.toml: no such file\n"),
    ],
)
def test_bad_collector_configs(tmp_path: Path, db: Path, content: str, message: str) -> None:
    """Each bad collector config: exit 2 and one line naming the key."""
    path = tmp_path / "collector.toml"
    path.write_text(content)
    code, _, err = _run("--config", str(path), "check-config")
    assert (code, err) == (2, message.format(path=path))


def test_bad_since(db: Path) -> None:
    """A bad --since is a usage error naming the option."""
    _run("--db", str(db), "init")
    code, _, err = _run("--db", str(db), "results", "--since", "soon")
    assert (code, err) == (2, "bbprobe-collector: since: expected an ISO 8601 date or "
                              "timestamp, got 'soon'\n")


def test_service_register_uses_store(store: Store) -> None:
    """register_probe returns a token that authenticates against the same database, on
    each backend."""
    token = register_probe(store, "p9", LineMetadata())
    found = store.probe_for_token(auth.hash_token(token))
    assert found is not None and found.name == "p9"


def test_init_creates_the_first_admin_once(db: Path) -> None:
    """First run: the database, one admin token (stdout, once), the next steps; run
    again, no second token."""
    code, out, err = _run("--db", str(db), "init")
    assert code == 0
    assert re.fullmatch(r"bbp_[A-Za-z0-9_-]+\n", out), out
    assert "admin token 'admin' created" in err and "next steps:" in err
    assert "probe add NAME" in err
    code, out, err = _run("--db", str(db), "init")
    assert (code, out) == (0, "")
    assert "admin token: 'admin' exists; none added." in err
    _code, listing, _ = _run("--db", str(db), "token", "list")
    assert len(listing.splitlines()) == 1 and " admin " in listing
    assert f"bbprobe-collector --db {db} probe add NAME" in err
    # With the only admin revoked, init makes a new one, under another name.
    _run("--db", str(db), "token", "revoke", "admin")
    code, out, err = _run("--db", str(db), "init")
    assert (code, out) == (2, "")
    assert "a token named 'admin' exists (revoked); choose another name" in err
    code, out, _err = _run("--db", str(db), "init", "--admin-name", "admin2")
    assert code == 0 and out.startswith("bbp_")


def test_csv_cells_cannot_be_formulas(db: Path) -> None:
    """A security review found admin-set metadata going into CSV as it was, so a spreadsheet
    ran =HYPERLINK(...). Text starting with = + - @ is now behind a quote; numbers (also
    negative ones) stay numbers."""
    from collector.safetext import csv_cell

    _run("--db", str(db), "probe", "add", "p1", "--operator", '=HYPERLINK("http://x","y")',
         "--offer", "@SUM(A1)", "--region", "+39 Lazio", "--technology", "FTTH")
    _code, out, _ = _run("--db", str(db), "probe", "list", "--format", "csv")
    row = out.splitlines()[1]
    assert "'=HYPERLINK" in row and "'@SUM(A1)" in row and "'+39 Lazio" in row
    assert ",=" not in row and ",@" not in row
    assert csv_cell(-5.0) == -5.0 and csv_cell("-x") == "'-x" and csv_cell(None) == ""


@pytest.mark.parametrize("command", [["results"], ["report"], ["samples"], ["probe", "list"],
                                     ["token", "list"], ["influx", "status"],
                                     ["certify", "--probe", "p1"]])
def test_read_only_commands_need_an_existing_database(db: Path, command: list[str]) -> None:
    """A security review found that a typo in --db made a new, empty database and an empty
    report. Now exit 2 naming the path, and nothing is created."""
    typo = db.with_name("c.sqlite")
    code, out, err = _run("--db", str(typo), *command)
    assert (code, out) == (2, "")
    assert err == (f"bbprobe-collector: no database at {typo} (check --db or storage.path; "
                   "`bbprobe-collector init` creates one)\n")
    assert not typo.exists()
