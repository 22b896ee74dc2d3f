"""What the agent prints for a person: one format for each quantity wherever it appears
(the summary, the live line, ``status``), every line within 100 columns whatever names and
reasons it holds, the token's true source, and the collector's instruction said in words
only when it changes something."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent import checks, config, live, report, units
from agent.app import runner
from agent.app import status as state
from agent.app.cli import main
from agent.client import CollectorClient
from agent.identity import identity_for
from agent.schema import HostContext, Server, Validity
from agent.spool import Spool
from collector.server.testing import running_collector
from tests import factories

# Realistic names at their longest: a DNS label is at most 63 characters, a probe is
# often named for the customer's line; a measurement server behind an operator's domain.
LONG_PROBE = "roma-ftth-via-della-conciliazione-44-scala-b-interno-12-linea-2"
LONG_SERVER = "https://misura-01.roma.backbone.operatore-di-telecomunicazioni.example.net:8443"
V6_LOCAL = "2001:db8:1234:5678:9abc:def0:1234:5678"
V6_REMOTE = "2001:db8:ffff:eeee:dddd:cccc:bbbb:aaaa"
MBIT = re.compile(r"([\d.,]+|—) Mbit/s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False, env=env)
    return result.exit_code, result.stdout, result.stderr


# --- one format per quantity ---------------------------------------------------------


@pytest.mark.parametrize(("bps", "text"), [
    (93_412_345.6, "93.41 Mbit/s"),
    (150_000.0, "0.15 Mbit/s"),  # a contract's minimum upload: one decimal would say 0.1
    (21_347_240_000.0, "21347.24 Mbit/s"),  # no "," (Italian reads it as the decimal mark)
    (0.0, "0.00 Mbit/s"),
    (None, "—"),  # not measured is not zero
])
def test_one_speed_format(bps: float | None, text: str) -> None:
    """Mbit/s with two decimals, no thousands separator; a missing figure is a dash."""
    assert units.speed(bps) == text


@pytest.mark.parametrize(("ms", "text"), [
    (14.2345, "14.23 ms"), (0.0284, "0.03 ms"), (250.0, "250.00 ms"), (None, "—")])
def test_one_latency_format(ms: float | None, text: str) -> None:
    """ms with two decimals: a loopback round trip still reads above zero."""
    assert units.latency(ms) == text


def test_one_speed_reads_the_same_in_the_summary_the_live_line_and_status(
        tmp_path: Path) -> None:
    """The same 93.41 Mbit/s in the session summary, the live line and ``status``'s last
    results, and no other way of writing a speed in any of them (the summary had
    "93.41", the live line and status "93.4", the summary with a thousands "," too)."""
    bps = 93_412_345.6
    result = factories.session(transfers=[factories.attempt("download", bps=bps),
                                          factories.attempt("upload", bps=bps)])
    summary = report.format_session(result)
    state_now = live.LiveState()
    for event in (live.PhaseStarted("download test 1/1 attempt 1", 0.0, 10.0, True),
                  live.BytesMoved(0.0, 0), live.BytesMoved(1.0, int(bps / 8))):
        state_now = live.advance(state_now, event)
    line = live.format_line(state_now, 1.0)
    cfg = config.load(None, {"HOME": str(tmp_path)}, {"state_dir": str(tmp_path / "s")})
    Spool(cfg.state_dir, cfg.delivery).put(result)
    status_text = state.text(state.read(cfg))
    for text in (summary, line, status_text):
        figures = set(MBIT.findall(text))
        assert figures == {"93.41"}, (figures, text)
    assert "Download: 93.41 Mbit/s" in summary and "now 93.41 Mbit/s" in line
    assert "down 93.41 / up 93.41 Mbit/s" in status_text


def test_one_latency_format_in_the_summary_and_the_live_line() -> None:
    """RTTs read with two decimals in the summary and the live line alike."""
    result = factories.session(rtts=(14.2345, 15.0, 16.5))
    summary = report.format_session(result)
    assert "RTT min/mean/median/p95/max 14.23/15.24/15.00/16.35/16.50 ms" in summary
    line = live.format_line(live.advance(live.advance(
        live.LiveState(), live.PhaseStarted("ping", 0.0, 9.0, False)),
        live.RttSampled(0.5, 14.2345)), 1.0)
    assert line.endswith("RTT 14.23 ms")
    assert not re.search(r"\d\.\d{3} ms", summary)


# --- every line within 100 columns ---------------------------------------------------

BAD_HOST = dataclasses.replace(
    HostContext(interface="eth0", addresses=("192.168.1.20",), gateway="192.168.1.1",
                mtu=1500, link_speed_mbps=1000, wireless=False, loopback=False,
                public_address=False, os="Linux 6.1", kernel="#1", cpu_percent=12.0,
                memory_used_ratio=0.4, memory_total_bytes=8 * 1024**3),
    interface="wlx00e04c68a1b2", wireless=True, link_speed_mbps=100, cpu_percent=97.0,
    memory_used_ratio=0.97, download_cross_traffic_ratio=0.51,
    upload_cross_traffic_ratio=0.34, lan_hosts=3,
    lan_scan="ARP scan of 192.168.178.0/24 on wlx00e04c68a1b2 (254 addresses, 2.1 s)")


def _a_hard_session() -> tuple[str, list[str]]:
    """A session with everything that makes lines long: a long probe name and server URL,
    IPv6 addresses, refused and failed attempts with long errors, and every host check
    failed. Returns the summary and the texts it must still hold."""
    reasons = checks.assess(BAD_HOST, checks.Thresholds(min_link_mbps=300))
    assert len(reasons) >= 6
    failed = dataclasses.replace(
        factories.attempt("download", 0, 1, ok=False), failure_reason="connect_error",
        error="Cannot connect to host misura-01.roma.backbone.operatore-di-telecomunicazioni"
              ".example.net:8443 [Connect call failed ('2001:db8:ffff:eeee:dddd:cccc:bbbb:"
              "aaaa', 8443, 0, 0)]")
    refused = dataclasses.replace(
        factories.attempt("upload", 0, 1, ok=False), failure_reason="server_refused",
        error="refused for capacity (busy: 48 of 48 streams in use): HTTP 429, retry after "
              "30 s", http_status=429)
    result = dataclasses.replace(
        factories.session(LONG_PROBE, transfers=[
            failed, factories.attempt("download", 0, 2, bps=912_345_678.9), refused,
            factories.attempt("upload", 0, 2, bps=98_765_432.1)]),
        server=Server(url=LONG_SERVER, ping_target="misura-01.roma.backbone.example.net"),
        address_family="ipv6", address_family_requested="any",
        local_addresses=(V6_LOCAL,), remote_addresses=(V6_REMOTE,),
        validity=Validity(valid=False, reasons=reasons))
    must = [LONG_PROBE, LONG_SERVER, V6_LOCAL, V6_REMOTE, failed.error or "",
            refused.error or "", *(r.detail for r in reasons)]
    return report.format_session(result), must


def _words(text: str) -> str:
    return " ".join(text.split())


def _too_wide(text: str) -> list[str]:
    """The lines past 100 columns, but for a single word (a path, a URL) on its own."""
    return [line for line in text.splitlines() if len(line) > 100 and len(line.split()) > 1]


def test_the_session_summary_fits_100_columns() -> None:
    """Every line of a hard session's summary within 100 columns (the probe line alone
    was 129 with this name), nothing lost in the wrapping, every invalid reason listed."""
    text, must = _a_hard_session()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, "\n".join(
        line for line in lines if len(line) > 100)
    for part in must:
        assert _words(part) in _words(text), part
    assert "INVALID (not counted in compliance):" in lines
    assert sum(1 for line in lines if line.startswith("  - ")) >= 6


def test_a_word_longer_than_a_line_is_never_cut() -> None:
    """A URL or path longer than the width stays whole (to be copied), on its own line."""
    url = "https://" + "a" * 120 + ".example.net/"
    lines = units.fit([f"  server {url} answers, as probe p1"])
    assert lines == ["  server", f"      {url}", "      answers, as probe p1"]


def test_status_and_check_config_fit_100_columns(tmp_path: Path) -> None:
    """``status`` with results waiting for another probe at a long URL, and
    ``check-config`` for a long collector URL with a token file deep in /etc: within 100
    columns."""
    other = identity_for(LONG_SERVER, "bbp_other-line")
    Spool(tmp_path / "state", None, other).put(
        factories.session(LONG_PROBE, invalid=("wifi", "cross_traffic")))
    token_file = tmp_path / "etc" / "bbprobe" / "credentials" / "roma-ftth-linea-2.token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text("bbp_mine\n")
    conf = tmp_path / "agent.toml"
    conf.write_text(f'state_dir = "{tmp_path / "state"}"\n[collector]\n'
                    f'url = "{LONG_SERVER.replace("misura-01", "raccolta")}"\n'
                    f'token_file = "{token_file}"\n')
    code, out, err = _run("--config", str(conf), "status", "--no-check")
    assert code == 0, err
    assert _too_wide(out) == [], out
    assert _words(f"1 result(s) waiting for probe {LONG_PROBE} at {LONG_SERVER}") \
        in _words(out), out
    assert "INVALID (wifi, cross_traffic)" in out
    assert _words(f"token: from file {token_file}") in _words(out)
    dead = f"http://127.0.0.1:{_free_port()}"
    code, out, err = _run("--config", str(conf), "--collector", dead, "check-config")
    assert code == 0, err
    assert _too_wide(out) == [], out


# --- where the token came from -------------------------------------------------------


@pytest.mark.parametrize(("how", "said"), [
    ("flag", "--token (the command line, which ps shows to every local user)"),
    ("environment", "BBPROBE_TOKEN (the environment)"),
    ("set", "--set collector.token (the command line, which ps shows to every local user)"),
    ("file", "file {token_file}"),
    ("config", "collector.token in {conf}"),
])
def test_status_and_check_config_name_the_token_source(tmp_path: Path, how: str,
                                                       said: str) -> None:
    """The true source: --token, BBPROBE_TOKEN, --set, token_file or the file's own
    collector.token. --token and the variable arrive in the config as collector.token,
    so both had been called "config"."""
    token_file = tmp_path / "token"
    token_file.write_text("bbp_from_file\n")
    conf = tmp_path / "agent.toml"
    body = f'state_dir = "{tmp_path / "state"}"\n[collector]\n'
    body += 'token = "bbp_in_file"\n' if how == "config" else \
        f'token_file = "{token_file}"\n'
    conf.write_text(body)
    dead = f"http://127.0.0.1:{_free_port()}"
    args = ["--config", str(conf), "--collector", dead]
    env: dict[str, str] = {}
    if how == "flag":
        args += ["--token", "bbp_flag"]
    elif how == "environment":
        env["BBPROBE_TOKEN"] = "bbp_env"
    elif how == "set":
        args += ["--set", "collector.token=bbp_set", "--set", "collector.token_file="]
    expected = said.format(token_file=token_file, conf=conf)
    code, out, err = _run(*args, "status", "--no-check", env=env)
    assert code == 0, err
    assert f"token: from {expected}" in _words(out), out
    code, out, err = _run(*args, "status", "--no-check", "--json", env=env)
    assert json.loads(out)["token_source"] == expected
    code, out, err = _run(*args, "check-config", env=env)
    assert code == 0, err
    assert f"token: set, from {expected}" in _words(out), out


def test_an_explicit_token_wins_over_the_environment_and_is_named(tmp_path: Path) -> None:
    """--token and BBPROBE_TOKEN both given: --token is used, and named."""
    conf = tmp_path / "agent.toml"
    conf.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    code, out, _ = _run("--config", str(conf), "--collector", "http://127.0.0.1:9",
                        "--token", "bbp_flag", "status", "--no-check", "--json",
                        env={"BBPROBE_TOKEN": "bbp_env"})
    assert code == 0
    assert json.loads(out)["token_source"].startswith("--token")


# --- the collector's instruction, only when it changes something ---------------------


def test_the_instruction_is_said_only_when_it_changes_something(tmp_path: Path) -> None:
    """A collector sends every probe an instruction, usually empty: a run then says
    nothing about it (it printed "central instruction dae9b3db…"), and status and
    check-config say none is in force. Once it sets keys, the run says which, and which
    the command line overrides."""
    from collector.fleet import control as central
    from collector.fleet.rules import Selector

    with running_collector(tmp_path / "c") as collector:
        token = collector.add_probe("p1")
        conf = tmp_path / "agent.toml"
        conf.write_text(f'state_dir = "{tmp_path / "state"}"\n[collector]\n'
                        f'url = "{collector.url}"\n')

        def prepare(**overrides: object) -> list[str]:
            said: list[str] = []
            source = runner.ConfigSource(str(conf), {"HOME": str(tmp_path)},
                                         {"collector.token": token, **overrides})
            cfg = source.load()
            client = CollectorClient(collector.url, token, 10)
            _, applied = asyncio.run(runner.Runner(source, client, said.append)
                                     .prepare(cfg, said.append))
            assert applied.version  # an instruction was received and applied
            return said

        assert prepare() == []
        env = {"BBPROBE_TOKEN": token}
        code, out, _ = _run("--config", str(conf), "status", "--no-check", env=env)
        assert code == 0
        assert "instruction: none in force (this file and the command line decide)" in out
        code, out, _ = _run("--config", str(conf), "check-config", env=env)
        assert code == 0
        assert "  instruction: none in force (this file and the command line decide)" in out
        store = collector.open_store()
        try:
            central.set_instruction(store, Selector(probe="p1"),
                                    {"ping.count": 20, "download.streams": 4})
        finally:
            store.close()
        (line,) = prepare()
        assert re.fullmatch(r"the collector's instruction sets download\.streams = 4, "
                            r"ping\.count = 20 \(instruction [0-9a-f]{8}\)", line), line
        (line,) = prepare(**{"ping.count": 5})
        assert line.startswith("the collector's instruction sets download.streams = 4 "
                               "(ping.count too, but the command line's value wins)"), line
        code, out, _ = _run("--config", str(conf), "status", "--no-check", env=env)
        assert code == 0
        assert "instruction: the collector's instruction sets download.streams = 4, " \
            "ping.count = 20" in _words(out), out


def test_a_valid_session_says_whether_cross_traffic_was_measured() -> None:
    """"Valid" does not claim a check that was not made: on a path where cross traffic
    cannot be measured (loopback) it says so."""
    result = factories.session()
    assert "Valid: the host checks passed; cross traffic not measured" in \
        report.format_session(result)
    measured = dataclasses.replace(result, context=dataclasses.replace(
        BAD_HOST, download_cross_traffic_ratio=0.01,
        upload_cross_traffic_ratio=0.02))
    assert "Valid: the host checks passed; cross traffic within the limit" in \
        report.format_session(measured)
