"""The probe's own signing key (agent/probekey.py): where it is read from, made at first
need (atomically), refused when others may read it; ``bbprobe key show``; and its
enrolment at the collector (``PUT /api/v1/probe/key``) before delivery."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import jose, keydocs, probekey
from agent.app import key_cmd
from agent.app.cli import main
from agent.client import CollectorClient
from agent.errors import DeliveryError
from agent.exitcodes import ExitCode
from agent.probekey import ProbeKeyError
from collector.server.testing import RunningCollector
from tests.httpclient import request


def _pem(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


# --- where the key comes from -----------------------------------------------------------

def test_made_at_first_need_mode_0600_then_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert probekey.load(state, {}, create=False) is None
    old_umask = os.umask(0o022)
    try:
        first = probekey.load(state, {})
    finally:
        os.umask(old_umask)
    assert first is not None and first.generated and not first.from_credential
    path = state / probekey.KEY_FILE
    assert first.path == path
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert [p.name for p in state.iterdir()] == [probekey.KEY_FILE]  # no temp file left
    again = probekey.load(state, {})
    assert again is not None and not again.generated
    assert again.kid == first.kid == jose.kid_of(first.public)
    assert "(generated now)" in first.source and "generated" not in again.source


def _generate_in(state: str) -> str:
    key = probekey.load(state, {})
    assert key is not None
    return key.kid


def test_racing_processes_end_with_one_key(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    with ProcessPoolExecutor(4) as pool:
        kids = set(pool.map(_generate_in, [state] * 8))
    assert kids == {_generate_in(state)}
    assert sorted(p.name for p in Path(state).iterdir()) == [probekey.KEY_FILE]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_key_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / probekey.KEY_FILE
    path.write_bytes(_pem(Ed25519PrivateKey.generate()))
    path.chmod(mode)
    with pytest.raises(ProbeKeyError) as caught:
        probekey.load(tmp_path, {})
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message and f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message
    path.chmod(0o600)
    assert probekey.load(tmp_path, {}) is not None


def test_the_credential_comes_first(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    by_credential = Ed25519PrivateKey.generate()
    (creds / probekey.CREDENTIAL).write_bytes(_pem(by_credential))
    (creds / probekey.CREDENTIAL).chmod(0o440)  # systemd's own: not ours to judge
    state = tmp_path / "state"
    got = probekey.load(state, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert got is not None and got.from_credential
    assert got.kid == jose.kid_of(by_credential.public_key())
    assert "systemd credential 'probe-signing-key'" in got.source
    assert not state.exists()  # nothing made beside it
    # Other credentials but not this one: the state directory's file.
    (creds / probekey.CREDENTIAL).unlink()
    got = probekey.load(state, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert got is not None and not got.from_credential and got.generated


def test_what_is_not_an_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / probekey.KEY_FILE
    path.write_bytes(_pem(generate_private_key(SECP256R1())))
    path.chmod(0o600)
    with pytest.raises(ProbeKeyError, match="another kind of key"):
        probekey.load(tmp_path, {})
    path.write_bytes(b"not a key")
    with pytest.raises(ProbeKeyError, match="not an unencrypted PEM"):
        probekey.load(tmp_path, {})
    path.write_bytes(b"x" * (probekey.MAX_KEY_FILE_BYTES + 10))
    with pytest.raises(ProbeKeyError, match="larger than a PEM key"):
        probekey.load(tmp_path, {})
    path.unlink()
    path.mkdir()
    with pytest.raises(ProbeKeyError, match="not a regular file"):
        probekey.load(tmp_path, {})
    path.rmdir()
    other = tmp_path / "elsewhere.pem"
    other.write_bytes(_pem(Ed25519PrivateKey.generate()))
    other.chmod(0o600)
    path.symlink_to(other)  # a link planted in the state directory is not followed
    with pytest.raises(ProbeKeyError, match="cannot read"):
        probekey.load(tmp_path, {})


def test_an_unwritable_state_directory_is_one_line(tmp_path: Path) -> None:
    """A state directory that cannot be made (its parent is a file: refused to root too,
    where a mode bit is not) is one line naming it, no traceback."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(ProbeKeyError, match="cannot create"):
        probekey.load(blocker / "state", {})


# --- bbprobe key show -----------------------------------------------------------------

def _show(tmp_path: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["key", "show", *args], catch_exceptions=False,
                              env={"STATE_DIRECTORY": str(tmp_path / "state"),
                                   "CREDENTIALS_DIRECTORY": None, "BBPROBE_CONFIG": None})


def test_key_show_makes_the_key_then_shows_the_same(tmp_path: Path) -> None:
    first = _show(tmp_path, "--json")
    assert first.exit_code == ExitCode.OK, first.output
    assert "no signing key yet: made one in" in first.stderr
    doc = json.loads(first.stdout)
    path = tmp_path / "state" / probekey.KEY_FILE
    assert doc["path"] == str(path) and doc["generated"] and not doc["from_credential"]
    assert jose.thumbprint(doc["jwk"]) == doc["kid"] == doc["jwk"]["kid"]
    assert jose.jwk_of(jose.public_key_of_pem(doc["pem"])) == {
        k: doc["jwk"][k] for k in ("kty", "crv", "x")}
    text = _show(tmp_path)
    assert text.exit_code == ExitCode.OK
    assert "made one" not in text.stderr
    assert f"kid (RFC 7638 thumbprint): {doc['kid']}" in text.stdout
    assert f"private key: file {path}" in text.stdout
    assert doc["pem"] in text.stdout and doc["jwk"]["x"] in text.stdout
    pem = _show(tmp_path, "--pem")
    assert pem.stdout == doc["pem"]  # a file for `bbprobe-collector probe add --key`


def test_key_show_refuses_a_readable_key(tmp_path: Path) -> None:
    assert _show(tmp_path).exit_code == ExitCode.OK
    path = tmp_path / "state" / probekey.KEY_FILE
    path.chmod(0o644)
    refused = _show(tmp_path)
    assert refused.exit_code == ExitCode.USAGE
    assert f"chmod 600 {path}" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


# --- enrolment --------------------------------------------------------------------------
# A tiny stand-in for the collector's PUT /api/v1/probe/key (the wire format of the
# contract): its real route is tested on the collector's side.

class FakeCollector:
    def __init__(self) -> None:
        self.bound: str | None = None
        self.requests: list[dict[str, Any]] = []
        self.answer: int | None = None  # force a status (404: an older collector)
        self.jwks: dict[str, dict[str, str]] = {}  # every key sent, by kid

    async def put_key(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"auth": request.headers.get("Authorization"), **body})
        if self.answer is not None:
            return web.json_response({"error": "not found"}, status=self.answer)
        try:
            kid = jose.thumbprint(body["jwk"])
        except (jose.JoseError, KeyError, TypeError) as exc:
            return web.json_response({"error": str(exc), "field": "jwk"}, status=400)
        self.jwks[kid] = body["jwk"]
        if "rotation" in body and self.bound != kid:
            rot = keydocs.open_rotation(body["rotation"], body["jwk"])
            if rot.old_kid != self.bound:
                return web.json_response({"error": "not the bound key", "field": "rotation",
                                          "bound_kid": self.bound}, status=409)
            keydocs.verify_rotation(rot, jose.public_key_of_jwk(self.jwks[rot.old_kid]))
            self.bound = kid
            return web.json_response({"kid": kid, "status": "rotated"}, status=201)
        if self.bound is None:
            self.bound = kid
            return web.json_response({"kid": kid, "status": "enrolled"}, status=201)
        if self.bound == kid:
            return web.json_response({"kid": kid, "status": "known"})
        return web.json_response(
            {"error": f"another key (kid {self.bound}) is bound to this probe",
             "field": "jwk"}, status=409)


def with_collector(test: Callable[[FakeCollector, str], Awaitable[None]]) -> None:
    """Run ``test(fake, url)`` with the fake collector on 127.0.0.1, port 0."""
    async def main() -> None:
        fake = FakeCollector()
        app = web.Application()
        app.router.add_put("/api/v1/probe/key", fake.put_key)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            await test(fake, f"http://127.0.0.1:{runner.addresses[0][1]}")
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_enrolled_once_then_remembered(tmp_path: Path) -> None:
    async def test(fake: FakeCollector, url: str) -> None:
        client = CollectorClient(url, "tok-1", 5)
        warned: list[str] = []
        assert await probekey.enrol(client, tmp_path, warned.append, environ={}) == \
            "enrolled"
        key = probekey.load(tmp_path, {})
        assert key is not None
        (sent,) = fake.requests
        assert (sent["auth"], sent["jwk"]) == ("Bearer tok-1", jose.jwk_of(key.public))
        keydocs.check_proof(sent["proof"], sent["jwk"])  # always its proof of possession
        assert set(sent) == {"auth", "jwk", "proof"}
        assert fake.bound == key.kid
        assert await probekey.enrol(client, tmp_path, warned.append, environ={}) == \
            "remembered"
        assert len(fake.requests) == 1 and warned == []
        # Another token (another probe, or a new token) is asked again: "known".
        other = CollectorClient(url, "tok-2", 5)
        assert await probekey.enrol(other, tmp_path, warned.append, environ={}) == "known"
        assert len(fake.requests) == 2
        # A lost memory costs one request, nothing else.
        (tmp_path / probekey.ENROLMENT_FILE).write_text("{damaged")
        assert await probekey.enrol(client, tmp_path, warned.append, environ={}) == "known"
        assert warned == []

    with_collector(test)


def test_client_enrol_key_statuses() -> None:
    async def test(fake: FakeCollector, url: str) -> None:
        client = CollectorClient(url, "tok", 5)
        jwk = jose.jwk_of(Ed25519PrivateKey.generate().public_key())
        kid = jose.thumbprint(jwk)
        assert await client.enrol_key(jwk) == (201, kid)
        assert await client.enrol_key(jwk) == (200, kid)
        other = jose.jwk_of(Ed25519PrivateKey.generate().public_key())
        assert await client.enrol_key(other) == (409, kid)  # the bound key's kid
        fake.answer = 404
        assert await client.enrol_key(jwk) == (404, None)
        fake.answer = 422
        with pytest.raises(DeliveryError) as caught:
            await client.enrol_key(jwk)
        assert caught.value.status == 422 and not caught.value.retryable

    with_collector(test)


def test_another_key_bound_is_one_warning_naming_both(tmp_path: Path) -> None:
    async def test(fake: FakeCollector, url: str) -> None:
        fake.bound = jose.kid_of(Ed25519PrivateKey.generate().public_key())
        warned: list[str] = []
        client = CollectorClient(url, "tok", 5)
        assert await probekey.enrol(client, tmp_path, warned.append, environ={}) == \
            "conflict"
        key = probekey.load(tmp_path, {})
        assert key is not None
        assert len(warned) == 1 and "\n" not in warned[0]
        assert fake.bound in warned[0] and key.kid in warned[0]
        # Not remembered: said again at the next delivery until it is settled.
        assert await probekey.enrol(client, tmp_path, warned.append, environ={}) == \
            "conflict"
        assert len(fake.requests) == 2

    with_collector(test)


def test_an_older_collector_is_asked_again_a_day_later(tmp_path: Path) -> None:
    async def test(fake: FakeCollector, url: str) -> None:
        fake.answer = 404
        client = CollectorClient(url, "tok", 5)
        now = [1_000_000.0]
        warned: list[str] = []

        async def enrol() -> str:
            return await probekey.enrol(client, tmp_path, warned.append, environ={},
                                        clock=lambda: now[0])

        assert await enrol() == "unsupported"
        now[0] += probekey.UNSUPPORTED_RETRY_S - 1
        assert await enrol() == "unsupported-remembered"
        assert len(fake.requests) == 1
        now[0] += 2
        fake.answer = None  # upgraded meanwhile
        assert await enrol() == "enrolled"
        assert len(fake.requests) == 2 and warned == []

    with_collector(test)


def test_a_new_key_is_enrolled_again(tmp_path: Path) -> None:
    async def test(fake: FakeCollector, url: str) -> None:
        client = CollectorClient(url, "tok", 5)
        assert await probekey.enrol(client, tmp_path, print, environ={}) == "enrolled"
        (tmp_path / probekey.KEY_FILE).unlink()
        warned: list[str] = []
        assert await probekey.enrol(client, tmp_path, warned.append, environ={}) == \
            "conflict"
        assert len(fake.requests) == 2 and len(warned) == 1

    with_collector(test)


def test_a_refused_key_is_one_warning(tmp_path: Path) -> None:
    async def test(fake: FakeCollector, url: str) -> None:
        fake.answer = 422
        warned: list[str] = []
        client = CollectorClient(url, "tok", 5)
        assert await probekey.enrol(client, tmp_path, warned.append, environ={}) == "failed"
        assert len(warned) == 1 and "HTTP 422" in warned[0]

    with_collector(test)


def test_an_unusable_key_or_collector_never_stops_delivery(tmp_path: Path) -> None:
    warned: list[str] = []
    (tmp_path / probekey.KEY_FILE).write_bytes(_pem(Ed25519PrivateKey.generate()))
    (tmp_path / probekey.KEY_FILE).chmod(0o644)
    client = CollectorClient("http://127.0.0.1:9", "tok", 2)
    assert asyncio.run(probekey.enrol(client, tmp_path, warned.append, environ={})) == \
        "no-key"
    assert len(warned) == 1 and "chmod 600" in warned[0]
    (tmp_path / probekey.KEY_FILE).chmod(0o600)
    warned.clear()
    # Nobody listens: delivery will say so; enrolment stays quiet and bounded.
    done = asyncio.run(asyncio.wait_for(
        probekey.enrol(client, tmp_path, warned.append, environ={}), 15))
    assert done == "failed" and warned == []


# --- rotation ---------------------------------------------------------------------------

def test_rotation_replaces_the_key_only_once_the_collector_took_it(tmp_path: Path) -> None:
    async def test(fake: FakeCollector, url: str) -> None:
        client = CollectorClient(url, "tok-1", 5)
        assert await probekey.enrol(client, tmp_path, print, environ={}) == "enrolled"
        old = probekey.load(tmp_path, {}, create=False)
        assert old is not None
        warned: list[str] = []
        # Refused (the collector holds another key): nothing changes, the new key waits.
        fake.bound = jose.kid_of(Ed25519PrivateKey.generate().public_key())
        with pytest.raises(DeliveryError) as caught:
            await key_cmd.rotate_with(client, tmp_path, warned.append, environ={})
        assert "key not rotated" in str(caught.value) and "\n" not in str(caught.value)
        kept = probekey.load(tmp_path, {}, create=False)
        assert kept is not None and kept.kid == old.kid
        waiting = probekey.next_key(tmp_path)
        new_kid = jose.kid_of(waiting.public_key())
        assert new_kid in str(caught.value)
        # Accepted: the waiting key (the same one) becomes the key.
        fake.bound = old.kid
        done = await key_cmd.rotate_with(client, tmp_path, warned.append, environ={})
        assert (done["old_kid"], done["new_kid"], done["status"]) == (old.kid, new_kid,
                                                                    "rotated")
        now = probekey.load(tmp_path, {}, create=False)
        assert now is not None and now.kid == new_kid and fake.bound == new_kid
        assert not (tmp_path / probekey.NEXT_KEY_FILE).exists()
        assert (tmp_path / probekey.KEY_FILE).stat().st_mode & 0o777 == 0o600
        sent = fake.requests[-1]
        keydocs.check_proof(sent["proof"], sent["jwk"])  # the new key's proof
        rot = keydocs.open_rotation(sent["rotation"], sent["jwk"])
        assert rot.old_kid == old.kid  # signed by the OLD key
        keydocs.verify_rotation(rot, old.public)
        # Remembered for this identity: the next delivery sends nothing.
        assert await probekey.enrol(client, tmp_path, print, environ={}) == "remembered"
        assert warned == [] and "->" in key_cmd.format_rotated(done)

    with_collector(test)


def test_a_crash_after_the_collector_took_the_rotation_is_finished_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def test(fake: FakeCollector, url: str) -> None:
        client = CollectorClient(url, "tok", 5)
        assert await probekey.enrol(client, tmp_path, print, environ={}) == "enrolled"
        old = probekey.load(tmp_path, {}, create=False)
        assert old is not None
        real_commit = probekey.commit_rotation

        def crash(*args: Any) -> None:
            raise SystemExit("power cut")

        monkeypatch.setattr(probekey, "commit_rotation", crash)
        with pytest.raises(SystemExit):
            await key_cmd.rotate_with(client, tmp_path, print, environ={})
        new_kid = fake.bound
        assert new_kid != old.kid  # the collector took it ...
        still = probekey.load(tmp_path, {}, create=False)
        assert still is not None and still.kid == old.kid  # ... the device did not yet
        monkeypatch.setattr(probekey, "commit_rotation", real_commit)
        done = await key_cmd.rotate_with(client, tmp_path, print, environ={})
        assert (done["new_kid"], done["status"]) == (new_kid, "known")
        now = probekey.load(tmp_path, {}, create=False)
        assert now is not None and now.kid == new_kid

    with_collector(test)


def test_a_collector_still_on_the_old_key_is_handed_over(tmp_path: Path) -> None:
    """The laptop's other line (another collector) still holds the key the rotation
    replaced: enrolment sends the kept rotation statement, and it is taken."""
    async def test(fake: FakeCollector, url: str) -> None:
        first = CollectorClient(url, "tok-1", 5)
        assert await probekey.enrol(first, tmp_path, print, environ={}) == "enrolled"
        old = probekey.load(tmp_path, {}, create=False)
        assert old is not None
        done = await key_cmd.rotate_with(first, tmp_path, print, environ={})
        fake.bound = old.kid  # the other collector, still on the old key
        warned: list[str] = []
        other = CollectorClient(url, "tok-2", 5)
        assert await probekey.enrol(other, tmp_path, warned.append, environ={}) == \
            "rotated"
        assert fake.bound == done["new_kid"] and warned == []
        # A key the kept statement does not lead from is still a conflict.
        fake.bound = jose.kid_of(Ed25519PrivateKey.generate().public_key())
        (tmp_path / probekey.ENROLMENT_FILE).unlink()
        assert await probekey.enrol(other, tmp_path, warned.append, environ={}) == \
            "conflict"

    with_collector(test)


def test_a_credential_key_or_no_key_is_not_rotated(tmp_path: Path) -> None:
    client = CollectorClient("http://127.0.0.1:9", "tok", 2)
    with pytest.raises(ProbeKeyError, match="key show"):
        asyncio.run(key_cmd.rotate_with(client, tmp_path, print, environ={}))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / probekey.CREDENTIAL).write_bytes(_pem(Ed25519PrivateKey.generate()))
    with pytest.raises(ProbeKeyError, match="credential"):
        asyncio.run(key_cmd.rotate_with(client, tmp_path, print,
                                        environ={"CREDENTIALS_DIRECTORY": str(creds)}))
    assert not (tmp_path / probekey.NEXT_KEY_FILE).exists()


def test_an_older_collector_without_proofs_still_enrols() -> None:
    """A collector from before proofs refuses any member but "jwk" (422): the key is
    sent again without its proof."""
    async def main() -> None:
        bodies: list[dict[str, Any]] = []

        async def put_key(request: web.Request) -> web.Response:
            body = await request.json()
            bodies.append(body)
            if set(body) != {"jwk"}:
                return web.json_response({"error": 'body must be {"jwk": {...}} (an '
                                          'Ed25519 public JWK, RFC 8037)', "field": "jwk"},
                                         status=422)
            return web.json_response({"kid": jose.thumbprint(body["jwk"]),
                                      "status": "enrolled"}, status=201)

        app = web.Application()
        app.router.add_put("/api/v1/probe/key", put_key)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            client = CollectorClient(f"http://127.0.0.1:{runner.addresses[0][1]}", "t", 5)
            private = Ed25519PrivateKey.generate()
            jwk = jose.jwk_of(private.public_key())
            proof = keydocs.enrolment_proof(private, "2026-12-07T00:00:00Z")
            assert await client.enrol_key(jwk, proof) == (201, jose.thumbprint(jwk))
            assert [set(b) for b in bodies] == [{"jwk", "proof"}, {"jwk"}]
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_key_documents_refuse_what_they_do_not_prove() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    jwk = jose.jwk_of(key.public_key())
    keydocs.check_proof(keydocs.enrolment_proof(key, "t"), jwk)
    with pytest.raises(jose.JoseError, match=r"^proof: signed by key"):
        keydocs.check_proof(keydocs.enrolment_proof(other, "t"), jwk)
    forged = {**keydocs.enrolment_proof(key, "t"),
              "signature": keydocs.enrolment_proof(other, "t")["signature"]}
    with pytest.raises(jose.JoseError, match=r"^proof: signature"):
        keydocs.check_proof(forged, jwk)
    with pytest.raises(jose.JoseError, match=r"^proof: typ"):
        keydocs.check_proof(keydocs.rotation(key, other.public_key(), "t"), jwk)
    bads: list[Any] = [None, [], {"payload": "x"},
                       {"protected": 1, "payload": "", "signature": ""}]
    for bad in bads:
        with pytest.raises(jose.JoseError, match=r"^proof: "):
            keydocs.check_proof(bad, jwk)
    # A rotation: by the old key, naming the new one; not the new key's own.
    statement = keydocs.rotation(other, key.public_key(), "t")
    rot = keydocs.open_rotation(statement, jwk)
    assert keydocs.verify_rotation(rot, other.public_key()) == "t"
    with pytest.raises(jose.JoseError, match=r"^rotation: "):
        keydocs.verify_rotation(rot, key.public_key())
    with pytest.raises(jose.JoseError, match=r"^rotation: signed by the new key"):
        keydocs.open_rotation(keydocs.rotation(key, key.public_key(), "t"), jwk)
    third = jose.jwk_of(Ed25519PrivateKey.generate().public_key())
    with pytest.raises(jose.JoseError, match=r"^rotation: hands over"):
        keydocs.verify_rotation(keydocs.open_rotation(statement, third), other.public_key())


# --- the real collector -------------------------------------------------------------------

def _push(common: list[str], state: Path) -> Any:
    return CliRunner().invoke(main, [*common, "--set", f"state_dir={state}", "push"],
                              catch_exceptions=False, env={"CREDENTIALS_DIRECTORY": None})


def test_push_enrols_the_key_at_the_real_collector(collector: RunningCollector,
                                                   fast_config: Path) -> None:
    """``bbprobe push`` (delivery, nothing measured) sends the key first, once; the
    collector binds it (trust on first use) and publishes it; another key for the same
    token is a warning naming both, and delivery goes on."""
    token = collector.add_probe("probe-keyed")
    common = ["--config", str(fast_config), "--probe-id", "probe-keyed", "--token", token,
              "--collector", collector.url]
    state = fast_config.parent / "state"
    run = _push(common, state)
    assert run.exit_code == ExitCode.OK, run.stderr
    key = probekey.load(state, {}, create=False)
    assert key is not None  # made at first need
    (entry,) = json.loads((state / probekey.ENROLMENT_FILE).read_text()).values()
    assert (entry["status"], entry["kid"]) == ("enrolled", key.kid)
    assert "key" not in run.stderr  # nothing to say
    _, jwks, _ = request("GET", collector.url + "/.well-known/bbprobe-keys.json")
    (mine,) = [k for k in jwks["keys"] if k["kid"] == key.kid]
    assert {k: mine[k] for k in ("kty", "crv", "x")} == key.jwk
    assert mine["bbprobe"]["probe"] == "probe-keyed"
    assert mine["bbprobe"]["source"] == "tofu"
    # The next delivery does not send it again (the memory, not the collector, says so).
    assert _push(common, state).exit_code == ExitCode.OK
    (entry,) = json.loads((state / probekey.ENROLMENT_FILE).read_text()).values()
    assert entry["status"] == "enrolled"  # not sent: a second PUT would say "known"
    # Another device with the same token: its key is not bound; delivery goes on.
    other_state = fast_config.parent / "other-state"
    run = _push(common, other_state)
    assert run.exit_code == ExitCode.OK, run.stderr
    other = probekey.load(other_state, {}, create=False)
    assert other is not None
    (warning,) = [line for line in run.stderr.splitlines() if "key" in line]
    assert key.kid in warning and other.kid in warning


def test_key_rotate_at_the_real_collector(collector: RunningCollector,
                                          fast_config: Path) -> None:
    """``bbprobe key rotate``: the collector binds the new key from the old key's
    statement (the old one stays, past), the device's key file is the new key, and the
    next delivery needs no enrolment."""
    token = collector.add_probe("probe-rotating")
    common = ["--config", str(fast_config), "--probe-id", "probe-rotating", "--token",
              token, "--collector", collector.url]
    state = fast_config.parent / "state"
    assert _push(common, state).exit_code == ExitCode.OK
    old = probekey.load(state, {}, create=False)
    assert old is not None
    run = CliRunner().invoke(main, [*common, "--set", f"state_dir={state}", "key", "rotate",
                                    "--json"], catch_exceptions=False,
                             env={"CREDENTIALS_DIRECTORY": None})
    assert run.exit_code == ExitCode.OK, run.stderr
    done = json.loads(run.stdout)
    new = probekey.load(state, {}, create=False)
    assert new is not None and (done["old_kid"], done["new_kid"]) == (old.kid, new.kid)
    _, jwks, _ = request("GET", collector.url + "/.well-known/bbprobe-keys.json")
    mine = {k["kid"]: k["bbprobe"] for k in jwks["keys"]
            if k["bbprobe"].get("probe") == "probe-rotating"}
    assert (mine[old.kid]["status"], mine[new.kid]["status"]) == ("past", "current")
    assert mine[new.kid]["source"] == "rotation"
    statement = mine[new.kid]["rotation"]
    keydocs.verify_rotation(keydocs.open_rotation(statement, new.jwk), old.public)
    run = _push(common, state)
    assert run.exit_code == ExitCode.OK and "key" not in run.stderr
    # The collector is gone: one line, the key unchanged, the next key waiting.
    down = ["--config", str(fast_config), "--probe-id", "probe-rotating", "--token", token,
            "--collector", "http://127.0.0.1:9"]
    run = CliRunner().invoke(main, [*down, "--set", f"state_dir={state}", "key", "rotate"],
                             catch_exceptions=False, env={"CREDENTIALS_DIRECTORY": None})
    assert run.exit_code != ExitCode.OK and "key not rotated" in run.stderr
    assert "Traceback" not in run.stderr
    same = probekey.load(state, {}, create=False)
    assert same is not None and same.kid == new.kid
    assert (state / probekey.NEXT_KEY_FILE).exists()
