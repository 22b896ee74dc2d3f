"""Signed results (issue 27): each stored result's JWS parts (RFC 7515 §7.2.2, the
flattened serialization; agent/evidence.py) in table result_signatures, written in the
transaction that stores the result, and each probe's hash chain read back as
agent.evidence ``Link`` rows for completeness and evidence bundles.

The payload a probe signed is its result's canonical JSON, which is the stored body, so
it is not kept twice: only when the two differ (a result spooled before the probe knew
its name, named by the collector) are the signed bytes kept, zstd-compressed, so the JWS
can be rebuilt exactly (``StoredSignature.jws``).

Gap records (H1 of the issue's review) are kept whole in table gap_signatures: each
record's canonical JSON (agent.canonical.canonical_gap; zstd, a few hundred bytes) and,
when its probe signed it (typ "bbprobe-gap"), the JWS parts, so a bundle carries the
record exactly as signed (``gap_evidence``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, cast

import zstandard

from agent.canonical import canonical_gap
from agent.evidence import Link
from agent.jose import b64url
from agent.schema import GapRecord
from collector.storage.codec import MAX_UNPACKED_BYTES, CodecError
from collector.storage.model import (
    GapEvidence,
    GapSignature,
    GapStatus,
    NewResult,
    SignatureStatus,
    StoredSignature,
)
from collector.storage.sql.base import SqlBase, Tx, readable

# zstd level 3 (its default), with its checksum: a damaged payload is an error when
# read, never other bytes (as storage/codec.py packs bodies).
_LEVEL = 3
SIGNATURE_COLUMNS = ("result_id", "kid", "protected", "signature", "prev_sha256", "payload",
                     "status", "received_at")
GAP_SIGNATURE_COLUMNS = ("gap_id", "kid", "protected", "signature", "payload",
                         "recorded_at", "status")


def insert_signature(tx: Tx, item: NewResult, stored_sha256: str | None = None) -> None:
    """Store ``item``'s signature, if it has one, in the caller's transaction: the one
    that has just stored the result, or found it stored already (a duplicate delivery),
    its row's hash ``stored_sha256``: a signature already there is kept; a row an older
    release stored in another canonical form keeps the signed bytes beside it, since its
    body is not them."""
    sig = item.signature
    if sig is None:
        return
    signed = sig.payload
    if signed is None and stored_sha256 is not None and stored_sha256 != item.body_sha256:
        signed = item.body.encode()  # what the probe signed: today's canonical form
    payload = None if signed is None else pack_payload(signed)
    tx.run(f"INSERT INTO result_signatures ({', '.join(SIGNATURE_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(SIGNATURE_COLUMNS))}) "
           "ON CONFLICT (result_id) DO NOTHING",
           (item.result_id, sig.kid, sig.protected, sig.signature, sig.prev_sha256, payload,
            sig.status, item.received_at))


def insert_gap_signature(tx: Tx, gap_id: str, sig: GapSignature) -> None:
    """Store gap record ``gap_id`` whole (``sig``) in the caller's transaction, the one
    that has just stored the record."""
    tx.run(f"INSERT INTO gap_signatures ({', '.join(GAP_SIGNATURE_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(GAP_SIGNATURE_COLUMNS))}) "
           "ON CONFLICT (gap_id) DO NOTHING",
           (gap_id, sig.kid, sig.protected, sig.signature, pack_payload(sig.payload),
            sig.recorded_at, sig.status))


def same_gap(tx: Tx, gap_id: str, sig: GapSignature | None) -> bool:
    """Whether stored gap record ``gap_id`` is the document ``sig`` holds (a record sent
    plain, then signed, is the same record); when it is and ``sig`` is signed while the
    stored copy is not, the signature is stored now (a duplicate delivery never throws a
    valid signature away)."""
    if sig is None:
        return False
    row = tx.one("SELECT payload, status FROM gap_signatures WHERE gap_id = ?", (gap_id,))
    if row is None or unpack_payload(row[0]) != sig.payload:
        return False
    if row[1] == "unsigned" and sig.status != "unsigned":
        tx.run("DELETE FROM gap_signatures WHERE gap_id = ? AND status = 'unsigned'",
               (gap_id,))
        insert_gap_signature(tx, gap_id, sig)
    return True


def pack_payload(payload: bytes) -> bytes:
    # A compressor per call: this path is rare (a renamed result), and zstandard's
    # objects must not be shared between the store's threads.
    return zstandard.ZstdCompressor(level=_LEVEL, write_checksum=True).compress(payload)


def unpack_payload(packed: bytes) -> bytes:
    """The signed bytes; CodecError (a StoreError) if they cannot be read back."""
    data = bytes(packed)
    try:
        declared = zstandard.frame_content_size(data)
        if declared < 0 or declared > MAX_UNPACKED_BYTES:
            raise CodecError(f"stored signed payload is corrupt: it declares {declared} "
                             "bytes")
        out: bytes = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=MAX_UNPACKED_BYTES)
        return out
    except zstandard.ZstdError as exc:
        raise CodecError(f"stored signed payload is corrupt: {exc}") from None


class SignatureQueries(SqlBase):
    """The result_signatures table, and the chains it makes with results."""

    def result_signatures(self, result_ids: Sequence[str]) -> dict[str, StoredSignature]:
        """The signatures of those of ``result_ids`` that were signed, by result id."""
        if not result_ids:
            return {}
        clause, param = self.dialect.in_list("result_id", list(result_ids))
        return {row[0]: _signature(row) for row in self._read(
            f"SELECT {', '.join(SIGNATURE_COLUMNS[:-1])} FROM result_signatures "
            f"WHERE {clause}", [param])}

    def chain_links(self, probe: str, since: str | None,
                    until: str | None) -> list[Link]:
        """Probe ``probe``'s numbered results that started in [since, until), as chain
        links by session_seq: a result's link is the SHA-256 of the bytes its probe
        signed (its canonical body, or the payload kept when they differ), and the link
        it names (``prev``) when it was signed. Results without a session_seq (schema
        < 4) have no place in a chain and are left out."""
        where, params = self._scope(None, since, until, column="r.started_at",
                                    named_only=True)
        links: list[Link] = []
        for result_id, seq, started, body_sha256, prev, signed, payload in self._read(
                "SELECT r.result_id, r.session_seq, r.started_at, r.body_sha256, "
                "s.prev_sha256, s.result_id IS NOT NULL, s.payload FROM results r "
                "LEFT JOIN result_signatures s ON s.result_id = r.result_id "
                f"WHERE r.probe_name = ? AND {where} AND r.session_seq IS NOT NULL "
                "ORDER BY r.session_seq, r.result_id", [probe, *params]):
            if not readable(result_id, started):
                continue
            # The probe chained the bytes it signed, not the body as named here.
            digest = body_sha256 if payload is None else \
                hashlib.sha256(unpack_payload(payload)).hexdigest()
            links.append(Link(seq=int(seq), result_id=result_id, sha256=digest, prev=prev,
                              signed=bool(signed)))
        return links


    def gap_evidence(self, probe: str) -> list[GapEvidence]:
        """Every gap record of ``probe``, oldest first, as evidence bundles carry it: a
        signed one's JWS rebuilt exactly, an unsigned one's canonical JSON. A record
        stored before gap records were kept whole (no gap_signatures row) is rebuilt
        from its columns, recorded_at being the time it was received."""
        return [_gap_evidence(probe, row) for row in self._read(
            "SELECT g.gap_id, g.received_at, g.reason, g.dropped, g.first_started_at, "
            "g.last_started_at, g.seq_ranges, s.kid, s.protected, s.signature, s.payload, "
            "s.recorded_at, s.status FROM gaps g "
            "LEFT JOIN gap_signatures s ON s.gap_id = g.gap_id WHERE g.probe_name = ? "
            "ORDER BY g.first_started_at, g.gap_id", [probe])]


def _gap_evidence(probe: str, row: Sequence[Any]) -> GapEvidence:
    (gap_id, received_at, reason, dropped, first, last, ranges, kid, protected, signature,
     payload, recorded_at, status) = row
    seq_ranges = tuple((int(a), int(b)) for a, b in json.loads(ranges))
    if payload is None:
        document = canonical_gap(GapRecord(
            schema_version=4 if seq_ranges else 3, gap_id=gap_id, probe_id=probe,
            recorded_at=received_at, reason=reason, dropped=int(dropped),
            first_started_at=first, last_started_at=last, dropped_seq_ranges=seq_ranges))
        return GapEvidence(gap_id, seq_ranges, str(reason), str(received_at), None,
                           "unsigned", document)
    document = unpack_payload(payload)
    jws = None if kid is None else {"protected": str(protected), "payload": b64url(document),
                                    "signature": str(signature)}
    return GapEvidence(gap_id, seq_ranges, str(reason), str(recorded_at), jws,
                       cast(GapStatus, status), document)


def _signature(row: Sequence[Any]) -> StoredSignature:
    result_id, kid, protected, signature, prev, payload, status = row
    return StoredSignature(result_id, kid, protected, signature, prev,
                           None if payload is None else unpack_payload(payload),
                           cast(SignatureStatus, status))
