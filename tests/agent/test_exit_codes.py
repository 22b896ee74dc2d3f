"""bbprobe's exit codes (agent/exitcodes.py): defined once, shown in --help, and used by
every command, as iperf3 and ping use theirs: a measurement that could not be made, or
that the host checks make invalid, is not a success. The commands run for real: ICMP to
127.0.0.1, transfers to a real collector on 127.0.0.1 port 0, and a closed port (bound,
read, closed) for a server that is not running."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent import exitcodes
from agent.app.cli import main
from agent.errors import AgentError, ConfigError, DeliveryError, ProbeSetupError
from agent.exitcodes import ExitCode
from collector.server.testing import RunningCollector
from tests import factories
from tests.conftest import icmp_allowed


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _closed_port() -> str:
    """A URL where nothing listens: a port the kernel gave us, closed again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class TestTheDecision:
    """The pure decision over a session's result."""

    def test_a_full_session_is_ok(self) -> None:
        """Every test measured, valid: 0."""
        assert exitcodes.for_sessions([factories.session()]) == ExitCode.OK

    def test_every_echo_lost_is_no_measurement(self) -> None:
        """A ping train whose every request was lost measured nothing (ping(8) exits
        non-zero too), even recorded as a train with status ok; some loss is a
        measurement."""
        lost = factories.ping_test([None, None, None])
        assert lost.summary.packets_sent == 3 and lost.summary.packets_received == 0
        assert exitcodes.ping_failed(lost)
        assert not exitcodes.ping_failed(factories.ping_test([None, 10.0, None]))
        session = factories.session(rtts=[None, None, None])
        assert exitcodes.for_sessions([session]) == ExitCode.FAILED
        assert exitcodes.failures([session]) == ["ping 198.18.0.1: no echo reply (3 sent)"]

    def test_a_test_with_no_successful_attempt_failed(self) -> None:
        """A test whose retry succeeded measured; one whose every attempt failed did not."""
        retried = factories.session(transfers=[
            factories.attempt("download", 0, 1, ok=False),
            factories.attempt("download", 0, 2), factories.attempt("upload")])
        assert exitcodes.for_sessions([retried]) == ExitCode.OK
        failed = factories.session(transfers=[
            factories.attempt("download"), factories.attempt("upload", 0, 1, ok=False)])
        assert exitcodes.for_sessions([failed]) == ExitCode.FAILED
        assert exitcodes.failures([failed]) == ["upload test 1: cannot connect: refused"]

    def test_an_invalid_session_is_five(self) -> None:
        """Measured but flagged by the host checks: 5; failed and invalid: 6 first."""
        assert exitcodes.for_sessions([factories.session(invalid=["wifi"])]) == \
            ExitCode.INVALID
        both = factories.session(invalid=["wifi"], rtts=[None])
        assert exitcodes.for_sessions([factories.session(), both]) == ExitCode.FAILED

    def test_the_order_when_several_apply(self) -> None:
        """Failed before invalid before not delivered before ok."""
        assert exitcodes.worst([ExitCode.NOT_DELIVERED, ExitCode.INVALID]) == 5
        assert exitcodes.worst([ExitCode.NOT_DELIVERED, ExitCode.FAILED]) == 6
        assert exitcodes.worst([ExitCode.OK, ExitCode.NOT_DELIVERED]) == 3
        assert exitcodes.worst([]) == ExitCode.OK

    def test_the_error_tree_uses_the_table(self) -> None:
        """The errors' codes are the table's, the ones documented before kept."""
        assert (AgentError.exit_code, ConfigError.exit_code, DeliveryError.exit_code,
                ProbeSetupError.exit_code) == (1, 2, 3, 6)


def test_help_shows_every_code() -> None:
    """`bbprobe --help` ends with the table: every code with its meaning, wrapped."""
    code, out, _ = _run("--help")
    assert code == 0
    table = out[out.index("Exit codes"):]
    for number in (0, 1, 2, 3, 5, 6, 130):
        assert re.search(rf"^\s+{number}\s+\S", table, re.M), (number, table)
    assert "bbprobe push" in table and "Ctrl-C" in table
    assert max(len(line) for line in table.splitlines()) <= 80


def test_speed_and_run_against_a_dead_server_fail(fast_config: Path) -> None:
    """`speed` and `run --no-push` to a server that is not running: the result is shown,
    each test that measured nothing said on stderr, exit 6 (before: 0)."""
    dead = _closed_port()
    code, out, err = _run("--config", str(fast_config), "--server", dead, "--set",
                          "ping.enabled=false", "speed", "--json")
    assert code == ExitCode.FAILED, err
    assert json.loads(out)["summary"]["download_bps"] is None
    assert f"bbprobe: no measurement: download test 1: cannot connect to " \
           f"{dead.removeprefix('http://')}: connection refused" in err
    code, out, err = _run("--config", str(fast_config), "--server", dead, "--set",
                          "ping.enabled=false", "run", "--no-push", "--json")
    assert code == ExitCode.FAILED, err
    assert "no measurement: upload test 1" in err


def test_an_invalid_session_exits_five(collector: RunningCollector, fast_config: Path) -> None:
    """Measured against a real server, flagged by a host check: exit 5 (before: 0)."""
    code, out, err = _run("--config", str(fast_config), "--server", collector.url, "--set",
                          "ping.enabled=false", "--set", f"checks.min_memory_bytes={10**15}",
                          "speed", "--json", "-t", "1")
    assert code == ExitCode.INVALID, err
    doc = json.loads(out)
    assert doc["summary"]["download_bps"] > 0
    assert [r["code"] for r in doc["validity"]["reasons"]] == ["memory_low"]


@pytest.mark.skipif(not icmp_allowed(), reason="needs an ICMP socket (ping_group_range)")
def test_ping_that_answers_is_ok(fast_config: Path) -> None:
    """A real echo train to 127.0.0.1: exit 0."""
    code, out, err = _run("--config", str(fast_config), "ping", "127.0.0.1", "-n", "2")
    assert code == ExitCode.OK, err
    assert "2 received" in out


class TestCheck:
    """`check` asks the measurement server too, not only the host."""

    def test_a_server_that_answers(self, collector: RunningCollector,
                                   fast_config: Path) -> None:
        """Host checks pass and the server answers its liveness route: exit 0."""
        code, out, err = _run("--config", str(fast_config), "--server", collector.url,
                              "check")
        assert code == ExitCode.OK, out + err
        assert "All host checks pass" in out
        assert f"Server {collector.url}: answers." in out

    def test_a_server_that_does_not_answer(self, fast_config: Path) -> None:
        """Nothing listens: said, with why, exit 6 (before: 'All host checks pass', 0)."""
        dead = _closed_port()
        code, out, _ = _run("--config", str(fast_config), "--server", dead, "check")
        assert code == ExitCode.FAILED
        assert f"Server {dead} does NOT answer (connection refused): a measurement now " \
               "would fail." in out
        code, out, _ = _run("--config", str(fast_config), "--server", dead, "check", "--json")
        assert code == ExitCode.FAILED
        assert json.loads(out)["server"] == {"url": dead, "answers": False,
                                             "error": "connection refused"}

    def test_a_failing_check_with_a_server_that_answers(
            self, collector: RunningCollector, fast_config: Path) -> None:
        """A host check fails, the server answers: exit 5, as documented before."""
        code, out, _ = _run("--config", str(fast_config), "--server", collector.url,
                            "--set", f"checks.min_memory_bytes={10**15}", "check", "--json")
        assert code == ExitCode.INVALID
        doc = json.loads(out)
        assert doc["server"]["answers"] is True
        assert [r["code"] for r in doc["invalid_reasons"]] == ["memory_low"]
