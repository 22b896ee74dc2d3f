"""A field technician's day with one laptop and two customer lines, as the installed
``bbprobe`` command runs it against real collectors and real SQLite files.

At line A the measurement server answers but the line's collector does not (it is down,
or out of reach from the customer's network): the session is measured, shown and kept in
the spool. At line B everything answers: the session is delivered to B's collector, and
A's result stays where it is. Back at the office A's collector answers again, and
``bbprobe push`` delivers A's result without measuring. Each result ends under its own
probe on its own collector, nothing crosses, and the spool ends empty.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from collector.config import CollectorConfig
from collector.server import app as app_mod
from collector.server.testing import RunningCollector, running_collector, serve_in_thread
from tests.httpclient import request

pytestmark = pytest.mark.slow  # three sessions and two collectors: about 15 s

# The console script a technician types, from the same environment as the tests.
BBPROBE = str(Path(sys.executable).parent / "bbprobe")

# Short sessions (about 3 s), no ping train: ICMP needs privileges a test host may not
# give, and the visit is about where results go, not how they are measured.
LAPTOP = """
profile = "custom"
state_dir = "{state}"

[ping]
enabled = false

[download]
streams = 2
warmup_s = 0.2
window_s = 0.6
sample_interval_s = 0.05

[upload]
streams = 2
warmup_s = 0.2
window_s = 0.6
sample_interval_s = 0.05

[checks]
# The collectors share the machine with the agent: CPU load is not the line's.
max_cpu_percent = 100.0

[delivery]
retry_min_s = 0.2
retry_max_s = 1.0
max_wait_s = 1.5
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _bbprobe(*args: str, home: Path, token: str | None = None) -> tuple[int, str, str]:
    """``bbprobe ARGS`` as a technician runs it; the token, when given, in BBPROBE_TOKEN
    (never on the command line, which ps shows every local user)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BBPROBE_")}
    env["HOME"] = str(home)
    if token is not None:
        env["BBPROBE_TOKEN"] = token
    done = subprocess.run([BBPROBE, *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    return done.returncode, done.stdout, done.stderr


def _stored(collector_url: str, probe: str) -> list[str]:
    """The result ids a collector holds for ``probe``."""
    status, listing, _ = request("GET", f"{collector_url}/api/v1/results?probe={probe}")
    assert status == 200, listing
    return [r["result_id"] for r in listing["results"]]


def _session_id(summary: str) -> str:
    match = re.search(r"^Session ([0-9a-f-]{36})$", summary, re.M)
    assert match, summary
    return match.group(1)


def test_two_line_visit(tmp_path: Path) -> None:
    """Line A offline (the collector away): the result is shown and kept (exit 3). Line
    B online: B's result goes to B's collector under line-b, A's is not sent with B's
    token. Back online, ``push`` with A's token delivers A's under line-a. Neither
    collector holds the other's result; the spool ends empty."""
    home = tmp_path / "laptop"
    home.mkdir()
    state = home / "state"
    laptop = home / "laptop.toml"
    laptop.write_text(LAPTOP.format(state=state))

    # Line A's collector: its probe registered (`bbprobe-collector probe add line-a`),
    # but not answering at its address during the visit.
    port_a = _free_port()
    default = CollectorConfig()
    config_a = replace(default,
                       server=replace(default.server, host="127.0.0.1", port=port_a,
                                      query_auth=False),
                       storage=replace(default.storage, path=str(tmp_path / "a.sqlite3")))
    url_a = f"http://127.0.0.1:{port_a}"
    collector_a = RunningCollector(url=url_a, db_path=tmp_path / "a.sqlite3",
                                   config=config_a)
    token_file_a = home / "line-a.token"
    token_file_a.write_text(collector_a.add_probe("line-a") + "\n")
    token_file_a.chmod(0o600)
    line_a = home / "line-a.toml"
    line_a.write_text(LAPTOP.format(state=state)
                      + f'\n[collector]\nurl = "{url_a}"\ntoken_file = "{token_file_a}"\n')

    with running_collector(tmp_path / "b") as collector_b, \
            running_collector(tmp_path / "measurement") as server:
        token_b = collector_b.add_probe("line-b")

        # Line A: the measurement server answers, the collector does not.
        code, out, err = _bbprobe("--config", str(line_a), "--server", server.url, "run",
                                  home=home)
        assert code == 3, err  # a result not delivered: kept, and said
        result_a = _session_id(out)
        assert "Download: " in out and "Upload: " in out, out
        assert f"result kept in {state / 'spool'}" in err, err
        (kept,) = (state / "spool").glob("*.json")
        assert result_a in kept.name

        # Line B: online. The token from the environment, the collector from the flag.
        code, out, err = _bbprobe("--config", str(laptop), "--collector", collector_b.url,
                                  "run", home=home, token=token_b)
        assert code == 0, err
        result_b = _session_id(out)
        assert f"result {result_b} delivered to {collector_b.url}" in err
        # B's collector sends its probes an instruction that sets nothing: not mentioned.
        assert "instruction" not in err, err
        assert "1 spooled result(s) measured for another probe or collector wait in the " \
            "spool, not sent with this token" in " ".join(err.split()), err
        # One speed, one format: the attempt's progress line and the summary agree (one
        # test of one attempt: the summary's figure is that attempt's).
        progress = re.search(r"·   attempt 1: (\d+\.\d\d) Mbit/s", err)
        summary = re.search(r"^Download: (\d+\.\d\d) Mbit/s", out, re.M)
        assert progress and summary and progress.group(1) == summary.group(1), (out, err)
        assert _stored(collector_b.url, "line-b") == [result_b]
        assert collector_b.count_results() == 1

        code, out, err = _bbprobe("--config", str(laptop), "--collector", collector_b.url,
                                  "status", home=home, token=token_b)
        assert code == 0, err
        said = " ".join(out.split())
        assert f"1 result(s) waiting for a probe not named yet at {url_a}, sent when a run " \
            "uses that identity" in said, out
        assert "token: from BBPROBE_TOKEN (the environment)" in said, out
        assert f"collector: {collector_b.url} answers, as probe line-b" in said, out

        # Back at the office: A's collector answers again at its address.
        with serve_in_thread(lambda: app_mod.start(config_a), "collector-a") as started:
            assert started == url_a
            code, out, err = _bbprobe("--config", str(line_a), "push", home=home)
            assert (code, out) == (0, ""), err
            assert f"1 result(s) and 0 gap record(s) delivered to {url_a}" in err
            assert _stored(url_a, "line-a") == [result_a]  # named line-a by A's collector
            assert collector_a.count_results() == 1
            code, out, err = _bbprobe("--config", str(line_a), "status", home=home)
            assert f"token: from file {token_file_a}" in " ".join(out.split()), out
            assert "spool: 0 result(s) waiting" in out, out

        # Nothing crossed: B holds line-b's result alone, A line-a's alone.
        assert _stored(collector_b.url, "line-b") == [result_b]
        assert (collector_b.count_results(), collector_a.count_results()) == (1, 1)
        # The spool is empty: a second push to either sends nothing and exits 0.
        assert not list((state / "spool").glob("*.json"))
        assert not list((state / "dead-letter").glob("*.json"))
        code, _, err = _bbprobe("--config", str(laptop), "--collector", collector_b.url,
                                "push", home=home, token=token_b)
        assert code == 0 and "0 result(s) and 0 gap record(s) delivered" in err, err
