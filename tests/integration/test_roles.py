"""Collector roles: a collector process serves everything, only the store's side
(``--role ingest``), or only the measurement endpoints (``--role measurement``: no
database, no targets table). Real processes: the collector's CLI, and the agent measuring
against a measurement-only server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent import spec
from agent.app.cli import main as agent_main
from collector.server.testing import serve_process
from tests.factories import session_dict
from tests.httpclient import post_json, request

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, role: str, in_config: bool) -> tuple[Path, Path]:
    """A collector config for ``role`` (named in it, or left to --role): (config, db)."""
    db = tmp_path / f"{role}.sqlite3"
    config = tmp_path / f"{role}.toml"
    text = '[server]\nhost = "127.0.0.1"\nport = 0\n'
    text += f'role = "{role}"\n' if in_config else ""
    text += f'\n[storage]\npath = "{db}"\n'
    if role == "measurement":
        # A targets table that does not exist: a measurement server never reads one.
        text += '\n[compliance]\ntargets = "/nonexistent/targets.toml"\n'
    config.write_text(text)
    return config, db


@contextmanager
def serving(tmp_path: Path, role: str, in_config: bool = False
            ) -> Iterator[tuple[str, Path, str]]:
    """``bbprobe-collector serve`` in ``role`` (``--role``, or server.role in the config)
    as its own process: (url, database path, what it printed on start)."""
    config, db = _config(tmp_path, role, in_config)
    flag = [] if in_config else ["--role", role]
    with serve_process(config, *flag, cwd=ROOT) as (url, server):
        assert server.stderr is not None
        line = server.stderr.readline()
        while line and "listening on" not in line:  # the log's lines may come first
            line = server.stderr.readline()
        yield url, db, line
    assert server.returncode == 0


@pytest.mark.slow
def test_a_measurement_only_server_needs_no_database(tmp_path: Path,
                                                    fast_config: Path) -> None:
    """It starts without a targets table, creates no database, serves the endpoints and
    the page (which does not post its result), and nothing of the store's side; the
    agent measures against it."""
    with serving(tmp_path, "measurement") as (url, db, line):
        assert "(measurement only: no database)" in line, line
        assert request("GET", url + "/healthz")[0] == 200
        status, page, _ = request("GET", url + "/speedtest")
        assert status == 200 and b'data-record="off"' in page
        assert post_json(url + spec.RESULTS_PATH, {}, "bbp_x")[0] == 404
        assert request("GET", url + "/api/v1/report")[0] == 404
        assert request("GET", url + "/")[0] == 404
        done = CliRunner().invoke(agent_main, ["--config", str(fast_config), "--server", url,
                                               "speed", "--json", "--quiet"],
                                  catch_exceptions=False)
        assert done.exit_code == 0, done.stderr
        summary = json.loads(done.stdout)["summary"]
        assert summary["download_bps"] > 1e6 and summary["upload_bps"] > 1e6
        assert summary["download_failure_ratio"] == summary["upload_failure_ratio"] == 0.0
    assert not db.exists()


def test_an_ingest_server_serves_no_measurement(tmp_path: Path) -> None:
    """Ingestion and queries as always; the measurement endpoints and the page are not
    there."""
    from collector.cli.main import main as collector_main

    with serving(tmp_path, "ingest") as (url, db, line):
        assert "no measurement endpoints" in line, line
        done = CliRunner().invoke(collector_main, ["--db", str(db), "probe", "add", "p1"])
        token = done.stdout.strip().splitlines()[-1]
        assert post_json(url + spec.RESULTS_PATH, session_dict(probe_id="p1"), token)[0] \
            == 201
        assert request("GET", url + "/speedtest")[0] == 404
        assert request("GET", url + spec.DOWNLOAD_PATH + "?bytes=1000")[0] == 404
        assert request("GET", url + "/healthz")[0] == 200


def test_the_role_from_the_config_and_check_config(tmp_path: Path) -> None:
    """server.role in the config does what --role does (the packaged unit runs a plain
    ``serve``), and check-config passes a measurement config without a targets table,
    as the unit's ExecStartPre runs it."""
    from collector.cli.main import main as collector_main

    config, _db = _config(tmp_path, "measurement", in_config=True)
    done = CliRunner().invoke(collector_main, ["--config", str(config), "check-config"])
    assert done.exit_code == 0, done.output
    assert "role measurement" in done.stdout
    with serving(tmp_path, "measurement", in_config=True) as (url, db, line):
        assert "(measurement only: no database)" in line, line
        assert request("GET", url + "/speedtest")[0] == 200
        assert post_json(url + spec.RESULTS_PATH, {}, "bbp_x")[0] == 404
    assert not db.exists()
