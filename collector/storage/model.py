"""The collector's records: what the store takes and gives back, whatever the database
(plain frozen dataclasses; both backends, storage/sqlite.py and storage/postgres.py,
speak them through storage/store.py's Store)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from agent.jose import b64url
from collector.compliance.facts import SessionFacts
from collector.lines import LineMetadata


@dataclass(frozen=True, slots=True)
class Quota:
    """Bounds of an anonymous table: rows from before ``keep_after`` (UTC, the schema's
    format) and beyond the newest ``max_rows`` are dropped."""

    keep_after: str
    max_rows: int


@dataclass(frozen=True, slots=True)
class Probe:
    name: str
    created_at: str
    revoked_at: str | None
    line: LineMetadata
    # When its token was last replaced (`probe rotate`): a client certificate issued
    # before then no longer names it (web/probe_routes.py). None: never replaced.
    rotated_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        line = {f.name: getattr(self.line, f.name) for f in fields(LineMetadata)}
        return {"probe_id": self.name, "created_at": self.created_at,
                "revoked_at": self.revoked_at, **line}


@dataclass(frozen=True, slots=True)
class StoredResult:
    result_id: str
    probe_name: str
    started_at: str
    ended_at: str
    received_at: str
    body: str
    # Probe clock minus collector clock at delivery, when the probe said (v3 agents).
    clock_skew_s: float | None = None


@dataclass(slots=True)
class HourRow:
    """Aggregates of one UTC hour (``hour`` is "YYYY-MM-DDTHH")."""

    hour: str
    sessions: int = 0
    pings_sent: int = 0
    pings_lost: int = 0
    rtt_n: int = 0
    rtt_sum_ms: float = 0.0
    download_n: int = 0
    download_kbps_sum: float = 0.0
    upload_n: int = 0
    upload_kbps_sum: float = 0.0
    # Jitter terms summed over the hour's sessions (facts.jitter_terms).
    jitter_sum_ns: int = 0
    jitter_pairs: int = 0


SignatureStatus = Literal["verified", "unverified"]


@dataclass(frozen=True, slots=True)
class ResultSignature:
    """How a probe signed a result it delivered (a flattened JWS, RFC 7515 §7.2.2;
    agent/evidence.py): the protected header and signature as received (base64url),
    the key (kid) and chain link (prev_sha256) the header names, and ``payload``: the
    signed bytes when they differ from the stored canonical body (a result spooled
    before the probe knew its name, named by the collector), else None. ``status``:
    "verified" against a key bound to the probe, "unverified" (the probe had no key
    then: verifiable once one is bound)."""

    kid: str
    protected: str
    signature: str
    prev_sha256: str | None
    payload: bytes | None
    status: SignatureStatus


@dataclass(frozen=True, slots=True)
class StoredSignature:
    """A stored result's signature (storage/sql/signatures.py), ``payload`` decompressed
    (None: the signed bytes are the stored canonical body). The JWS is rebuilt exactly
    by ``jws(body)``."""

    result_id: str
    kid: str
    protected: str
    signature: str
    prev_sha256: str | None
    payload: bytes | None
    status: SignatureStatus

    def jws(self, canonical_body: bytes) -> dict[str, str]:
        """The flattened JWS as the probe signed it, given the stored canonical body."""
        payload = self.payload if self.payload is not None else canonical_body
        return {"protected": self.protected,
                "payload": b64url(payload),
                "signature": self.signature}


GapStatus = Literal["verified", "unverified", "unsigned"]


@dataclass(frozen=True, slots=True)
class GapSignature:
    """How a gap record was delivered, stored with it (table gap_signatures):
    ``payload`` its canonical JSON (agent.canonical.canonical_gap; for a signed record the
    bytes the probe signed, as received), and for a signed one (RFC 7515 §7.2.2, typ
    "bbprobe-gap") the kid, protected header and signature as received. ``status`` as
    for results, or "unsigned" (kid, protected, signature None); ``recorded_at`` the
    record's own (the time its probe's key must cover)."""

    payload: bytes
    recorded_at: str
    status: GapStatus
    kid: str | None = None
    protected: str | None = None
    signature: str | None = None


@dataclass(frozen=True, slots=True)
class GapEvidence:
    """A stored gap record as evidence bundles carry it (store ``gap_evidence``): its
    dropped session_seq ranges, reason and recorded_at (the probe's clock; for a record
    stored before gap records were kept whole, the time the collector received it),
    ``jws`` the flattened JWS exactly as the probe signed it (None: unsigned), and
    ``document`` its canonical JSON (a signed record's payload; an unsigned one's bytes
    as a bundle carries them)."""

    gap_id: str
    seq_ranges: tuple[tuple[int, int], ...]
    reason: str
    recorded_at: str
    jws: dict[str, str] | None
    status: GapStatus
    document: bytes


@dataclass(frozen=True, slots=True)
class NewResult:
    """A validated result ready to store (collector/intake/ingest.py makes them)."""

    result_id: str
    probe_name: str
    schema_version: int
    started_at: str
    ended_at: str
    received_at: str
    body: str
    body_sha256: str
    facts: SessionFacts
    clock_skew_s: float | None = None
    session_seq: int | None = None
    # The body packed (storage/codec.py); None: stored as the text ``body``.
    packed: bytes | None = None
    # How the probe signed it (None: unsigned); stored with the result, never on a
    # duplicate.
    signature: ResultSignature | None = None


InsertOutcome = Literal["stored", "duplicate", "conflict"]


@dataclass(frozen=True, slots=True)
class AlertDelivery:
    """A pending delivery of an alert to one notifier, as leased by one collector
    process."""

    alert_id: int
    notifier: str
    attempts: int
    key: str
    kind: str
    probe: str | None
    severity: str
    created_at: str
    subject: str
    details: str  # JSON


# How a key was bound: trust on first use, pinned by an admin, or introduced by a
# rotation JWS signed with the probe's previous key (``ProbeKey.rotation_jws``).
KeySource = Literal["tofu", "pinned", "rotation"]
KeyStatus = Literal["current", "past", "revoked"]


@dataclass(frozen=True, slots=True)
class ProbeKey:
    """A public key bound to a probe (storage/sql/probe_keys.py): its RFC 7638
    thumbprint, its JWK (RFC 8037) as JSON text, how it was bound (trust on first use,
    from ``first_seen_address``, or pinned by an admin) and from when until when (None:
    still bound). A key stays in the history after it is replaced or revoked, so what
    it signed can still be verified (and named revoked)."""

    probe_name: str
    kid: str
    jwk: str
    source: KeySource
    first_seen_at: str
    first_seen_address: str | None
    bound_from: str
    bound_until: str | None
    revoked_at: str | None
    revoked_reason: str | None
    # The rotation JWS (by the old key, typ "bbprobe-key-rotation") that introduced
    # this key; None: enrolled or pinned.
    rotation_jws: str | None = None

    @property
    def status(self) -> KeyStatus:
        if self.revoked_at is not None:
            return "revoked"
        return "current" if self.bound_until is None else "past"


# What binding a key did (ProbeKeyStore.bind_probe_key): "enrolled" (now the probe's
# key), "known" (it already was), "bound" (another key is the probe's: the record
# given), "taken" (this key is in the history already, the probe's own past or revoked
# key or another probe's: the record given), "closed" (first use is over: the probe
# has had keys and has none bound; an admin pins one), "no_probe".
BindOutcome = Literal["enrolled", "known", "bound", "taken", "closed", "no_probe"]

# What a rotation did (ProbeKeyStore.rotate_probe_key): "rotated" (the new key is bound,
# the old one bound until then), "known" (it already was: a retry), "stale" (the old key
# named is not the probe's current key: the record given, or None), "taken" (the new
# key is in the way, as for BindOutcome), "no_probe".
RotateOutcome = Literal["rotated", "known", "stale", "taken", "no_probe"]
