"""Signed spool files (issue 27, design 1): each result the spool writes with the probe's
key is the JWS of its canonical JSON, chained per identity to the one before; every
reader of the spool understands it; no key spools unsigned, never loses a result."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import canonical, evidence, jose, probekey
from agent.config import DeliveryConfig
from agent.decoding import parse_gap, parse_result
from agent.identity import Identity
from agent.jose import JoseError
from agent.schema import format_utc
from agent.spool import Spool
from agent.spooldoc import ChainState, inherited, parse_spooled, result_of, signed_size
from collector.server.testing import RunningCollector
from tests.factories import session

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
CFG = DeliveryConfig(spool_max_bytes=10**7, min_free_bytes=0, max_age_days=30)
ME = Identity("http://collector.test", "a" * 16)
OTHER = Identity("http://collector.test", "b" * 16)


def _put(spool: Spool, n: int, probe: str = "p1", minutes: int = 0) -> list[Path]:
    out = []
    for i in range(n):
        moment = NOW - timedelta(minutes=15 * (n - i) + minutes)
        path = spool.put(session(probe, started_at=format_utc(moment)), now=NOW)
        assert path is not None
        out.append(path)
    return out


def _opened(path: Path) -> evidence.SignedResult:
    return evidence.open_result(json.loads(path.read_bytes()))


def _signed_gap(path: Path, key: Ed25519PrivateKey) -> dict[str, Any]:
    """A gap file read as the collector reads it: a JWS typ bbprobe-gap that verifies
    with ``key``, over the record's canonical JSON; the record."""
    opened = evidence.open_gap(json.loads(path.read_bytes()))
    evidence.verify(opened, key.public_key())
    doc = json.loads(opened.payload)
    assert opened.payload == canonical.canonical_gap(parse_gap(doc))
    assert isinstance(doc, dict)
    return doc


def test_a_signed_spool_file_is_the_jws_of_the_numbered_result(tmp_path: Path) -> None:
    """The file is exactly a flattened JWS; its payload is the canonical JSON of the
    result as spooled (session_seq assigned), and it verifies with the key and not with
    another; the readers see the result through it."""
    key = Ed25519PrivateKey.generate()
    spool = Spool(tmp_path, CFG, ME, key)
    [path] = _put(spool, 1)
    raw = json.loads(path.read_bytes())
    assert set(raw) == {"protected", "payload", "signature"}
    signed = evidence.open_result(raw)
    evidence.verify(signed, key.public_key())
    with pytest.raises(JoseError):
        evidence.verify(signed, Ed25519PrivateKey.generate().public_key())
    put = spool.last_put
    assert put is not None and put.session_seq == 1
    assert signed.payload == canonical.canonical(put)
    assert signed.kid == jose.kid_of(key.public_key())
    assert spool.last_jws == raw
    # Every reader: the facts (status, gap records, the counter's seed), delivery's parse.
    assert Spool.facts(path) == (1, "p1")
    assert parse_spooled(path.read_bytes(), put.result_id) == raw
    assert result_of(raw)["result_id"] == put.result_id


def test_chain_links_follow_and_survive_a_restart(tmp_path: Path) -> None:
    """The first names nothing, each next one names the SHA-256 of the one before; a new
    Spool on the same state directory (a restart) goes on from the state kept on disk."""
    key = Ed25519PrivateKey.generate()
    paths = _put(Spool(tmp_path, CFG, ME, key), 3, minutes=100)
    paths += _put(Spool(tmp_path, CFG, ME, key), 2)  # restarted
    opened = [_opened(p) for p in paths]
    assert opened[0].prev is None
    for before, after in itertools.pairwise(opened):
        assert after.prev == before.sha256
    seqs = [json.loads(o.payload)["session_seq"] for o in opened]
    assert seqs == [1, 2, 3, 4, 5]
    state = ChainState.parse((tmp_path / f"chain.{ME.token_fingerprint}").read_bytes())
    assert state == ChainState(5, opened[-1].sha256, ME.collector_url, "p1")
    # As the collector checks it: no break at all.
    links = [evidence.Link(s, json.loads(o.payload)["result_id"], o.sha256, o.prev, True)
             for s, o in zip(seqs, opened, strict=True)]
    assert evidence.chain_breaks(links) == []
    # The counter lost: it starts again after the highest number the signed files hold.
    (tmp_path / f"session_seq.{ME.token_fingerprint}").unlink()
    spool = Spool(tmp_path, CFG, ME, key)
    [again] = _put(spool, 1, minutes=-30)
    assert Spool.facts(again) == (6, "p1") and _opened(again).prev == opened[-1].sha256


def test_each_identity_keeps_its_own_chain(tmp_path: Path) -> None:
    """Probe A, then B, then A again (a technician's laptop): A's third names A's second,
    not B's result."""
    key = Ed25519PrivateKey.generate()
    a1 = _put(Spool(tmp_path, CFG, ME, key), 1, minutes=60)[0]
    b1 = _put(Spool(tmp_path, CFG, OTHER, key), 1, "p2", minutes=30)[0]
    a2 = _put(Spool(tmp_path, CFG, ME, key), 1)[0]
    assert _opened(b1).prev is None
    assert _opened(a2).prev == _opened(a1).sha256


def test_an_evicted_result_keeps_the_chain_and_its_gap_documents_it(tmp_path: Path) -> None:
    """The oldest signed result dropped for room: the chain still names it from the next,
    and the gap record names its session_seq, so the collector sees a documented hole."""
    key = Ed25519PrivateKey.generate()
    spool = Spool(tmp_path, CFG, ME, key)
    paths = _put(spool, 3)
    result = session("p1", started_at=format_utc(NOW))
    # Room for the two newest and this one (at the size the spool reckons it at): the
    # oldest must go.
    incoming = signed_size(len(canonical.canonical(replace(result, session_seq=4))))
    spool.cfg = replace(CFG, spool_max_bytes=sum(p.stat().st_size for p in paths[1:])
                        + incoming)
    newest = spool.put(result, now=NOW)
    assert newest is not None and not paths[0].exists()  # the oldest went
    [gap] = [_signed_gap(p, key) for p in spool.gaps()]
    assert gap["dropped_seq_ranges"] == [[1, 1]] and gap["reason"] == "spool_full"
    opened = [_opened(p) for p in [*paths[1:], newest]]
    assert opened[0].prev is not None  # seq 2 still names the dropped seq 1
    links = [evidence.Link(s, f"r{s}", o.sha256, o.prev, True)
             for s, o in zip((2, 3, 4), opened, strict=True)]
    assert evidence.chain_breaks(links) == []
    assert opened[-1].prev == opened[-2].sha256


def test_no_key_spools_unsigned_and_the_chain_still_moves(tmp_path: Path) -> None:
    """Without a key the file is the plain result; the chain state moves on all the same,
    so a signed result after it names it (an unsigned link, as the collector holds it)."""
    key = Ed25519PrivateKey.generate()
    plain = _put(Spool(tmp_path, CFG, ME, None), 1, minutes=60)[0]
    doc = json.loads(plain.read_bytes())
    assert not evidence.is_jws(doc) and doc["session_seq"] == 1
    signed = _put(Spool(tmp_path, CFG, ME, key), 1)[0]
    assert _opened(signed).prev == canonical.sha256_hex(
        canonical.canonical(parse_result(doc)))


def test_a_signature_that_fails_spools_the_result_unsigned(tmp_path: Path) -> None:
    """Not an Ed25519 key (a broken key object): the result is written plain, the
    reason kept for the caller to say, and nothing is lost."""
    spool = Spool(tmp_path, CFG, ME, object())  # type: ignore[arg-type]
    [path] = _put(spool, 1)
    assert not evidence.is_jws(json.loads(path.read_bytes()))
    assert spool.unsigned_reason is not None and "not signed" in spool.unsigned_reason
    assert spool.last_jws is None and Spool.facts(path) == (1, "p1")


def test_an_unreadable_key_warns_once_and_spools_unsigned(tmp_path: Path) -> None:
    """A probe key the group may read is refused by agent/probekey.py: the runner warns
    once (not at every session) and its spool writes unsigned."""
    from agent.app.runner import ConfigSource, Runner
    from agent.client import CollectorClient
    from agent.config import AgentConfig

    state = tmp_path / "state"
    state.mkdir()
    key_file = probekey.key_path(state)
    key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    key_file.chmod(0o644)
    said: list[str] = []
    runner = Runner(ConfigSource(None, {}), CollectorClient("http://127.0.0.1:9", "t"),
                    said.append)
    cfg = AgentConfig(state_dir=str(state))
    spools = [runner.spool(cfg, signing=True) for _ in range(3)]
    assert all(s is not None and s.signing_key is None for s in spools)
    assert len(said) == 1 and "unsigned" in said[0] and "chmod 600" in said[0]
    spool = spools[0]
    assert spool is not None
    [path] = _put(spool, 1)
    assert not evidence.is_jws(json.loads(path.read_bytes()))
    # A usable key: signed.
    key_file.unlink()
    signing = runner.spool(cfg, signing=True)
    assert signing is not None and signing.signing_key is not None


def test_a_lost_chain_state_restarts_the_chain_visibly(tmp_path: Path) -> None:
    """A damaged chain file: the next result names nothing (a restart the collector shows),
    never a made-up link."""
    key = Ed25519PrivateKey.generate()
    spool = Spool(tmp_path, CFG, ME, key)
    _put(spool, 1, minutes=60)
    (tmp_path / f"chain.{ME.token_fingerprint}").write_text("{not json")
    [path] = _put(spool, 1)
    assert _opened(path).prev is None


def test_readers_set_aside_a_damaged_jws(tmp_path: Path) -> None:
    """A spool file that is a JWS in form but whose payload is not a result with the file's
    id: delivery's parse names the problem; the facts read nothing from it."""
    key = Ed25519PrivateKey.generate()
    spool = Spool(tmp_path, CFG, ME, key)
    [path] = _put(spool, 1)
    raw = json.loads(path.read_bytes())
    raw["payload"] = jose.b64url(b'{"result_id":"someone-else"}')
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="is not the"):
        parse_spooled(path.read_bytes(), path.stem.rsplit("_", 1)[-1])
    raw["protected"] = "!!"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="signed result"):
        parse_spooled(path.read_bytes(), path.stem.rsplit("_", 1)[-1])
    assert Spool.facts(path) == (None, None)


def test_a_full_disk_after_signing_keeps_the_chain_and_documents_the_hole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk refuses the signed file itself (ENOSPC after the chain moved on): the result
    is a counted drop whose gap record names its session_seq, and the next result names
    the dropped one, so the collector sees a documented hole, not a forged link."""
    import errno

    from agent import spool as spool_mod

    key = Ed25519PrivateKey.generate()
    spool = Spool(tmp_path, CFG, ME, key)
    first = _put(spool, 1, minutes=60)[0]
    real = spool_mod._write_durably

    def full(final: Path, data: str) -> None:
        if final.parent == spool.dir and final.suffix == ".json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(final, data)

    monkeypatch.setattr(spool_mod, "_write_durably", full)
    lost = session("p1", started_at=format_utc(NOW - timedelta(minutes=30)))
    assert spool.put(lost, now=NOW) is None
    monkeypatch.setattr(spool_mod, "_write_durably", real)
    [gap] = [_signed_gap(p, key) for p in spool.gaps()]
    assert gap["dropped_seq_ranges"] == [[2, 2]] and gap["reason"] == "disk_full"
    after = _put(spool, 1)[0]
    lost_sha = canonical.sha256_hex(canonical.canonical(replace(lost, session_seq=2)))
    assert _opened(after).prev == lost_sha != _opened(first).sha256
    links = [evidence.Link(1, "a", _opened(first).sha256, None, True),
             evidence.Link(3, "c", _opened(after).sha256, _opened(after).prev, True)]
    assert [b.kind for b in evidence.chain_breaks(links, [(2, 2)])] == ["documented"]


# --- `bbprobe run --evidence DIR` and `bbprobe verify PATH`


def _cli(*args: str) -> tuple[int, str, str]:
    from click.testing import CliRunner

    from agent.app.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _tamper_session(path: Path) -> None:
    """The session's duration changed, its signature kept as it was."""
    jws = json.loads(path.read_bytes())
    doc = json.loads(jose.b64url_decode(jws["payload"], "payload", 10**8))
    doc["duration_s"] = doc["duration_s"] + 1.0
    jws["payload"] = jose.b64url(json.dumps(doc, separators=(",", ":")).encode())
    path.write_text(json.dumps(jws))


@pytest.mark.slow
def test_run_evidence_writes_a_bundle_that_bbprobe_verify_checks(
        collector: RunningCollector, fast_config: Path, tmp_path: Path) -> None:
    """A pushed run with --evidence: the bundle holds the very JWS the spool signed and the
    collector stored verified; `bbprobe verify` passes it (exit 0), fails it once a
    session is edited (exit 1, naming the check), and a missing path is a usage error
    (2). A --no-push run signs its result itself and its bundle verifies too. An
    --evidence directory that is not empty is refused before anything is measured."""
    token = collector.add_probe("p1")
    common = ["--config", str(fast_config), "--token", token, "--server", collector.url,
              "--collector", collector.url, "--set", "ping.enabled=false"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    code, _, err = _cli(*common, "run", "--json", "--evidence", str(busy))
    assert code == 2 and "not empty" in err and collector.count_results() == 0

    out = tmp_path / "evidence"
    code, stdout, err = _cli(*common, "run", "--json", "--evidence", str(out))
    assert code == 0, err
    rid = json.loads(stdout)["result_id"]
    bundled = json.loads((out / "sessions" / f"{rid}.json").read_bytes())
    store = collector.open_store()
    try:
        kept = store.result_signatures([rid])[rid]
    finally:
        store.close()
    assert (kept.status, kept.protected, kept.signature) == (
        "verified", bundled["protected"], bundled["signature"])
    code, said, err = _cli("verify", str(out))
    # Consistent, but the bundle's own key anchors nothing (review H5): exit 3 naming it.
    assert code == 3, said + err
    assert "FAIL" not in said and f"{kept.kid} is not anchored" in said
    code, said, err = _cli("verify", "--trust", kept.kid, str(out))
    assert code == 0, said + err
    assert "FAIL" not in said and said.strip().splitlines()[-1].startswith("verified")

    _tamper_session(out / "sessions" / f"{rid}.json")
    code, said, err = _cli("verify", str(out))
    assert code == 1, said + err
    assert "FAIL" in said and "NOT verified" in said

    code, _, err = _cli("verify", str(tmp_path / "nowhere"))
    assert code == 2 and "no such file" in err

    alone = tmp_path / "alone"
    code, _, err = _cli(*common, "run", "--no-push", "--evidence", str(alone))
    assert code == 2 and "--probe-id" in err  # nothing names the probe
    code, stdout, err = _cli(*common, "--probe-id", "p1", "run", "--no-push", "--json",
                             "--evidence", str(alone))
    assert code == 0, err
    code, said, err = _cli("verify", "--trust", kept.kid, str(alone))
    assert code == 0, said + err


def test_key_rotate_is_a_command(
        collector: RunningCollector, fast_config: Path, tmp_path: Path) -> None:
    """`bbprobe key rotate` (agent/app/key_cmd.py behind it): refused in one line while
    the collector holds no key of the probe; once enrolled, exit 0 naming both kids, and
    `key show` names the new kid afterwards."""
    token = collector.add_probe("p1")
    common = ["--config", str(fast_config), "--token", token, "--collector", collector.url]
    code, shown, err = _cli(*common, "key", "show", "--json")
    assert code == 0, err
    old = json.loads(shown)["kid"]
    code, said, err = _cli(*common, "key", "rotate")
    assert code == 3 and "not a key of probe p1" in err  # never enrolled: one line
    assert len(err.strip().splitlines()) == 1
    code, _, err = _cli(*common, "push")  # delivery enrols the key first
    assert code == 0, err
    code, said, err = _cli(*common, "key", "rotate", "--json")
    assert code == 0, said + err
    done = json.loads(said)
    assert done["old_kid"] == old and done["new_kid"] != old
    code, shown, err = _cli(*common, "key", "show", "--json")
    assert code == 0 and json.loads(shown)["kid"] == done["new_kid"]


def test_status_and_dead_letter_commands_read_signed_files(tmp_path: Path) -> None:
    """`bbprobe status --json` counts signed results per probe (read through the JWS),
    and `dead-letter list/retry` handle a signed file like any other."""
    key = Ed25519PrivateKey.generate()
    state = tmp_path / "state"
    spool = Spool(state, CFG, ME, key)
    paths = _put(spool, 2)
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{state}"\n')
    code, out, err = _cli("--config", str(config), "status", "--json", "--no-check")
    assert code == 0, err
    rows = json.loads(out)["spool"]["by_identity"]
    assert [(r["probe_id"], r["results"]) for r in rows] == [("p1", 2)]
    spool.dead_letter(paths[0], "HTTP 422: signature: does not verify")
    code, out, err = _cli("--config", str(config), "dead-letter", "list")
    assert code == 0 and "does not verify" in out, err
    code, out, err = _cli("--config", str(config), "dead-letter", "retry", "--all")
    assert code == 0, err
    assert [p.name for p in spool.pending()] == [p.name for p in paths]
    assert evidence.is_jws(json.loads(paths[0].read_bytes()))  # moved back unchanged


# --- signed gap records (review H1) ----------------------------------------------------


def test_a_gap_record_is_signed_and_signed_again_when_merged(tmp_path: Path) -> None:
    """With a key, a gap record is the JWS (typ bbprobe-gap) of its canonical JSON; a
    later drop merges into a new record (new gap_id, both ranges), signed again, and the
    first is gone. Every reader sees through it: the owner (facts), delivery's parse,
    and the counter's seed when the counter is lost."""
    key = Ed25519PrivateKey.generate()
    spool = Spool(tmp_path, CFG, ME, key)
    paths = _put(spool, 3, minutes=60)
    spool._drop("p1", [(e, "spool_full") for e in spool.entries()[:1]])
    [first] = spool.gaps()
    one = _signed_gap(first, key)
    assert (one["dropped_seq_ranges"], one["probe_id"]) == ([[1, 1]], "p1")
    assert Spool.facts(first) == (None, "p1")
    assert parse_spooled(first.read_bytes(), one["gap_id"], "gap_id") == \
        json.loads(first.read_bytes())
    spool._drop("p1", [(e, "spool_full") for e in spool.entries()[:1]])
    [merged] = spool.gaps()
    two = _signed_gap(merged, key)
    assert two["gap_id"] != one["gap_id"] and not first.exists()
    assert (two["dropped_seq_ranges"], two["dropped"]) == ([[1, 2]], 2)
    # Only the third result is left; the counter lost: it goes on after the gap's 2 and
    # the file's 3, never reusing a number a signed gap record names.
    assert not paths[0].exists() and not paths[1].exists()
    paths[2].unlink()
    (tmp_path / f"session_seq.{ME.token_fingerprint}").unlink()
    [again] = _put(spool, 1)
    assert Spool.facts(again)[0] == 3


def test_without_a_key_a_gap_record_stays_plain(tmp_path: Path) -> None:
    spool = Spool(tmp_path, CFG, ME)
    _put(spool, 2)
    spool._drop("p1", [(e, "too_old") for e in spool.entries()[:1]])
    [gap] = spool.gaps()
    doc = json.loads(gap.read_bytes())
    assert not evidence.is_jws(doc) and doc["dropped_seq_ranges"] == [[1, 1]]
    parse_gap(doc)


def test_a_gap_record_that_cannot_be_signed_is_written_plain_and_said(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signature that fails never costs the record: it is written plain, and the
    spool's last_error says why."""
    key = Ed25519PrivateKey.generate()
    spool = Spool(tmp_path, CFG, ME, key)
    _put(spool, 2)

    def broken(*_args: object) -> dict[str, str]:
        raise JoseError("no entropy")

    monkeypatch.setattr(evidence, "sign_gap", broken)
    spool._drop("p1", [(e, "spool_full") for e in spool.entries()[:1]])
    [gap] = spool.gaps()
    assert not evidence.is_jws(json.loads(gap.read_bytes()))
    assert "not signed: no entropy" in spool.stats()["last_error"]


# --- a new token for the same probe (review M3) --------------------------------------


def test_a_new_token_for_the_same_probe_carries_the_counter_and_chain_on(
        tmp_path: Path) -> None:
    """`bbprobe-collector probe rotate` gives p1 a new token: a new identity, which goes
    on from the old one's number and chain (no repeated session_seq, no restart at the
    collector). Another probe's new identity, or the same name at another collector,
    starts its own."""
    key = Ed25519PrivateKey.generate()
    old = _put(Spool(tmp_path, CFG, ME, key), 2, minutes=60)
    rotated = Identity(ME.collector_url, "c" * 16)
    [after] = _put(Spool(tmp_path, CFG, rotated, key), 1)
    assert Spool.facts(after) == (3, "p1")
    assert _opened(after).prev == _opened(old[-1]).sha256
    links = [evidence.Link(s, str(s), o.sha256, o.prev, True) for s, o in
             zip((1, 2, 3), [_opened(p) for p in [*old, after]], strict=True)]
    assert evidence.chain_breaks(links) == []
    # p2 on a new token of its own, and p1 at another collector: their own chains.
    [p2] = _put(Spool(tmp_path, CFG, OTHER, key), 1, "p2", minutes=-30)
    assert Spool.facts(p2) == (1, "p2") and _opened(p2).prev is None
    elsewhere = Identity("http://other.test", "d" * 16)
    [there] = _put(Spool(tmp_path, CFG, elsewhere, key), 1, minutes=-45)
    assert Spool.facts(there) == (1, "p1") and _opened(there).prev is None


def test_inherited_takes_the_highest_of_the_same_collector_and_probe() -> None:
    sha = "0" * 64
    mine = ChainState(4, sha, "http://c", "p1")
    later = ChainState(6, "1" * 64, "http://c", "p1")
    candidates = [(mine, 5), (later, None), (ChainState(9, sha, "http://c", "p2"), 9),
                  (ChainState(9, sha, "http://x", "p1"), 9), (ChainState(9, sha), 9),
                  (None, 12)]
    assert inherited(candidates, "http://c", "p1") == (6, later)
    assert inherited(candidates[:1], "http://c", "p1") == (5, mine)  # its counter ran on
    assert inherited(candidates, "http://c", "p3") is None
    # Written and read back with whose chain it is; a state from before stays readable.
    assert ChainState.parse(mine.to_json().encode()) == mine
    assert ChainState.parse(b'{"seq": 4, "sha256": "' + sha.encode() + b'"}') == \
        ChainState(4, sha)
