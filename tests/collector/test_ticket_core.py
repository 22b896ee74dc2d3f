"""Measurement tickets without a server: the signing keys (collector/keys.py),
issuing and verifying (collector/tickets.py), each ticket's ledger
(collector/measurement/ledger.py) and the slots' admission rules, on given clocks."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import spec
from agent.ticket import Allowance, peek
from collector import config as config_mod
from collector import keys, tickets
from collector.errors import ApiError, ConfigError
from collector.measurement.ledger import Ledger, Refusal
from collector.measurement.slots import Gate, TransferSlots, reserved_slots
from collector.tickets import Claims, TicketPolicy, TicketRefused, Verifier

NOW = 1_800_000_000.0
SERVER = "http://ms.example:8080"
POLICY = TicketPolicy(expiry_s=1200, streams=2, bytes=1000, duration_s=10.0)
CODES = {"malformed", "unknown_key", "bad_signature", "wrong_issuer", "not_yet_valid",
         "expired", "wrong_server", "allowance_bytes", "allowance_duration",
         "too_many_tickets"}


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _kid(key: Ed25519PrivateKey) -> str:
    return keys.thumbprint(key.public_key())


def _verifier(key: Ed25519PrivateKey, audience: tuple[str, ...] = (SERVER,)) -> Verifier:
    return Verifier({_kid(key): key.public_key()}, audience)


def _ticket(key: Ed25519PrivateKey, now: float = NOW, servers: tuple[str, ...] = (SERVER,),
            policy: TicketPolicy = POLICY) -> str:
    return tickets.issue(key, _kid(key), "p1", servers, policy, now)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- keys -------------------------------------------------------------------------------


def test_thumbprint_is_rfc_8037s_example() -> None:
    """The kid is the JWK thumbprint of RFC 8037 Appendix A.3 for its example key."""
    raw = base64.urlsafe_b64decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
    public = Ed25519PublicKey.from_public_bytes(raw)
    assert keys.jwk(public) == {"kty": "OKP", "crv": "Ed25519",
                                "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert keys.thumbprint(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_generated_once_mode_0600_and_reread(tmp_path: Path) -> None:
    """A missing key is generated 0600 whatever the umask; the next load reads that
    same key; its public PEM loads back as the same key."""
    path = tmp_path / "state" / keys.TICKET_KEY_FILE
    old = os.umask(0)
    try:
        first = keys.load_or_generate(path, "tickets signing key")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = keys.load_or_generate(path, "tickets signing key")
    assert keys.thumbprint(again.public_key()) == keys.thumbprint(first.public_key())
    pem = tmp_path / "public.pem"
    pem.write_text(keys.public_pem(first.public_key()))
    assert keys.trusted_keys((str(pem),)) == {
        keys.thumbprint(first.public_key()): keys.load_public(pem, "x")}
    assert [p.name for p in path.parent.iterdir()] == [keys.TICKET_KEY_FILE]  # no temp left


def _generate_in(path: str) -> str:
    return keys.thumbprint(keys.load_or_generate(Path(path), "k").public_key())


def test_racing_processes_end_with_one_key(tmp_path: Path) -> None:
    """Processes generating at once (serve --workers at first start) all get one key."""
    path = str(tmp_path / keys.TICKET_KEY_FILE)
    with ProcessPoolExecutor(4) as pool:
        kids = set(pool.map(_generate_in, [path] * 8))
    assert kids == {_generate_in(path)}


def test_key_sources(tmp_path: Path) -> None:
    """The credential under systemd, else the file, else generated in the state dir."""
    creds = tmp_path / "creds"
    creds.mkdir()
    by_credential, by_file = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    for where, k in ((creds / "ticket-key", by_credential), (tmp_path / "k.pem", by_file)):
        where.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    systemd = {"CREDENTIALS_DIRECTORY": str(creds)}
    got = keys.signing_key("ticket-key", str(tmp_path / "k.pem"), tmp_path, "g.pem", systemd,
                           "tickets")
    assert (got.kid, got.source) == (_kid(by_credential), "credential 'ticket-key'")
    got = keys.signing_key("ticket-key", str(tmp_path / "k.pem"), tmp_path, "g.pem", {},
                           "tickets")
    assert got.kid == _kid(by_file)
    got = keys.signing_key("", "", tmp_path / "state", "g.pem", {}, "tickets")
    assert (tmp_path / "state" / "g.pem").is_file() and got.source.endswith("(generated)")


def test_key_state_dir_is_the_databases(tmp_path: Path) -> None:
    """With no key configured, the key goes beside the SQLite database."""
    cfg = config_mod.load(None, {"storage.path": str(tmp_path / "db" / "c.sqlite3")})
    assert keys.state_dir(cfg, {}) == tmp_path / "db"
    cfg = config_mod.load(None, environ={"STATE_DIRECTORY": str(tmp_path / "svc")})
    assert keys.state_dir(cfg, {}) == tmp_path / "svc"


def test_a_key_of_another_kind_is_refused(tmp_path: Path) -> None:
    """An EC key where an Ed25519 one belongs: one line naming the key and the file."""
    path = tmp_path / "ec.pem"
    path.write_bytes(generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ConfigError) as caught:
        keys.signing_key("", str(path), tmp_path, "g.pem", {}, "tickets")
    assert str(caught.value) == (f"tickets.signing_key_file: {str(path)!r} holds another "
                                 "kind of key, not an Ed25519 one")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ConfigError, match=r"^tickets.trusted_keys\[0\]: .* is not a PEM "
                                          "public key"):
        keys.trusted_keys((str(tmp_path / "junk.pem"),))


# --- issuing and verifying ----------------------------------------------------------------


def test_issued_claims(key: Ed25519PrivateKey) -> None:
    """A ticket carries the contract's claims and the kid; it verifies to its claims."""
    token = _ticket(key, servers=(SERVER, "https://b.example:443"))
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": _kid(key),
                                                "typ": "JWT"}
    seen = peek(token)
    assert (seen.probe, seen.servers, seen.issued_at, seen.expires_at, seen.allowance) == (
        "p1", (SERVER, "https://b.example:443"), NOW, NOW + 1200,
        Allowance(2, 1000, 10.0))
    claims = _verifier(key).verify(token, None, NOW + 5)
    assert claims == Claims(seen.ticket_id, "p1", seen.servers, NOW + 1200, seen.allowance)
    assert _ticket(key) != _ticket(key)  # a new id each time


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["bbprobe"]["bytes"] *= 1000
    return ".".join((header, _b64(json.dumps(claims).encode()), signature))


def _foreign_issuer(key: Ed25519PrivateKey) -> str:
    claims: dict[str, Any] = {**jwt.decode(_ticket(key), options={"verify_signature": False}),
                              "iss": "someone-else"}
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": _kid(key)})


@pytest.mark.parametrize(("make", "at", "origin", "code", "message"), [
    (lambda k: "garbage", NOW, None, "malformed", "not a JWT: Not enough segments"),
    (lambda k: "a" * 5000, NOW, None, "malformed", "longer than 4096 characters"),
    (lambda k: jwt.encode({"iss": "x"}, "s" * 32, algorithm="HS256",
                          headers={"kid": _kid(k)}), NOW, None, "malformed",
     "expected alg EdDSA and a kid in the JWS header"),
    (lambda k: _ticket(Ed25519PrivateKey.generate()), NOW, None, "unknown_key", None),
    (lambda k: tickets.issue(Ed25519PrivateKey.generate(), _kid(k), "p1", (SERVER,), POLICY,
                             NOW), NOW, None, "bad_signature",
     "the signature does not match the ticket (forged or altered)"),
    (lambda k: _tampered(_ticket(k)), NOW, None, "bad_signature", None),
    (_foreign_issuer, NOW, None, "wrong_issuer",
     "issued by 'someone-else', not 'bbprobe-collector'"),
    (lambda k: _ticket(k, now=NOW + 61), NOW, None, "not_yet_valid", None),
    (lambda k: _ticket(k, now=NOW - 1200 - 61), NOW, None, "expired", None),
    (lambda k: _ticket(k, servers=("http://other.example:80",)), NOW, None, "wrong_server",
     None),
])
def test_refusals(key: Ed25519PrivateKey, make: Any, at: float, origin: str | None,
                  code: str, message: str | None) -> None:
    """Each kind of bad ticket is refused with its code (and message where fixed)."""
    with pytest.raises(TicketRefused) as caught:
        _verifier(key).verify(make(key), origin, at)
    assert caught.value.code == code
    if message is not None:
        assert caught.value.message == message


def test_clock_skew_within_the_leeway(key: Ed25519PrivateKey) -> None:
    """A minute either way is clock skew, not a refusal."""
    verifier = _verifier(key)
    assert verifier.verify(_ticket(key, now=NOW + 59), None, NOW).probe == "p1"
    assert verifier.verify(_ticket(key, now=NOW - 1200 - 59), None, NOW).probe == "p1"


def test_self_audience_is_the_requests_origin(key: Ed25519PrivateKey) -> None:
    """Without a configured audience, the ticket must name the origin the request was
    made to (scheme and Host)."""
    verifier = _verifier(key, audience=())
    token = _ticket(key)
    assert verifier.verify(token, tickets.origin_of("http", "MS.example:8080"), NOW)
    for host in ("ms.example:8081", None, "[bad"):
        with pytest.raises(TicketRefused, match="wrong_server"):
            verifier.verify(token, tickets.origin_of("http", host), NOW)
    assert tickets.origin_of("https", "h.example") == "https://h.example:443"


def test_self_audience_is_never_another_servers(key: Ed25519PrivateKey) -> None:
    """Without a configured audience, a Host naming one of tickets.servers is not this
    server: a ticket for that server, replayed here with its Host, is wrong_server."""
    verifier = Verifier({_kid(key): key.public_key()}, (), foreign=(SERVER,))
    with pytest.raises(TicketRefused) as caught:
        verifier.verify(_ticket(key), tickets.origin_of("http", "ms.example:8080"), NOW)
    assert caught.value.code == "wrong_server"
    assert caught.value.message.endswith(f"not this one ({SERVER} is another server's)")
    here = "http://c.example:80"
    assert verifier.verify(_ticket(key, servers=(SERVER, here)),
                           tickets.origin_of("http", "c.example"), NOW).probe == "p1"


def test_verified_tickets_are_cached_and_the_cache_bounded(key: Ed25519PrivateKey) -> None:
    """A verified ticket is not verified again (its key may even go); expiry still
    applies; the cache keeps at most its size."""
    verifier = Verifier({_kid(key): key.public_key()}, (SERVER,), cache_entries=2)
    token = _ticket(key)
    verifier.verify(token, None, NOW)
    verifier.keys.clear()
    assert verifier.verify(token, None, NOW).probe == "p1"
    with pytest.raises(TicketRefused, match="expired"):
        verifier.verify(token, None, NOW + 1200 + 61)
    verifier.trust(_kid(key), key.public_key())
    for _ in range(3):
        verifier.verify(_ticket(key), None, NOW)
    assert len(verifier._cache) == 2


@pytest.mark.slow
@settings(max_examples=2000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mangled_token_is_a_refusal(key: Ed25519PrivateKey, data: st.DataObject) -> None:
    """Whatever reaches a measurement server in the header (anyone may send one), the
    verdict is a ticket or a TicketRefused with a code, never another exception: random
    text, three random segments, and a genuine ticket with one segment replaced,
    truncated or with a byte changed, or its claims re-encoded with wrong types."""
    genuine = _ticket(key)
    head, body, sig = genuine.split(".")
    segment = st.one_of(st.text(max_size=60), st.binary(max_size=60).map(_b64))
    claims = st.dictionaries(
        st.sampled_from(["iss", "sub", "jti", "aud", "iat", "exp", "bbprobe"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                  st.lists(st.text(max_size=8), max_size=3),
                  st.dictionaries(st.sampled_from(["streams", "bytes", "duration_s"]),
                                  st.one_of(st.integers(), st.floats(), st.text(max_size=4)),
                                  max_size=3)), max_size=7)
    token = data.draw(st.one_of(
        st.text(max_size=300),
        st.tuples(segment, segment, segment).map(".".join),
        st.tuples(segment).map(lambda t: f"{t[0]}.{body}.{sig}"),
        st.tuples(segment).map(lambda t: f"{head}.{t[0]}.{sig}"),
        st.tuples(segment).map(lambda t: f"{head}.{body}.{t[0]}"),
        st.integers(0, len(genuine)).map(lambda n: genuine[:n]),
        st.tuples(st.integers(0, len(genuine) - 1), st.characters()).map(
            lambda t: genuine[:t[0]] + t[1] + genuine[t[0] + 1:]),
        claims.map(lambda c: f"{head}.{_b64(json.dumps(c).encode())}.{sig}"),
    ))
    verifier = _verifier(key)
    try:
        got = verifier.verify(token, SERVER, NOW)
    except TicketRefused as exc:
        assert exc.code in CODES
    else:
        # Only the genuine ticket passes (or a spelling of the same signed bytes: base64's
        # unused low bits, surrounding spaces): the signature binds its claims.
        assert got == _verifier(key).verify(genuine, SERVER, NOW)


# --- the ledger and the slots ---------------------------------------------------------------


def _claims(ticket_id: str = "t1", streams: int = 2, nbytes: int = 1000,
            duration_s: float = 10.0, expires_at: float = NOW + 1200) -> Claims:
    return Claims(ticket_id, "p1", (SERVER,), expires_at, Allowance(streams, nbytes,
                                                                    duration_s))


def test_ledger_counts_streams_bytes_and_busy_time() -> None:
    """Streams at once, bytes in all, and time with at least one transfer running."""
    ledger = Ledger()
    c = _claims()
    a = ledger.start(c, 0.0, NOW)
    b = ledger.start(c, 2.0, NOW)
    with pytest.raises(Refusal) as caught:
        ledger.check(c, 3.0, NOW)
    assert (caught.value.reason, caught.value.message) == (
        "ticket_streams", "ticket t1 already runs 2 transfers (its allowance: 2 at once)")
    ledger.stop(a, 4.0, NOW)
    ledger.stop(b, 6.0, NOW)  # busy 0..6 s, though two ran during 2..4
    assert a.busy(100.0) == 6.0 and a.seconds_left(100.0) == 4.0
    a.bytes = 1000
    with pytest.raises(Refusal, match="has moved 1000 bytes, its allowance of 1000"):
        ledger.check(c, 7.0, NOW)
    a.bytes = 10
    d = ledger.start(c, 10.0, NOW)
    with pytest.raises(Refusal) as caught:
        ledger.check(c, 14.0, NOW)  # 6 + 4 s
    assert caught.value.reason == "allowance_duration"
    ledger.stop(d, 14.0, NOW)


def test_ledger_forgets_expired_tickets_and_is_bounded() -> None:
    """An entry goes once its ticket is past expiry and leeway (not while a transfer of
    it runs); a full ledger refuses new tickets instead of growing."""
    ledger = Ledger(max_tickets=2)
    running = ledger.start(_claims("old", expires_at=NOW), 0.0, NOW)
    ledger.stop(ledger.start(_claims("new"), 0.0, NOW), 1.0, NOW)
    with pytest.raises(Refusal) as caught:
        ledger.check(_claims("third"), 2.0, NOW + 61)
    assert caught.value.reason == "ledger_full"  # "old" expired, but still running
    ledger.stop(running, 3.0, NOW + 61)  # expired: dropped as its last transfer ends
    assert set(ledger.tickets) == {"new"}
    ledger.start(_claims("third"), 4.0, NOW + 61)
    assert set(ledger.tickets) == {"new", "third"}


def test_one_probe_holds_a_few_tickets_and_one_tickets_streams() -> None:
    """A probe's credential can mint tickets at its rate limit: at one server it holds at
    most per_probe of them (too_many_tickets beyond; another probe is not affected), and
    the transfers of all its tickets together at most one ticket's streams."""
    ledger = Ledger(per_probe=3)
    held = [ledger.start(_claims(f"t{i}", streams=4), 0.0, NOW) for i in range(3)]
    with pytest.raises(Refusal) as caught:
        ledger.check(_claims("t3", streams=4), 0.0, NOW)
    assert (caught.value.reason, caught.value.message) == (
        "too_many_tickets", "probe p1 already has 3 tickets in use here (at most 3): "
        "measure with one of them")
    other = Claims("o1", "p2", (SERVER,), NOW + 1200, Allowance(4, 1000, 10.0))
    ledger.stop(ledger.start(other, 0.0, NOW), 1.0, NOW)
    ledger.start(_claims("t0", streams=4), 0.0, NOW)  # its tickets in use: 4 streams
    with pytest.raises(Refusal) as caught:
        ledger.check(_claims("t1", streams=4), 0.0, NOW)
    assert (caught.value.reason, caught.value.message) == (
        "ticket_streams", "probe p1's tickets already run 4 transfers (a ticket's "
        "allowance: 4 at once)")
    ledger.stop(held[2], 2.0, NOW)
    ledger.start(_claims("t1", streams=4), 2.0, NOW)
    # Expired (and idle) tickets no longer count toward their probe's.
    for usage in list(ledger.tickets.values()):
        while usage.running:
            ledger.stop(usage, 3.0, NOW)
    ledger.check(_claims("t9", expires_at=NOW + 2000), 4.0, NOW + 1261)
    assert ledger.probes == {}


def test_a_ticket_with_less_left_than_asked_is_refused_up_front() -> None:
    """duration_s above the ticket's seconds left, or bytes above its bytes left: the
    allowance refusal now, not a transfer cut short."""
    ledger = Ledger()
    c = _claims(nbytes=1000, duration_s=10.0)
    ledger.stop(ledger.start(c, 0.0, NOW), 6.0, NOW)
    assert ledger.check(c, 7.0, NOW, seconds=4.0, nbytes=1000) is not None
    with pytest.raises(Refusal) as caught:
        ledger.check(c, 7.0, NOW, seconds=5.0)
    assert (caught.value.reason, caught.value.message) == (
        "allowance_duration", "5 s asked; the ticket has 4.0 s left")
    ledger.tickets["t1"].bytes = 400
    with pytest.raises(Refusal) as caught:
        ledger.check(c, 7.0, NOW, nbytes=601)
    assert (caught.value.reason, caught.value.message) == (
        "allowance_bytes", "601 bytes asked; the ticket has 600 left")


class _Counted(dict[str, Any]):
    """A dict that counts walks over it."""

    walks = 0

    def items(self) -> Any:
        _Counted.walks += 1
        return super().items()

    def values(self) -> Any:
        _Counted.walks += 1
        return super().values()

    def __iter__(self) -> Any:
        _Counted.walks += 1
        return super().__iter__()


def test_a_full_ledger_is_not_scanned_per_new_ticket() -> None:
    """New tickets at a full ledger are refused without a walk over its entries (a
    flood of them cost a 50,000-entry scan each); expired ones still leave, in order."""
    ledger = Ledger(max_tickets=100, per_probe=1000)
    ledger.tickets = _Counted()
    for i in range(100):
        ledger.stop(ledger.start(_claims(f"t{i}", expires_at=NOW + i), 0.0, NOW), 0.0, NOW)
    _Counted.walks = 0
    for i in range(1000):
        with pytest.raises(Refusal, match="100 tickets in use here"):
            ledger.check(_claims(f"new{i}"), 1.0, NOW)
    assert _Counted.walks == 0
    ledger.check(_claims("new"), 1.0, NOW + 60.5)  # t0 is past expiry and leeway
    assert "t0" not in ledger.tickets and len(ledger.tickets) == 99
    assert _Counted.walks == 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_slots_keep_a_share_for_tickets_and_apart_from_addresses() -> None:
    """With 4 slots and 2 reserved: anonymous clients get 2 in all (503 beyond, naming
    the reserve); tickets from the same address get the rest, not counted against it;
    a ticket's transfer gets the caps it has left."""
    clock = Clock()
    slots = TransferSlots(4, 1, reserved=2, max_bytes=5000, max_duration_s=60.0,
                          clock=clock, wall=lambda: NOW)

    async def main() -> None:
        async with slots.slot("192.0.2.1"), slots.slot("192.0.2.2"):
            with pytest.raises(ApiError) as caught:
                slots.check("192.0.2.3")
            assert (caught.value.status, caught.value.message) == (
                503, "server busy: 2 transfers without a ticket already running (2 of 4 "
                     "slots are kept for ticketed probes)")
            c = _claims(nbytes=3000, duration_s=10.0)
            async with slots.slot("192.0.2.1", c) as first:
                assert (first.seconds, first.bytes) == (10.0, 3000)
                assert first.take(2500) == 2500
                clock.now = 4.0
                async with slots.slot("192.0.2.1", c) as second:
                    assert (second.seconds, second.bytes) == (6.0, 500)
                    assert second.take(800) == 500 and second.take(1) == 0
                    assert not second.record(1)
                    with pytest.raises(ApiError) as caught:
                        slots.check("192.0.2.9")
                    assert caught.value.message == "server busy: 4 transfers already running"
            assert slots.ticketed == 0 and slots.by_client == {"192.0.2.1": 1,
                                                               "192.0.2.2": 1}
            with pytest.raises(ApiError) as caught:
                slots.check("192.0.2.7", c)
            assert (caught.value.status, caught.value.code,
                    caught.value.headers) == (403, "allowance_bytes",
                                              {spec.TICKET_REFUSED_HEADER: "allowance_bytes"})

    asyncio.run(main())
    assert slots.running == 0 and slots.by_client == {}


def test_capacity_refusals_are_marked_and_asks_not_counted() -> None:
    """Every 429/503 for capacity carries the server's marker with its reason; a
    capacity ask (count=False) refuses alike but counts nothing."""
    counted: list[str] = []
    slots = TransferSlots(2, 1, reserved=1, ledger=Ledger(max_tickets=1),
                          clock=Clock(), wall=lambda: NOW)
    slots.refused = counted.append  # type: ignore[method-assign,assignment]

    def refusal(address: str, claims: Claims | None = None, count: bool = True
                ) -> tuple[int, str | None]:
        with pytest.raises(ApiError) as caught:
            slots.check(address, claims, count=count)
        return caught.value.status, caught.value.headers.get(spec.REFUSED_HEADER)

    async def main() -> None:
        async with slots.slot("192.0.2.1"):
            assert refusal("192.0.2.1") == (429, "per_client")
            assert refusal("192.0.2.2") == (503, "anonymous_share")
            async with slots.slot("192.0.2.1", _claims("t1", streams=1)):
                assert refusal("192.0.2.3", _claims("t1", streams=1)) == (
                    429, "ticket_streams")
                assert refusal("192.0.2.3", _claims("t2")) == (503, "ledger_full")
                slots.ledger.max_tickets = 2
                assert refusal("192.0.2.3", _claims("t2")) == (503, "busy")
                assert counted == ["per_client", "anonymous_share", "ticket_streams",
                                   "ledger_full", "busy"]
                assert refusal("192.0.2.3", _claims("t2"), count=False) == (503, "busy")
                assert refusal("192.0.2.1", count=False) == (429, "per_client")
                assert len(counted) == 5

    asyncio.run(main())


class _Loader:
    """A key that cannot be read until ``mended``; remembers which threads read it."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.mended = False
        self.threads: list[str] = []

    def __call__(self) -> keys.SigningKey:
        import threading

        self.threads.append(threading.current_thread().name)
        if not self.mended:
            raise ConfigError("tickets.signing_key_file: cannot read 'k.pem': denied")
        return keys.SigningKey(self.key, _kid(self.key), "file k.pem")


def test_the_collectors_key_has_one_holder_retried_beside_the_loop(
        key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture) -> None:
    """The issuing side and the verifying side share one holder: a key unusable at start
    is tried again (beside the event loop, at most every retry_s), and once it reads,
    the collector's own tickets are accepted: not refused as unknown_key until a
    restart. The failure is logged once, not per request."""
    clock = Clock()
    loader = _Loader(key)
    own = keys.OwnKey(loader, retry_s=30.0, clock=clock)
    gate = Gate(Verifier({}, (SERVER,)), own)
    token = _ticket(key)

    async def main() -> None:
        assert await own.get() is None
        for _ in range(5):
            with pytest.raises(TicketRefused, match="unknown_key"):
                await gate.verify(token, None, NOW)
        assert len(loader.threads) == 1  # within retry_s: not tried again
        loader.mended = True
        clock.now = 31.0
        assert (await gate.verify(token, None, NOW)).probe == "p1"
        assert (await own.get()) is not None and len(loader.threads) == 2
        stranger = _ticket(Ed25519PrivateKey.generate())
        with pytest.raises(TicketRefused, match="unknown_key"):
            await gate.verify(stranger, None, NOW)
        assert len(loader.threads) == 2  # a known key: no read for a stranger's kid

    with caplog.at_level("INFO", logger="bbprobe.collector"):
        asyncio.run(main())
    assert all(name != "MainThread" for name in loader.threads)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "unusable" in m]) == 1
    assert [m for m in messages if "usable again" in m] == [
        f"tickets: signing key file k.pem, kid {_kid(key)} (usable again)"]


def test_an_ask_for_the_key_is_shared() -> None:
    """Requests arriving while the key is read wait for that one read."""
    loader = _Loader(Ed25519PrivateKey.generate())
    loader.mended = True
    own = keys.OwnKey(loader)

    async def main() -> None:
        got = await asyncio.gather(*(own.get() for _ in range(10)))
        assert len({k.kid for k in got if k is not None}) == 1

    asyncio.run(main())
    assert len(loader.threads) == 1


def test_default_capacity_keeps_strangers_share() -> None:
    """128 slots by default, half kept for tickets: strangers keep the 64 they had
    before tickets, and the reserve is one ticket's streams."""
    cfg = config_mod.load(None)
    assert cfg.measurement.max_concurrent == 128
    assert reserved_slots(cfg.measurement, True) == cfg.tickets.streams == 64
    assert cfg.measurement.max_concurrent - reserved_slots(cfg.measurement, True) == 64


@pytest.mark.parametrize(("tickets_table", "measurement", "message"), [
    ({"audience": ["ms.example"]}, {}, "tickets.audience[0]: expected http(s)://host[:port]: "
     "must be an http:// or https:// URL with a host, got 'ms.example'"),
    ({"servers": [f"http://s{i}.example" for i in range(33)]}, {},
     "tickets.servers: at most 32 URLs, got 33"),
    ({"trusted_keys": ["/nonexistent/k.pem"]}, {},
     "tickets.trusted_keys[0]: no such file '/nonexistent/k.pem'"),
    ({"signing_key_credential": "../key"}, {}, "tickets.signing_key_credential: must be a "
     "credential name (letters, digits, '.', '_', '-')"),
    ({"streams": 0}, {}, "tickets.streams: must be >= 1, got 0"),
    ({"expiry_s": 10}, {}, "tickets.expiry_s: must be >= 60, got 10"),
    ({"tickts": 1}, {}, "tickets.tickts: unknown key"),
    ({}, {"ticket_reserved_share": 0.99},
     "measurement.ticket_reserved_share: must be <= 0.95, got 0.99"),
    ({"trusted_keys": [__file__]}, {}, "tickets.audience: must list this server's URLs "
     "when tickets.trusted_keys is set (it accepts another issuer's tickets, which may "
     "name other servers)"),
    ({"servers": ["https://ms.example"]}, {}, "tickets.audience: must list this "
     "collector's measurement URLs when tickets.servers is set (its tickets name other "
     "servers, which may trust the same key)"),
])
def test_bad_ticket_configs(tickets_table: dict[str, Any], measurement: dict[str, Any],
                            message: str) -> None:
    """Each bad [tickets] setting: one line naming the key."""
    with pytest.raises(ConfigError) as caught:
        config_mod.parse({"tickets": tickets_table, "measurement": measurement}, "c.toml")
    assert str(caught.value) == f"c.toml: {message}"


@pytest.mark.parametrize("table", [
    {"tickets": {"servers": ["https://ms.example"]}, "server": {"role": "ingest"}},
    {"tickets": {"servers": ["https://ms.example"]}, "measurement": {"enabled": False}},
    {"tickets": {"servers": ["https://ms.example"], "audience": ["https://c.example"]}},
    {"tickets": {"trusted_keys": [__file__], "audience": ["https://ms.example"]},
     "server": {"role": "measurement"}},
    {"tickets": {"trusted_keys": [__file__], "enabled": False}},
    {"tickets": {}},
])
def test_where_the_host_may_name_the_server(table: dict[str, Any]) -> None:
    """The Host-derived audience remains where no other server's ticket can be replayed
    here: a collector naming other servers without measuring itself, one with its
    audience set, a lone collector; and wherever tickets are off."""
    config_mod.parse(table, "c.toml")
