"""The real agent and collector across the network lab: shaped rate, loss and delay are
recovered from configured ground truth; a failing or stalled server gives failure records.

Each test builds its own namespaces (198.18.0.0/15, and 2001:2::/48 for IPv6) and tears
them down; nothing leaves them. The rate and loss tests also run over IPv6.
Required under CI=true (root); skipped elsewhere with the reason.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.stats import binomial_interval
from tests.lab.netlab import LinkSpec, network_lab

pytestmark = [pytest.mark.privileged, pytest.mark.slow]
AGENT = [sys.executable, "-m", "agent"]


def _speed(lab: Any, url: str, *sets: str, timeout: float = 120,
           flags: tuple[str, ...] = (), exit_code: int = 0) -> dict[str, Any]:
    """``bbprobe speed --json`` in the client namespace; its result, after checking its
    exit code (0 measured, 5 invalid, 6 nothing measured: agent/exitcodes.py)."""
    argv = [*AGENT, *flags, "--server", url, "--set", "ping.enabled=false"]
    for item in sets:
        argv += ["--set", item]
    done = lab.run(lab.client, [*argv, "speed", "--json", "-q"], timeout=timeout,
                   check=False)
    assert done.returncode == exit_code, (done.returncode, done.stderr[-2000:])
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


@pytest.mark.parametrize(("down", "up", "family"),
                         [(20.0, 5.0, "ipv4"), (2.0, 1.0, "ipv4"), (20.0, 5.0, "ipv6")])
def test_shaped_rates_recovered(lab_dir: Path, down: float, up: float, family: str) -> None:
    """Every payload byte bbprobe counts crossed the shaped link, and the rate it reports
    is bounded by the shaper.

    - Accounting: bytes counted for the attempt (client side for downloads, the server's
      report for uploads) within 3 % of the bottleneck device's transmitted frames over
      the attempt, as TCP payload (retransmissions are the slack).
    - Rate: never more than 3 % above the goodput tbf allows (nothing crosses faster).
      No floor: how much of the link TCP uses depends on the host (under CPU steal a
      5 Mbit/s link was seen carrying 1.3 Mbit/s, which bbprobe counted correctly).
    Whole-attempt, not window, accounting: on a shared VM, CPU steal shifts the mapping
    between the server's clock and wall time by up to hundreds of ms, while the link's
    rate itself swings (TCP/BBR behind tail drop). Window-rate accuracy against iperf3 and
    truth is the benchmark's to show (docs/benchmarks.md). Default method: 2 s warm-up +
    10 s window, 4 streams. Over IPv6 (-6 to the server's 2001:2:0:1::1) the payload
    share of a frame is smaller (a 40-byte header, not 20), and the record says so.
    """
    from agent.schema import parse_utc

    spec = LinkSpec(down_mbit=down, up_mbit=up)
    with network_lab(spec, lab_dir) as lab:
        url = lab.start_collector(host=lab.server_ip6 if family == "ipv6" else None)
        with lab.tx_counter("download") as down_tx, lab.tx_counter("upload") as up_tx:
            doc = _speed(lab, url, "download.streams=4", "upload.streams=4",
                         "download.attempts=1", "upload.attempts=1",
                         flags=("-6",) if family == "ipv6" else ("-4",))
        server, client = (lab.server_ip6, lab.client_ip6) if family == "ipv6" else \
            (lab.server_ip, lab.client_ip)
        assert (doc["address_family"], doc["remote_addresses"], doc["local_addresses"]) == \
            (family, [server], [client])
        for direction, counter in (("download", down_tx), ("upload", up_tx)):
            (attempt,) = [t for t in doc["transfers"] if t["direction"] == direction]
            assert attempt["status"] == "ok", (attempt["failure_reason"], attempt["error"])
            start = parse_utc(attempt["started_at"]).timestamp() - 0.5
            end = start + 0.5 + attempt["duration_s"] + 0.5
            crossed = lab.delivered_goodput_bps(counter, start, end, family) * \
                (end - start) / 8
            assert attempt["bytes_total"] == pytest.approx(crossed, rel=0.03), (
                direction, attempt["bytes_total"], crossed)
            ceiling = spec.goodput_bps(direction, family)
            assert ceiling is not None
            assert 0 < attempt["throughput_bps"] <= 1.03 * ceiling


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_loss_inside_binomial_interval(lab_dir: Path, family: str) -> None:
    """5 % drop on the download direction: ping loss inside the 99.9 % binomial interval
    (99 % failed about once in a hundred runs, as it should: one such run was seen).
    Over IPv6 the train is ICMPv6 echo (RFC 4443) and the drop rule the same inet one."""
    spec = LinkSpec(down_loss=0.05)
    n = 400
    with network_lab(spec, lab_dir) as lab:
        target = lab.server_ip6 if family == "ipv6" else lab.server_ip
        done = lab.run(lab.client, [*AGENT, "ping", target, "-4" if family == "ipv4" else "-6",
                                    "-n", str(n), "-i", "0.005", "-W", "0.5", "--json", "-q"])
    doc = json.loads(done.stdout)
    assert (doc["address_family"], doc["ping"]["address"]) == (family, target)
    lost = sum(1 for sample in doc["ping"]["samples"] if sample["rtt_ms"] is None)
    lo, hi = binomial_interval(n, spec.round_trip_loss, confidence=0.999)
    assert lo <= lost <= hi, (lost, lo, hi)
    assert doc["summary"]["loss_ratio"] == pytest.approx(lost / n)


def test_delay_and_jitter_recovered(lab_dir: Path) -> None:
    """10 ms ± 1 ms each way through the TUN emulator, bbprobe and iputils ping running
    at the same time: every ping answered, nothing below the path's floor of 2 x 9 ms,
    bbprobe's minimum RTT within 5 ms of ping's; one-way = RTT / 2.

    Minimums, because the userspace emulator stalls whenever the VM loses its CPU
    (steal time on a shared host: maxima of 200-300 ms were seen on a 20 ms path), and
    stalls only ever add delay: the floor is what the path really is, and a timestamping
    bias in bbprobe would show there. The tolerance is loose because the two tools meet
    the emulator at different instants (floors 2.7 ms apart were seen under steal); the
    0.2 ms agreement is the benchmark's to show, on a quiet machine (docs/benchmarks.md).
    """
    import re

    spec = LinkSpec(delay_ms=10.0, jitter_ms=1.0)
    with network_lab(spec, lab_dir) as lab:
        reference = lab.spawn(lab.client, ["ping", "-n", "-c", "150", "-i", "0.02",
                                           lab.server_ip])
        done = lab.run(lab.client, [*AGENT, "ping", lab.server_ip, "-n", "150", "-i", "0.02",
                                    "-W", "1", "--json", "-q"])
        ping_out, _ = reference.communicate(timeout=60)
    s = json.loads(done.stdout)["ping"]["summary"]
    theirs = [float(x) for x in re.findall(r"time=([0-9.]+) ms", ping_out)]
    assert s["loss_ratio"] == 0.0
    assert len(theirs) == 150
    assert s["one_way_delay_mean_ms"] == pytest.approx(s["rtt_mean_ms"] / 2)
    assert s["rtt_min_ms"] >= 18.0  # never released early
    assert abs(s["rtt_min_ms"] - min(theirs)) <= 5.0, (s["rtt_min_ms"], min(theirs))


def test_stalled_server_gives_timeouts_not_hangs(lab_dir: Path) -> None:
    """A server that accepts connections and never answers: every attempt times out, is
    recorded, and the command ends within its deadlines."""
    with network_lab(LinkSpec(), lab_dir) as lab:
        lab.spawn(lab.server, [sys.executable, "-c",
                               "import socket, time\n"
                               "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
                               "socket.SO_REUSEADDR, 1)\n"
                               f"s.bind(('{lab.server_ip}', 8080)); s.listen(16)\n"
                               "held = []\n"
                               "while True: held.append(s.accept())\n"])
        time.sleep(0.5)
        started = time.monotonic()
        doc = _speed(lab, f"http://{lab.server_ip}:8080", "download.attempts=2",
                     "upload.attempts=1", "download.streams=1", "upload.streams=1",
                     "download.warmup_s=0.5", "download.window_s=1",
                     "upload.warmup_s=0.5", "upload.window_s=1",
                     "download.timeout_s=2", "upload.timeout_s=2", exit_code=6)
        elapsed = time.monotonic() - started
    reasons = [(t["direction"], t["failure_reason"]) for t in doc["transfers"]]
    assert reasons == [("download", "timeout"), ("download", "timeout"),
                       ("upload", "timeout")]
    assert doc["summary"]["download_failure_ratio"] == 1.0
    assert elapsed < 20


def test_server_dying_mid_transfer_is_recorded(lab_dir: Path) -> None:
    """The collector is killed during the download: the attempt in flight is a broken
    connection, the retries cannot connect, and the agent still reports."""
    with network_lab(LinkSpec(down_mbit=50.0), lab_dir) as lab:
        url = lab.start_collector()
        agent = lab.spawn(lab.client, [*AGENT, "--server", url, "--set", "ping.enabled=false",
                                       "--set", "checks.enabled=false",  # start at once
                                       "--set", "download.streams=2",
                                       "--set", "download.attempts=2",
                                       "--set", "download.window_s=4",
                                       "speed", "--direction", "download", "--json", "-q"])
        time.sleep(2.0)
        collector = next(p for p in lab._processes if "collector" in " ".join(p.args))
        collector.kill()
        out, err = agent.communicate(timeout=60)
    assert agent.returncode == 6, err  # the download measured nothing
    doc = json.loads(out)
    reasons = [t["failure_reason"] for t in doc["transfers"]]
    assert reasons[0] in ("broken_connection", "short_transfer")
    assert reasons[1] == "connect_error"
    assert doc["summary"]["download_failure_ratio"] == 1.0


def test_cross_traffic_marks_the_session_invalid(lab_dir: Path) -> None:
    """iperf3 pulls data across the same shaped link during bbprobe's download: the
    session is flagged invalid for cross traffic, with the measured share. The same
    download alone is valid (control)."""
    spec = LinkSpec(down_mbit=20.0, up_mbit=20.0)
    sets = ("download.streams=2", "download.warmup_s=1", "download.window_s=3",
            "download.attempts=1")
    with network_lab(spec, lab_dir) as lab:
        url = lab.start_collector()
        alone = json.loads(lab.run(lab.client, [
            *AGENT, "--server", url, "--set", "ping.enabled=false",
            *[a for item in sets for a in ("--set", item)],
            "speed", "--direction", "download", "--json", "-q"], timeout=120).stdout)
        lab.spawn(lab.server, ["iperf3", "-s", "-1", "-B", lab.server_ip, "-p", "5201"])
        time.sleep(0.5)
        lab.spawn(lab.client, ["iperf3", "-c", lab.server_ip, "-p", "5201", "-R", "-t", "12"])
        time.sleep(1.0)
        busy_run = lab.run(lab.client, [
            *AGENT, "--server", url, "--set", "ping.enabled=false",
            *[a for item in sets for a in ("--set", item)],
            "speed", "--direction", "download", "--json", "-q"], timeout=120, check=False)
    assert busy_run.returncode == 5, busy_run.stderr  # measured, but invalid
    busy = json.loads(busy_run.stdout)
    print(f"\ncross traffic share: alone {alone['context']['download_cross_traffic_ratio']:.3f}"
          f", with iperf3 {busy['context']['download_cross_traffic_ratio']:.3f}")
    assert alone["validity"] == {"valid": True, "reasons": []}, alone["context"]
    assert alone["context"]["download_cross_traffic_ratio"] < 0.1
    share = busy["context"]["download_cross_traffic_ratio"]
    assert share > 0.1, busy["context"]
    assert busy["validity"]["valid"] is False
    (reason,) = busy["validity"]["reasons"]
    assert reason["code"] == "cross_traffic"
    assert f"{share:.0%} of the bytes on" in reason["detail"]


def test_other_hosts_on_a_bridged_lan_are_counted(lab_dir: Path) -> None:
    """A test LAN of our own (198.18.30.0/24 on a bridge in a private namespace): the
    gateway, the probe and three other hosts. The probe's ARP scan counts the three, and
    `bbprobe check` flags a measurement there as invalid and says what to do."""
    import os
    import subprocess

    tag = f"bl{os.getpid() % 100000}"
    hosts = {"gw": "198.18.30.1", "probe": "198.18.30.2", "h1": "198.18.30.11",
             "h2": "198.18.30.12", "h3": "198.18.30.13"}
    namespaces = [f"{tag}sw", *[f"{tag}{h}" for h in hosts]]

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, timeout=30, capture_output=True)

    try:
        for ns in namespaces:
            ip("netns", "add", ns)
        sw = f"{tag}sw"
        ip("-n", sw, "link", "add", "br0", "type", "bridge")
        ip("-n", sw, "link", "set", "br0", "up")
        for i, (name, address) in enumerate(hosts.items()):
            ns = f"{tag}{name}"
            ip("link", "add", f"{tag}a{i}", "type", "veth", "peer", "name", f"{tag}b{i}")
            ip("link", "set", f"{tag}a{i}", "netns", ns)
            ip("link", "set", f"{tag}b{i}", "netns", sw)
            ip("-n", sw, "link", "set", f"{tag}b{i}", "master", "br0", "up")
            ip("-n", ns, "link", "set", f"{tag}a{i}", "name", "eth0")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", f"{tag}probe", "route", "add", "default", "via", hosts["gw"])
        done = subprocess.run(
            ["ip", "netns", "exec", f"{tag}probe", *AGENT, "--server",
             f"http://{hosts['gw']}:8080", "check", "--json"],
            capture_output=True, text=True, timeout=120, check=False)
        text = subprocess.run(
            ["ip", "netns", "exec", f"{tag}probe", *AGENT, "--server",
             f"http://{hosts['gw']}:8080", "check"],
            capture_output=True, text=True, timeout=120, check=False)
        # A measurement server and a ping target on the probe's own subnet (a lab, an
        # on-site server) are the test's far ends, not other hosts.
        on_lan = subprocess.run(
            ["ip", "netns", "exec", f"{tag}probe", *AGENT, "--server",
             f"http://{hosts['h1']}:8080", "--set", f"server.ping_target={hosts['h2']}",
             "check", "--json"],
            capture_output=True, text=True, timeout=120, check=False)
    finally:
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)
    # 6, not 5: nothing serves on the gateway's port 8080, and a measurement that could
    # not be made outranks an invalid one (agent/exitcodes.py); the finding is still there.
    assert done.returncode == 6, done.stderr
    doc = json.loads(done.stdout)
    assert doc["context"]["lan_hosts"] == 3, doc["context"]
    assert doc["context"]["lan_scan"] == "ARP scan of 198.18.30.0/24"
    assert [r["code"] for r in doc["invalid_reasons"]] == ["lan_hosts"]
    assert "switch off or unplug the other devices on the LAN" in text.stdout
    assert json.loads(on_lan.stdout)["context"]["lan_hosts"] == 1, on_lan.stdout
