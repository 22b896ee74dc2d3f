"""The probe's own signing key, Ed25519 (RFC 8032): the I/O edge that reads, or makes, it.

The key comes from a systemd credential when the unit hands one over
(``LoadCredential=probe-signing-key:PATH``, read from ``$CREDENTIALS_DIRECTORY``), else
from ``<state_dir>/probe-signing-key.pem`` (PKCS#8 PEM, mode 0600), which is generated at
first need. The encodings of its public half (JWK, RFC 7638 thumbprint, PEM) are
agent/jose.py's.

Generation is atomic: the key is written to a temporary file opened with O_EXCL (mode
0600 from the start) and hard-linked to its name, which fails if the name exists, so
processes racing at first start all end up with the one key that won, never a
half-written file or two keys (as collector/keys.py does for the collector's keys).

A private key file that the group or others may read is refused, not used: whoever could
read it could sign as this probe. The message names the file and the fix.

Enrolment (``enrol``): before delivering, the agent sends the public key to the collector
(``PUT /api/v1/probe/key``, trust on first use) with the key's proof of possession
(agent/keydocs.py) once per collector and token, and remembers the answer in
``<state_dir>/probe-key-enrolment.json``: a key the collector holds is not sent again; a
collector that has no such endpoint (404, an older one) is asked again after
UNSUPPORTED_RETRY_S; a collector that holds another key for this token (409) is handed
over to this key when that other key is the one the last rotation replaced (the
rotation statement is kept for this), else it is a warning naming both keys, at each
delivery, and delivery goes on.

Rotation (``bbprobe key rotate``, agent/app/key_cmd.py): the new key is made first as
``probe-signing-key.next.pem`` and kept there until the collector has accepted the
rotation statement signed by the current key; only then does it replace the key file
(``commit_rotation``: rename, then fsync of the directory). A crash before the collector
answers leaves the old key in use and the same new key waiting: the next rotate offers
it again. A crash after the collector accepted but before the rename leaves the old key
in use, which the collector still holds (past, not revoked: what it signs verifies);
the next rotate offers the same statement again, the collector answers "known", and
the rename happens then.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent import jose, keydocs, keyfile
from agent.client import CollectorClient
from agent.errors import ConfigError, DeliveryError
from agent.schema import utc_now

CREDENTIAL = "probe-signing-key"
KEY_FILE = "probe-signing-key.pem"
# A PEM private key is about 120 bytes: anything much larger is not one.
MAX_KEY_FILE_BYTES = 64 * 1024
NEXT_KEY_FILE = "probe-signing-key.next.pem"
# The last rotation statement ({"old_kid", "new_kid", "jws"}): what hands a collector
# that still holds the old key over to the new one.
ROTATION_FILE = "probe-key-rotation.json"
ENROLMENT_FILE = "probe-key-enrolment.json"
# A collector without the key endpoint (404) is asked again a day later: it may have been
# upgraded meanwhile, and one request a day costs nothing.
UNSUPPORTED_RETRY_S = 86400.0
MAX_ENROLMENT_FILE_BYTES = 256 * 1024
# One small PUT: it must not hold delivery long when the collector is slow or away.
ENROL_TIMEOUT_S = 10.0


class ProbeKeyError(ConfigError):
    """The probe's key cannot be read, is unsafe or cannot be made; one line naming the
    file (or credential) and, where there is one, the fix."""


@dataclass(frozen=True, slots=True)
class ProbeKey:
    private: Ed25519PrivateKey
    kid: str  # the public key's RFC 7638 thumbprint
    path: Path  # the file it was read from
    from_credential: bool
    generated: bool  # made by this call (there was none)

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def jwk(self) -> dict[str, str]:
        return jose.jwk_of(self.public)

    @property
    def source(self) -> str:
        """Where the key is, for messages."""
        if self.from_credential:
            return f"systemd credential {CREDENTIAL!r} ({self.path})"
        return f"file {self.path}" + (" (generated now)" if self.generated else "")


def credential_path(environ: Mapping[str, str]) -> Path | None:
    """The credential's file when systemd handed one over, else None."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / CREDENTIAL
    try:
        return path if path.is_file() else None
    except OSError:
        return None


def key_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / KEY_FILE


def load(state_dir: str | os.PathLike[str], environ: Mapping[str, str] = os.environ, *,
         create: bool = True) -> ProbeKey | None:
    """The probe's key: the credential if there is one, else the state directory's file,
    generated there first when there is none and ``create`` (else None)."""
    cred = credential_path(environ)
    if cred is not None:
        private = _load_private(cred, f"credential {CREDENTIAL!r}", check_mode=False)
        return ProbeKey(private, jose.kid_of(private.public_key()), cred, True, False)
    path = key_path(state_dir)
    generated = False
    if not os.path.lexists(path):
        if not create:
            return None
        generated = _generate(path)
    private = _load_private(path, "probe signing key", check_mode=True)
    return ProbeKey(private, jose.kid_of(private.public_key()), path, False, generated)


def _load_private(path: Path, what: str, *, check_mode: bool) -> Ed25519PrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ProbeKeyError(f"{what}: cannot read {str(path)!r}: "
                            f"{exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProbeKeyError(f"{what}: {str(path)!r} is not a regular file")
        if check_mode and st.st_mode & 0o077:
            raise ProbeKeyError(
                f"{what}: {str(path)!r} may be read by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); refused: run `chmod 600 {path}`")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ProbeKeyError(f"{what}: cannot read {str(path)!r}: "
                            f"{exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ProbeKeyError(f"{what}: {str(path)!r} is larger than a PEM key")
    try:
        key: Any = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise ProbeKeyError(f"{what}: {str(path)!r} is not an unencrypted PEM (PKCS#8) "
                            f"private key ({first})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ProbeKeyError(f"{what}: {str(path)!r} holds another kind of key "
                            f"({type(key).__name__}), not an Ed25519 one")
    return key


def _generate(path: Path) -> bool:
    """Write a new key at ``path`` unless another process wins the race; True if ours
    (agent/keyfile.py)."""
    try:
        return keyfile.create(path)
    except OSError as exc:
        raise ProbeKeyError(f"probe signing key: cannot create {str(path)!r}: "
                            f"{exc.strerror or exc}") from None


def describe(key: ProbeKey) -> dict[str, Any]:
    """What ``bbprobe key show`` prints: the public key three ways and where it is."""
    return {"kid": key.kid, "jwk": {**key.jwk, "kid": key.kid, "alg": jose.ALGORITHM,
                                    "use": "sig"},
            "pem": jose.pem_of(key.public), "source": key.source,
            "path": str(key.path), "from_credential": key.from_credential,
            "generated": key.generated}


def _read_enrolments(path: Path) -> dict[str, Any]:
    """The remembered answers, by identity; {} when there are none or the file is
    unreadable (the worst that costs is one request more)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_ENROLMENT_FILE_BYTES + 1)
        doc = json.loads(data) if len(data) <= MAX_ENROLMENT_FILE_BYTES else None
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_enrolments(path: Path, doc: Mapping[str, Any]) -> None:
    """Temp file (fsynced) + rename: a reader sees the old answers or the new, never
    half, and a rotation's statement is on disk before the key file is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remembered(entry: Any, kid: str, now: float) -> bool:
    """Whether a remembered answer spares the request. Pure."""
    if not isinstance(entry, dict):
        return False
    at = entry.get("at")
    if entry.get("status") in ("enrolled", "known"):
        return entry.get("kid") == kid
    if entry.get("status") == "unsupported" and isinstance(at, int | float) \
            and not isinstance(at, bool):
        return 0 <= now - at < UNSUPPORTED_RETRY_S
    return False


async def enrol(client: CollectorClient, state_dir: str | os.PathLike[str],
                warn: Callable[[str], None], *, environ: Mapping[str, str] = os.environ,
                clock: Callable[[], float] = time.time) -> str:
    """Make sure the collector knows this probe's public key (see the module docstring).
    Never raises for the collector's answer or the key: a problem is one line through
    ``warn`` (or nothing, when delivery will say it anyway: the collector unreachable, the
    token refused). What happened, as one word: "remembered", "enrolled", "known",
    "rotated" (handed over from the key the last rotation replaced), "conflict",
    "unsupported", "unsupported-remembered", "no-key" or "failed"."""
    try:
        key = load(state_dir, environ)
    except ProbeKeyError as exc:
        warn(f"the probe's signing key is unusable, not enrolled: {exc}")
        return "no-key"
    assert key is not None
    path = Path(state_dir) / ENROLMENT_FILE
    name = client.identity.to_json()
    answers = _read_enrolments(path)
    entry = answers.get(name)
    now = clock()
    if remembered(entry, key.kid, now) and isinstance(entry, dict):
        return "unsupported-remembered" if entry.get("status") == "unsupported" \
            else "remembered"
    try:
        async with asyncio.timeout(ENROL_TIMEOUT_S):
            proof = keydocs.enrolment_proof(key.private, utc_now())
            status, kid = await client.enrol_key(key.jwk, proof)
            handover = _handover(Path(state_dir), kid, key.kid) if status == 409 else None
            if handover is not None:
                status, kid = await client.enrol_key(key.jwk, proof, handover)
    except TimeoutError:
        return "failed"  # the collector is slow or away: delivery says so
    except DeliveryError as exc:
        if not exc.retryable and exc.status not in (401, 403):
            warn(f"the collector refused this probe's key {key.kid}: {exc}")
        return "failed"
    if status == 409:
        warn(f"the collector holds another key for this probe (kid {kid}), not this "
             f"one (kid {key.kid}, {key.source}): its signed results are refused (kept in "
             "dead-letter) until an admin binds this key with `bbprobe-collector probe key "
             "set NAME FILE` (FILE from `bbprobe key show --pem`); then `bbprobe "
             "dead-letter retry --all`")
        return "conflict"
    if status not in (200, 201, 404):
        warn(f"the collector answered HTTP {status} to this probe's key {key.kid}; "
             "sent again next time")
        return "failed"
    if status == 404:
        outcome = "unsupported"
        answers[name] = {"status": outcome, "at": now}
    else:
        if kid is not None and kid != key.kid:
            warn(f"the collector enrolled this probe's key under kid {kid}, not {key.kid}")
        outcome = "known" if status == 200 else "rotated" if handover else "enrolled"
        answers[name] = {"status": "known" if status == 200 else "enrolled",
                         "kid": key.kid, "at": now}
    try:
        _write_enrolments(path, answers)
    except OSError as exc:
        warn(f"cannot remember the key's enrolment in {path} (sent again next time): "
             f"{exc.strerror or exc}")
    return outcome


def _handover(state_dir: Path, bound_kid: str | None, kid: str) -> dict[str, str] | None:
    """The kept rotation statement from ``bound_kid`` (the key a collector holds) to
    ``kid`` (this key), if that is the last rotation; else None."""
    doc = _read_enrolments(state_dir / ROTATION_FILE)
    jws = doc.get("jws")
    if bound_kid is None or doc.get("old_kid") != bound_kid or doc.get("new_kid") != kid \
            or not isinstance(jws, dict):
        return None
    return {str(k): str(v) for k, v in jws.items()}


def next_key(state_dir: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The key a rotation moves to: made at the first attempt, the same one at every
    retry until ``commit_rotation`` (so a collector that accepted it and a crash before
    the rename still agree)."""
    path = Path(state_dir) / NEXT_KEY_FILE
    if not os.path.lexists(path):
        _generate(path)
    return _load_private(path, "next probe signing key", check_mode=True)


def commit_rotation(state_dir: str | os.PathLike[str], old_kid: str, new_kid: str,
                    statement: Mapping[str, str]) -> None:
    """The collector took the rotation: keep its statement (for other collectors still
    on the old key), then the next key becomes the key, durably. ProbeKeyError."""
    state = Path(state_dir)
    try:
        _write_enrolments(state / ROTATION_FILE, {"old_kid": old_kid, "new_kid": new_kid,
                                                  "jws": dict(statement)})
        os.replace(state / NEXT_KEY_FILE, key_path(state))
        dir_fd = os.open(state, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename survives a crash
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise ProbeKeyError(f"probe signing key: cannot replace {str(key_path(state))!r} "
                            f"by {str(state / NEXT_KEY_FILE)!r}: {exc.strerror or exc}"
                            ) from None


def remember(client: CollectorClient, state_dir: str | os.PathLike[str], kid: str,
             now: float) -> None:
    """Remember that the collector holds ``kid`` for this client's identity (after a
    rotation): not sent again at the next delivery. OSError."""
    path = Path(state_dir) / ENROLMENT_FILE
    answers = _read_enrolments(path)
    answers[client.identity.to_json()] = {"status": "known", "kid": kid, "at": now}
    _write_enrolments(path, answers)
