"""Issue 24: five probes behind one NAT address measure at the same moment, 20 streams
each, against one measurement-only server (no database): under tickets no attempt is
refused and every session is valid; without tickets the same setup shows the refusals
(so the test can fail), and they are recorded as the server's, never as the line's.

A stranger behind the same NAT, with no ticket, still gets its per-address cap (20) and
no more, while the probes measure.

The collector (the ticket issuer, role ingest) and the measurement-only server run in the
lab's server namespace; the probes and the stranger each in their own namespace behind
one masquerading router (tests/lab/natlab.py). Required under CI=true (root); skipped
elsewhere with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.schema import REFUSAL_REASONS
from tests.lab.natlab import NatLab, nat_lab

pytestmark = [pytest.mark.privileged, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
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

# Opens ``count`` anonymous downloads that never read, prints each one's HTTP status as a
# JSON list, then holds them (the test stops it when the probes are done; at most 60 s).
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
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
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
                                  "serve", "--addr-file", str(addr)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if addr.exists() and addr.read_text().strip():
            return addr.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"{name} stopped: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not start in the lab's server namespace")


def _servers(lab: NatLab, tickets: bool) -> tuple[str, str, Path]:
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


def _sessions(lab: NatLab, collector_url: str, server_url: str, db: Path
              ) -> list[dict[str, Any]]:
    """One `bbprobe run` per probe namespace, all started together; their results."""
    runs = []
    for i in range(PROBES):
        token = _collector_cli(db, "probe", "add", f"nat{i}").strip()
        cfg = lab.workdir / f"agent{i}.toml"
        cfg.write_text(AGENT_CONFIG.format(state=lab.workdir / f"state{i}",
                                           collector=collector_url, token=token,
                                           server=server_url, streams=STREAMS))
        runs.append(cfg)
    procs = [lab.spawn(lab.clients[i], [sys.executable, "-m", "agent", "--config", str(cfg),
                                        "run", "--json", "-q"], cwd=ROOT)
             for i, cfg in enumerate(runs)]
    docs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        docs.append(json.loads(out))
    return docs


def _refused(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Attempts the server refused: the new reasons, or a 429/503 however recorded."""
    return [t for t in doc["transfers"]
            if t["failure_reason"] in REFUSAL_REASONS or t["http_status"] in (429, 503)]


def test_probes_behind_one_address_measure_under_tickets(lab_dir: Path) -> None:
    with nat_lab(PROBES + 1, lab_dir, access_mbit=80) as lab:
        collector_url, server_url, db = _servers(lab, tickets=True)
        stranger = lab.spawn(lab.clients[PROBES], [sys.executable, "-c", STRANGER,
                                                   str(STREAMS + 1), lab.server_ip,
                                                   str(SERVER_PORT)])
        assert stranger.stdout is not None
        statuses = json.loads(stranger.stdout.readline())
        try:
            docs = _sessions(lab, collector_url, server_url, db)
        finally:
            stranger.terminate()
    # The stranger, behind the same address, got its per-address cap and no more.
    assert statuses == [200] * STREAMS + [429], statuses
    for doc in docs:
        assert doc["ticket"]["presented"] and doc["ticket"]["refused"] is None, doc["ticket"]
        assert doc["ticket"]["servers"] == [f"{server_url}"]
        assert _refused(doc) == [], _refused(doc)
        assert [(t["direction"], t["status"], t["streams"]) for t in doc["transfers"]] == \
            [("download", "ok", STREAMS), ("upload", "ok", STREAMS)], doc["transfers"]
        assert doc["validity"]["valid"], doc["validity"]


def test_without_tickets_the_same_probes_are_refused(lab_dir: Path) -> None:
    """The control: the collector issues no tickets, so the server counts all five
    probes as one address (20 transfers): refusals happen, and each is recorded as the
    server's (server_refused, HTTP 429), never as an ordinary failed attempt."""
    with nat_lab(PROBES, lab_dir, access_mbit=80) as lab:
        collector_url, server_url, db = _servers(lab, tickets=False)
        docs = _sessions(lab, collector_url, server_url, db)
    refused = [t for doc in docs for t in _refused(doc)]
    assert refused, "five probes x 20 streams behind one address: no refusal seen"
    assert {t["failure_reason"] for t in refused} == {"server_refused"}
    assert {t["http_status"] for t in refused} <= {429, 503}
    assert all(doc.get("ticket") is None for doc in docs)
    # A refusal is never the line's failure: the only failed attempts are refusals.
    failed = [t for doc in docs for t in doc["transfers"] if t["status"] == "failed"]
    assert failed == refused
