"""Host checks: each rule of methodology.md §2.6 (pure), the observations on this host,
and `bbprobe check`."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from agent import checks
from agent.schema import HostContext

CLEAN = HostContext(
    interface="eth0", addresses=("192.168.1.20",), gateway="192.168.1.1", mtu=1500,
    link_speed_mbps=1000, wireless=False, loopback=False, public_address=False,
    os="Linux 6.1", kernel="#1", cpu_percent=12.0, memory_used_ratio=0.4,
    memory_total_bytes=8 * 1024**3, download_cross_traffic_ratio=0.01,
    upload_cross_traffic_ratio=0.02)
LIMITS = checks.Thresholds(min_link_mbps=300)


def test_clean_host_is_valid() -> None:
    """A host within every limit gives no invalidity reason."""
    assert checks.assess(CLEAN, LIMITS) == ()


@pytest.mark.parametrize(("change", "code", "detail"), [
    ({"cpu_percent": 91.0}, "cpu_busy", "CPU 91 % busy before the tests (limit 85 %)"),
    ({"memory_used_ratio": 0.97}, "memory_busy", "memory 97% used (limit 95%)"),
    ({"memory_total_bytes": 64 * 1024**2}, "memory_low", "64 MiB of memory (minimum 128 MiB)"),
    ({"wireless": True, "interface": "wlan0"}, "wifi",
     "the route to the server uses the wireless interface wlan0; measure over a cable"),
    ({"link_speed_mbps": 100}, "link_speed",
     "eth0 links at 100 Mbit/s, below the 300 Mbit/s the contract needs"),
    ({"download_cross_traffic_ratio": 0.35}, "cross_traffic",
     "35% of the bytes on eth0 during the download tests were not the test's (limit 10%)"),
])
def test_each_rule(change: dict[str, object], code: str, detail: str) -> None:
    """Each host or LAN condition over its limit gives exactly one reason with its code and a
    detail stating the observed value and the limit."""
    (reason,) = checks.assess(replace(CLEAN, **change), LIMITS)  # type: ignore[arg-type]
    assert (reason.code, reason.detail) == (code, detail)


def test_unknowns_are_not_failures() -> None:
    """A virtual NIC reports no speed; no traffic measured: nothing to judge."""
    unknown = replace(CLEAN, link_speed_mbps=None, cpu_percent=None,
                      download_cross_traffic_ratio=None, wireless=None)
    assert checks.assess(unknown, LIMITS) == ()


def test_cross_traffic_ratio_counts_headers_as_ours() -> None:
    """The test's own payload on the wire includes TCP/IP/Ethernet headers."""
    own = 1_000_000
    assert checks.cross_traffic_ratio(int(own * checks.WIRE_OVERHEAD), own) == \
        pytest.approx(0, abs=1e-6)
    assert checks.cross_traffic_ratio(2 * int(own * checks.WIRE_OVERHEAD), own) == \
        pytest.approx(0.5, abs=1e-6)
    assert checks.cross_traffic_ratio(0, own) is None


def test_nothing_transferred_is_not_cross_traffic() -> None:
    """A transfer that moved no byte of its own (a server that refused the connection)
    is its own failure: whatever else crossed the interface is not called "100 % cross
    traffic"."""
    assert checks.cross_traffic_ratio(5_000_000, 0) is None
    assert checks.cross_traffic_ratio(5_000_000, 1) == pytest.approx(1.0, abs=1e-6)


def test_wire_overhead_follows_a_smaller_mtu_only() -> None:
    """Headers are per packet: MTU 1500 adds about 4.6 %, PPPoE's 1492 a little more; a
    jumbo MTU is read as 1500 (the path beyond the LAN carries 1500-byte segments), and
    an unknown one as 1500."""
    assert checks.wire_overhead(1500) == checks.WIRE_OVERHEAD
    assert checks.wire_overhead(None) == checks.WIRE_OVERHEAD
    assert checks.wire_overhead(9000) == checks.WIRE_OVERHEAD
    assert checks.wire_overhead(1492) == pytest.approx(1506 / 1440)
    # Judged with MTU 1500 headers, the test's own bytes through a 1280-byte tunnel
    # would be underestimated: its traffic alone would read as 0.8 % someone else's.
    own = 10_000_000
    seen = int(own * checks.wire_overhead(1280))
    assert checks.cross_traffic_ratio(seen, own, checks.WIRE_OVERHEAD) > 0.007
    assert checks.cross_traffic_ratio(seen, own, checks.wire_overhead(1280)) == \
        pytest.approx(0.0, abs=1e-6)


def test_loopback_has_no_cross_traffic_to_measure() -> None:
    """Over loopback the interface counters hold every local process's traffic and no
    access line: the check says it does not apply; on a real interface it applies."""
    lo = replace(CLEAN, interface="lo", loopback=True)
    reason = checks.cross_traffic_unmeasured(lo)
    assert reason is not None and "loopback" in reason
    assert checks.cross_traffic_unmeasured(CLEAN) is None


def test_observations_on_this_host() -> None:
    """Towards 127.0.0.1 the route is the loopback interface; memory and CPU are read."""
    ctx = checks.observe_host("127.0.0.1", cpu_sample_s=0.1)
    assert ctx.loopback and ctx.interface is not None
    assert "127.0.0.1" in ctx.addresses
    assert ctx.memory_total_bytes and 0 <= (ctx.memory_used_ratio or 0) <= 1
    assert ctx.cpu_percent is not None and ctx.wireless is False


def test_check_command_says_what_to_do() -> None:
    """A failing check: exit 5, the finding and the advice; --json carries the reasons."""
    argv = [sys.executable, "-m", "agent", "--server", "http://127.0.0.1:9", "--set",
            f"checks.min_memory_bytes={10**15}",
            # A busy shared machine must not add cpu_busy to the one finding asked for.
            "--set", "checks.max_cpu_percent=100", "check"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    # 6, not 5: nothing answers on port 9, and a failed measurement comes first.
    assert done.returncode == 6, done.stderr
    assert "A measurement now would be flagged INVALID:" in done.stdout
    assert "use a device with at least 128 MiB of memory" in done.stdout
    done = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60,
                          check=False)
    doc = json.loads(done.stdout)
    assert [r["code"] for r in doc["invalid_reasons"]] == ["memory_low"]
    assert doc["context"]["interface"] is not None


def test_lan_scan_plan_is_bounded_to_private_ranges() -> None:
    """Private subnets only, at most a /24; loopback, public and IPv6 are skipped."""
    from agent import lan

    assert lan.plan("192.168.1.20", 24) == lan.Plan("192.168.1.0/24", None)
    assert lan.plan("10.1.2.3", 8) == lan.Plan("10.1.2.0/24", None)  # not all of 10/8
    assert lan.plan("10.1.2.3", 30) == lan.Plan("10.1.2.0/30", None)
    assert lan.plan("8.8.4.4", 24).network is None
    assert lan.plan("127.0.0.1", 8).skipped == "loopback route: no LAN"
    assert lan.plan("fd00::5", 64).skipped == "IPv6 route: no ARP"
    assert lan.plan(None, None).network is None


def test_lan_count_leaves_out_self_gateway_and_twin_macs() -> None:
    """The LAN host count leaves out this host, the gateway and any other address answering with
    the gateway's MAC."""
    from agent import lan

    answers = {"192.168.1.1": "aa", "192.168.1.2": "aa",  # a router answering twice
               "192.168.1.20": "me", "192.168.1.30": "tv", "192.168.1.31": "pc"}
    assert lan.count_others(answers, "192.168.1.20", "192.168.1.1") == 2


def test_lan_count_leaves_out_the_test_peers() -> None:
    """The measurement server and the ping target on the probe's subnet are not 'other
    hosts', nor is a second address of the same machine."""
    from agent import lan

    answers = {"192.168.1.1": "gw", "192.168.1.20": "me", "192.168.1.5": "srv",
               "192.168.1.6": "srv", "192.168.1.7": "pingbox", "192.168.1.30": "tv"}
    assert lan.count_others(answers, "192.168.1.20", "192.168.1.1") == 3
    assert lan.count_others(answers, "192.168.1.20", "192.168.1.1",
                            {"192.168.1.5", "192.168.1.7"}) == 1


def test_lan_hosts_rule() -> None:
    """Other hosts active on the LAN make the session invalid with the lan_hosts code, saying
    how many."""
    ctx = replace(CLEAN, lan_hosts=2, lan_scan="ARP scan of 192.168.1.0/24")
    (reason,) = checks.assess(ctx, LIMITS)
    assert reason.code == "lan_hosts"
    assert reason.detail.startswith("2 other host(s) active on the LAN besides the gateway")


def test_cross_traffic_over_the_attempts_the_server_did_not_refuse() -> None:
    """A refused attempt's streams are cut at once, and what the server had
    already sent them reaches the interface unread. Counted over the whole direction
    those bytes read as a neighbour's; over the other attempts' windows they do not,
    while a real neighbour inside an attempt's window still shows."""
    from tests.factories import attempt

    refused = replace(attempt("download", number=1, ok=False),
                      failure_reason="server_refused", http_status=429, bytes_total=96)
    ok = attempt("download", number=2)
    wire = int(ok.bytes_total * checks.WIRE_OVERHEAD)
    # 5 MB arrived unread around the refused attempt, nothing else around the good one.
    metered = [(refused, (0, 0), (5_000_000, 0)), (ok, (5_000_000, 0), (5_000_000 + wire, 0))]
    assert checks.line_cross_traffic(metered, "download") == pytest.approx(0.0, abs=1e-9)
    whole = checks.cross_traffic_ratio(5_000_000 + wire, checks.own_bytes([refused, ok]))
    assert whole is not None and whole > 0.05  # what the whole-direction count said
    # A neighbour's 20 % inside the good attempt's window is still seen.
    busy = [(refused, (0, 0), (5_000_000, 0)),
            (ok, (5_000_000, 0), (5_000_000 + int(wire / 0.8), 0))]
    assert checks.line_cross_traffic(busy, "download") == pytest.approx(0.2, rel=1e-3)
    # Only refusals: nothing of the line was measured, nothing to judge.
    assert checks.line_cross_traffic(metered[:1], "download") is None
    assert checks.line_cross_traffic(metered, "upload") is None
