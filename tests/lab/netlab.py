"""A network lab of our own: client, router and server namespaces on 198.18.0.0/15
(RFC 2544's benchmarking range) and, for IPv6, 2001:2::/48 (RFC 5180's).

    client 198.18.0.1 --c0|r0-- router --r1|s0-- 198.18.1.1    server
           2001:2::1                               2001:2:0:1::1

- rate: ``tc tbf`` per direction on the access link: download (server -> client) on the
  router's r0 egress, upload (client -> server) on the client's c0 egress;
- loss: nftables ``numgen random`` drops in the router's forward chain, per direction;
- delay and jitter: a userspace TUN forwarder in the router (``tests.lab.delay``), since
  netem is not available on these kernels; policy routing sends every forwarded packet
  through it, each direction delayed ``delay_ms ± jitter_ms``.

``network_lab(spec, workdir)`` builds it, yields a ``Lab`` that knows the ground truth
it configured, and always tears everything down (processes, namespaces), even when the
test fails. Traffic never leaves the namespaces. Needs root and iproute2, nftables.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

CLIENT_IP = "198.18.0.1"
ROUTER_CLIENT_IP = "198.18.0.2"
SERVER_IP = "198.18.1.1"
ROUTER_SERVER_IP = "198.18.1.2"
# IPv6: one /64 per link, from the benchmarking range (RFC 5180 §8: 2001:2::/48).
CLIENT_IP6 = "2001:2::1"
ROUTER_CLIENT_IP6 = "2001:2::2"
SERVER_IP6 = "2001:2:0:1::1"
ROUTER_SERVER_IP6 = "2001:2:0:1::2"
# IPv4 (20) + TCP (20) + timestamp option (12): per-packet overhead of a TCP payload;
# IPv6's fixed header is 40 bytes (RFC 8200), 20 more.
TCP_IP_OVERHEAD = 52
TCP_IP6_OVERHEAD = 72
ETHERNET_HEADER = 14
_counter = itertools.count()
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """The ground truth of a lab link. Rates in Mbit/s (None: unshaped), loss as a
    fraction of packets per direction, delay and jitter one-way in ms (each direction)."""

    down_mbit: float | None = None
    up_mbit: float | None = None
    down_loss: float = 0.0
    up_loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    mtu: int = 1500
    queue_ms: float = 50.0
    # Where the upload is shaped. On the client's own interface (default) the shaper
    # pushes back on the sender's TCP directly (local drops, TSQ): no loss, and what is
    # queued stays on the client, so a 1 Mbit/s upload drains within the agent's grace.
    # At the router, as on a real line, a single BBR flow is not held back by its own
    # host (it used a third of a 10 Mbit/s link shaped at the client); the open-protocol
    # test and benchmark, whose clients run one flow, shape there.
    up_at_router: bool = False
    # One veth pair between client and server, no router: for capacity benchmarks only
    # (no shaping, loss or delay possible).
    direct: bool = False

    def goodput_bps(self, direction: str, family: str = "ipv4") -> float | None:
        """Expected TCP payload rate through the shaper: tbf counts whole Ethernet frames,
        of which (mtu - 52) bytes are payload (mtu - 72 over IPv6)."""
        rate = self.down_mbit if direction == "download" else self.up_mbit
        if rate is None:
            return None
        return rate * 1e6 * self.payload_share(family)

    def payload_share(self, family: str = "ipv4") -> float:
        """TCP payload bytes per byte of a full-sized frame on the wire."""
        overhead = TCP_IP6_OVERHEAD if family == "ipv6" else TCP_IP_OVERHEAD
        return (self.mtu - overhead) / (self.mtu + ETHERNET_HEADER)

    @property
    def round_trip_loss(self) -> float:
        """Probability an echo round trip fails: the request or the reply is dropped."""
        return 1 - (1 - self.up_loss) * (1 - self.down_loss)


def available() -> str | None:
    """None if the lab can be built here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian packages iproute2, nftables)"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun for the delay emulator"
    if not Path("/proc/sys/net/ipv6").exists():
        return "needs IPv6 in the kernel (booted with ipv6.disable=1?): the lab is dual-stack"
    return None


def _run(argv: Sequence[str], stdin: str | None = None) -> None:
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                          timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"lab setup failed: {' '.join(argv)}: {done.stderr.strip()}")


class Lab:
    def __init__(self, spec: LinkSpec, workdir: Path) -> None:
        tag = f"bbl{os.getpid() % 100000}x{next(_counter)}"
        self.spec = spec
        self.workdir = workdir
        self.client = f"{tag}-c"
        self.router = f"{tag}-r"
        self.server = f"{tag}-s"
        self.client_ip = CLIENT_IP
        self.server_ip = SERVER_IP
        self.client_ip6 = CLIENT_IP6
        self.server_ip6 = SERVER_IP6
        self._processes: list[subprocess.Popen[str]] = []
        self._namespaces: list[str] = []

    # --- building ----------------------------------------------------------------------------

    def _namespace(self, ns: str, ipv6: bool = True) -> None:
        """Add namespace ``ns`` (deleted by close()), IPv6 on if asked, loopback up."""
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        if ipv6:
            self._ipv6_on(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def build(self) -> None:
        spec = self.spec
        if spec.direct:
            self._build_direct()
            return
        for ns in (self.client, self.router, self.server):
            self._namespace(ns)
        _run(["ip", "link", "add", "c0", "netns", self.client, "type", "veth",
              "peer", "name", "r0", "netns", self.router])
        _run(["ip", "link", "add", "s0", "netns", self.server, "type", "veth",
              "peer", "name", "r1", "netns", self.router])
        for ns, dev, addr in ((self.client, "c0", f"{CLIENT_IP}/30"),
                              (self.router, "r0", f"{ROUTER_CLIENT_IP}/30"),
                              (self.router, "r1", f"{ROUTER_SERVER_IP}/30"),
                              (self.server, "s0", f"{SERVER_IP}/30")):
            _run(["ip", "-n", ns, "addr", "add", addr, "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "mtu", str(spec.mtu), "up"])
        for ns, dev, addr in ((self.client, "c0", f"{CLIENT_IP6}/64"),
                              (self.router, "r0", f"{ROUTER_CLIENT_IP6}/64"),
                              (self.router, "r1", f"{ROUTER_SERVER_IP6}/64"),
                              (self.server, "s0", f"{SERVER_IP6}/64")):
            # nodad: usable at once, not after duplicate address detection's ~1 s
            # (RFC 4862 §5.4); nothing else can be on these links.
            _run(["ip", "-n", ns, "-6", "addr", "add", addr, "dev", dev, "nodad"])
        _run(["ip", "-n", self.client, "route", "add", "default", "via", ROUTER_CLIENT_IP])
        _run(["ip", "-n", self.server, "route", "add", "default", "via", ROUTER_SERVER_IP])
        _run(["ip", "-n", self.client, "-6", "route", "add", "default", "via",
              ROUTER_CLIENT_IP6])
        _run(["ip", "-n", self.server, "-6", "route", "add", "default", "via",
              ROUTER_SERVER_IP6])
        self.sysctl(self.router, "net.ipv4.ip_forward", "1")
        self.sysctl(self.router, "net.ipv6.conf.all.forwarding", "1")
        if spec.down_mbit is not None:
            self._shape(self.router, "r0", spec.down_mbit)
        if spec.up_mbit is not None:
            self._shape(*self.bottleneck("upload"), spec.up_mbit)
        if spec.down_loss or spec.up_loss:
            self._drop(spec.up_loss, spec.down_loss)
        if spec.delay_ms or spec.jitter_ms:
            self._delay(spec.delay_ms, spec.jitter_ms)

    def _build_direct(self) -> None:
        spec = self.spec
        if spec.down_mbit or spec.up_mbit or spec.down_loss or spec.up_loss or spec.delay_ms:
            raise ValueError("a direct lab link cannot be shaped, lossy or delayed")
        for ns in (self.client, self.server):
            self._namespace(ns)
        _run(["ip", "link", "add", "c0", "netns", self.client, "type", "veth",
              "peer", "name", "s0", "netns", self.server])
        self.server_ip = ROUTER_CLIENT_IP
        self.server_ip6 = ROUTER_CLIENT_IP6
        for ns, dev, addr, addr6 in (
                (self.client, "c0", f"{CLIENT_IP}/30", f"{CLIENT_IP6}/64"),
                (self.server, "s0", f"{ROUTER_CLIENT_IP}/30", f"{ROUTER_CLIENT_IP6}/64")):
            _run(["ip", "-n", ns, "addr", "add", addr, "dev", dev])
            _run(["ip", "-n", ns, "-6", "addr", "add", addr6, "dev", dev, "nodad"])
            _run(["ip", "-n", ns, "link", "set", dev, "mtu", str(spec.mtu), "up"])

    def _ipv6_on(self, ns: str) -> None:
        """IPv6 enabled (a host may disable it by default) and DAD off in a new namespace,
        for the interfaces made after: addresses are usable at once."""
        for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6",
                    "net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"):
            self.sysctl(ns, key, "0")

    def sysctl(self, ns: str, key: str, value: str) -> None:
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"])

    def _shape(self, ns: str, dev: str, mbit: float) -> None:
        rate_bytes = mbit * 1e6 / 8
        frame = self.spec.mtu + ETHERNET_HEADER
        burst = int(max(2 * frame, rate_bytes * 0.002))
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
              "rate", f"{int(mbit * 1e6)}bit", "burst", str(burst),
              "latency", f"{self.spec.queue_ms:g}ms"])

    def _drop(self, up: float, down: float) -> None:
        # Forwarded packets cross the forward hook once per hop through the router; "up"
        # enters from the client (iif r0), "down" leaves towards the client (oif r0).
        million = 1_000_000
        rules = [f'iifname "r0" numgen random mod {million} < {round(up * million)} drop'
                 if up else "",
                 f'oifname "r0" numgen random mod {million} < {round(down * million)} drop'
                 if down else ""]
        body = "\n".join(r for r in rules if r)
        script = ("table inet bblab {\n chain forward {\n"
                  "  type filter hook forward priority 0; policy accept;\n"
                  f"  {body}\n }}\n}}\n")
        _run(["ip", "netns", "exec", self.router, "nft", "-f", "-"], stdin=script)

    def _delay(self, delay_ms: float, jitter_ms: float) -> None:
        r = self.router
        _run(["ip", "-n", r, "tuntap", "add", "dev", "tun0", "mode", "tun"])
        _run(["ip", "-n", r, "link", "set", "tun0", "mtu", str(self.spec.mtu), "up"])
        for key in ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.tun0.rp_filter",
                    "net.ipv4.conf.default.rp_filter"):
            self.sysctl(r, key, "0")
        # Everything arriving from the client or the server goes through tun0; what the
        # emulator writes back arrives on tun0 and is routed normally by destination.
        # IPv6 alike: a TUN device without packet information tells the two apart by
        # the version nibble of each packet, so the emulator needs no change.
        for family in ("-4", "-6"):
            _run(["ip", "-n", r, family, "route", "add", "default", "dev", "tun0",
                  "table", "100"])
            for dev in ("r0", "r1"):
                _run(["ip", "-n", r, family, "rule", "add", "iif", dev, "lookup", "100"])
        proc = self.spawn(r, [sys.executable, "-m", "tests.lab.delay", "--dev", "tun0",
                              "--delay-ms", f"{delay_ms:g}", "--jitter-ms", f"{jitter_ms:g}"],
                          cwd=REPO)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"delay emulator did not start: {line!r}")

    # --- using ---------------------------------------------------------------------------------

    def spawn(self, ns: str, argv: Sequence[str], cwd: Path | None = None) -> subprocess.Popen[str]:
        """Start a process inside namespace ``ns``; it is stopped when the lab closes."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=cwd)
        self._processes.append(proc)
        return proc

    def run(self, ns: str, argv: Sequence[str], timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                               f"{done.stderr.strip()[-2000:]}")
        return done

    def bottleneck(self, direction: str) -> tuple[str, str]:
        """(namespace, device) whose egress shapes ``direction``."""
        if direction == "download":
            return self.router, "r0"
        return (self.router, "r1") if self.spec.up_at_router else (self.client, "c0")

    @contextlib.contextmanager
    def tx_counter(self, direction: str, interval_s: float = 0.05) -> Iterator[
        list[tuple[float, int]]
    ]:
        """Sample the bottleneck's transmitted bytes (wall clock, bytes) while the block
        runs: the ground truth of what the link actually delivered, whatever TCP did."""
        ns, dev = self.bottleneck(direction)
        samples: list[tuple[float, int]] = []
        # One long-lived reader inside the namespace (its own /sys), not a process per
        # sample: the sampler must not load the machine whose link it measures.
        code = ("import sys, time\n"
                f"path = '/sys/class/net/{dev}/statistics/tx_bytes'\n"
                "while True:\n"
                "    with open(path) as fh: value = fh.read().strip()\n"
                "    print(time.time(), value, flush=True)\n"
                f"    time.sleep({interval_s})\n")
        proc = self.spawn(ns, [sys.executable, "-c", code])
        assert proc.stdout is not None
        stdout = proc.stdout

        def collect() -> None:
            for line in stdout:
                fields = line.split()
                if len(fields) == 2:  # a line cut short when the reader is stopped: skip
                    samples.append((float(fields[0]), int(fields[1])))

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        time.sleep(2 * interval_s)
        try:
            yield samples
        finally:
            time.sleep(2 * interval_s)
            proc.terminate()
            proc.wait(5)
            reader.join(5)

    def delivered_goodput_bps(self, samples: list[tuple[float, int]], start: float,
                              end: float, family: str = "ipv4") -> float:
        """TCP payload rate that crossed the bottleneck in [start, end] (wall clock): the
        counter's bytes interpolated at both edges, times the payload share of a frame."""
        from agent.stats import bytes_at

        frames = bytes_at(samples, end) - bytes_at(samples, start)
        return frames * self.spec.payload_share(family) * 8 / (end - start)

    def start_collector(self, port: int = 8080, host: str | None = None) -> str:
        """A real bbprobe collector in the server namespace, listening on ``host``
        (default: the server's IPv4 address; "::" serves both families); returns its
        URL as it wrote it."""
        addr_file = self.workdir / f"{self.server}.addr"
        addr_file.unlink(missing_ok=True)
        self.spawn(self.server, [sys.executable, "-m", "collector",
                                 "--db", str(self.workdir / f"{self.server}.sqlite3"),
                                 "serve", "--host", host or self.server_ip, "--port", str(port),
                                 "--addr-file", str(addr_file)], cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if addr_file.exists() and addr_file.read_text().strip():
                return addr_file.read_text().strip()
            time.sleep(0.05)
        raise RuntimeError("collector did not start in the lab's server namespace")

    def close(self) -> None:
        for proc in self._processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._processes:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30,
                           check=False)


@contextlib.contextmanager
def network_lab(spec: LinkSpec, workdir: Path) -> Iterator[Lab]:
    """Build a lab with ``spec``; always torn down on exit."""
    lab = Lab(spec, workdir)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()
