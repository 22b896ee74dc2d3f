"""The probes' public keys (Ed25519, RFC 8032) and their history: which key each probe
signs with, bound by trust on first use (the agent's first ``PUT /api/v1/probe/key``,
with the time and the address it came from) or pinned by an admin (``probe add --key``,
``probe key set``). A row is a key, named by its RFC 7638 thumbprint (``kid``, unique
across every probe: two probes never share a key). At most one key per probe is bound
(``bound_until`` NULL), a partial unique index says so; a replaced key keeps its row
with ``bound_until`` set, and a revoked one its ``revoked_at`` and reason, so results it
signed stay verifiable and a verification that meets it can name it revoked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from collector.storage.model import BindOutcome, KeySource, ProbeKey
from collector.storage.sql.base import SqlBase, Tx

KEY_COLUMNS = ("probe_name", "kid", "jwk", "source", "first_seen_at", "first_seen_address",
               "bound_from", "bound_until", "revoked_at", "revoked_reason")
_SELECT = f"SELECT {', '.join(KEY_COLUMNS)} FROM probe_keys"


class ProbeKeyQueries(SqlBase):
    """The probe_keys table."""

    def bind_probe_key(self, name: str, kid: str, jwk: str, source: KeySource, at: str,
                       address: str | None, *, replace: bool = False
                       ) -> tuple[BindOutcome, ProbeKey | None]:
        def work(tx: Tx) -> tuple[BindOutcome, ProbeKey | None]:
            # The probe's row, locked: one binding of a probe at a time (PostgreSQL;
            # SQLite's write transactions are serial already). The unique indexes hold
            # the rest (one probe's key raced onto another at the same instant fails).
            if tx.one(f"SELECT name FROM probes WHERE name = ? {self.dialect.for_update}",
                      (name,)) is None:
                return "no_probe", None
            held = tx.rows(f"{_SELECT} WHERE probe_name = ? OR kid = ?", (name, kid))
            keys = [_key(r) for r in held]
            current = next((k for k in keys if k.probe_name == name and
                            k.bound_until is None), None)
            if current is not None and current.kid == kid:
                return "known", current
            same = next((k for k in keys if k.kid == kid), None)
            if same is not None:
                return "taken", same
            if not replace:
                if current is not None:
                    return "bound", current
                if keys:
                    return "closed", None
            elif current is not None:
                tx.run("UPDATE probe_keys SET bound_until = ? WHERE kid = ?",
                       (at, current.kid))
            tx.run(f"INSERT INTO probe_keys ({', '.join(KEY_COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(KEY_COLUMNS))})",
                   (name, kid, jwk, source, at, address, at, None, None, None))
            return "enrolled", ProbeKey(name, kid, jwk, source, at, address, at, None, None,
                                        None)

        return self._transaction(work)

    def probe_keys(self, name: str) -> list[ProbeKey]:
        return [_key(r) for r in self._read(
            f"{_SELECT} WHERE probe_name = ? ORDER BY bound_from, kid", (name,))]

    def all_probe_keys(self, limit: int) -> list[ProbeKey]:
        return [_key(r) for r in self._read(
            f"{_SELECT} ORDER BY probe_name, bound_from, kid LIMIT ?", (limit,))]

    def revoke_probe_key(self, name: str, kid: str, at: str, reason: str) -> bool:
        return self._transaction(lambda tx: tx.run(
            "UPDATE probe_keys SET revoked_at = ?, revoked_reason = ?, "
            "bound_until = COALESCE(bound_until, ?) "
            "WHERE probe_name = ? AND kid = ? AND revoked_at IS NULL",
            (at, reason, at, name, kid))) == 1


def _key(row: Sequence[Any]) -> ProbeKey:
    (probe_name, kid, jwk, source, first_seen_at, address, bound_from, bound_until,
     revoked_at, revoked_reason) = row
    return ProbeKey(probe_name, kid, jwk, cast(KeySource, source), first_seen_at, address,
                    bound_from, bound_until, revoked_at, revoked_reason)
