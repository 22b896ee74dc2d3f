"""What evidence costs (issue 27), in one run each, as ratios. Asserts nothing.

    .venv/bin/python -m benchmarks.evidence ingest [--seconds 10] [--clients 16] [--rounds 2]
    .venv/bin/python -m benchmarks.evidence verify [--sessions 96] [--repeat 5]
    .venv/bin/python -m benchmarks.evidence sign [--repeat 200]

Method, stated with every number:
- Documents are real: the agent runs a ``quick`` and an ``agcom`` session (20 streams on
  loopback) against a local collector (``benchmarks.ingest.real_documents``). Every
  document is put in its canonical form (agent/canonical.py, what a probe signs), with a
  fresh result id per post.
- ``ingest``: the current tree's collector, a process of its own on a fresh SQLite store
  (WAL, synchronous=FULL), its probe's key pinned (``probe add --key``). The same load
  (``--clients`` clients, each result alone in a batch, as the agent delivers, ``--seconds``
  counted after a 3 s warm-up) is posted plain (unsigned, marked so) and signed (a JWS
  per result, verified at ingest), alternating plain and signed for ``--rounds`` rounds
  so that the machine's drift hits both. The load generator shares the 2-core VM with
  the collector and signs every body in both rows (posting the plain document or its
  JWS), so its own cost is the same in both; the collector's CPU per 1,000 results
  (/proc/PID/stat) is the figure that shows verification alone. Stored KiB per
  session: the SQLite file and WAL after the collector stopped.
- ``verify``: ``--sessions`` agcom sessions, chained and signed by one key as a probe
  would (session_seq 1..N, every fifteen minutes over the day before), delivered to a
  collector; ``bbprobe-collector certify --evidence DIR`` writes the bundle; then
  ``bbprobe verify DIR`` runs ``--repeat`` times, each a fresh process: wall time and its
  peak RSS (GNU time), against importing the verifier alone as a floor; the bundle's
  bytes on disk. ``bbprobe-collector verify`` is timed the same way.
- ``sign``: on the agent, the cost of signing a session (canonical JSON, then the JWS:
  SHA-512 twice over the base64url payload, agent/evidence.py) against writing the
  result as the spool did before (``agent.spool.result_json``), median of ``--repeat``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import evidence, jose
from agent.canonical import canonical
from agent.decoding import parse_result
from agent.spool import result_json
from benchmarks.ingest import (
    COLLECTOR,
    PLACEHOLDER,
    _peak_rss_mib,
    _stored_sqlite,
    load,
    real_documents,
)
from collector.server.testing import bound_url

ROOT = Path(__file__).resolve().parents[1]


def _canonical(body: bytes) -> bytes:
    """The document as a probe signs it: canonical, and numbered (a signed result must
    be: intake/signed.py)."""
    return canonical(dataclasses.replace(parse_result(json.loads(body)), session_seq=1))


@contextmanager
def collector(work: Path, key: Ed25519PrivateKey | None
              ) -> Iterator[tuple[str, str, int, Callable[[], tuple[int, int]], Path]]:
    """A current collector on a fresh SQLite file, probe ``bench`` with ``key`` pinned:
    (url, token, pid, stored bytes-and-results, config)."""
    db = work / f"{uuid.uuid4().hex[:8]}.sqlite3"
    config = work / f"{uuid.uuid4().hex[:8]}.toml"
    config.write_text('[server]\nhost = "127.0.0.1"\nport = 0\nprobe_requests_per_min = 0\n'
                      f'max_body_bytes = 8000000\n\n[storage]\npath = "{db}"\n\n'
                      f'[log]\nlevel = "warning"\n')
    add = [*COLLECTOR, "--config", str(config), "probe", "add", "bench"]
    if key is not None:
        pem = work / f"{uuid.uuid4().hex[:8]}.pem"
        pem.write_text(jose.pem_of(key.public_key()))
        add += ["--key", str(pem)]
    token = subprocess.run(add, cwd=ROOT, check=True, capture_output=True, text=True,
                           timeout=60).stdout.strip().splitlines()[-1]
    addr = config.with_suffix(".addr")
    with config.with_suffix(".log").open("w") as stderr:
        server = subprocess.Popen([*COLLECTOR, "--config", str(config), "serve",
                                   "--addr-file", str(addr)], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        yield bound_url(server, addr), token, server.pid, lambda: _stored_sqlite(db), config
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)


def bench_ingest(args: argparse.Namespace) -> None:
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="bbprobe-evidence-") as tmp:
        work = Path(tmp)
        docs = {name: _canonical(body) for name, body in real_documents(work).items()}
        rows: dict[tuple[str, str], list[tuple[float, float, float, int]]] = {}
        for name, body in docs.items():
            def fresh(body: bytes = body) -> tuple[bytes, bytes]:
                """(the plain document, the same signed), with a new result id."""
                doc = body.replace(PLACEHOLDER.encode(), str(uuid.uuid4()).encode())
                jws = evidence.sign_result(key, doc, None)
                return doc, json.dumps(jws, separators=(",", ":")).encode()

            # The generator signs in both rows (it shares the machine's two cores with
            # the collector): only what is posted differs.
            def plain(fresh: Callable[[], tuple[bytes, bytes]] = fresh) -> bytes:
                return fresh()[0]

            def signed(fresh: Callable[[], tuple[bytes, bytes]] = fresh) -> bytes:
                return fresh()[1]

            for _ in range(args.rounds):
                for mode, make in (("plain", plain), ("signed", signed)):
                    with collector(work, key) as (url, token, pid, stored, _cfg):
                        ok, errors, cpu = asyncio.run(load(url, token, b"", args.clients,
                                                           args.seconds, pid, batch=True,
                                                           make=make))
                        peak = _peak_rss_mib(pid)
                    size, count = stored()
                    row = (ok / args.seconds, 1000 * cpu / ok if ok else float("nan"), peak,
                           errors)
                    rows.setdefault((name, mode), []).append(
                        (*row[:3], size // max(count, 1)))
                    print(f"{name:<24} {mode:<7} {row[0]:7.1f}/s err {errors} cpu "
                          f"{row[1]:5.2f} s/1000 rss {peak:4.0f} MiB "
                          f"{size / 1024 / max(count, 1):5.1f} KiB/session",
                          file=sys.stderr, flush=True)
    print(f"Ingest, plain against signed+verified, {args.clients} clients, batch of one, "
          f"{args.seconds:g} s counted, {args.rounds} rounds (median)")
    print(f"{'document':<24} {'results/s plain -> signed':>26} {'ratio':>6} "
          f"{'CPU s/1000':>16} {'ratio':>6} {'RSS MiB':>12} {'KiB/session':>14}")
    for name in docs:
        p, s = ([statistics.median(v) for v in zip(*rows[(name, m)], strict=True)]
                for m in ("plain", "signed"))
        print(f"{name:<24} {p[0]:>12.1f} -> {s[0]:<9.1f} {s[0] / p[0]:>6.2f} "
              f"{p[1]:>6.2f} -> {s[1]:<6.2f} {s[1] / p[1]:>6.2f} {p[2]:>4.0f} -> {s[2]:<4.0f} "
              f"{p[3] / 1024:>5.1f} -> {s[3] / 1024:<5.1f}")


def _campaign(body: bytes, key: Ed25519PrivateKey, n: int) -> list[bytes]:
    """``n`` sessions chained and signed as a probe would, every 15 minutes until an hour
    ago."""
    template = parse_result(json.loads(body))
    doc = json.loads(body)
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    out: list[bytes] = []
    prev: str | None = None
    first_start = datetime.fromisoformat(template.started_at)
    for i in range(n):
        start = end - timedelta(minutes=15 * (n - 1 - i))
        shift = start - first_start

        def moved(text: str, shift: timedelta = shift) -> str:
            return (datetime.fromisoformat(text) + shift).isoformat()

        doc.update(result_id=str(uuid.uuid4()), session_seq=i + 1, probe_id="bench",
                   started_at=moved(template.started_at), ended_at=moved(template.ended_at))
        payload = canonical(parse_result(doc))
        out.append(json.dumps(evidence.sign_result(key, payload, prev),
                              separators=(",", ":")).encode())
        prev = evidence.sha256_hex(payload)
    return out


def _timed(argv: list[str]) -> tuple[float, float, int]:
    """(wall s, peak RSS MiB, exit code) of one process, by GNU time (wait4's ru_maxrss
    would carry this process's own high-water mark into the child's: the fork shares
    it)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        proc = subprocess.run(["/usr/bin/time", "-o", out.name, "-f", "%e %M", *argv],
                              cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, check=False)
        wall, kib = out.read().split()[-2:]
    return float(wall), int(kib) / 1024, proc.returncode


def bench_verify(args: argparse.Namespace) -> None:
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="bbprobe-evidence-") as tmp:
        work = Path(tmp)
        agcom = next(b for n, b in real_documents(work).items() if n.startswith("agcom"))
        sessions = _campaign(agcom, key, args.sessions)
        bundle = work / "bundle"
        with collector(work, key) as (url, token, _pid, _stored, config):
            async def deliver() -> None:
                headers = {"Authorization": f"Bearer {token}",
                           "Content-Type": "application/json"}
                async with aiohttp.ClientSession() as http:
                    for i in range(0, len(sessions), 8):
                        body = b'{"results":[' + b",".join(sessions[i:i + 8]) + b"]}"
                        async with http.post(url + "/api/v1/results/batch", data=body,
                                             headers=headers) as resp:
                            items = (await resp.json())["items"]
                            bad = [it for it in items if it["status"] != 201]
                            if bad:
                                raise SystemExit(f"not stored: {bad[:2]}")

            asyncio.run(deliver())
            made = subprocess.run([*COLLECTOR, "--config", str(config), "certify",
                                   "--probe", "bench", "--evidence", str(bundle)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=300,
                                  check=False)
            if made.returncode != 0:
                raise SystemExit(f"certificate --evidence failed: {made.stderr[-2000:]}")
        size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
        if args.keep:
            shutil.copytree(bundle, args.keep, dirs_exist_ok=True)
        floor = [_timed([sys.executable, "-c", "import collector.evidence.verify"])
                 for _ in range(args.repeat)]
        runs = [_timed([sys.executable, "-m", "agent", "verify", str(bundle)])
                for _ in range(args.repeat)]
        collector_runs = [_timed([sys.executable, "-m", "collector", "verify", str(bundle)])
                          for _ in range(args.repeat)]
    codes = {code for _, _, code in runs}
    print(f"bbprobe verify on a {args.sessions}-session agcom campaign bundle "
          f"({size / 1e6:.1f} MB on disk, {args.sessions} signed sessions), "
          f"{args.repeat} fresh processes, median; exit codes {sorted(codes)}")
    wall = statistics.median(r[0] for r in runs)
    rss = max(r[1] for r in runs)
    floor_wall = statistics.median(r[0] for r in floor)
    floor_rss = max(r[1] for r in floor)
    print(f"  bbprobe verify:  {wall:6.3f} s   peak RSS {rss:6.1f} MiB")
    print(f"  bbprobe-collector verify: "
          f"{statistics.median(r[0] for r in collector_runs):6.3f} s   peak RSS "
          f"{max(r[1] for r in collector_runs):6.1f} MiB")
    print(f"  imports only:    {floor_wall:6.3f} s   peak RSS {floor_rss:6.1f} MiB")
    print(f"  verify's own:    {wall - floor_wall:6.3f} s   "
          f"{(wall - floor_wall) / args.sessions * 1000:.1f} ms a session")


def bench_sign(args: argparse.Namespace) -> None:
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="bbprobe-evidence-") as tmp:
        docs = real_documents(Path(tmp))
    print(f"Signing a session on the agent, median of {args.repeat} "
          "(canonical JSON + JWS, against the spool's JSON as before)")
    for name, body in docs.items():
        result = parse_result(json.loads(body))

        def median_s(fn: Callable[[], object]) -> float:
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times)

        before = median_s(lambda r=result: result_json(r))  # type: ignore[misc]
        sign = median_s(lambda r=result: json.dumps(  # type: ignore[misc]
            evidence.sign_result(key, canonical(r), None)))
        print(f"  {name:<24} spool JSON {before * 1000:6.2f} ms   canonical + sign + JWS "
              f"{sign * 1000:6.2f} ms   ratio {sign / before:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    ingest = sub.add_parser("ingest")
    ingest.add_argument("--seconds", type=float, default=10.0)
    ingest.add_argument("--clients", type=int, default=16)
    ingest.add_argument("--rounds", type=int, default=2)
    verify = sub.add_parser("verify")
    verify.add_argument("--sessions", type=int, default=96)
    verify.add_argument("--repeat", type=int, default=5)
    verify.add_argument("--keep", type=Path, help="copy the bundle here (to profile it)")
    sign = sub.add_parser("sign")
    sign.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    {"ingest": bench_ingest, "verify": bench_verify, "sign": bench_sign}[args.what](args)


if __name__ == "__main__":
    main()
