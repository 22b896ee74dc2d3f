"""ICMP: the pure reply parser on hand-built packets, and real echo trains on loopback."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys

import pytest

from agent.probes import icmp
from agent.schema import PingMethod


def _icmp(icmp_type: int, ident: int, seq: int, payload: bytes = b"x" * 8) -> bytes:
    return struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + payload


def _ipv4(payload: bytes, ihl_words: int = 5) -> bytes:
    header = bytes([0x40 | ihl_words]) + b"\0" * (ihl_words * 4 - 1)
    return header + payload


def test_parse_echo_reply_with_ip_header() -> None:
    """Raw IPv4 sockets deliver the IP header; its length comes from IHL (here 24 bytes)."""
    reply = icmp.parse_reply(_ipv4(_icmp(0, 0x1234, 7), ihl_words=6), 4, has_ip_header=True)
    assert reply == icmp.Reply(type=0, ident=0x1234, seq=7)


def test_parse_echo_reply_without_ip_header() -> None:
    """Unprivileged IPv4 and all IPv6 sockets deliver the ICMP message alone."""
    assert icmp.parse_reply(_icmp(129, 9, 3), 6, has_ip_header=False) == icmp.Reply(129, 9, 3)


def test_parse_unreachable_quotes_our_request() -> None:
    """A destination-unreachable error is matched by the request it quotes (RFC 792)."""
    quoted = _ipv4(_icmp(8, 0xBEEF, 2))
    error = _ipv4(struct.pack("!BBHI", 3, 1, 0, 0) + quoted)
    assert icmp.parse_reply(error, 4, has_ip_header=True) == icmp.Reply(3, 0xBEEF, 2)


@pytest.mark.parametrize("packet", [b"", b"\x45" + b"\0" * 10, _ipv4(b"\x03\x00")])
def test_truncated_packets_are_ignored(packet: bytes) -> None:
    """Short or truncated packets give None, never an exception."""
    assert icmp.parse_reply(packet, 4, has_ip_header=True) is None


@pytest.mark.privileged
def test_loopback_train_timing() -> None:
    """Ten pings to 127.0.0.1: all answered within the timeout, and sent on the fixed
    schedule: never before t0 + i x interval, in order (a late wake-up on a busy host
    may delay a send; nothing may make one early)."""
    method = PingMethod(count=10, interval_s=0.02, payload_bytes=56, timeout_s=1.0)
    obs = asyncio.run(icmp.run("127.0.0.1", method))
    assert [s.seq for s in obs.samples] == list(range(10))
    assert all(s.rtt_ms is not None and 0 < s.rtt_ms < 1000 for s in obs.samples)
    offsets = [s.sent_offset_s for s in obs.samples]
    assert all(off >= 0.02 * i - 1e-6 for i, off in enumerate(offsets))
    assert offsets == sorted(offsets)


@pytest.mark.privileged
def test_unroutable_target_in_private_namespace(netns: str) -> None:
    """In a namespace of our own with no route, every ping is lost and says why.

    Runs the real CLI inside the namespace; nothing can leave it (it has only loopback).
    """
    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "agent", "ping", "198.18.0.1",
         "-n", "3", "-i", "0.01", "-W", "0.2", "--json", "--quiet"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 6, done.stderr  # no reply: no measurement (agent/exitcodes.py)
    assert "no echo reply from 198.18.0.1: 3 sent, 0 received" in done.stderr
    doc = json.loads(done.stdout)
    assert doc["summary"]["loss_ratio"] == 1.0
    assert [s["rtt_ms"] for s in doc["ping"]["samples"]] == [None, None, None]
    assert all(s["error"].startswith("send_error") for s in doc["ping"]["samples"])
