"""The agent over IPv6 against a real collector on the IPv6 loopback: -6
resolves, connects and pings over IPv6 only, the result records it, and the collector
stores the family, which a report scope can select. Real TCP and ICMPv6 on ::1 only.

ICMP needs root or CAP_NET_RAW (the privileged marker): required under CI=true, skipped
elsewhere with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.schema import SCHEMA_VERSION
from collector.server.testing import running_collector
from tests.collector.test_family import _ipv6_loopback
from tests.httpclient import request

pytestmark = [pytest.mark.privileged, pytest.mark.slow]  # real agent sessions
ROOT = Path(__file__).resolve().parents[2]


def _agent(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "--config", str(config), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_agent_over_ipv6_to_a_collector_on_the_ipv6_loopback(tmp_path: Path,
                                                             fast_config: Path) -> None:
    """`bbprobe run -6` against a collector listening on ::1 only: ping train (ICMPv6),
    download and upload all over IPv6, delivered; the stored session is IPv6 in the
    listing filtered by family and absent from the IPv4 one. The same with -4 against
    the same collector fails every test, naming the family, and is still a result."""
    _ipv6_loopback()
    with running_collector(tmp_path / "collector", host="::1") as collector:
        assert collector.url.startswith("http://[::1]:")
        token = collector.add_probe("p6")
        done = _agent(fast_config, "--collector", collector.url, "--token", token,
                      "--set", "checks.enabled=false", "-6", "run", "--json", "-q")
        assert done.returncode == 0, done.stderr[-2000:]
        doc = json.loads(done.stdout)
        assert (doc["schema_version"], doc["address_family"],
                doc["address_family_requested"]) == (SCHEMA_VERSION, "ipv6", "ipv6")
        assert (doc["local_addresses"], doc["remote_addresses"]) == (["::1"], ["::1"])
        assert (doc["ping"]["status"], doc["ping"]["address"]) == ("ok", "::1")
        assert {t["status"] for t in doc["transfers"]} == {"ok"}
        for family, count in (("ipv6", 1), ("ipv4", 0)):
            status, body, _ = request("GET", f"{collector.url}/api/v1/results?family={family}")
            assert status == 200, body
            assert [r["result_id"] for r in body["results"]] == \
                [doc["result_id"]] * count, family
        status, body, _ = request("GET", f"{collector.url}/api/v1/results?family=ip6")
        assert (status, body["field"]) == (400, "family")

        wrong = _agent(fast_config, "--server", collector.url, "--set", "checks.enabled=false",
                       "--set", "download.attempts=1", "--set", "upload.attempts=1",
                       "-4", "speed", "--json", "-q")
    assert wrong.returncode == 6, wrong.stderr[-2000:]  # no measurement
    failed = json.loads(wrong.stdout)
    assert failed["address_family"] == "ipv4"
    assert [(t["failure_reason"], t["error"].split(": ", 1)[1]) for t in failed["transfers"]] \
        == [("connect_error", "::1 is an IPv6 address, and IPv4 was asked for")] * 2


def test_a_dual_stack_run_spools_and_delivers_a_result_per_family(
        tmp_path: Path, fast_config: Path) -> None:
    """`bbprobe -4 -6 run --json` (address_family "both") against a collector on "::"
    reached at 127.0.0.1: an IPv4 session then an IPv6 one, printed as one JSON array,
    numbered one after the other by the spool, both delivered and stored with their
    family. The IPv6 session cannot reach an IPv4 literal: every test of it fails,
    naming the family, and it is still a result."""
    _ipv6_loopback()
    with running_collector(tmp_path / "collector", host="::") as collector:
        port = collector.url.rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}"
        token = collector.add_probe("ds")
        done = _agent(fast_config, "--collector", url, "--token", token,
                      "--set", "checks.enabled=false", "--set", "download.attempts=1",
                      "--set", "upload.attempts=1", "-4", "-6", "run", "--json", "-q")
        assert done.returncode == 6, done.stderr[-2000:]  # the IPv6 session measured nothing
        docs = json.loads(done.stdout)
        assert [(d["address_family"], d["address_family_requested"]) for d in docs] == [
            ("ipv4", "both"), ("ipv6", "both")]
        v4, v6 = docs
        assert v4["ping"]["status"] == "ok" and {t["status"] for t in v4["transfers"]} == {
            "ok"}
        assert v6["ping"]["status"] == "failed" and "IPv6 was asked for" in \
            v6["ping"]["error"]
        assert {t["status"] for t in v6["transfers"]} == {"failed"}
        assert v6["session_seq"] == v4["session_seq"] + 1
        for family, doc in (("ipv4", v4), ("ipv6", v6)):
            status, body, _ = request("GET", f"{url}/api/v1/results?family={family}")
            assert status == 200 and [r["result_id"] for r in body["results"]] == [
                doc["result_id"]], family
