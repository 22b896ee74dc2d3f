"""The collector's signing keys, Ed25519 (RFC 8032): the I/O edge that reads, or makes,
them.

A key comes from a systemd credential (``LoadCredential=NAME:PATH``, so the service's
dynamic user reads a file that stays root's), or from a PEM file (PKCS#8), or, with
neither, is generated at first need in the collector's state directory, the directory of
the SQLite database (storage.path; by default $STATE_DIRECTORY under systemd, else the XDG
data directory). Each key has a role and a file name of its own: the measurement tickets'
is ``ticket-signing-key.pem``; the key that signs evidence (published in the JWK Set,
web/keys_routes.py) is ``evidence-signing-key.pem`` or the credential
``evidence-signing-key``: never the same key for two purposes.

Generation is atomic: the key is written to a temporary file opened with O_EXCL (mode
0600 from the start) and hard-linked to its name, which fails if the name exists, so
processes racing at first start (``serve --workers``) all end up with the one key that
won, never a half-written file or two keys.

A public key is shown as PEM (SubjectPublicKeyInfo, what ``tickets.trusted_keys`` files
hold), as a JWK (RFC 8037 §2: kty OKP, crv Ed25519) and by its JWK thumbprint (RFC 7638),
which tickets carry as their JWS header's ``kid``.

A collector's own ticket key has one holder, ``OwnKey``, shared by the side that issues
tickets (web/ticket_routes.py) and the side that verifies them at its measurement
endpoints (measurement/slots.py Gate): read or generated beside the event loop (a
thread), at start and, while it is unusable, again at most every RETRY_S when needed;
its failures logged once per change, not once per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent import credentials, jose, keyfile
from collector.config import CollectorConfig, default_database
from collector.errors import ConfigError

log = logging.getLogger("bbprobe.collector")

TICKET_KEY_FILE = "ticket-signing-key.pem"
# The key that signs evidence (the collector's JWK Set, certificates): a role of its
# own, never the ticket key. From the systemd credential of this name when the unit
# loads one (LoadCredential=evidence-signing-key:PATH), else this file, made at need.
EVIDENCE_KEY_FILE = "evidence-signing-key.pem"
EVIDENCE_KEY_CREDENTIAL = "evidence-signing-key"
# A PEM key is about 120 bytes: anything much larger is not one (a wrong path).
MAX_KEY_FILE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class SigningKey:
    private: Ed25519PrivateKey
    kid: str  # the public key's RFC 7638 thumbprint
    source: str  # where it was read from, for messages ("file PATH", "credential NAME")

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()


# The encodings are agent.jose's (one implementation for both sides); these names stay for
# the collector's callers.
def public_pem(key: Ed25519PublicKey) -> str:
    """The public key as PEM (SubjectPublicKeyInfo)."""
    return jose.pem_of(key)


def jwk(key: Ed25519PublicKey) -> dict[str, str]:
    """The public key as a JWK (RFC 8037 §2)."""
    return jose.jwk_of(key)


def thumbprint(key: Ed25519PublicKey) -> str:
    """The public key's RFC 7638 thumbprint (the ``kid`` of what it signs)."""
    return jose.kid_of(key)


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {str(path)!r}: "
                          f"{exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{what}: {str(path)!r} is larger than a PEM key")
    return data


def load_private(path: Path, what: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS#8) file; ConfigError naming ``what``."""
    try:
        key = serialization.load_pem_private_key(_read(path, what), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{what}: {str(path)!r} is not an unencrypted PEM private key "
                          f"({str(exc).splitlines()[0] if str(exc) else 'unreadable'})"
                          ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{what}: {str(path)!r} holds another kind of key, not an "
                          "Ed25519 one")
    return key


def load_public(path: Path, what: str) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) file."""
    try:
        key = serialization.load_pem_public_key(_read(path, what))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{what}: {str(path)!r} is not a PEM public key "
                          f"({str(exc).splitlines()[0] if str(exc) else 'unreadable'}); "
                          "`bbprobe-collector tickets key --out FILE` writes one") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{what}: {str(path)!r} holds another kind of key, not an "
                          "Ed25519 one")
    return key


def load_or_generate(path: Path, what: str) -> Ed25519PrivateKey:
    """The key at ``path``, generated there first if there is none (see the module
    docstring: atomic, mode 0600, one winner among racing processes)."""
    if not path.exists():
        _generate(path, what)
    return load_private(path, what)


def _generate(path: Path, what: str) -> None:
    try:
        keyfile.create(path)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot create {str(path)!r}: "
                          f"{exc.strerror or exc}") from None


def state_dir(cfg: CollectorConfig, environ: Mapping[str, str]) -> Path:
    """Where generated keys live: the SQLite database's directory (storage.path, filled
    in by config.load; its default when the config was built without load)."""
    return Path(cfg.storage.path or default_database(environ)).parent


def signing_key(credential: str, file: str, directory: Path, filename: str,
                environ: Mapping[str, str], key: str) -> SigningKey:
    """A role's signing key: the credential (under systemd, or when no file is named),
    else the file, else generated as ``directory/filename``. ``key`` is the config
    section, for messages ("tickets")."""
    if credential and (environ.get("CREDENTIALS_DIRECTORY") or not file):
        try:
            path = credentials.path(credential, environ, f"{key}.signing_key_credential")
        except credentials.CredentialError as exc:
            raise ConfigError(str(exc)) from None
        private = load_private(path, f"{key}.signing_key_credential")
        source = f"credential {credential!r}"
    elif file:
        private = load_private(Path(file), f"{key}.signing_key_file")
        source = f"file {file}"
    else:
        path = directory / filename
        private = load_or_generate(path, f"{key} signing key")
        source = f"file {path} (generated)"
    return SigningKey(private, thumbprint(private.public_key()), source)


def ticket_signing_key(cfg: CollectorConfig, environ: Mapping[str, str] = os.environ
                       ) -> SigningKey:
    """The key that signs measurement tickets ([tickets])."""
    t = cfg.tickets
    return signing_key(t.signing_key_credential, t.signing_key_file, state_dir(cfg, environ),
                       TICKET_KEY_FILE, environ, "tickets")


def evidence_signing_key(cfg: CollectorConfig, environ: Mapping[str, str] = os.environ
                         ) -> SigningKey:
    """The collector's evidence key: the credential EVIDENCE_KEY_CREDENTIAL if systemd
    loaded it, else EVIDENCE_KEY_FILE in the state directory (generated at first need)."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    loaded = bool(directory) and (Path(str(directory)) / EVIDENCE_KEY_CREDENTIAL).is_file()
    return signing_key(EVIDENCE_KEY_CREDENTIAL if loaded else "", "", state_dir(cfg, environ),
                       EVIDENCE_KEY_FILE, environ, "evidence")


def trusted_keys(paths: tuple[str, ...]) -> dict[str, Ed25519PublicKey]:
    """tickets.trusted_keys, by kid."""
    found: dict[str, Ed25519PublicKey] = {}
    for i, name in enumerate(paths):
        key = load_public(Path(name), f"tickets.trusted_keys[{i}]")
        found[thumbprint(key)] = key
    return found


# How long an unusable key is left alone before a need tries it again: the operator may
# mend a file or a directory's rights meanwhile, and a stranger's requests must not have
# the collector read (or try to generate) it on each.
RETRY_S = 30.0


class OwnKey:
    """The collector's own signing key (``load``: keys.ticket_signing_key bound to its
    config), held for both of its sides: see the module docstring. ``clock``: monotonic
    seconds."""

    def __init__(self, load: Callable[[], SigningKey], what: str = "tickets",
                 retry_s: float = RETRY_S, clock: Callable[[], float] = time.monotonic,
                 meanwhile: str = "no ticket is issued, and this collector's own are "
                                  "refused") -> None:
        self._load = load
        self.what = what
        self.meanwhile = meanwhile  # what the log says goes without the key
        self.retry_s = retry_s
        self.clock = clock
        self.key: SigningKey | None = None
        self.problem: str | None = None  # why the last attempt failed
        self._tried_at = -float("inf")
        self._loading: asyncio.Task[SigningKey | None] | None = None

    def load_now(self) -> SigningKey:
        """The key, read or made in this thread (the CLI); ConfigError if unusable."""
        if self.key is None:
            self._loaded(self._load())
        assert self.key is not None
        return self.key

    async def get(self) -> SigningKey | None:
        """The key; read or made beside the loop if not yet (one attempt at a time,
        shared by its callers, and none within RETRY_S of a failed one). None while
        it is unusable (``problem`` says why; the log said so once)."""
        if self.key is not None:
            return self.key
        if self._loading is None:
            if self.clock() - self._tried_at < self.retry_s:
                return None
            self._tried_at = self.clock()
            self._loading = asyncio.ensure_future(self._attempt())
        loading = self._loading
        try:
            return await asyncio.shield(loading)
        finally:
            if loading.done() and self._loading is loading:
                self._loading = None

    async def _attempt(self) -> SigningKey | None:
        try:
            key = await asyncio.to_thread(self._load)
        except ConfigError as exc:
            if str(exc) != self.problem:
                log.error("%s: the signing key is unusable (%s; tried again at need, "
                          "every %g s at most): %s", self.what, self.meanwhile,
                          self.retry_s, exc)
            self.problem = str(exc)
            return None
        self._loaded(key)
        return key

    def _loaded(self, key: SigningKey) -> None:
        if self.key is None:
            log.info("%s: signing key %s, kid %s%s", self.what, key.source, key.kid,
                     " (usable again)" if self.problem else "")
        self.key = key
        self.problem = None
