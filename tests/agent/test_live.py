"""The technician's live view: the pure state and line (agent/live.py), the
transfer engine's feed, and the real CLI on a real terminal (tmux), on a pty with --json,
and with stderr not a terminal."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import pty
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import live, liveview
from agent.live import BytesMoved, LiveState, PhaseStarted, RttSampled
from collector.server.testing import RunningCollector, serve_process
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]


def fold(*events: live.LiveEvent) -> LiveState:
    return functools.reduce(live.advance, events, LiveState())


def reads(start: float, step_s: float, count: int, bytes_per_step: int) -> list[BytesMoved]:
    """``count`` reads ``step_s`` apart after ``start``, ``bytes_per_step`` each."""
    return [BytesMoved(start + (i + 1) * step_s, (i + 1) * bytes_per_step)
            for i in range(count)]


DOWN = PhaseStarted("download test 1/2 attempt 1", 100.0, 12.0, transfer=True)
PING = PhaseStarted("ping", 50.0, 9.0, transfer=False)


# --- the pure state and line ------------------------------------------------------------


class TestState:
    def test_phase_start_resets_reads_and_rtt(self) -> None:
        """A new phase forgets the previous phase's reads and RTT."""
        state = fold(DOWN, *reads(100.0, 0.1, 5, 1000), RttSampled(100.2, 12.0),
                     PhaseStarted("upload test 1/1 attempt 1", 110.0, None, transfer=True))
        assert state == LiveState(label="upload test 1/1 attempt 1", started_t=110.0,
                                  planned_s=None, transfer=True, recent=((110.0, 0),),
                                  rtt_ms=None)

    def test_bytes_outside_a_transfer_are_ignored(self) -> None:
        """The ping phase counts no bytes."""
        assert fold(PING, BytesMoved(51.0, 10)).recent == ()

    @pytest.mark.parametrize(("sent_t", "shown"), [(99.9, None), (100.0, 7.5), (105.0, 7.5)])
    def test_rtt_of_a_probe_sent_before_the_phase_is_dropped(
            self, sent_t: float, shown: float | None) -> None:
        """A late reply to the previous phase's loaded ping does not label this one."""
        assert fold(DOWN, RttSampled(sent_t, 7.5)).rtt_ms == shown

    def test_recent_reads_span_about_one_second(self) -> None:
        """Reads older than the newest one at or before CURRENT_SPAN_S ago are dropped."""
        state = fold(DOWN, *reads(100.0, 0.25, 12, 1000))  # up to t = 103.0
        assert state.recent[0] == (102.0, 8000)
        assert state.recent[-1] == (103.0, 12000)

    def test_rates_from_the_byte_counts(self) -> None:
        """1.25 MB every 100 ms is 100 Mbit/s, now and on average; then the rate halves
        for the last second: "now" follows, the mean lags."""
        state = fold(DOWN, *reads(100.0, 0.1, 20, 1_250_000))
        assert live.current_bps(state) == pytest.approx(100e6)
        assert live.mean_bps(state) == pytest.approx(100e6)
        slower = [BytesMoved(102.0 + (i + 1) * 0.1, 25_000_000 + (i + 1) * 625_000)
                  for i in range(10)]
        state = fold(DOWN, *reads(100.0, 0.1, 20, 1_250_000), *slower)
        assert live.current_bps(state) == pytest.approx(50e6)
        assert live.mean_bps(state) == pytest.approx(31_250_000 * 8 / 3.0)

    def test_no_rate_before_the_first_read(self) -> None:
        """Nothing read yet: no rate, rather than zero."""
        assert live.current_bps(fold(DOWN)) is None
        assert live.mean_bps(fold(DOWN)) is None

    def test_transfer_label(self) -> None:
        """Tests count from 1 on screen, from 0 in the schema."""
        assert live.transfer_label("upload", 1, 3, 2) == "upload test 2/3 attempt 2"


@pytest.mark.parametrize(
    ("state", "now", "line"),
    [
        (LiveState(), 5.0, ""),
        (fold(PING, RttSampled(50.5, 0.0512)), 51.04, "ping · 1.0 s / 9 s · RTT 0.05 ms"),
        (fold(DOWN), 100.0,
         "download test 1/2 attempt 1 · 0.0 s / 12 s · now — Mbit/s · mean — Mbit/s"),
        (fold(DOWN), 99.0,  # a clock read just before the phase's own: never negative
         "download test 1/2 attempt 1 · 0.0 s / 12 s · now — Mbit/s · mean — Mbit/s"),
        (fold(DOWN, *reads(100.0, 0.1, 41, 1_250_000), RttSampled(103.9, 23.46)), 104.12,
         "download test 1/2 attempt 1 · 4.1 s / 12 s · now 100.00 Mbit/s · mean 100.00 "
         "Mbit/s · RTT 23.46 ms"),
        (fold(PhaseStarted("upload test 1/1 attempt 2", 0.0, None, transfer=True),
              *reads(0.0, 0.5, 4, 500_000)), 2.25,
         "upload test 1/1 attempt 2 · 2.2 s · now 8.00 Mbit/s · mean 8.00 Mbit/s"),
        (fold(PhaseStarted("ndt7 download", 0.0, 10.0, transfer=True),
              BytesMoved(0.25, 31_250), BytesMoved(0.5, 62_500)), 0.6,
         "ndt7 download · 0.6 s / 10 s · now 1.00 Mbit/s · mean 1.00 Mbit/s"),
    ],
)
def test_format_line(state: LiveState, now: float, line: str) -> None:
    """The line: phase, elapsed against the planned time, now and mean Mbit/s, RTT."""
    assert live.format_line(state, now) == line


def test_no_view_with_json_quiet_or_no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """--json and --quiet never draw; a stderr that is not a terminal never draws."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not liveview.wanted(as_json=False)
    assert not liveview.wanted(as_json=True)
    with liveview.shown(False) as view:
        assert view == liveview.View(live.ignore, None)


# --- the transfer engine's feed ---------------------------------------------------------


def test_feed_reports_the_bytes_counted(collector: RunningCollector) -> None:
    """A download attempt announces its phase, then reads its streams' byte count at most
    every UPDATE_INTERVAL_S on the same monotonic clock; the last read is the byte count
    the attempt records."""
    from agent.probes import http_download
    from agent.schema import TransferMethod

    method = TransferMethod(mode="duration", streams=2, warmup_s=0.2, window_s=0.6,
                            file_size_bytes=None, tests=1, attempts=1,
                            sample_interval_s=0.05, timeout_s=5.0)
    events: list[live.LiveEvent] = []
    before = time.monotonic()
    (attempt,) = asyncio.run(http_download.run(collector.url, method, 0, events.append))
    after = time.monotonic()
    assert attempt.status == "ok", attempt.error
    start, *moved = events
    assert isinstance(start, PhaseStarted)
    assert (start.label, start.planned_s, start.transfer) == \
        ("download test 1/1 attempt 1", 0.8, True)
    assert before <= start.t <= after
    assert all(isinstance(e, BytesMoved) for e in moved)
    times = [e.t for e in moved if isinstance(e, BytesMoved)]
    counts = [e.bytes_total for e in moved if isinstance(e, BytesMoved)]
    assert times == sorted(times) and counts == sorted(counts)
    assert times[-1] <= after
    assert 5 <= len(moved) <= attempt.duration_s / live.UPDATE_INTERVAL_S + 2
    assert counts[-1] == attempt.bytes_total


@pytest.mark.slow
def test_ndt7_feed(tmp_path: Path) -> None:
    """The ndt7 client announces each subtest (the download planned at ndt7's 10 s, the
    upload at its runtime), reads its byte count at each client sample (the last read
    is at most the subtest's count), and the download's server RTT."""
    from dataclasses import replace

    from agent.probes import ndt7
    from collector.config import CollectorConfig
    from collector.server.testing import running_collector

    base = CollectorConfig()
    cfg = replace(base, measurement=replace(base.measurement, ndt7_runtime_s=1.0))
    events: list[live.LiveEvent] = []
    with running_collector(tmp_path / "collector", cfg) as running:
        down, up = asyncio.run(ndt7.run(running.url, runtime_s=1.0, observe=events.append))
    assert down.ok and up.ok, (down.error, up.error)
    phases = [e for e in events if isinstance(e, PhaseStarted)]
    assert [(p.label, p.planned_s, p.transfer) for p in phases] == [
        ("ndt7 download", 10.0, True), ("ndt7 upload", 1.0, True)]
    split = events.index(phases[1])
    for sub, part in ((down, events[:split]), (up, events[split:])):
        moved = [e.bytes_total for e in part if isinstance(e, BytesMoved)]
        assert moved and moved == sorted(moved) and moved[-1] <= sub.client_bytes
    assert any(isinstance(e, RttSampled) and e.rtt_ms > 0 for e in events[:split])


# --- the real CLI: on tmux, on a pty with --json, and with stderr not a terminal ---------


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A collector process of its own (SQLite in tmp) on 127.0.0.1, port 0."""
    d = tmp_path_factory.mktemp("live-collector")
    config = d / "collector.toml"
    config.write_text(f'[server]\nhost = "127.0.0.1"\nport = 0\n\n'
                      f'[storage]\npath = "{d / "collector.sqlite3"}"\n')
    with serve_process(config, cwd=ROOT) as (url, _):
        yield url


def bbprobe() -> list[str]:
    """The installed entry point beside this interpreter, else ``python -m agent``."""
    script = Path(sys.executable).parent / "bbprobe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent"]


def agent_env(**extra: str) -> dict[str, str]:
    """This environment without what would force rich's terminal detection either way."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "CI"}}
    return {**env, **extra}


# Duration mode, 0.3 s warm-up + 1.5 s window: the line reads "... / 1.8 s".
SHORT = ["--set", "download.warmup_s=0.3", "--set", "download.window_s=1.5",
         "--set", "upload.warmup_s=0.3", "--set", "upload.window_s=1.5"]
LIVE_LINE = re.compile(r"(download|upload) test 1/1 attempt 1 · \d+\.\d s / 1\.8 s · "
                       r"now \d+\.\d\d Mbit/s · mean \d+\.\d\d Mbit/s")


def tmux_or_skip() -> str:
    tmux = shutil.which("tmux")
    if tmux is None:
        if IN_CI:
            pytest.fail("CI=true but tmux is missing (make system-deps installs it)")
        pytest.skip("needs tmux to read a terminal's screen (apt-get install tmux)")
    return tmux


@pytest.mark.slow
@pytest.mark.parametrize("command", [["speed"], ["run", "--no-push"]])
def test_live_line_on_a_terminal(server_url: str, fast_config: Path, tmp_path: Path,
                                 command: list[str]) -> None:
    """On a 120x30 tmux terminal, `bbprobe speed` and `bbprobe run` show the live line
    (phase, elapsed against the window, now and mean Mbit/s; for run, with its ping
    trains, the RTT under load) while they transfer; at the end the line is gone, the
    progress lines and the report stay, and the exit code is 0."""
    tmux = tmux_or_skip()
    conf = tmp_path / "tmux.conf"
    # The pane stays readable after the command ends; /bin/sh runs the command line.
    conf.write_text("set -g remain-on-exit on\nset -g default-shell /bin/sh\n")
    exit_file = tmp_path / "exit"
    cmd = [*bbprobe(), "--config", str(fast_config), "--server", server_url, *SHORT, *command]
    # A server of its own, its socket in tmp_path (-S rather than -L: tmux leaves the
    # socket file behind, and the test's directory takes it away).
    base = [tmux, "-S", str(tmp_path / "tmux.sock"), "-f", str(conf)]
    env = agent_env(TERM="xterm-256color")

    def screen(*history: str) -> str:
        return subprocess.run([*base, "capture-pane", "-p", "-t", "live", *history],
                              capture_output=True, text=True, timeout=10, env=env,
                              check=True).stdout

    try:
        subprocess.run([*base, "new-session", "-d", "-s", "live", "-x", "120", "-y", "30",
                        "-c", str(ROOT), f"{shlex.join(cmd)}; echo $? > {exit_file}"],
                       check=True, timeout=10, env=env)
        seen: set[str] = set()
        rtt_seen = False
        deadline = time.monotonic() + 60
        while not exit_file.exists() and time.monotonic() < deadline:
            now = screen()
            for match in LIVE_LINE.finditer(now):
                seen.add(match.group(1))
            rtt_seen |= bool(re.search(LIVE_LINE.pattern + r" · RTT \d+\.\d+ ms", now))
            time.sleep(0.1)
        assert exit_file.exists(), f"bbprobe speed did not end:\n{screen()}"
        # With the scrollback: tmux scrolls the screen by a line to say the pane is dead.
        final = screen("-S", "-100")
        assert exit_file.read_text().strip() == "0", final
        assert seen == {"download", "upload"}, final
        assert rtt_seen == (command[0] == "run")  # speed runs no ping train
        assert " · now " not in final  # the live line was erased
        assert "· download test 1/1: 2 stream(s), 0.3 s warm-up + 1.5 s window" in final
        assert re.search(r"·   attempt 1: [\d.]+ Mbit/s", final), final
        assert "Download: " in final and "Upload: " in final, final
    finally:
        subprocess.run([*base, "kill-server"], check=False, capture_output=True, timeout=10,
                       env=env)


def _plain_lines(err: str) -> None:
    assert "\x1b" not in err  # no terminal escapes
    assert " · now " not in err  # no live line
    assert "· download test 1/1: 2 stream(s), 0.2 s warm-up + 0.6 s window\n" in err
    assert re.search(r"^·   attempt 1: [\d.]+ Mbit/s \(2 stream\(s\)\)$", err, re.M), err


@pytest.mark.slow
def test_not_a_terminal_gets_the_plain_lines(server_url: str, fast_config: Path) -> None:
    """stderr a pipe, even with FORCE_COLOR and TTY_COMPATIBLE set: the progress lines as
    before, no live line, no escape codes; --json prints one JSON document and nothing
    else on stdout."""
    env = agent_env(FORCE_COLOR="1", TTY_COMPATIBLE="1", TERM="xterm-256color")
    for extra in ([], ["--json"]):
        done = subprocess.run([*bbprobe(), "--config", str(fast_config), "--server",
                               server_url, "speed", *extra], check=False,
                              capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        _plain_lines(done.stderr)
        if extra:
            doc = json.loads(done.stdout)
            assert done.stdout == json.dumps(doc, indent=2) + "\n"
        else:
            assert done.stdout.startswith("Session ")


@pytest.mark.slow
def test_json_on_a_terminal_draws_nothing(server_url: str, fast_config: Path) -> None:
    """--json with stderr on a terminal (a pty): the same plain lines on stderr, no live
    line, and stdout exactly the JSON document."""
    primary, secondary = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(primary, 4096)
            except OSError:  # EIO: every writer has closed the pty
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        done = subprocess.run([*bbprobe(), "--config", str(fast_config), "--server",
                               server_url, "speed", "--json"], check=False,
                              stdout=subprocess.PIPE, stderr=secondary, timeout=120,
                              env=agent_env(TERM="xterm"), cwd=ROOT)
    finally:
        os.close(secondary)
        reader.join(timeout=10)
        os.close(primary)
    err = b"".join(chunks).decode().replace("\r\n", "\n")
    assert done.returncode == 0, err
    _plain_lines(err)
    out = done.stdout.decode()
    assert out == json.dumps(json.loads(out), indent=2) + "\n"
