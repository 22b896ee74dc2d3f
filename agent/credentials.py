"""Secrets handed over by systemd as credentials (``LoadCredential=NAME:PATH``).

systemd copies each credential into a private, read-only directory that only the unit's
(dynamic) user can read, and names that directory in ``$CREDENTIALS_DIRECTORY``
(systemd.exec(5), "Credentials"). A config key names the credential; outside systemd the
same secret comes from a plain file path instead. One edge function per question, no
state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from agent.errors import AgentError

# systemd accepts any file name as a credential ID; we keep to a safe subset so a
# config value can never climb out of the credentials directory.
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class CredentialError(AgentError):
    """A named credential is missing or unreadable; the message names the config key."""


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a credential name, or None (for config validation)."""
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        return "must be a credential name (letters, digits, '.', '_', '-')"
    return None


def path(name: str, environ: Mapping[str, str], key: str) -> Path:
    """Where credential ``name`` is, for the config key ``key`` that names it."""
    if (problem := name_problem(name)) is not None:
        raise CredentialError(f"{key}: {problem}")
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise CredentialError(
            f"{key}: credential {name!r} asked for, but $CREDENTIALS_DIRECTORY is not set "
            f"(it is set by systemd's LoadCredential=; outside systemd use a file path)")
    found = Path(directory) / name
    try:
        present = found.is_file()
    except OSError as exc:
        raise CredentialError(f"{key}: cannot look in {directory}: {exc.strerror}") from None
    if not present:
        raise CredentialError(f"{key}: no credential {name!r} in {directory} (is "
                              f"LoadCredential={name}:… in the unit?)")
    return found


def read(name: str, environ: Mapping[str, str], key: str) -> str:
    """The credential's text, stripped; an empty one is an error."""
    where = path(name, environ, key)
    try:
        value = where.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialError(f"{key}: cannot read credential {name!r}: {exc}") from None
    if not value:
        raise CredentialError(f"{key}: credential {name!r} is empty")
    return value
