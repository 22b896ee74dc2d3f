"""Probes behind one address (issue 24): several client namespaces behind a router that
masquerades them all to one IPv4 address, as carrier-grade NAT does (FWA, many fibre and
mobile-backup offers), and a server namespace.

    probe 0  198.18.2.1 --p0|h0--+
    probe 1  198.18.2.5 --p1|h1--+ router ==(nft masquerade to 198.18.1.2)== 198.18.1.1 server
    ...                          +--r1|s0--

Each client has its own veth pair and /30 (198.18.2.4i+1, router 198.18.2.4i+2); the router
rewrites every source to its address on the server link, so the server sees one client
address for all of them. Each client's access link may be shaped with ``tc tbf``
(download on the router's egress towards it, upload on its own egress, as netlab does), so
a hundred streams do not turn into a CPU benchmark. Not the shared link: a hundred flows
behind one tail-drop queue retransmit a fifth of what they send, and the probes' own
cross-traffic check would count the retransmissions as someone else's bytes.
Everything stays inside the namespaces (198.18.0.0/15) and is torn down on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.lab.netlab import ETHERNET_HEADER, Lab, LinkSpec, _run

NAT_ADDRESS = "198.18.1.2"
SERVER_ADDRESS = "198.18.1.1"


def client_address(index: int) -> str:
    return f"198.18.2.{4 * index + 1}"


class NatLab(Lab):
    """``clients`` namespaces behind one masquerading router; ``access_mbit`` shapes each
    client's link in both directions (None: unshaped)."""

    def __init__(self, clients: int, workdir: Path, access_mbit: float | None = None) -> None:
        super().__init__(LinkSpec(), workdir)
        if not 1 <= clients <= 60:
            raise ValueError("1 to 60 clients")
        self.access_mbit = access_mbit
        self.clients = [f"{self.client}{i}" for i in range(clients)]
        self.server_ip = SERVER_ADDRESS
        self.nat_ip = NAT_ADDRESS

    def build(self) -> None:
        for ns in (self.router, self.server, *self.clients):
            _run(["ip", "netns", "add", ns])
            self._namespaces.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "link", "add", "s0", "netns", self.server, "type", "veth",
              "peer", "name", "r1", "netns", self.router])
        _run(["ip", "-n", self.server, "addr", "add", f"{SERVER_ADDRESS}/30", "dev", "s0"])
        _run(["ip", "-n", self.router, "addr", "add", f"{NAT_ADDRESS}/30", "dev", "r1"])
        _run(["ip", "-n", self.server, "link", "set", "s0", "up"])
        _run(["ip", "-n", self.router, "link", "set", "r1", "up"])
        for i, ns in enumerate(self.clients):
            address = client_address(i)
            gateway = f"198.18.2.{4 * i + 2}"
            _run(["ip", "link", "add", "p0", "netns", ns, "type", "veth",
                  "peer", "name", f"h{i}", "netns", self.router])
            _run(["ip", "-n", ns, "addr", "add", f"{address}/30", "dev", "p0"])
            _run(["ip", "-n", self.router, "addr", "add", f"{gateway}/30", "dev", f"h{i}"])
            _run(["ip", "-n", ns, "link", "set", "p0", "up"])
            _run(["ip", "-n", self.router, "link", "set", f"h{i}", "up"])
            _run(["ip", "-n", ns, "route", "add", "default", "via", gateway])
        # The server knows only the router's address: replies to the NAT address are on
        # the link, nothing routes back to the clients' own addresses.
        self.sysctl(self.router, "net.ipv4.ip_forward", "1")
        script = ("table ip bbnat {\n chain postrouting {\n"
                  "  type nat hook postrouting priority srcnat; policy accept;\n"
                  '  oifname "r1" masquerade\n }\n}\n')
        _run(["ip", "netns", "exec", self.router, "nft", "-f", "-"], stdin=script)
        if self.access_mbit is not None:
            rate_bytes = self.access_mbit * 1e6 / 8
            burst = int(max(2 * (1500 + ETHERNET_HEADER), rate_bytes * 0.002))
            for i, ns in enumerate(self.clients):
                for where, dev in ((self.router, f"h{i}"), (ns, "p0")):
                    _run(["ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev,
                          "root", "tbf", "rate", f"{int(self.access_mbit * 1e6)}bit",
                          "burst", str(burst), "latency", "50ms"])


@contextlib.contextmanager
def nat_lab(clients: int, workdir: Path, access_mbit: float | None = None
            ) -> Iterator[NatLab]:
    """Build a NAT lab; always torn down on exit (processes, then namespaces)."""
    lab = NatLab(clients, workdir, access_mbit)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()
