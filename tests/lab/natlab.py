"""Probes behind one address: several client namespaces behind a router that
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
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.lab.netlab import ETHERNET_HEADER, REPO, Lab, LinkSpec, _run

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
            self._namespace(ns, ipv6=False)
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


PROBES = 5
STREAMS = 20
COLLECTOR_PORT = 8080
SERVER_PORT = 8081

AGENT_CONFIG = """
profile = "custom"
state_dir = "{state}"

[collector]
url = "{collector}"
token = "{token}"

[server]
url = "{server}"

[ping]
count = 5
interval_s = 0.05
timeout_s = 1.0

[download]
streams = {streams}
tests = 1
attempts = 1
warmup_s = 0.5
window_s = 2.0
sample_interval_s = 0.1

[upload]
streams = {streams}
tests = 1
attempts = 1
warmup_s = 0.5
window_s = 2.0
sample_interval_s = 0.1

[checks]
# Five agents and two servers share two cores: CPU load is not the line's here.
max_cpu_percent = 100.0

[delivery]
retry_min_s = 0.2
retry_max_s = 1.0
max_wait_s = 5.0
"""

# The stranger: opens ``count`` anonymous downloads that never read, prints each one's
# HTTP status as a JSON list, then holds them (stopped when the probes are done; at
# most 60 s).
STRANGER = """
import json, socket, sys, time
count, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
held, statuses = [], []
for _ in range(count):
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /measure/v1/download?duration_s=50 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    head = b""
    while b"\\r\\n" not in head:
        chunk = s.recv(64)
        if not chunk:
            break
        head += chunk
    statuses.append(int(head.split()[1]) if head.split() else 0)
    held.append(s)
print(json.dumps(statuses), flush=True)
time.sleep(60)
"""


def _collector_cli(db: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "collector", "--db", str(db), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO, check=True)
    return done.stdout


def _keys(workdir: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = workdir / "issuer.pem", workdir / "issuer.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _serve(lab: NatLab, config: Path, name: str) -> str:
    addr = lab.workdir / f"{name}.addr"
    addr.unlink(missing_ok=True)
    proc = lab.spawn(lab.server, [sys.executable, "-m", "collector", "--config", str(config),
                                  "serve", "--addr-file", str(addr)], cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if addr.exists() and addr.read_text().strip():
            return addr.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"{name} stopped: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not start in the lab's server namespace")


def start_servers(lab: NatLab, tickets: bool) -> tuple[str, str, Path]:
    """The issuing collector and the measurement-only server; returns their URLs and
    the collector's database."""
    work = lab.workdir
    private, public = _keys(work)
    server_url = f"http://{lab.server_ip}:{SERVER_PORT}"
    db = work / "collector.sqlite3"
    collector_cfg = work / "collector.toml"
    collector_cfg.write_text(
        f'[server]\nhost = "{lab.server_ip}"\nport = {COLLECTOR_PORT}\nrole = "ingest"\n'
        f'[storage]\npath = "{db}"\n'
        f'[tickets]\nenabled = {"true" if tickets else "false"}\n'
        f'signing_key_file = "{private}"\nservers = ["{server_url}"]\n')
    measure_cfg = work / "measure.toml"
    # 130 slots, half reserved for tickets: 100 ticketed streams and a stranger's 20 fit;
    # 20 per address, the default.
    measure_cfg.write_text(
        f'[server]\nhost = "{lab.server_ip}"\nport = {SERVER_PORT}\nrole = "measurement"\n'
        '[measurement]\nmax_concurrent = 130\nmax_concurrent_per_client = 20\n'
        'ticket_reserved_share = 0.5\n'
        f'[tickets]\ntrusted_keys = ["{public}"]\naudience = ["{server_url}"]\n')
    collector_url = _serve(lab, collector_cfg, "collector")
    measured_url = _serve(lab, measure_cfg, "measurement")
    assert measured_url == server_url
    return collector_url, measured_url, db


def run_probes(lab: NatLab, collector_url: str, server_url: str, db: Path,
               exits: frozenset[int] = frozenset({0})) -> list[dict[str, Any]]:
    """One `bbprobe run` per probe namespace, all started together; their results. Each
    must exit with one of ``exits`` (6: a test the server refused every attempt of)."""
    runs = []
    for i in range(PROBES):
        token = _collector_cli(db, "probe", "add", f"nat{i}").strip()
        cfg = lab.workdir / f"agent{i}.toml"
        cfg.write_text(AGENT_CONFIG.format(state=lab.workdir / f"state{i}",
                                           collector=collector_url, token=token,
                                           server=server_url, streams=STREAMS))
        runs.append(cfg)
    procs = [lab.spawn(lab.clients[i], [sys.executable, "-m", "agent", "--config", str(cfg),
                                        "run", "--json", "-q"], cwd=REPO)
             for i, cfg in enumerate(runs)]
    docs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode in exits, (proc.returncode, err[-2000:])
        docs.append(json.loads(out))
    return docs




def hold_anonymous(lab: NatLab, client: int, count: int) -> tuple[Any, list[int]]:
    """A stranger in client namespace ``client`` holds ``count`` anonymous downloads
    that never read; returns its process (terminate it when done) and their statuses."""
    proc = lab.spawn(lab.clients[client], [sys.executable, "-c", STRANGER, str(count),
                                           lab.server_ip, str(SERVER_PORT)])
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


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
