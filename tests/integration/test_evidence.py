"""Evidence end to end (issue 27, "Done when"): the real agent signs its sessions and
delivers them to a real collector on 127.0.0.1; `bbprobe-collector certify --evidence`
writes the bundle; `verify` passes it, and each tamper fails for its own reason: a sample
changed in a stored body or in a bundle, a session removed from the middle of the chain,
a session of another probe swapped in, a certificate figure edited (re-signing
impossible; or re-signed by another key), a key replaced; and those of the review: a
signature stripped in the store (downgrade), sessions removed at a period's ends
(boundary sessions), a gap record forged in the database. Without --trust a bundle that
passes every check exits 3 (not anchored), never 0. OpenSSL alone checks the
signatures as VERIFY.txt says, writing nothing into the bundle."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import evidence, jose
from agent.app.cli import main as agent_cli
from collector.cli.main import main as collector_cli
from collector.evidence.instructions import SCRIPT_BEGIN, SCRIPT_END
from collector.lines import LineMetadata
from collector.server.testing import running_collector
from collector.storage import codec
from tests.conftest import FAST_AGENT
from tests.httpclient import request

LINE = LineMetadata(operator="Op", download_min_kbps=1000.0, upload_min_kbps=1000.0,
                    max_delay_ms=100.0, max_loss_ratio=0.5)
SESSIONS = 5
# The agents ping 127.0.0.1 (the certificate's delay and loss come from real samples).
pytestmark = pytest.mark.privileged


@dataclass
class Campaign:
    db: Path  # a copy of the collector's database, closed
    jwks: Path  # the collector's /.well-known/bbprobe-keys.json
    collector_kid: str
    sessions: list[dict[str, Any]]  # line-a's results, as the agent printed them
    other: dict[str, Any]  # line-b's one result
    zip_bytes: bytes  # GET /api/v1/probes/line-a/certificate/evidence.zip


def _agent(config: Path, token: str, url: str) -> dict[str, Any]:
    res = CliRunner().invoke(agent_cli, ["--config", str(config), "--token", token,
                                         "--collector", url, "--server", url, "run",
                                         "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    assert "delivered" in res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campaign]:
    """Five sessions of line-a and one of line-b, each by its own agent (its own key),
    delivered signed; the collector's database copied once they are stored."""
    tmp = tmp_path_factory.mktemp("evidence")
    configs = {}
    for name in ("line-a", "line-b"):
        configs[name] = tmp / f"{name}.toml"
        configs[name].write_text(FAST_AGENT.format(state=tmp / f"state-{name}"))
    with running_collector(tmp / "collector") as c:
        tokens = {name: c.add_probe(name, LINE) for name in configs}
        results = [_agent(configs["line-a"], tokens["line-a"], c.url)
                   for _ in range(SESSIONS)]
        other = _agent(configs["line-b"], tokens["line-b"], c.url)
        status, jwks, _ = request("GET", c.url + "/.well-known/bbprobe-keys.json")
        assert status == 200
        status, zipped, _ = request("GET", c.url + "/api/v1/probes/line-a/certificate/"
                                    "evidence.zip", raw=True)
        assert status == 200
        copy = tmp / "db" / "collector.sqlite3"
        copy.parent.mkdir()
        with sqlite3.connect(c.db_path) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)
        # The collector's evidence key lives next to its database: the copy signs with it.
        for key_file in c.db_path.parent.glob("*evidence*"):
            shutil.copy2(key_file, copy.parent / key_file.name)
    (tmp / "jwks.json").write_text(json.dumps(jwks))
    kid = next(k["kid"] for k in jwks["keys"] if k["bbprobe"]["holder"] == "collector")
    yield Campaign(copy, tmp / "jwks.json", kid, results, other, zipped)


def _database(campaign: Campaign, tmp_path: Path,
              edit: Callable[[sqlite3.Connection], None] | None = None) -> Path:
    """A copy of the campaign's database (with its evidence key), changed by ``edit``."""
    where = tmp_path / "db"
    shutil.copytree(campaign.db.parent, where)
    if edit is not None:
        with sqlite3.connect(where / campaign.db.name) as db:
            edit(db)
    return where / campaign.db.name


def _bundle(db: Path, out: Path, probe: str = "line-a", *period: str) -> Path:
    res = CliRunner().invoke(collector_cli, ["certify", "--db", str(db), "--probe", probe,
                                             "--evidence", str(out), *period])
    assert res.exit_code == 0, res.output
    return out


def _verify(path: Path, *trust: str) -> tuple[int, list[str]]:
    args = ["verify", str(path)] + [a for t in trust for a in ("--trust", t)]
    res = CliRunner().invoke(collector_cli, args)
    assert "Traceback" not in res.output
    return res.exit_code, res.output.splitlines()


def _failed(lines: list[str], check: str, *words: str) -> None:
    """The output ends at check ``check`` failing, its line holding ``words``."""
    fail = [line for line in lines if line.startswith("FAIL ")]
    assert len(fail) == 1, lines
    assert fail[0].startswith(f"FAIL {check}: "), fail[0]
    for word in words:
        assert word in fail[0], fail[0]
    assert lines[-1].startswith(f"NOT verified: {check}: ")


def _payload(jws: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(jose.b64url_decode(jws["payload"], "payload", 10**8))
    return doc


@pytest.mark.slow
def test_a_real_campaign_verifies(campaign: Campaign, tmp_path: Path) -> None:
    """The bundle the CLI writes and the zip the collector serves both pass every check,
    the issuer checked against the collector's published JWK Set; `bbprobe verify` says
    the same."""
    out = _bundle(_database(campaign, tmp_path), tmp_path / "ev")
    code, lines = _verify(out, str(campaign.jwks))
    assert code == 0, lines
    assert lines[-1] == "verified: every check passed"
    assert not any(line.startswith("warning") for line in lines)
    assert f"ok   sessions: {SESSIONS} sessions: {SESSIONS} signed" in "\n".join(lines)
    assert any(line.startswith("ok   certificate figures:") for line in lines)
    (tmp_path / "ev.zip").write_bytes(campaign.zip_bytes)
    code, lines = _verify(tmp_path / "ev.zip", campaign.collector_kid)
    assert code == 0, lines
    res = CliRunner().invoke(agent_cli, ["verify", str(out), "--trust",
                                         campaign.collector_kid])
    assert res.exit_code == 0, res.output
    # Without an anchor: every check passes, but exit 3, naming the key to compare.
    code, lines = _verify(out)
    assert code == 3, lines
    assert lines[-1].startswith(f"consistent, but issuer key {campaign.collector_kid} is "
                                "not anchored")
    res = CliRunner().invoke(agent_cli, ["verify", str(out)])
    assert res.exit_code == 3, res.output


def _delete(db: sqlite3.Connection, result_id: str) -> None:
    for table in ("result_signatures", "session_facts", "transfer_facts", "influx_outbox",
                  "results"):
        db.execute(f"DELETE FROM {table} WHERE result_id = ?", (result_id,))


@pytest.mark.slow
def test_a_signature_stripped_in_the_store_fails(campaign: Campaign, tmp_path: Path) -> None:
    """H2: the last session's signature row deleted: it is listed unsigned after a
    signed one, and the chain fails as a downgrade, even with the collector trusted."""
    victim = campaign.sessions[-1]

    def edit(db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM result_signatures WHERE result_id = ?",
                   (victim["result_id"],))

    out = _bundle(_database(campaign, tmp_path, edit), tmp_path / "ev")
    code, lines = _verify(out, str(campaign.jwks))
    assert code == 1
    _failed(lines, "chain", victim["result_id"], "downgrade")


@pytest.mark.slow
def test_sessions_removed_at_the_ends_of_the_period_fail(campaign: Campaign,
                                                         tmp_path: Path) -> None:
    """H3: the last session of a period deleted (no record): the probe's next session,
    carried as the boundary after the period, names it; the first one deleted: the
    boundary before shows the hole."""
    s = campaign.sessions
    gone = s[2]["result_id"]
    db = _database(campaign, tmp_path, lambda db: _delete(db, gone))
    out = _bundle(db, tmp_path / "tail", "line-a", "--until", s[3]["started_at"])
    code, lines = _verify(out, str(campaign.jwks))
    assert code == 1
    _failed(lines, "chain", s[3]["result_id"], f"session_seq {s[2]['session_seq']}",
            "missing")
    out = _bundle(db, tmp_path / "head", "line-a", "--since", s[2]["started_at"])
    code, lines = _verify(out, str(campaign.jwks))
    assert code == 1
    _failed(lines, "chain", s[3]["result_id"], "missing")
    # A period whose boundary session lies beyond the hole verifies (its ends sealed);
    # one that borders the hole does not, even without the deleted session's period.
    out = _bundle(db, tmp_path / "next", "line-a", "--since", s[3]["started_at"])
    code, lines = _verify(out, str(campaign.jwks))
    _failed(lines, "chain", s[3]["result_id"], "missing")
    out = _bundle(db, tmp_path / "late", "line-a", "--since", s[4]["started_at"])
    code, lines = _verify(out, str(campaign.jwks))
    assert code == 0, lines
    assert "boundary" in "\n".join(lines)


@pytest.mark.slow
def test_a_forged_gap_record_does_not_explain_a_deletion(campaign: Campaign,
                                                         tmp_path: Path) -> None:
    """H1: a session deleted and a gap record inserted in the database to cover it: the
    record is not the probe's signed word, so the hole is still a failure."""
    gone = campaign.sessions[2]
    seq = gone["session_seq"]

    def edit(db: sqlite3.Connection) -> None:
        _delete(db, gone["result_id"])
        db.execute("INSERT INTO gaps (gap_id, probe_name, received_at, reason, dropped, "
                   "first_started_at, last_started_at, body_sha256, seq_ranges) VALUES "
                   "(?, 'line-a', ?, 'spool_full', 1, ?, ?, ?, ?)",
                   ("0b5e4c3e-7a43-4f3c-9f59-3d5e0e4a1b27", gone["started_at"],
                    gone["started_at"], gone["started_at"], "0" * 64,
                    json.dumps([[seq, seq]])))

    out = _bundle(_database(campaign, tmp_path, edit), tmp_path / "ev")
    assert (out / "gaps" / "0b5e4c3e-7a43-4f3c-9f59-3d5e0e4a1b27.json").is_file()
    code, lines = _verify(out, str(campaign.jwks))
    assert code == 1
    _failed(lines, "chain", "documented only by an unsigned gap record",
            f"session_seq {seq}")


@pytest.mark.slow
def test_a_sample_changed_in_a_stored_body_fails(campaign: Campaign, tmp_path: Path) -> None:
    """One RTT changed in the database's copy of a result: its signature fails, naming the
    session."""
    victim = campaign.sessions[2]["result_id"]

    def edit(db: sqlite3.Connection) -> None:
        body, packed = db.execute("SELECT body, body_packed FROM results WHERE "
                                  "result_id = ?", (victim,)).fetchone()
        doc = json.loads(codec.unpack(packed) if packed is not None else body)
        doc["ping"]["samples"][0]["rtt_ms"] += 1.0
        db.execute("UPDATE results SET body = ?, body_packed = NULL WHERE result_id = ?",
                   (json.dumps(doc, separators=(",", ":")), victim))

    out = _bundle(_database(campaign, tmp_path, edit), tmp_path / "ev")
    code, lines = _verify(out)
    assert code == 1
    _failed(lines, "sessions", victim, "does not verify")


@pytest.mark.slow
def test_a_sample_changed_in_a_bundle_fails(campaign: Campaign, tmp_path: Path) -> None:
    """One download sample changed in a session file of the bundle: its signature fails."""
    out = _bundle(_database(campaign, tmp_path), tmp_path / "ev")
    victim = campaign.sessions[1]["result_id"]
    path = out / "sessions" / f"{victim}.json"
    jws = json.loads(path.read_text())
    doc = _payload(jws)
    t, b = doc["transfers"][0]["stream_samples"][0][-1]
    doc["transfers"][0]["stream_samples"][0][-1] = [t, b * 2]
    jws["payload"] = jose.b64url(json.dumps(doc, separators=(",", ":")).encode())
    path.write_text(json.dumps(jws))
    code, lines = _verify(out)
    assert code == 1
    _failed(lines, "sessions", victim, "does not verify")


@pytest.mark.slow
def test_a_session_removed_from_the_middle_breaks_the_chain(campaign: Campaign,
                                                            tmp_path: Path) -> None:
    """A session deleted from the database with no record: the collector's bundle is
    honest about what it holds, and the chain names the session after the hole."""
    gone, after = campaign.sessions[2], campaign.sessions[3]

    def edit(db: sqlite3.Connection) -> None:
        for table in ("result_signatures", "session_facts", "transfer_facts",
                      "influx_outbox", "results"):
            db.execute(f"DELETE FROM {table} WHERE result_id = ?",
                       (gone["result_id"],))

    out = _bundle(_database(campaign, tmp_path, edit), tmp_path / "ev")
    code, lines = _verify(out)
    assert code == 1
    _failed(lines, "chain", after["result_id"], f"session_seq {after['session_seq']}",
            "missing")


@pytest.mark.slow
def test_a_session_of_another_probe_swapped_in_fails(campaign: Campaign,
                                                     tmp_path: Path) -> None:
    """line-b's session relabelled as line-a's in the database: signed by a key that is
    not line-a's."""
    theirs = campaign.other["result_id"]

    def edit(db: sqlite3.Connection) -> None:
        for table in ("results", "session_facts", "transfer_facts"):
            db.execute(f"UPDATE {table} SET probe_name = 'line-a' "
                       "WHERE result_id = ?", (theirs,))

    out = _bundle(_database(campaign, tmp_path, edit), tmp_path / "ev")
    code, lines = _verify(out)
    assert code == 1
    _failed(lines, "sessions", theirs, "line-a")


def _edit_figure(out: Path) -> tuple[dict[str, str], dict[str, Any]]:
    jws = json.loads((out / "certificate.json").read_text())
    doc = _payload(jws)
    doc["certificate"]["checks"][0]["observed"] = 1.0
    return jws, doc


@pytest.mark.slow
def test_a_certificate_figure_edited_fails(campaign: Campaign, tmp_path: Path) -> None:
    """A figure edited in certificate.json: without the collector's key, its signature
    fails; signed again by another key (added to the bundle), that key is not the
    collector's published one."""
    out = _bundle(_database(campaign, tmp_path), tmp_path / "ev")
    jws, doc = _edit_figure(out)
    jws["payload"] = jose.b64url(json.dumps(doc, sort_keys=True).encode())
    (out / "certificate.json").write_text(json.dumps(jws))
    code, lines = _verify(out, str(campaign.jwks))
    assert code == 1
    _failed(lines, "issuer signature", "does not verify")

    forger = Ed25519PrivateKey.generate()
    kid = jose.kid_of(forger.public_key())
    doc["issuer"]["kid"] = kid
    forged = jose.sign_flattened(forger, json.dumps(doc, sort_keys=True).encode(),
                                 {"typ": evidence.CERTIFICATE_TYP})
    (out / "certificate.json").write_text(json.dumps(forged))
    (out / "keys" / f"{kid}.pem").write_text(jose.pem_of(forger.public_key()))
    keys = json.loads((out / "keys.json").read_text())
    keys["keys"].append({**jose.jwk_of(forger.public_key()), "kid": kid})
    (out / "keys.json").write_text(json.dumps(keys))
    code, lines = _verify(out, str(campaign.jwks))
    assert code == 1
    _failed(lines, "issuer key", kid, "not a trusted key")
    # Without the published key to compare with, the recomputation still finds the edit.
    code, lines = _verify(out)
    _failed(lines, "certificate figures", "certificate.checks[0].observed")


@pytest.mark.slow
def test_a_key_replaced_fails(campaign: Campaign, tmp_path: Path) -> None:
    """The probe's PEM replaced by another key: the keys check names both."""
    out = _bundle(_database(campaign, tmp_path), tmp_path / "ev")
    cert = _payload(json.loads((out / "certificate.json").read_text()))
    probe_kid = next(k["kid"] for k in cert["keys"] if k["probe"] == "line-a")
    other = Ed25519PrivateKey.generate().public_key()
    (out / "keys" / f"{probe_kid}.pem").write_text(jose.pem_of(other))
    code, lines = _verify(out)
    assert code == 1
    _failed(lines, "keys", probe_kid, jose.kid_of(other), "replaced")


def _scripts(out: Path) -> list[str]:
    text = (out / "VERIFY.txt").read_text()
    parts = text.split(SCRIPT_BEGIN)[1:]
    return [p.split(SCRIPT_END)[0] for p in parts]


@pytest.mark.slow
def test_openssl_alone_checks_the_signatures_as_verify_txt_says(campaign: Campaign,
                                                                tmp_path: Path) -> None:
    """The scripts of VERIFY.txt, run as written with OpenSSL 3: the certificate's and a
    session's signatures verify, the session's SHA-256 is the one listed; a payload
    changed by one byte no longer verifies."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    out = _bundle(_database(campaign, tmp_path), tmp_path / "ev")
    scripts = _scripts(out)
    assert len(scripts) == 2  # the certificate, and one session
    cert = _payload(json.loads((out / "certificate.json").read_text()))
    listed = {s["sha256"] for s in cert["sessions"]}
    members = sorted(p.relative_to(out) for p in out.rglob("*"))
    for script in scripts:
        run = subprocess.run(["sh", "-e", "-c", script], check=False, cwd=out, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert "Signature Verified Successfully" in run.stdout
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == members  # L3
    digest = run.stdout.strip().split()[-1]
    assert digest in listed
    jws = json.loads((out / "certificate.json").read_text())
    raw = jose.b64url_decode(jws["payload"], "payload", 10**8)
    jws["payload"] = jose.b64url(raw.replace(b'"line-a"', b'"line-A"', 1))
    # Written compact, as the bundle is (the script reads the members with sed).
    (out / "certificate.json").write_text(json.dumps(jws, separators=(",", ":")))
    run = subprocess.run(["sh", "-e", "-c", scripts[0]], check=False, cwd=out,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "Signature Verification Failure" in run.stdout + run.stderr
