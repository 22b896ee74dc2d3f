"""Other hosts on the probe's LAN, by ARP scan (scapy). Ne.Me.Sys refuses a measurement
when anything but the router answers on the LAN (MAX_HOSTS = 1, methodology.md §2.6): an
IPTV box or a laptop downloading shares the line with the test.

Bounded: private subnets only (never a public range), at most one /24 (the one holding
the probe's address when the subnet is larger), one broadcast round with a short timeout.
Needs CAP_NET_RAW; without it, or on loopback or a public address, the scan is skipped
and the reason recorded.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

MAX_PREFIX = 24  # scan at most a /24


@dataclass(frozen=True, slots=True)
class Plan:
    network: str | None  # what to scan, e.g. "192.168.1.0/24"; None: skip
    skipped: str | None  # why not


def plan(address: str | None, prefixlen: int | None) -> Plan:
    """What to scan from the probe's address on its interface. Pure."""
    if address is None or prefixlen is None:
        return Plan(None, "no IPv4 address on the interface towards the server")
    ip = ipaddress.ip_address(address)
    if ip.version != 4:
        return Plan(None, "IPv6 route: no ARP")
    if ip.is_loopback:
        return Plan(None, "loopback route: no LAN")
    if not ip.is_private:
        return Plan(None, f"{address} is public: no LAN to scan")
    network = ipaddress.ip_network(f"{address}/{max(prefixlen, MAX_PREFIX)}", strict=False)
    return Plan(str(network), None)


def count_others(answers: dict[str, str], own: str, gateway: str | None,
                 ignore: Iterable[str] = ()) -> int:
    """Hosts that answered, other than the probe itself, the gateway and the ``ignore``
    addresses (the measurement server and the ping target: a server on the probe's own
    subnet, as in a lab or an on-site test, is the far end of the test, not competing
    traffic). Two addresses behind one MAC (routers that answer twice) count once. Pure."""
    known = {own, gateway or "", *ignore}
    known_macs = {answers[ip] for ip in known if ip in answers}
    macs = {mac for ip, mac in answers.items() if ip not in known}
    return len(macs - known_macs)


def scan(interface: str, network: str, timeout_s: float = 1.5) -> dict[str, str]:
    """ip -> MAC of every host answering one ARP broadcast round on ``interface``.
    Raises PermissionError without CAP_NET_RAW."""
    import logging

    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
    from scapy.layers.l2 import ARP, Ether
    from scapy.sendrecv import srp

    answered, _ = srp(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=network), iface=interface,
                      timeout=timeout_s, verbose=0)
    return {received.psrc: received.hwsrc for _, received in answered}


def interface_ipv4(interface: str | None) -> tuple[str | None, int | None]:
    """The interface's IPv4 address and prefix length."""
    import socket

    import psutil

    if interface is None:
        return None, None
    for a in psutil.net_if_addrs().get(interface, ()):
        if a.family == socket.AF_INET and a.netmask:
            prefix = ipaddress.ip_network(f"0.0.0.0/{a.netmask}").prefixlen
            return a.address, prefix
    return None, None


def others_on_lan(interface: str | None, gateway: str | None,
                  ignore: Iterable[str] = ()) -> tuple[int | None, str]:
    """(hosts other than the gateway and ``ignore``, what was done), never raising."""
    address, prefix = interface_ipv4(interface)
    what = plan(address, prefix)
    if what.network is None or interface is None or address is None:
        return None, f"skipped: {what.skipped}"
    try:
        answers = scan(interface, what.network)
    except PermissionError:
        return None, "skipped: the ARP scan needs CAP_NET_RAW"
    except OSError as exc:
        return None, f"skipped: ARP scan failed: {exc.strerror or exc}"
    return count_others(answers, address, gateway, ignore), f"ARP scan of {what.network}"
