"""Measurement tickets: what they cost, and what they change behind one NAT address.
Prints tables; asserts nothing.

    .venv/bin/python -m benchmarks.tickets crypto [--n 2000]
    .venv/bin/python -m benchmarks.tickets throughput [--rounds 3] [--window 4]
    sudo .venv/bin/python -m benchmarks.tickets nat [--rounds 3]

Method, stated with every number:
- crypto: issuing (Ed25519 JWT, collector/tickets.py issue) and verifying a ticket the
  first time (signature, claims; collector/tickets.py Verifier) and again (the verified
  cache), microseconds each as the median of ``n``; the reference in the same run is one
  HTTP request to the measurement server's echo over a new loopback TCP connection (what
  every transfer stream costs before its first byte), so "ratio" is a ticket check's
  share of that.
- throughput: a measurement-only server (role measurement, trusting the key) on
  127.0.0.1; bbprobe's own download and upload probes, 4 streams, 1 s warm-up + W s
  window, with a ticket and without, alternating, ``rounds`` times each; the median
  Gbit/s of each, and ticketed / anonymous (the per-ticket ledger counts every sendfile
  chunk and every upload buffer). Loopback on a 2-core VM: rounds swing by several
  percent, so the ratio says "no visible cost" or not, nothing finer.
- nat: the NAT lab of tests/lab/natlab.py: five probes behind one masquerade, 20
  streams each, 80 Mbit/s access links, all started together against one
  measurement-only server (20 transfers per address): per round, with tickets and
  without, the attempts, the attempts the server refused, the line's failed attempts,
  the directions (of 10) with no successful test, the valid sessions and the longest
  session.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent import spec
from agent.schema import REFUSAL_REASONS, TransferMethod
from agent.ticket import origin, peek
from collector import keys, tickets

POLICY = tickets.TicketPolicy(expiry_s=1200, streams=64, bytes=10**13, duration_s=900)


def _median_us(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _echo_us(url: str, n: int) -> float:
    host, port = url.split("//")[1].split(":")
    request = f"GET {spec.ECHO_PATH} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"

    def once() -> None:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(request.encode())
            while s.recv(4096):
                pass

    return _median_us(once, n)


def _server(work: Path, public: Path, tickets_on: bool = True) -> Any:
    from collector.server.testing import serve_process

    cfg = work / "measure.toml"
    # A server trusting a key names its audience (config.py): a port known beforehand.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\nrole = "measurement"\n'
                   '[measurement]\nmax_concurrent = 200\n'
                   f'[tickets]\nenabled = {"true" if tickets_on else "false"}\n'
                   f'trusted_keys = ["{public}"]\naudience = ["http://127.0.0.1:{port}"]\n')
    return serve_process(cfg, cwd=Path(__file__).resolve().parents[1])


def _keypair(work: Path) -> tuple[Any, str, Path]:
    private = keys.load_or_generate(work / "issuer.pem", "ticket signing key")
    public = work / "issuer.pub.pem"
    public.write_text(keys.public_pem(private.public_key()))
    return private, keys.thumbprint(private.public_key()), public


def crypto(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        private, kid, public = _keypair(work)
        with _server(work, public) as (url, _proc):
            aud = origin(url)
            issue_us = _median_us(lambda: tickets.issue(private, kid, "p1", [aud], POLICY,
                                                        time.time()), n)
            tokens = [tickets.issue(private, kid, "p1", [aud], POLICY, time.time())
                      for _ in range(n)]
            verifier = tickets.Verifier({kid: private.public_key()}, [aud])
            it = iter(tokens)
            first_us = _median_us(lambda: verifier.verify(next(it), aud, time.time()), n)
            again_us = _median_us(lambda: verifier.verify(tokens[0], aud, time.time()), n)
            echo_us = _echo_us(url, min(n, 500))
    print(f"tickets crypto, n={n} (median per operation)\n")
    print("| operation | µs | ratio to one echo request on a new connection |")
    print("|---|---|---|")
    for name, us in (("issue (sign)", issue_us), ("verify, first use", first_us),
                     ("verify, cached", again_us), ("echo request (reference)", echo_us)):
        print(f"| {name} | {us:.1f} | {us / echo_us:.3f} |")


async def _rate(direction: str, url: str, window: float, token: str | None) -> float:
    from agent.probes import http_download, http_upload
    from agent.probes.transfer import Access

    method = TransferMethod(mode="duration", streams=4, warmup_s=1.0, window_s=window,
                            file_size_bytes=None, tests=1, attempts=1,
                            sample_interval_s=0.1, timeout_s=window + 10)
    access = Access(ticket=peek(token) if token else None)
    probe = http_download if direction == "download" else http_upload
    (attempt, *_rest) = await probe.run(url, method, 0, access=access)
    if attempt.status != "ok" or attempt.throughput_bps is None:
        raise RuntimeError(f"{direction}: {attempt.failure_reason}: {attempt.error}")
    return float(attempt.throughput_bps) / 1e9


def throughput(rounds: int, window: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        private, kid, public = _keypair(work)
        rows = []
        with _server(work, public) as (url, _proc):
            for direction in ("download", "upload"):
                rates: dict[str, list[float]] = {"ticket": [], "anonymous": []}
                for _ in range(rounds):
                    token = tickets.issue(private, kid, "p1", [origin(url)], POLICY,
                                          time.time())
                    rates["ticket"].append(asyncio.run(_rate(direction, url, window, token)))
                    rates["anonymous"].append(asyncio.run(_rate(direction, url, window,
                                                                None)))
                t, a = statistics.median(rates["ticket"]), statistics.median(rates["anonymous"])
                rows.append((direction, t, a, rates))
    print(f"tickets throughput on loopback: 4 streams, 1 s + {window:g} s, {rounds} rounds "
          "each, alternating (median Gbit/s)\n")
    print("| direction | with ticket | without | ratio | rounds (ticket / without) |")
    print("|---|---|---|---|---|")
    for direction, t, a, rates in rows:
        each = " ".join(f"{x:.2f}" for x in rates["ticket"]) + " / " + \
            " ".join(f"{x:.2f}" for x in rates["anonymous"])
        print(f"| {direction} | {t:.2f} | {a:.2f} | {t / a:.3f} | {each} |")


def nat(rounds: int) -> None:
    from tests.lab.natlab import nat_lab, run_probes, start_servers
    from tests.lab.netlab import available

    problem = available()
    if problem:
        sys.exit(f"benchmarks.tickets nat: {problem}")
    print("tickets behind one NAT address: 5 probes x 20 streams, 80 Mbit/s access links, "
          "one measurement-only server (20 per address)\n")
    print("| round | tickets | attempts | refused by the server | line failures | "
          "directions never measured | valid sessions | longest session s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in range(1, rounds + 1):
        for on in (True, False):
            with tempfile.TemporaryDirectory() as tmp, nat_lab(5, Path(tmp), 80) as lab:
                collector_url, server_url, db = start_servers(lab, tickets=on)
                docs = run_probes(lab, collector_url, server_url, db)
            attempts = [t for d in docs for t in d["transfers"]]
            refused = [t for t in attempts if t["failure_reason"] in REFUSAL_REASONS]
            failed = [t for t in attempts
                      if t["status"] == "failed" and t["failure_reason"] not in REFUSAL_REASONS]
            valid = sum(1 for d in docs if d["validity"]["valid"])
            unmeasured = sum(1 for d in docs for direction in ("download", "upload")
                             if not any(t["direction"] == direction and t["status"] == "ok"
                                        for t in d["transfers"]))
            longest = max(d["duration_s"] for d in docs)
            print(f"| {r} | {'yes' if on else 'no'} | {len(attempts)} | {len(refused)} | "
                  f"{len(failed)} | {unmeasured}/{2 * len(docs)} | {valid}/{len(docs)} | "
                  f"{longest:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("crypto")
    c.add_argument("--n", type=int, default=2000)
    t = sub.add_parser("throughput")
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--window", type=float, default=4.0)
    n = sub.add_parser("nat")
    n.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.what == "crypto":
        crypto(args.n)
    elif args.what == "throughput":
        throughput(args.rounds, args.window)
    else:
        nat(args.rounds)


if __name__ == "__main__":
    main()
