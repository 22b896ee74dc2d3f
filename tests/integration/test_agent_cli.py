"""The real agent CLI against a real collector: ICMP to 127.0.0.1, HTTP transfers, SQLite."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.app.cli import main
from agent.spooldoc import result_of
from collector.server.testing import RunningCollector
from tests.httpclient import post_json, request

SUMMARY_KEYS = {"download_bps", "upload_bps", "rtt_mean_ms", "rtt_stdev_ms", "loss_ratio",
                "download_failure_ratio", "upload_failure_ratio"}


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.slow
@pytest.mark.privileged
def test_run_json_pushes_once(collector: RunningCollector, fast_config: Path) -> None:
    """bbprobe run --json prints one document; the collector lists it; a re-push stores
    nothing new."""
    token = collector.add_probe("probe-1")
    # The exact form of the issue: options after the command name.
    code, out, err = _run("run", "--json", "--collector", collector.url, "--token", token,
                          "--config", str(fast_config))
    assert code == 0, err
    doc = json.loads(out)  # exactly one JSON document on stdout
    assert set(doc["summary"]) >= SUMMARY_KEYS
    s = doc["summary"]
    assert doc["probe_id"] == "probe-1"  # learnt from the collector (whoami)
    assert s["loss_ratio"] == 0.0
    assert s["rtt_mean_ms"] > 0
    assert s["download_bps"] > 1e6
    assert s["upload_bps"] > 1e6
    assert s["download_failure_ratio"] == 0.0
    assert doc["method"]["profile"] == "custom"
    assert len(doc["ping"]["samples"]) == 5
    uploads = [t for t in doc["transfers"] if t["direction"] == "upload"]
    assert uploads[0]["measured_at"] == "server"
    # Latency under load: a train during each window, reported apart from idle latency.
    assert doc["ping_download"]["summary"]["packets_sent"] == 3  # 0.6 s window / 0.2 s
    assert s["rtt_download_mean_ms"] == doc["ping_download"]["summary"]["rtt_mean_ms"]
    assert s["rtt_upload_mean_ms"] is not None
    # Host checks: the route to 127.0.0.1 is loopback, which has no access line and
    # whose counters hold every local process's traffic: cross traffic is not measured
    # there (checks.cross_traffic_unmeasured), so the session is valid and says why.
    ctx = doc["context"]
    assert ctx["loopback"] is True and "127.0.0.1" in ctx["addresses"]
    assert ctx["download_cross_traffic_ratio"] is None, ctx
    assert ctx["upload_cross_traffic_ratio"] is None, ctx
    assert "cross traffic not measured on loopback" in err
    assert doc["validity"] == {"valid": True, "reasons": []}
    assert "delivered" in err
    status, listing, _ = request("GET", collector.url + "/api/v1/results?probe=probe-1")
    assert [r["result_id"] for r in listing["results"]] == [doc["result_id"]]
    status, body = post_json(collector.url + "/api/v1/results", doc, token)
    assert (status, body["duplicate"]) == (200, True)
    assert collector.count_results() == 1
    # The spool is empty once the collector acknowledged the result.
    assert not list((fast_config.parent / "state" / "spool").glob("*.json"))


@pytest.mark.slow
def test_collector_down_keeps_result_then_delivers(collector: RunningCollector,
                                                   fast_config: Path) -> None:
    """Push fails: exit 3 and the result stays spooled; the next run delivers both."""
    token = collector.add_probe("probe-2")
    dead = f"http://127.0.0.1:{_free_port()}"
    common = ["--config", str(fast_config), "--probe-id", "probe-2", "--token", token,
              "--server", collector.url, "--set", "ping.enabled=false"]
    code, out, err = _run(*common, "--collector", dead, "run", "--json")
    assert code == 3
    first = json.loads(out)
    assert "result kept in" in err
    spooled = list((fast_config.parent / "state" / "spool").glob("*.json"))
    assert len(spooled) == 1
    assert first["result_id"] in spooled[0].name
    code, out, err = _run(*common, "--collector", collector.url, "run", "--json")
    assert code == 0, err
    second = json.loads(out)
    _, listing, _ = request("GET", collector.url + "/api/v1/results?probe=probe-2")
    assert [r["result_id"] for r in listing["results"]] == [first["result_id"],
                                                           second["result_id"]]



@pytest.mark.slow
def test_push_delivers_the_spool_without_measuring(collector: RunningCollector,
                                                   fast_config: Path) -> None:
    """A technician's visit with no connection: the run keeps its result (exit 3);
    ``push`` with the collector still away measures nothing and exits 3 saying what is
    kept; back online, ``push`` delivers it (exit 0, the spool empty); a second ``push``
    has nothing to send and still exits 0."""
    token = collector.add_probe("probe-visit")
    dead = f"http://127.0.0.1:{_free_port()}"
    common = ["--config", str(fast_config), "--probe-id", "probe-visit", "--token", token,
              "--server", collector.url, "--set", "ping.enabled=false"]
    spool = fast_config.parent / "state" / "spool"
    code, out, _ = _run(*common, "--collector", dead, "run", "--json")
    assert code == 3
    measured = json.loads(out)["result_id"]
    code, out, err = _run(*common, "--collector", dead, "push")
    assert (code, out) == (3, "")
    assert "1 result(s) kept in" in err and "0 result(s)" in err
    (kept,) = spool.glob("*.json")
    assert kept.name.endswith(f"_{measured}.json")
    code, out, err = _run(*common, "--collector", collector.url, "push")
    assert (code, out) == (0, ""), err
    assert f"1 result(s) and 0 gap record(s) delivered to {collector.url}" in err
    _, listing, _ = request("GET", collector.url + "/api/v1/results?probe=probe-visit")
    assert [r["result_id"] for r in listing["results"]] == [measured]
    assert not list(spool.glob("*.json"))
    code, _, err = _run(*common, "--collector", collector.url, "push")
    assert code == 0 and "0 result(s) and 0 gap record(s) delivered" in err


def test_the_token_from_the_environment(collector: RunningCollector, fast_config: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """BBPROBE_TOKEN stands for --token, so no example needs the token on a command line
    (which ps shows every local user): the collector answers with it, refuses a wrong
    one, and an explicit --token still wins."""
    token = collector.add_probe("probe-env")
    common = ["--config", str(fast_config), "--collector", collector.url]
    monkeypatch.setenv("BBPROBE_TOKEN", token)
    code, _, err = _run(*common, "push")
    assert code == 0, err
    monkeypatch.setenv("BBPROBE_TOKEN", "bbp_wrong")
    code, _, err = _run(*common, "push")
    assert (code, "the collector refused the token" in err) == (3, True), err
    code, _, err = _run(*common, "--token", token, "push")
    assert code == 0, err

def test_wrong_token_is_refused_before_measuring(collector: RunningCollector,
                                                 fast_config: Path) -> None:
    """An unknown token stops the run at once with the collector's reason."""
    code, out, err = _run("--config", str(fast_config), "--collector", collector.url,
                          "--token", "bbp_wrong", "run")
    assert code == 3
    assert out == ""
    assert err == ("bbprobe: the collector refused the token: HTTP 401: unknown or revoked "
                   "token\n")


def test_unreachable_server_records_failed_attempts(fast_config: Path) -> None:
    """Transfers to a closed port are failed attempts with a reason, not a crash; a
    refused connection is retried once (a server restarting), then not again in the
    session (nothing listens), and no measurement is exit 6."""
    server = f"http://127.0.0.1:{_free_port()}"
    code, out, err = _run("--config", str(fast_config), "--server", server,
                          "--set", "download.attempts=3", "--set", "upload.attempts=2",
                          "speed", "--json", "--quiet")
    assert code == 6, err
    doc = json.loads(out)
    assert doc["summary"]["download_failure_ratio"] == 1.0
    assert doc["summary"]["upload_failure_ratio"] == 1.0
    assert doc["summary"]["download_bps"] is None
    assert [(t["direction"], t["attempt"], t["failure_reason"])
            for t in doc["transfers"]] == [
        ("download", 1, "connect_error"), ("download", 2, "connect_error"),
        ("upload", 1, "connect_error")]
    assert doc["ping"] is None


def test_http_error_is_recorded(collector: RunningCollector, fast_config: Path) -> None:
    """A server answering 404 (no measurement endpoint) gives http_status failures."""
    _code, out, _ = _run("--config", str(fast_config), "--server", collector.url + "/nothing",
                        "--set", "download.attempts=1", "speed", "--direction", "download",
                        "--json", "-q")
    doc = json.loads(out)
    (attempt,) = doc["transfers"]
    assert (attempt["failure_reason"], attempt["http_status"]) == ("http_status", 404)
    assert doc["method"]["upload"]["tests"] == 0


def test_file_mode_speed(collector: RunningCollector, fast_config: Path) -> None:
    """131/06 file mode: the whole file is transferred and speed = size / time."""
    code, out, err = _run("--config", str(fast_config), "--server", collector.url,
                          "--set", 'download.mode="file"',
                          "--set", "download.file_size_bytes=4000000",
                          "--set", 'upload.mode="file"',
                          "--set", "upload.file_size_bytes=3000000",
                          # 3 attempts of the automatic 300 s each way would plan 30
                          # minutes, over a session's 15 (agent/budget.py).
                          "--set", "download.timeout_s=60", "--set", "upload.timeout_s=60",
                          "speed", "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    down, up = doc["transfers"]
    assert (down["status"], down["bytes_total"]) == ("ok", 4_000_000)
    assert (up["status"], up["bytes_total"]) == ("ok", 3_000_000)
    assert down["throughput_bps"] == pytest.approx(4_000_000 * 8 / down["window_s"])


@pytest.mark.privileged
def test_ping_command(fast_config: Path) -> None:
    """bbprobe ping prints the same document shape with the ping summary filled in."""
    code, out, err = _run("--config", str(fast_config), "ping", "127.0.0.1", "-n", "4",
                          "-i", "0.01", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc["summary"]) >= SUMMARY_KEYS
    assert doc["summary"]["loss_ratio"] == 0.0
    assert doc["summary"]["download_bps"] is None
    assert [s["seq"] for s in doc["ping"]["samples"]] == [0, 1, 2, 3]
    assert all(s["rtt_ms"] is not None and s["rtt_ms"] < 100 for s in doc["ping"]["samples"])


@pytest.mark.privileged
def test_ping_human_output(fast_config: Path) -> None:
    """Without --json, a technician reads RTT statistics and loss."""
    code, out, _ = _run("--config", str(fast_config), "ping", "127.0.0.1", "-n", "3",
                        "-i", "0.01")
    assert code == 0
    assert "Ping 127.0.0.1 (127.0.0.1): 3 sent, 3 received, loss 0.0 %" in out
    assert "One-way delay (RTT/2)" in out


@pytest.mark.privileged
def test_ping_unresolvable_host(netns: str) -> None:
    """A name that cannot be resolved is one clear line, exit 6 (no measurement).

    Run inside a private namespace (loopback only) so no DNS query leaves the machine.
    """
    import subprocess
    import sys

    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "agent", "ping",
         "no-such-host.invalid", "-n", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 6
    assert done.stdout == ""
    assert "\nbbprobe: cannot resolve ping target 'no-such-host.invalid'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "bbprobe: no collector to push to: set collector.url or --collector, or "
         "pass --no-push\n"),
        (["--collector", "http://127.0.0.1:9", "run"],
         "bbprobe: no token: set collector.token, token_file or token_credential, or --token "
         "(bbprobe-collector probe add NAME prints one), or a client certificate "
         "(collector.client_cert)\n"),
        (["--set", "ping.count=0", "check-config"],
         "bbprobe: the command line: ping.count: must be >= 1, got 0\n"),
        (["--set", "nonsense", "check-config"],
         "bbprobe: --set 'nonsense': expected KEY=VALUE\n"),
        (["--set", "download.streamz=2", "check-config"],
         "bbprobe: the command line: download.streamz: unknown key (did you mean "
         "download.streams?)\n"),
        (["speed"], "bbprobe: no measurement server: set server.url or collector.url (or "
         "pass --server)\n"),
        (["--collector", "http://[::1", "check-config"],
         "bbprobe: the command line: collector.url: is not a valid URL (Invalid IPv6 URL), "
         "got "
         "'http://[::1'\n"),
        (["--server", "http://127.0.0.1:99999", "speed"],
         "bbprobe: the command line: server.url: port must be a number from 1 to 65535, "
         "got "
         "'http://127.0.0.1:99999'\n"),
        (["--server", "http://127.0.0.1:99999", "check-config"],
         "bbprobe: the command line: server.url: port must be a number from 1 to 65535, "
         "got "
         "'http://127.0.0.1:99999'\n"),
        (["--server", "127.0.0.1:99999", "check-config"],
         "bbprobe: the command line: server.url: port must be a number from 1 to 65535, "
         "got 'http://127.0.0.1:99999'\n"),
        (["dead-letter", "retry"], "bbprobe: dead-letter retry: give result ids or --all "
         "(bbprobe dead-letter list shows them)\n"),
        (["--collector", "http://127.0.0.1:9", "--set",
          "collector.client_cert='/nonexistent/p1.pem'", "run"],
         "bbprobe: collector.client_cert: cannot read /nonexistent/p1.pem: No such file or "
         "directory\n"),
        (["dead-letter", "drop", "--all", "x"], "bbprobe: dead-letter drop: give result ids "
         "or --all (bbprobe dead-letter list shows them)\n"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    """Bad usage gets one line naming the problem, exit 2, no traceback."""
    code, _out, err = _run("--set", f"state_dir={str(tmp_path)!r}", *args)
    assert (code, err) == (2, message)


def test_status_shows_the_spool_when_the_client_certificate_cannot_be_read(
        tmp_path: Path) -> None:
    """`status` with no token and a certificate file that is gone still shows the spool
    (whose identity is only unknown), exit 0."""
    code, out, err = _run("--set", f"state_dir={str(tmp_path)!r}", "--collector",
                          "http://127.0.0.1:9", "--set",
                          "collector.client_cert='/nonexistent/p1.pem'", "status",
                          "--no-check")
    assert (code, err) == (0, "")
    # Lines past 100 columns wrap (a long temporary path here): compare the words.
    assert " ".join(out.split()).startswith(f"spool: 0 result(s) waiting (0.0 KiB of 64 "
                                            f"MiB) in {tmp_path / 'spool'} ")


def test_check_config_shows_plan(fast_config: Path) -> None:
    """check-config validates and prints what a session would do."""
    code, out, _ = _run("--config", str(fast_config), "--collector", "http://198.18.0.1:8080",
                        "check-config")
    assert code == 0
    assert "config OK" in out
    assert "ping target: 198.18.0.1" in out
    assert "download: 1 test(s), 2 stream(s), 0.2 s warm-up + 0.6 s window" in out



def test_host_and_port_alone_are_read_as_http(fast_config: Path) -> None:
    """``--server host:port`` and ``--collector host:port`` (what iperf3 and curl users
    type) mean plain HTTP to that host and port; a URL stays as given."""
    code, out, err = _run("--config", str(fast_config), "--server", "127.0.0.1:18380",
                          "--collector", "[::1]:8080", "check-config")
    assert code == 0, err
    assert "measurement server: http://127.0.0.1:18380" in out
    assert "collector: http://[::1]:8080" in out
    code, out, _ = _run("--config", str(fast_config), "--server", "https://198.18.0.1:8443",
                        "check-config")
    assert "measurement server: https://198.18.0.1:8443" in out


def test_speed_duration_is_the_measured_window(collector: RunningCollector,
                                               fast_config: Path) -> None:
    """``speed -t S`` measures each transfer for S seconds after its warm-up (iperf3's
    -t), in the directions --direction names: the method records it, and the attempt's
    window lasted it."""
    code, out, err = _run("--config", str(fast_config), "--server", collector.url,
                          "speed", "-t", "1.5", "--direction", "download", "--json")
    assert code == 0, err
    (doc,) = [json.loads(out)]
    assert doc["method"]["download"]["window_s"] == 1.5
    assert {t["direction"] for t in doc["transfers"]} == {"download"}
    (attempt,) = doc["transfers"]
    assert attempt["status"] == "ok"
    assert attempt["window_bytes"] > 0 and attempt["window_bytes"] < attempt["bytes_total"]
    code, _, err = _run("--config", str(fast_config), "speed", "-t", "0.5")
    assert code == 2 and "0.5 is not in the range 1.0<=x<=600.0" in err

def test_options_before_command_and_env_precedence(fast_config: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """--config before the command beats BBPROBE_CONFIG seen again at the command."""
    other = tmp_path / "other.toml"
    other.write_text("[ping]\ncount = 7\n")
    monkeypatch.setenv("BBPROBE_CONFIG", str(other))
    for args, expected in ((["check-config"], "ping: 7 x 56 B"),
                           (["--config", str(fast_config), "check-config"], "ping: 5 x 56 B"),
                           (["check-config", "--config", str(fast_config)], "ping: 5 x 56 B")):
        code, out, _ = _run(*args)
        assert (code, expected in out) == (0, True), args


@pytest.mark.slow
def test_results_measured_while_the_collector_is_away_are_named_on_delivery(
        collector: RunningCollector, fast_config: Path) -> None:
    """No --probe-id and the collector unreachable at the start: the result is spooled
    without a probe id (not under the host name, which the collector would refuse with
    403 and dead-letter); the next run, whose whoami is answered, delivers both under
    the name the collector gives the token."""
    token = collector.add_probe("probe-2")
    dead = f"http://127.0.0.1:{_free_port()}"
    common = ["--config", str(fast_config), "--token", token, "--server", collector.url,
              "--set", "ping.enabled=false"]
    code, out, err = _run(*common, "--collector", dead, "run", "--json")
    assert code == 3, err
    first = json.loads(out)
    assert first["probe_id"] == ""
    (spooled,) = (fast_config.parent / "state" / "spool").glob("*.json")
    assert result_of(json.loads(spooled.read_text()))["probe_id"] == ""
    code, out, err = _run(*common, "--collector", collector.url, "run", "--json")
    assert code == 0, err
    second = json.loads(out)
    assert second["probe_id"] == "probe-2"
    _, listing, _ = request("GET", collector.url + "/api/v1/results?probe=probe-2")
    assert [r["result_id"] for r in listing["results"]] == [first["result_id"],
                                                           second["result_id"]]
    _, stored, _ = request("GET", collector.url + f"/api/v1/results/{first['result_id']}")
    assert stored["probe_id"] == "probe-2"
    assert not list((fast_config.parent / "state" / "dead-letter").glob("*.json"))


@pytest.mark.slow
def test_a_damaged_spool_file_does_not_stall_run(collector: RunningCollector,
                                                 fast_config: Path) -> None:
    """The oldest spooled result truncated: `run` sets it aside (saying where and why)
    and delivers the rest with its own result, exit 0."""
    from datetime import UTC, datetime, timedelta

    from agent.schema import format_utc
    from agent.spool import Spool
    from tests.factories import session

    token = collector.add_probe("probe-2")
    spool = Spool(fast_config.parent / "state")
    now = datetime.now(UTC)
    broken = session("probe-2", started_at=format_utc(now - timedelta(hours=2)))
    kept = session("probe-2", started_at=format_utc(now - timedelta(hours=1)))
    path = spool.put(broken)
    spool.put(kept)
    assert path is not None
    path.write_bytes(path.read_bytes()[:300])
    code, out, err = _run("--config", str(fast_config), "--token", token, "--collector",
                          collector.url, "--set", "ping.enabled=false", "run", "--json")
    assert code == 0, err
    assert "a result was set aside (damaged spool file, not sent: not valid JSON: " in err
    assert f"kept in {spool.dead_dir / path.name}" in err
    _, listing, _ = request("GET", collector.url + "/api/v1/results?probe=probe-2")
    assert [r["result_id"] for r in listing["results"]] == [kept.result_id,
                                                           json.loads(out)["result_id"]]


def test_dead_letter_list_retry_drop(fast_config: Path) -> None:
    """list shows each set-aside result (and gap record) with its reason; retry moves
    results back to the spool (a gap record to the gaps); drop deletes; unknown ids are
    one line, exit 2, and nothing is touched."""
    from dataclasses import replace
    from datetime import UTC, datetime, timedelta

    from agent.config import DeliveryConfig
    from agent.schema import format_utc
    from agent.spool import Spool
    from tests.factories import session

    now = datetime.now(UTC)
    spool = Spool(fast_config.parent / "state", DeliveryConfig(min_free_bytes=0))
    results = [session("probe-2", started_at=format_utc(now - timedelta(minutes=10 - i)))
               for i in range(3)]
    for r in results:
        spool.put(r)
    spool.cfg = replace(spool.cfg, spool_max_bytes=sum(e.size for e in spool.entries()))
    spool.put(session("probe-2"))  # over the cap: the oldest goes, a gap record is kept
    (gap,) = spool.gaps()
    gap_id = json.loads(gap.read_text())["gap_id"]
    spool.dead_letter(gap, "HTTP 422: dropped: must be >= 1, got 0")
    for r, reason in zip(results[1:], ("HTTP 403: not yours", "damaged spool file"),
                         strict=True):
        path = next(e.path for e in spool.entries() if r.result_id in e.path.name)
        spool.dead_letter(path, reason)
    common = ["--config", str(fast_config), "dead-letter"]

    code, out, err = _run(*common, "list")
    assert (code, err) == (0, "")
    assert sorted(out.splitlines()) == sorted([
        f"gap {gap_id}: HTTP 422: dropped: must be >= 1, got 0",
        f"result {results[1].result_id}: HTTP 403: not yours",
        f"result {results[2].result_id}: damaged spool file"])

    code, out, err = _run(*common, "retry", results[1].result_id, "no-such-id")
    assert (code, err) == (2, "bbprobe: dead-letter retry: no dead-lettered result "
                              f"no-such-id in {spool.dead_dir}\n")
    assert len(spool.dead_letters()) == 3  # nothing moved

    code, out, err = _run(*common, "retry", results[1].result_id, gap_id)
    assert code == 0, err
    assert out == "2 moved back to the spool; the next run or session sends them\n"
    assert results[1].result_id in {p.name.split("_", 1)[1][:-5] for p in spool.pending()}
    assert [json.loads(p.read_text())["gap_id"] for p in spool.gaps()] == [gap_id]
    assert not list(spool.dead_dir.glob(f"*{results[1].result_id}*"))  # reason gone too

    code, out, err = _run(*common, "drop", "--all")
    assert (code, out) == (0, "1 deleted\n"), err
    assert list(spool.dead_dir.iterdir()) == []
    code, out, _ = _run(*common, "list", "--json")
    assert (code, json.loads(out)) == (0, [])


@pytest.mark.slow
def test_a_result_spooled_for_one_probe_is_never_delivered_as_another(
        collector: RunningCollector, fast_config: Path, tmp_path: Path) -> None:
    """A spooled result belongs to its identity, as a field technician meets it: one laptop, two
    customer lines. A session for probe A while A's collector is away stays spooled (unnamed); the
    next run, with B's token and B's collector, delivers only its own result and says one result
    waits for another probe; `status` lists it under A's collector; a run with A's token delivers it
    once, named by A's collector."""
    from collector.server.testing import running_collector

    token_a = collector.add_probe("line-a")
    dead = f"http://127.0.0.1:{_free_port()}"
    state = fast_config.parent / "state"
    common = ["--config", str(fast_config), "--set", "ping.enabled=false"]
    code, out, err = _run(*common, "--collector", dead, "--token", token_a, "--server",
                          collector.url, "run", "--json")
    assert code == 3, err
    first = json.loads(out)
    assert first["probe_id"] == ""
    with running_collector(tmp_path / "collector-b") as other:
        token_b = other.add_probe("line-b")
        code, out, err = _run(*common, "--collector", other.url, "--token", token_b, "run",
                              "--json")
        assert code == 0, err
        mine = json.loads(out)["result_id"]
        assert "spooled earlier" not in err
        assert "bbprobe: 1 spooled result(s) measured for another probe or collector " \
            "wait in the spool, not sent with this token" in err
        _, listing, _ = request("GET", other.url + "/api/v1/results?probe=line-b")
        assert [r["result_id"] for r in listing["results"]] == [mine]
        assert other.count_results() == 1
        code, out, err = _run(*common, "--collector", other.url, "--token", token_b,
                              "status", "--no-check")
        assert code == 0, err
        assert f"1 result(s) waiting for a probe not named yet at {dead}, " \
               "sent when a run uses that identity" in " ".join(out.split())
    (spooled,) = (state / "spool").glob("*.json")
    assert first["result_id"] in spooled.name
    assert result_of(json.loads(spooled.read_text()))["probe_id"] == ""  # never rewritten
    code, out, err = _run(*common, "--collector", collector.url, "--token", token_a, "run",
                          "--json")
    assert code == 0, err
    assert "with 1 spooled earlier" in err and "another probe" not in err
    _, listing, _ = request("GET", collector.url + "/api/v1/results?probe=line-a")
    assert [r["result_id"] for r in listing["results"]] == [first["result_id"],
                                                           json.loads(out)["result_id"]]
    assert collector.count_results() == 2
    assert not list((state / "spool").glob("*.json"))
    assert not list((state / "dead-letter").glob("*.json"))
