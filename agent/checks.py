"""Host checks: is this measurement evidence about the line, or about the probe's
surroundings? After Ne.Me.Sys (methodology.md §2.6), which refuses measurements taken over
Wi-Fi, with a busy CPU, short of memory, on a NIC slower than the contract, or with other
traffic on the interface (rejected from 10 % of the test's bytes, TH_TRAFFIC = 0.1).

- ``observe_host`` gathers raw observations (psutil, /proc, /sys): I/O at the edge;
- ``assess`` is pure: observations + thresholds -> the reasons a session is invalid;
- ``cross_traffic_ratio`` is pure: interface byte counters around the transfers minus
  the test's own bytes on the wire.
"""

from __future__ import annotations

import ipaddress
import platform
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.schema import REFUSAL_REASONS, HostContext, InvalidReason, TransferAttempt

# Bytes on the wire per TCP payload byte at MTU 1500 with timestamps: (1500 + 14) /
# (1500 - 52). The test's own traffic is its payload times this, so the interface
# counter is not read as cross traffic because of headers.
WIRE_OVERHEAD = (1500 + 14) / (1500 - 52)


def wire_overhead(mtu: int | None) -> float:
    """Bytes on the wire per TCP payload byte on an interface of this MTU (Ethernet
    header 14, IP + TCP with timestamps 52), the MTU taken at most 1500; 1500 when
    unknown. Pure. A smaller MTU (PPPoE's 1492, a tunnel's 1420) packs less payload per
    packet, and read at 1500 the test's own bytes would be underestimated and part of
    them counted as someone else's. A larger one is not trusted: a jumbo-frame LAN says
    nothing of the path beyond it, where the segments are 1500 again, and reading 9000
    would count the headers of the test's own 1500-byte segments as cross traffic."""
    if mtu is None or mtu <= 52 * 2:
        return WIRE_OVERHEAD
    mtu = min(mtu, 1500)
    return (mtu + 14) / (mtu - 52)


@dataclass(frozen=True, slots=True)
class Thresholds:
    max_cpu_percent: float = 85.0  # Ne.Me.Sys WARNCPU
    max_memory_used_ratio: float = 0.95  # OVERMEM
    min_memory_bytes: int = 128 * 1024**2  # LOWMEM
    reject_wireless: bool = True  # WARNWLAN
    min_link_mbps: float = 0.0  # 0: not checked (the agent may not know the contract)
    max_cross_traffic_ratio: float = 0.10  # TH_TRAFFIC
    max_lan_hosts: int = 0  # besides the gateway (Ne.Me.Sys MAX_HOSTS = 1, the router)


def assess(ctx: HostContext, limits: Thresholds) -> tuple[InvalidReason, ...]:
    """The reasons this session is not evidence about the line (empty: valid). Pure."""
    out = []
    if ctx.cpu_percent is not None and ctx.cpu_percent > limits.max_cpu_percent:
        out.append(InvalidReason("cpu_busy", f"CPU {ctx.cpu_percent:.0f} % busy before the "
                                 f"tests (limit {limits.max_cpu_percent:g} %)"))
    if ctx.memory_used_ratio is not None and \
            ctx.memory_used_ratio > limits.max_memory_used_ratio:
        out.append(InvalidReason("memory_busy", f"memory {ctx.memory_used_ratio:.0%} used "
                                 f"(limit {limits.max_memory_used_ratio:.0%})"))
    if ctx.memory_total_bytes is not None and ctx.memory_total_bytes < limits.min_memory_bytes:
        out.append(InvalidReason("memory_low", f"{ctx.memory_total_bytes / 1024**2:.0f} MiB "
                                 f"of memory (minimum {limits.min_memory_bytes / 1024**2:.0f} "
                                 "MiB)"))
    if limits.reject_wireless and ctx.wireless:
        out.append(InvalidReason("wifi", f"the route to the server uses the wireless "
                                 f"interface {ctx.interface}; measure over a cable"))
    if limits.min_link_mbps and ctx.link_speed_mbps is not None and \
            ctx.link_speed_mbps < limits.min_link_mbps:
        out.append(InvalidReason("link_speed", f"{ctx.interface} links at "
                                 f"{ctx.link_speed_mbps} Mbit/s, below the "
                                 f"{limits.min_link_mbps:g} Mbit/s the contract needs"))
    if ctx.lan_hosts is not None and ctx.lan_hosts > limits.max_lan_hosts:
        out.append(InvalidReason("lan_hosts", f"{ctx.lan_hosts} other host(s) active on the "
                                 f"LAN besides the gateway (limit {limits.max_lan_hosts}; "
                                 f"{ctx.lan_scan})"))
    for direction, ratio in (("download", ctx.download_cross_traffic_ratio),
                             ("upload", ctx.upload_cross_traffic_ratio)):
        if ratio is not None and ratio > limits.max_cross_traffic_ratio:
            out.append(InvalidReason("cross_traffic", f"{ratio:.0%} of the bytes on "
                                     f"{ctx.interface} during the {direction} tests were not "
                                     f"the test's (limit {limits.max_cross_traffic_ratio:.0%})"))
    return tuple(out)


def cross_traffic_ratio(interface_bytes: int, own_payload_bytes: int,
                        overhead: float = WIRE_OVERHEAD) -> float | None:
    """Share of the interface's bytes (in the transfer's direction, over the tests) that
    were not the test's own; None when nothing crossed, and None when the test itself
    moved nothing: with no test traffic there is nothing for other traffic to disturb,
    and a failed transfer (a server that refused the connection) is a failure of its
    own, not "100 % cross traffic". Pure."""
    if interface_bytes <= 0 or own_payload_bytes <= 0:
        return None
    other = interface_bytes - own_payload_bytes * overhead
    return min(1.0, max(0.0, other / interface_bytes))


def cross_traffic_unmeasured(ctx: HostContext) -> str | None:
    """Why the interface counters say nothing about this session's cross traffic (None:
    they do). Pure. The check guards the access line (Ne.Me.Sys TH_TRAFFIC: other
    traffic sharing the line during the test). A path over loopback has no line, and
    lo's counters hold every local process's traffic: another program's loopback
    transfer would read as "cross traffic" though it shares nothing with the test but
    the CPU, which the CPU check covers."""
    if ctx.loopback or ctx.interface == "lo":
        return ("cross traffic not measured on loopback (no access line; lo counts all "
                "local traffic)")
    return None


def line_cross_traffic(
    metered: Sequence[tuple[TransferAttempt, tuple[int, int], tuple[int, int]]],
    direction: str, overhead: float = WIRE_OVERHEAD,
) -> float | None:
    """Cross traffic over the attempts of ``direction`` the server did not refuse, from
    the interface counters read around each one (received for downloads, sent for
    uploads); None when there were none. Pure. A refused attempt's streams are cut at
    once, and what the server had sent them still arrives, unread by the agent: counted
    over the whole direction, the agent's own bytes would read as someone else's."""
    side = 0 if direction == "download" else 1
    line = [(a, b, c) for a, b, c in metered
            if a.direction == direction and a.failure_reason not in REFUSAL_REASONS]
    if not line:
        return None
    return cross_traffic_ratio(sum(c[side] - b[side] for _, b, c in line),
                               own_bytes([a for a, _, _ in line]), overhead)


# --- observations (I/O) ------------------------------------------------------------------


def route_source(host: str, port: int = 80, af: int = socket.AF_UNSPEC) -> str | None:
    """The local address the kernel would use towards ``host`` in family ``af`` (a UDP
    connect sends nothing)."""
    try:
        infos = socket.getaddrinfo(host, port, family=af, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            try:
                s.connect(address)
                return str(s.getsockname()[0])
            except OSError:
                continue
    return None


def default_gateway() -> str | None:
    """IPv4 default gateway from /proc/net/route (Linux)."""
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            raw = int(fields[2], 16)
            return socket.inet_ntoa(raw.to_bytes(4, "little"))
    return None


def _interface_of(address: str | None) -> tuple[str | None, tuple[str, ...]]:
    import psutil

    if address is None:
        return None, ()
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs):
            return name, tuple(a.address for a in addrs
                               if a.family in (socket.AF_INET, socket.AF_INET6))
    return None, ()


def is_wireless(interface: str) -> bool:
    base = Path("/sys/class/net") / interface
    return (base / "wireless").exists() or (base / "phy80211").exists()


def addresses_of(hosts: Iterable[str]) -> set[str]:
    """Every IPv4 and IPv6 address the names resolve to (unresolvable ones: none)."""
    out: set[str] = set()
    for host in hosts:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError):
            continue
        out.update(str(info[4][0]) for info in infos)
    return out


def observe_host(server_host: str, cpu_sample_s: float = 0.5,
                 scan_lan: bool = True, far_ends: Iterable[str] = (),
                 af: int = socket.AF_UNSPEC) -> HostContext:
    """What the host looks like now, towards ``server_host`` (blocks ``cpu_sample_s`` to
    measure CPU load, as Ne.Me.Sys's cpu_percent(0.5), and up to 2 s for the ARP scan).
    The LAN scan does not count ``server_host`` nor the ``far_ends`` (the ping target):
    they are the test's own peers. ``af``: the session's address family, so the
    interface is the one its traffic takes."""
    import psutil

    source = route_source(server_host, af=af)
    interface, addresses = _interface_of(source)
    try:
        stats = psutil.net_if_stats().get(interface) if interface else None
    except OSError:  # /proc/net hidden (a sandbox): link speed and MTU unknown, not fatal
        stats = None
    memory = psutil.virtual_memory()
    public: bool | None = None
    loopback = False
    if source is not None:
        ip = ipaddress.ip_address(source)
        loopback = ip.is_loopback
        public = ip.is_global
    gateway = default_gateway()
    lan_hosts, lan_scan = None, "not scanned"
    if scan_lan:
        from agent import lan

        peers = addresses_of([server_host, *far_ends])
        lan_hosts, lan_scan = lan.others_on_lan(interface, gateway, peers)
    return HostContext(
        lan_hosts=lan_hosts, lan_scan=lan_scan,
        interface=interface, addresses=addresses, gateway=gateway,
        mtu=stats.mtu if stats else None,
        link_speed_mbps=stats.speed if stats and stats.speed > 0 else None,
        wireless=is_wireless(interface) if interface else None, loopback=loopback,
        public_address=public, os=f"{platform.system()} {platform.release()}",
        kernel=platform.version(), cpu_percent=psutil.cpu_percent(cpu_sample_s),
        memory_used_ratio=memory.percent / 100, memory_total_bytes=memory.total,
    )


def interface_bytes(interface: str | None) -> tuple[int, int] | None:
    """(received, sent) bytes of ``interface`` so far, or None."""
    import psutil

    if interface is None:
        return None
    try:
        counters = psutil.net_io_counters(pernic=True).get(interface)
    except OSError:  # /proc/net/dev unreadable: cross traffic is then not measured
        return None
    return (counters.bytes_recv, counters.bytes_sent) if counters else None


def own_bytes(attempts: Sequence[TransferAttempt]) -> int:
    """Payload bytes the test itself moved (every attempt, warm-up included)."""
    return sum(a.bytes_total for a in attempts)
