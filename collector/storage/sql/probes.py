"""Probes and tokens: who may deliver results (a probe, by its token's digest) and who
may read or administer (analyst and admin tokens), with each probe's line metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from collector.errors import AlreadyExists
from collector.lines import LineMetadata
from collector.storage.model import Probe
from collector.storage.sql.base import SqlBase, Tx
from collector.storage.sql.contracts import add_version

LINE_COLUMNS = tuple(f.name for f in fields(LineMetadata))
PROBE_COLUMNS = ("name", "created_at", "revoked_at", "rotated_at", *LINE_COLUMNS)


class ProbeQueries(SqlBase):
    """The probes and tokens tables."""

    def add_probe(self, name: str, token_sha256: str, created_at: str,
                  line: LineMetadata, changed_by: str = "unknown") -> None:
        """Register a probe; its line metadata is version 1 of its contract, valid from
        ``created_at`` (``changed_by``: who registered it)."""
        values = [getattr(line, c) for c in LINE_COLUMNS]

        def work(tx: Tx) -> None:
            try:
                tx.run(f"INSERT INTO probes (name, token_sha256, created_at, "
                       f"{', '.join(LINE_COLUMNS)}) "
                       f"VALUES (?, ?, ?, {', '.join('?' * len(LINE_COLUMNS))})",
                       [name, token_sha256, created_at, *values])
            except self.dialect.integrity_errors:
                # Revoked or not: a name is a line's history. A new token for it is
                # a rotation, never a second registration.
                raise AlreadyExists(f"a probe named {name!r} already exists (a new token "
                                    f"for it: `probe rotate {name}`)", "probe_id") from None
            add_version(tx, name, created_at, created_at, changed_by, line)

        self._transaction(work)

    def revoke_probe(self, name: str, revoked_at: str) -> bool:
        return self._revoke("probes", name, revoked_at)

    def rotate_probe(self, name: str, token_sha256: str,
                     rotated_at: str) -> tuple[bool, str | None]:
        """Give probe ``name`` a new token digest, in one statement with the old one's
        end: the old token is refused from the next request, and a client certificate
        issued before ``rotated_at``. A revoked probe is live again under the new
        token. (found, revoked_at before the change)."""
        def work(tx: Tx) -> tuple[bool, str | None]:
            row = tx.one(f"SELECT revoked_at FROM probes WHERE name = ? "
                         f"{self.dialect.for_update}", (name,))
            if row is None:
                return False, None
            tx.run("UPDATE probes SET token_sha256 = ?, revoked_at = NULL, rotated_at = ? "
                   "WHERE name = ?", (token_sha256, rotated_at, name))
            return True, row[0]

        return self._transaction(work)

    def update_line(self, name: str, changes: Mapping[str, Any]) -> bool:
        """Change some of a probe's line metadata (the offer changed); False if there is
        no such probe."""
        unknown = set(changes) - set(LINE_COLUMNS)
        if unknown:
            raise ValueError(f"not line metadata: {sorted(unknown)}")
        if not changes:
            return self.probe(name) is not None
        names = sorted(changes)
        return self._transaction(lambda tx: tx.run(
            f"UPDATE probes SET {', '.join(f'{n} = ?' for n in names)} WHERE name = ?",
            [*(changes[n] for n in names), name])) == 1

    def _revoke(self, table: str, name: str, revoked_at: str) -> bool:
        """Revoke a live probe or token; False when there is none of that name."""
        return self._transaction(lambda tx: tx.run(
            f"UPDATE {table} SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
            (revoked_at, name))) == 1

    def add_token(self, name: str, role: str, token_sha256: str, created_at: str) -> None:
        def work(tx: Tx) -> None:
            try:
                tx.run("INSERT INTO tokens (name, role, token_sha256, created_at, revoked_at) "
                       "VALUES (?, ?, ?, ?, NULL)", (name, role, token_sha256, created_at))
            except self.dialect.integrity_errors:
                raise AlreadyExists(f"a token named {name!r} already exists", "name") from None

        self._transaction(work)

    def revoke_token(self, name: str, revoked_at: str) -> bool:
        return self._revoke("tokens", name, revoked_at)

    def tokens(self) -> list[dict[str, Any]]:
        keys = ("name", "role", "created_at", "revoked_at")
        return [dict(zip(keys, r, strict=True)) for r in self._read(
            "SELECT name, role, created_at, revoked_at FROM tokens ORDER BY name")]

    def role_for_token(self, token_sha256: str) -> tuple[str, str] | None:
        """(role, name) of a live analyst/admin token, or ("probe", name) of a probe's."""
        with self._reading() as tx:
            row = tx.one("SELECT role, name FROM tokens WHERE token_sha256 = ? AND "
                         "revoked_at IS NULL", (token_sha256,))
        if row is not None:
            return str(row[0]), str(row[1])
        probe = self.probe_for_token(token_sha256)
        return ("probe", probe.name) if probe is not None else None

    def probe_for_token(self, token_sha256: str) -> Probe | None:
        rows = self._read(f"SELECT {', '.join(PROBE_COLUMNS)} FROM probes "
                          "WHERE token_sha256 = ? AND revoked_at IS NULL", (token_sha256,))
        return _probe(rows[0]) if rows else None

    def probe(self, name: str) -> Probe | None:
        rows = self._read(f"SELECT {', '.join(PROBE_COLUMNS)} FROM probes WHERE name = ?",
                          (name,))
        return _probe(rows[0]) if rows else None

    def probes(self) -> list[Probe]:
        return [_probe(r) for r in self._read(
            f"SELECT {', '.join(PROBE_COLUMNS)} FROM probes ORDER BY name")]


def _probe(row: Sequence[Any]) -> Probe:
    name, created_at, revoked_at, rotated_at, *line = row
    return Probe(name=name, created_at=created_at, revoked_at=revoked_at,
                 line=LineMetadata(*line), rotated_at=rotated_at)
