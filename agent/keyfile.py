"""A new Ed25519 private key file, made once: the I/O both the probe's key
(agent/probekey.py) and the collector's keys (collector/keys.py) are generated with.

Atomic and race-safe: the key is written to a temporary file opened with O_EXCL (mode
0600 from the start, whatever the umask), fsynced, and hard-linked to its name, which
fails if the name exists; so processes racing at first start all end with the one key
that won, never a half-written file or two keys. The directory is fsynced so the name
survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def create(path: Path) -> bool:
    """Write a new PKCS#8 PEM Ed25519 key at ``path`` unless one is there or another
    process wins the race; True if this call's key is the one at ``path``. Raises
    OSError (the caller names the role)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    ours = False
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # another process won: its key
            os.link(tmp, path)
            ours = True
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return ours
