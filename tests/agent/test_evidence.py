"""agent/evidence.py: a result's JWS, the per-probe chain and the Merkle tree (issue 27)."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import evidence, jose
from agent.evidence import Break, Link, chain_breaks
from agent.jose import JoseError


def _key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


PAYLOAD = b'{"result_id":"r1","probe_id":"p","session_seq":3}'


def test_a_signed_result_opens_and_verifies_with_its_key_only() -> None:
    key = _key()
    prev = hashlib.sha256(b"before").hexdigest()
    jws = evidence.sign_result(key, PAYLOAD, prev)
    assert evidence.is_jws(jws)
    signed = evidence.open_result(jws)
    assert signed.payload == PAYLOAD and signed.prev == prev
    assert signed.kid == jose.kid_of(key.public_key())
    assert signed.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    evidence.verify(signed, key.public_key())
    other = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    with pytest.raises(JoseError, match="kid"):
        evidence.verify(signed, other.public_key())


def test_a_changed_payload_or_chain_link_does_not_verify() -> None:
    key = _key()
    jws = evidence.sign_result(key, PAYLOAD, None)
    changed = {**jws, "payload": jose.b64url(PAYLOAD.replace(b"3", b"4"))}
    with pytest.raises(JoseError, match="does not verify"):
        evidence.verify(evidence.open_result(changed), key.public_key())
    header = json.loads(jose.b64url_decode(jws["protected"], "h", 9999))
    header["prev"] = "0" * 64
    relinked = {**jws, "protected": jose.b64url(json.dumps(header).encode())}
    with pytest.raises(JoseError, match="does not verify"):
        evidence.verify(evidence.open_result(relinked), key.public_key())


@pytest.mark.parametrize(("change", "reason"), [
    (lambda j: {**j, "header": {}}, "members must be exactly"),
    (lambda j: {k: v for k, v in j.items() if k != "signature"}, "members must be exactly"),
    (lambda j: {**j, "payload": "a b"}, "payload: not base64url"),
    (lambda j: [j], "not a JSON object"),
])
def test_malformed_envelopes_are_named(change, reason) -> None:  # type: ignore[no-untyped-def]
    jws = evidence.sign_result(_key(), PAYLOAD, None)
    with pytest.raises(JoseError, match=reason):
        evidence.open_result(change(jws))


def test_a_signature_over_something_else_is_not_a_result() -> None:
    """A key rotation or a certificate signed by the same key is never taken for a
    result: typ says what was signed."""
    other = jose.sign_flattened(_key(), PAYLOAD, {"typ": evidence.ROTATION_TYP})
    with pytest.raises(JoseError, match="typ must be 'bbprobe-result'"):
        evidence.open_result(other)
    with pytest.raises(JoseError, match="prev"):
        evidence.sign_result(_key(), PAYLOAD, "ABC")
    bad_prev = jose.sign_flattened(_key(), PAYLOAD, {"typ": evidence.RESULT_TYP,
                                                     "prev": "x" * 64})
    with pytest.raises(JoseError, match="prev must be null"):
        evidence.open_result(bad_prev)


def _links(n: int) -> list[Link]:
    out: list[Link] = []
    prev = None
    for seq in range(1, n + 1):
        sha = hashlib.sha256(f"r{seq}".encode()).hexdigest()
        out.append(Link(seq, f"r{seq}", sha, prev, True))
        prev = sha
    return out


def test_an_intact_chain_has_no_break() -> None:
    assert chain_breaks(_links(6)) == []


def test_a_removed_session_is_missing_unless_a_gap_covers_it() -> None:
    links = [link for link in _links(6) if link.seq != 3]
    (found,) = chain_breaks(links)
    assert (found.kind, found.seq, found.result_id) == ("missing", 4, "r4")
    assert "session_seq 3 absent" in found.detail
    (documented,) = chain_breaks(links, [(3, 3)])
    assert documented.kind == "documented"
    assert evidence.undocumented([documented]) == []


def test_a_replaced_or_swapped_session_is_a_mismatch() -> None:
    links = _links(5)
    forged = Link(3, "x3", hashlib.sha256(b"forged").hexdigest(), links[1].sha256, True)
    breaks = chain_breaks([*links[:2], forged, *links[3:]])
    # The forgery names seq 2 rightly, but seq 4 names the original seq 3.
    assert [(b.kind, b.seq) for b in breaks] == [("mismatch", 4)]
    swapped = [*links[:2], links[3], links[2], links[4]]  # reordered: seqs stay, so
    assert chain_breaks(swapped) == []                     # order of listing is irrelevant
    twice = [*links, Link(5, "dup", "0" * 64, links[3].sha256, True)]
    assert [b.kind for b in chain_breaks(twice)] == ["mismatch"]


def test_a_restarted_chain_and_unsigned_links() -> None:
    links = _links(4)
    restarted = [*links[:2], Link(3, "r3", links[2].sha256, None, True), links[3]]
    assert [(b.kind, b.seq) for b in chain_breaks(restarted)] == [("restart", 3)]
    # Unsigned results name nothing; the first signed one after them may name the last.
    unsigned = [Link(1, "u1", "a" * 64, None, False), Link(2, "u2", "b" * 64, None, False),
                Link(3, "s3", "c" * 64, "b" * 64, True)]
    assert chain_breaks(unsigned) == []
    # An agent upgraded to signing: its first signed result names nothing, after
    # unsigned ones: the chain's start, not a break.
    upgraded = [*unsigned[:2], Link(3, "s3", "c" * 64, None, True)]
    assert chain_breaks(upgraded) == []
    assert isinstance(Break("missing", 1, "r", "d"), Break)


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1, written out independently."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 96, 97])
def test_merkle_root_follows_rfc_9162(n: int) -> None:
    leaves = [evidence.leaf_data(f"r{i}", hashlib.sha256(bytes([i % 256])).hexdigest())
              for i in range(n)]
    assert evidence.merkle_root(leaves) == _mth(leaves).hex()
    if n >= 2:
        changed = [leaves[0] + b"x", *leaves[1:]]
        assert evidence.merkle_root(changed) != evidence.merkle_root(leaves)
    # The empty tree's hash (RFC 9162 §2.1.1).
    assert evidence.merkle_root([]) == \
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_a_stripped_signature_is_a_downgrade() -> None:
    """An unsigned result after a signed one: the signing agent never stops signing, so
    someone removed a signature (a store or a spool edited)."""
    links = _links(4)
    stripped = [*links[:2], Link(3, "r3", links[2].sha256, None, False), links[3]]
    breaks = chain_breaks(stripped)
    assert [(b.kind, b.seq) for b in breaks] == [("downgrade", 3)]
    assert evidence.undocumented(breaks) == breaks
    restarted = [*links[:2], Link(3, "r3", links[2].sha256, None, True)]
    (restart,) = chain_breaks(restarted)
    assert restart.kind == "restart" and evidence.undocumented([restart]) == []


def test_huge_session_numbers_cost_one_bisection() -> None:
    """A probe may name any seq: a jump of 10**12 covered by ranges is checked without
    walking it (before: one step per number, days for this)."""
    first, last = _links(2)
    far = Link(10**12, "far", "f" * 64, last.sha256, True)
    ranges = [(3, 10**6), (10**6 + 1, 10**12 - 1), *((k, k) for k in range(5, 10_000))]
    (documented,) = chain_breaks([first, last, far], ranges)
    assert documented.kind == "documented"
    (missing,) = chain_breaks([first, last, far], [(3, 10**12 - 2)])
    assert missing.kind == "missing" and "3-999999999999" in missing.detail
    assert evidence.merged([(5, 9), (1, 3), (4, 4), (20, 19)]) == [(1, 9)]
    assert evidence.covers(evidence.merged([(1, 3), (5, 9)]), 2, 3)
    assert not evidence.covers(evidence.merged([(1, 3), (5, 9)]), 3, 5)


def test_a_replaced_key_covers_sessions_until_an_hour_after() -> None:
    from datetime import UTC, datetime, timedelta

    until = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert evidence.key_covers(None, until + timedelta(days=900))
    assert evidence.key_covers(until, until + timedelta(minutes=59))
    assert not evidence.key_covers(until, until + timedelta(hours=1, seconds=1))
