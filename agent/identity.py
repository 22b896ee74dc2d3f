"""Whose a spooled document is, and what a client delivering as someone does with it. Pure.

Contract (shared/reference/reliability.md A1-A9; agent.spool records, agent.delivery sends):
- Each spooled result and gap record belongs to the identity it was measured for,
  recorded next to it when it is spooled (``NAME.identity``: the collector URL and the
  credential's fingerprint, never the credential: the first 16 hex digits of the token's
  SHA-256, or, for a probe known by its client certificate alone, of the certificate's
  own SHA-256 fingerprint, read from the file when the identity is made).
- Delivery sends only what was recorded for the same token (the credential the collector
  checks; the URL is shown, not matched, so a collector back at another address gets its
  own results): ``claim``. The rest stays spooled untouched and is listed by ``bbprobe
  status`` per owner (``backlog``).
- A file spooled by a bbprobe from before identities (no ``.identity`` beside it) is sent
  only when its own ``probe_id`` is the name the collector gives the token in use; one
  without a ``probe_id`` cannot be placed and waits (``bbprobe status`` says so) until
  the spool's age cap drops it with a gap record.

Pure, but for ``identity_for`` reading a client certificate.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Identity:
    """Whom a spooled document was measured for: the collector's URL and a fingerprint
    of the credential (first 16 hex digits of SHA-256): the token's, or with no token
    the client certificate's (the field keeps its name, as spools already hold it). The
    token itself is a secret and is never written to the spool."""

    collector_url: str
    token_fingerprint: str

    def to_json(self) -> str:
        return json.dumps({"collector_url": self.collector_url,
                           "token_fingerprint": self.token_fingerprint}, sort_keys=True)

    @staticmethod
    def parse(raw: bytes) -> Identity | None:
        """A ``.identity`` file's contents; None when unreadable (then the document is
        placed by its own probe_id, as one from before identities)."""
        try:
            data = json.loads(raw)
            url, fp = data["collector_url"], data["token_fingerprint"]
        except (ValueError, TypeError, KeyError):
            return None
        return Identity(url, fp) if isinstance(url, str) and isinstance(fp, str) else None


# The first certificate of a PEM file: the client's own, as OpenSSL's
# SSL_CTX_use_certificate_chain_file takes it (a key or the chain may precede or follow).
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----(.*?)"
                              rb"-----END (?:X509 |TRUSTED )?CERTIFICATE-----", re.DOTALL)


def certificate_fingerprint(pem: bytes) -> str:
    """The first 16 hex digits of the SHA-256 of the first certificate's DER in a PEM
    file: the start of what ``openssl x509 -noout -fingerprint -sha256`` prints. The
    same certificate however the file is laid out (line ends, wrapping, a chain or a
    key beside it); a different certificate at the same path differs. Raises
    ``ValueError`` when there is no certificate. Pure."""
    match = _PEM_CERTIFICATE.search(pem)
    if match is None:
        raise ValueError("holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:
        der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except binascii.Error:
        raise ValueError("holds a PEM certificate that is not base64") from None
    if not der:
        raise ValueError("holds an empty PEM certificate")
    return hashlib.sha256(der).hexdigest()[:16]


def identity_for(url: str, token: str, client_cert: str = "") -> Identity:
    """The identity a client with this URL and credential delivers as. A probe known by
    its client certificate alone (no token) is identified by the certificate itself
    (``certificate_fingerprint``), read from ``client_cert`` now: another probe's
    certificate put at the same path is another identity, whose results it never sends.
    A renewed certificate is a new credential, as a new token is: results spooled under
    the old one wait for it (``bbprobe status`` lists them). Raises ``ConfigError`` when
    that file cannot be read or holds no certificate."""
    if token or not client_cert:
        return Identity(url.rstrip("/"), hashlib.sha256(token.encode()).hexdigest()[:16])
    try:
        fingerprint = certificate_fingerprint(Path(client_cert).read_bytes())
    except OSError as exc:
        raise ConfigError(f"collector.client_cert: cannot read {client_cert}: "
                          f"{exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"collector.client_cert: {client_cert} {exc}") from None
    return Identity(url.rstrip("/"), fingerprint)


Claim = Literal["send", "ask", "wait"]


def claim(recorded: Identity | None, probe_id: str | None, mine: Identity,
          known: str | None) -> Claim:
    """What delivering as ``mine`` (the probe's name ``known``, or None until the
    collector has said it) does with a spooled document recorded for ``recorded`` whose
    ``probe_id`` is given (None: the file cannot be read): "send" it, "ask" the
    collector's name for the token first, or let it "wait" for its own identity. The
    token decides, not the URL: the collector checks the token, and the same token
    reaches the same store wherever that collector now answers. Pure."""
    if recorded is not None:
        return "send" if recorded.token_fingerprint == mine.token_fingerprint else "wait"
    # Spooled before identities were recorded: only its own probe_id can place it.
    if probe_id is None:
        return "send"  # damaged: read, found out and set aside as before, sent nowhere
    if not probe_id:
        return "wait"  # nobody can tell whose it is now: never named after a guess
    if known is None:
        return "ask"
    return "send" if probe_id == known else "wait"


def owner_of(recorded: Identity | None, probe_id: str | None) -> tuple[str, str]:
    """Whose a dropped document is, for its gap record: its token's, or (older spools,
    no identity recorded) its probe_id's."""
    return ("token", recorded.token_fingerprint) if recorded is not None else \
        ("probe", probe_id or "")


@dataclass(frozen=True, slots=True)
class Backlog:
    """The spooled documents of one owner: a token (``identity``, the latest recorded
    for it), or, spooled before identities were recorded (``identity`` None), a
    ``probe_id``."""

    identity: Identity | None
    probe_id: str  # the name they carry; "" when not named yet
    results: int
    size_bytes: int
    gaps: int


def backlog(rows: Sequence[tuple[Identity | None, str | None, int, bool]]) -> list[Backlog]:
    """(identity, probe_id, size, is_gap) per spooled document as one ``Backlog`` per
    owner, in the order first met. Pure."""
    out: dict[tuple[str, str], Backlog] = {}
    for recorded, probe, size, is_gap in rows:
        key = owner_of(recorded, probe)
        seen = out.get(key, Backlog(recorded, "", 0, 0, 0))
        out[key] = Backlog(recorded or seen.identity, probe or seen.probe_id,
                           seen.results + (0 if is_gap else 1), seen.size_bytes + size,
                           seen.gaps + (1 if is_gap else 0))
    return list(out.values())


def identity_file(path: Path) -> Path:
    """Where the identity of the spooled document ``path`` is kept (not ``*.json``: it
    is never listed or sent as a document)."""
    return path.with_suffix(".identity")
