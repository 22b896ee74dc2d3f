"""Accuracy and capacity of bbprobe in the network lab, against iperf3 and iputils ping
measured on the same link in the same run. Prints tables; asserts nothing.

    sudo .venv/bin/python -m benchmarks.lab accuracy [--rates 2,20,100,1000] [--window 5]
    sudo .venv/bin/python -m benchmarks.lab capacity [--window 5]
    sudo .venv/bin/python -m benchmarks.lab protocols [--rates 10,50,100] [--window 10]

Method, stated with every number:
- throughput: bbprobe with N fixed streams, 2 s warm-up + W s window, receiver-counted;
  iperf3 with -P N, -O 2 (the same warm-up omitted), -t 2+W, receiver goodput (-J);
  "truth" is the TCP goodput the tbf shaper allows: rate x (MTU-52)/(MTU+14);
- latency: bbprobe ping and iputils ping, the same count, interval and payload, back to
  back on the same path; truth is 2 x the configured one-way delay (plus forwarding);
- loss: bbprobe's ping loss against the 99 % binomial interval of the configured
  round-trip loss 1-(1-p_up)(1-p_down);
- protocols: third-party clients against the collector's ndt7 and LibreSpeed endpoints,
  compared with bbprobe's agent (HTTP, 4 streams, 2 s warm-up + W s window) on the same
  link in the same run: M-Lab's ndt7-js under Node and bbprobe's ndt7 client (one stream,
  10 s from the WebSocket opening, no warm-up: the protocol's method; download counted
  by the client, upload = the server's TCP_INFO BytesReceived/ElapsedTime), Chromium on
  /speedtest (4 streams, the same warm-up and window as the agent), iperf3 -P4 alike.
  The link has 20 ms one-way delay (40 ms RTT, a typical access line to its server):
  with none, a single BBR flow behind a tail-drop shaper swings between 0.7 and 0.95 of
  the rate, which says more about BBR at 0 ms than about any client.
Needs root, iproute2, nftables, iperf3, iputils-ping, node + tests/ndt7js, chromium
(make test and make bench install them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.stats import binomial_interval
from tests.lab.netlab import LinkSpec, available, network_lab

AGENT = [sys.executable, "-m", "agent"]
WARMUP_S = 2.0


def bbprobe_speed(lab: Any, url: str, direction: str, streams: int, window: float,
                  extra: tuple[str, ...] = ()) -> dict[str, Any]:
    argv = [*AGENT, "--server", url, "--set", "ping.enabled=false",
            "--set", f"{direction}.streams={streams}", "--set", f"{direction}.warmup_s={WARMUP_S}",
            "--set", f"{direction}.window_s={window}", "--set", f"{direction}.attempts=1"]
    for item in extra:
        argv += ["--set", item]
    # wait4 on this very process: its own CPU time and peak RSS, nobody else's.
    proc = subprocess.Popen(["ip", "netns", "exec", lab.client, *argv, "speed",
                             "--direction", direction, "--json", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"bbprobe speed failed with exit code {proc.returncode}")
    doc: dict[str, Any] = json.loads(out)
    (attempt,) = doc["transfers"]
    return {
        "bps": attempt["throughput_bps"],
        "bytes": attempt["bytes_total"],
        "streams": attempt["streams"],
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "maxrss_kb": usage.ru_maxrss,
        "error": attempt["error"],
    }


def iperf3(lab: Any, direction: str, streams: int, window: float,
           zerocopy: bool = False) -> float:
    server = lab.spawn(lab.server, ["iperf3", "-s", "-1", "-B", lab.server_ip])
    time.sleep(0.3)
    argv = ["iperf3", "-c", lab.server_ip, "-J", "-P", str(streams), "-O", f"{WARMUP_S:g}",
            "-t", f"{WARMUP_S + window:g}"]
    if direction == "download":
        argv.append("-R")
    if zerocopy:
        argv.append("-Z")
    out = lab.run(lab.client, argv, timeout=window + 60).stdout
    server.wait(10)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])


def iputils_ping(lab: Any, count: int, interval: float) -> tuple[float | None, float]:
    out = lab.run(lab.client, ["ping", "-q", "-n", "-c", str(count), "-i", f"{interval:g}",
                               "-W", "1", lab.server_ip], check=False).stdout
    loss = float(re.search(r"([0-9.]+)% packet loss", out).group(1)) / 100  # type: ignore[union-attr]
    rtt = re.search(r"= [0-9.]+/([0-9.]+)/", out)
    return (float(rtt.group(1)) if rtt else None), loss


def bbprobe_ping(lab: Any, count: int, interval: float) -> tuple[float | None, int]:
    out = lab.run(lab.client, [*AGENT, "ping", lab.server_ip, "-n", str(count), "-i",
                               f"{interval:g}", "-W", "1", "--json", "-q"]).stdout
    samples = json.loads(out)["ping"]["samples"]
    rtts = [s["rtt_ms"] for s in samples if s["rtt_ms"] is not None]
    return (sum(rtts) / len(rtts) if rtts else None), len(samples) - len(rtts)


def fmt(value: float | None, scale: float = 1e6, digits: int = 2) -> str:
    return "—" if value is None else f"{value / scale:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.3f}"


def accuracy(rates: list[float], window: float, streams: int) -> None:
    print(f"# Accuracy: bbprobe vs iperf3 -P{streams} and iputils ping, same link, same run")
    print(f"# throughput: {streams} streams, {WARMUP_S:g} s warm-up + {window:g} s window "
          "(iperf3 -O/-t alike), Mbit/s of TCP payload at the receiver")
    print("# latency: 200 pings 10 ms apart each tool; loss: 1000 pings 5 ms apart")
    header = ("rate", "loss", "delay", "truth", "bb down", "ip3 down", "bb/ip3", "bb/truth",
              "bb up", "ip3 up", "bb/ip3", "bb/truth", "RTT bb", "RTT ping", "Δ ms",
              "loss bb", "99% interval", "note")
    print(" | ".join(header))
    for rate in rates:
        for loss in (0.0, 0.01):
            for delay in (0.0, 20.0):
                spec = LinkSpec(down_mbit=rate, up_mbit=rate, down_loss=loss, up_loss=loss,
                                delay_ms=delay, jitter_ms=1.0 if delay else 0.0)
                with tempfile.TemporaryDirectory() as work, \
                        network_lab(spec, Path(work)) as lab:
                    url = lab.start_collector()
                    down = bbprobe_speed(lab, url, "download", streams, window)
                    up = bbprobe_speed(lab, url, "upload", streams, window)
                    ip_down = iperf3(lab, "download", streams, window)
                    ip_up = iperf3(lab, "upload", streams, window)
                    rtt_bb, _ = bbprobe_ping(lab, 200, 0.01)
                    rtt_ip, _ = iputils_ping(lab, 200, 0.01)
                    n = 1000
                    _, lost = bbprobe_ping(lab, n, 0.005)
                truth = spec.goodput_bps("download")
                lo, hi = binomial_interval(n, spec.round_trip_loss)
                note = "emulator-bound" if delay and rate >= 400 else ""
                print(" | ".join([
                    f"{rate:g}", f"{loss:.0%}", f"{delay:g}±{spec.jitter_ms:g}", fmt(truth),
                    fmt(down["bps"]), fmt(ip_down), ratio(down["bps"], ip_down),
                    ratio(down["bps"], truth),
                    fmt(up["bps"]), fmt(ip_up), ratio(up["bps"], ip_up), ratio(up["bps"], truth),
                    fmt(rtt_bb, 1, 3), fmt(rtt_ip, 1, 3),
                    "—" if rtt_bb is None or rtt_ip is None else f"{rtt_bb - rtt_ip:+.3f}",
                    f"{lost}/{n}", f"[{lo}, {hi}] {'ok' if lo <= lost <= hi else 'OUT'}", note,
                ]), flush=True)


def idle_rss_kb() -> int:
    """RSS of an agent process with its run-time modules imported, idle."""
    code = ("import agent.app.cli, agent.probes.session, agent.delivery, sys, time\n"
            "assert 'scapy' not in sys.modules and 'scapy.all' not in sys.modules\n"
            "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\n")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.strip())


def capacity(window: float) -> None:
    print("# Capacity on an unshaped veth pair (client and server namespaces, MTU 1500)")
    print(f"# bbprobe: {WARMUP_S:g} s warm-up + {window:g} s window; iperf3 -O {WARMUP_S:g} "
          f"-t {WARMUP_S + window:g}; Gbit/s of TCP payload at the receiver")
    with tempfile.TemporaryDirectory() as work, \
            network_lab(LinkSpec(direct=True), Path(work)) as lab:
        url = lab.start_collector()
        import psutil

        # `ip netns exec` runs the program in place: the spawned pid is the collector.
        collector = next(p for p in lab._processes if "collector" in str(p.args))
        server = psutil.Process(collector.pid)
        refs = {}
        for direction in ("download", "upload"):
            refs[(direction, "P1")] = iperf3(lab, direction, 1, window)
            refs[(direction, "P4")] = iperf3(lab, direction, 4, window)
            refs[(direction, "P1 -Z")] = iperf3(lab, direction, 1, window, zerocopy=True)
        print("direction | bbprobe streams | bbprobe Gbit/s | iperf3 -P1 | ratio | "
              "iperf3 -P4 | ratio | iperf3 -P1 -Z | ratio | agent CPU s/GB | server CPU s/GB"
              " | agent peak RSS MB")
        for direction in ("download", "upload"):
            for streams in (1, 4, 0):
                s0 = server.cpu_times()
                r = bbprobe_speed(lab, url, direction, streams, window)
                s1 = server.cpu_times()
                gb = r["bytes"] / 1e9
                server_cpu = (s1.user + s1.system) - (s0.user + s0.system)
                label = f"{streams}" if streams else f"adaptive ({r['streams']})"
                print(" | ".join([
                    direction, label, fmt(r["bps"], 1e9),
                    fmt(refs[(direction, "P1")], 1e9), ratio(r["bps"], refs[(direction, "P1")]),
                    fmt(refs[(direction, "P4")], 1e9), ratio(r["bps"], refs[(direction, "P4")]),
                    fmt(refs[(direction, "P1 -Z")], 1e9),
                    ratio(r["bps"], refs[(direction, "P1 -Z")]),
                    f"{r['cpu_s'] / gb:.3f}", f"{server_cpu / gb:.3f}",
                    f"{r['maxrss_kb'] / 1024:.1f}",
                ]), flush=True)
    print(f"agent idle RSS: {idle_rss_kb() / 1024:.1f} MB (agent.cli, session, delivery "
          "imported; scapy not loaded)")


def protocols(rates: list[float], window: float, repeats: int) -> None:
    from tests.lab import clients

    for problem in (clients.ndt7js_problem(), clients.chromium_problem()):
        if problem:
            sys.exit(f"benchmarks.lab protocols: {problem}")
    print("# Third-party clients vs bbprobe's agent, same link, same run (Mbit/s of payload)")
    print(f"# agent: HTTP, 4 streams, {WARMUP_S:g} s warm-up + {window:g} s window; iperf3 -P4 "
          "alike; ndt7 (ndt7-js, bbprobe ndt7): 1 stream, 10 s from open; browser: "
          f"Chromium /speedtest, 4 streams, {WARMUP_S:g} s + {window:g} s; link: 20 ms "
          "one-way delay")
    header = ("rate down/up", "run", "dir", "truth", "agent", "iperf3", "ndt7-js", "bb ndt7",
              "browser", "js/agent", "bbndt7/agent", "browser/agent", "agent/iperf3",
              "js/iperf3")
    print(" | ".join(header), flush=True)
    for down_rate in rates:
        up_rate = down_rate / 2
        spec = LinkSpec(down_mbit=down_rate, up_mbit=up_rate, delay_ms=20.0,
                        up_at_router=True)
        seen: dict[str, list[tuple[float | None, ...]]] = {"download": [], "upload": []}
        for run in range(1, repeats + 1):
            with tempfile.TemporaryDirectory() as work, network_lab(spec, Path(work)) as lab:
                url = lab.start_collector()
                agent = {d: bbprobe_speed(lab, url, d, 4, window)["bps"]
                         for d in ("download", "upload")}
                ip3 = {d: iperf3(lab, d, 4, window) for d in ("download", "upload")}
                js = clients.ndt7js_rates(clients.run_ndt7js(lab, url))
                ours = {s["test"]: s["throughput_bps"] for s in clients.run_bbprobe_ndt7(lab, url)}
                row = clients.run_browser(lab, url, Path(work) / "profile", WARMUP_S, window, 4)
            browser: dict[str, float | None] = {
                d: (row.get(f"{d}_bps") if row else None) for d in ("download", "upload")}
            for i, d in enumerate(("download", "upload")):
                seen[d].append((agent[d], ip3[d], js[i], ours.get(d), browser[d]))
                _protocol_row(f"{down_rate:g}/{up_rate:g}", str(run), d,
                              spec.goodput_bps(d), seen[d][-1])
        if repeats >= 3:  # the median run of each tool: single runs at low rates swing
            for d in ("download", "upload"):
                columns = list(zip(*seen[d], strict=True))
                _protocol_row(f"{down_rate:g}/{up_rate:g}", "median", d, spec.goodput_bps(d),
                              tuple(_median(c) for c in columns))


def _median(values: tuple[float | None, ...]) -> float | None:
    import statistics

    known = [v for v in values if v]
    return statistics.median(known) if known else None


def _protocol_row(link: str, run: str, direction: str, truth: float | None,
                  rates: tuple[float | None, ...]) -> None:
    agent, ip3, js, ours, browser = rates
    print(" | ".join([
        link, run, direction, fmt(truth), fmt(agent), fmt(ip3), fmt(js), fmt(ours),
        fmt(browser), ratio(js, agent), ratio(ours, agent), ratio(browser, agent),
        ratio(agent, ip3), ratio(js, ip3),
    ]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["accuracy", "capacity", "protocols"])
    parser.add_argument("--rates", default="2,20,100,1000", help="Mbit/s, comma separated")
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs per link (protocols)")
    args = parser.parse_args()
    reason = available()
    if reason:
        sys.exit(f"benchmarks.lab: {reason}")
    if args.what == "accuracy":
        accuracy([float(r) for r in args.rates.split(",")], args.window, args.streams)
    elif args.what == "protocols":
        rates = "10,50,100" if args.rates == parser.get_default("rates") else args.rates
        window = 10.0 if args.window == parser.get_default("window") else args.window
        protocols([float(r) for r in rates.split(",")], window, args.repeats)
    else:
        capacity(args.window)


if __name__ == "__main__":
    main()
