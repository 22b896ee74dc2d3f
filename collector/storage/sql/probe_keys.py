"""The probes' public keys (Ed25519, RFC 8032) and their history: which key each probe
signs with, bound by trust on first use (the agent's first ``PUT /api/v1/probe/key``,
with the time and the address it came from), pinned by an admin (``probe add --key``,
``probe key set``) or introduced by a rotation JWS signed with the probe's previous key
(``bbprobe key rotate``, kept in ``rotation_jws``).

A row is a binding: a key (named by its RFC 7638 thumbprint, ``kid``) to a probe. One
key may be bound to several probes (a technician's laptop measuring several lines, one
token each; migration 24 keys the table by (probe_name, kid)). At most one key per probe
is bound now (``bound_until`` NULL), a partial unique index says so; a replaced key
keeps its row with ``bound_until`` set, and a revoked one its ``revoked_at`` and reason,
so results it signed stay verifiable and a verification that meets it can name it
revoked. A key in a probe's history is never bound to it again, and a key revoked on any
probe is never bound again anywhere: whoever leaked it may hold it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from collector.storage.model import BindOutcome, KeySource, ProbeKey, RotateOutcome
from collector.storage.sql.base import SqlBase, Tx

KEY_COLUMNS = ("probe_name", "kid", "jwk", "source", "first_seen_at", "first_seen_address",
               "bound_from", "bound_until", "revoked_at", "revoked_reason", "rotation_jws")
_SELECT = f"SELECT {', '.join(KEY_COLUMNS)} FROM probe_keys"
_INSERT = (f"INSERT INTO probe_keys ({', '.join(KEY_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(KEY_COLUMNS))})")
T = TypeVar("T")


class _Raced(Exception):
    """Another transaction bound a key in the way between our read and our insert."""


class ProbeKeyQueries(SqlBase):
    """The probe_keys table."""

    def bind_probe_key(self, name: str, kid: str, jwk: str, source: KeySource, at: str,
                       address: str | None, *, replace: bool = False
                       ) -> tuple[BindOutcome, ProbeKey | None]:
        def work(tx: Tx) -> tuple[BindOutcome, ProbeKey | None]:
            if not _lock_probe(tx, self.dialect.for_update, name):
                return "no_probe", None
            keys = _held(tx, (name,), (kid,))
            mine = [k for k in keys if k.probe_name == name]
            current = _current(mine)
            if current is not None and current.kid == kid:
                return "known", current
            in_the_way = _in_the_way(keys, name, kid)
            if in_the_way is not None:
                return "taken", in_the_way
            if not replace:
                if current is not None:
                    return "bound", current
                if mine:
                    return "closed", None
            elif current is not None:
                _end(tx, name, current.kid, at)
            key = ProbeKey(name, kid, jwk, source, at, address, at, None, None, None)
            _insert(tx, key)
            return "enrolled", key

        return self._bind_once_more(work)

    def rotate_probe_key(self, name: str, old_kid: str, kid: str, jwk: str, at: str,
                         address: str | None, rotation_jws: str
                         ) -> tuple[RotateOutcome, ProbeKey | None]:
        def work(tx: Tx) -> tuple[RotateOutcome, ProbeKey | None]:
            if not _lock_probe(tx, self.dialect.for_update, name):
                return "no_probe", None
            # The same device's other lines: every probe whose current key is the old
            # one. Whoever holds the old key could sign as each of them already, so its
            # signature is authority enough to move them all (a laptop's tokens on one
            # collector keep agreeing with the laptop).
            others = [str(r[0]) for r in tx.rows(
                "SELECT probe_name FROM probe_keys WHERE kid = ? AND bound_until IS NULL "
                "AND probe_name <> ? ORDER BY probe_name", (old_kid, name))]
            for other in others:  # in name order: two rotations lock in the same order
                _lock_probe(tx, self.dialect.for_update, other)
            keys = _held(tx, (name, *others), (kid,))
            current = _current([k for k in keys if k.probe_name == name])
            if current is not None and current.kid == kid:
                return "known", current  # a retry: the agent crashed before its swap
            if current is None or current.kid != old_kid:
                return "stale", current
            for probe in (name, *others):
                in_the_way = _in_the_way(keys, probe, kid)
                if in_the_way is not None:
                    if probe == name:
                        return "taken", in_the_way
                    continue  # that line keeps its key: an admin decides
                _end(tx, probe, old_kid, at)  # its current key: the old one, locked
                _insert(tx, ProbeKey(probe, kid, jwk, "rotation", at, address, at, None,
                                     None, None, rotation_jws))
            return "rotated", ProbeKey(name, kid, jwk, "rotation", at, address, at, None,
                                       None, None, rotation_jws)

        return self._bind_once_more(work)

    def _bind_once_more(self, work: Callable[[Tx], T]) -> T:
        """``work`` in a transaction, once more if a concurrent binding won the race to
        an index (two first contacts of one probe at the same instant, on PostgreSQL's
        READ COMMITTED): the second run reads the winner's row and answers "known",
        "bound" or "taken", never an error."""
        def guarded(tx: Tx) -> T:
            try:
                return work(tx)
            except self.dialect.integrity_errors:
                raise _Raced() from None

        try:
            return self._transaction(guarded)
        except _Raced:
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


def _lock_probe(tx: Tx, for_update: str, name: str) -> bool:
    """Lock the probe's row (PostgreSQL; SQLite's write transactions are serial): one
    binding of a probe at a time. False: no such probe."""
    return tx.one(f"SELECT name FROM probes WHERE name = ? {for_update}", (name,)) \
        is not None


def _held(tx: Tx, probes: Sequence[str], kids: Sequence[str]) -> list[ProbeKey]:
    """The bindings of these probes and of these keys, anywhere."""
    marks = ", ".join("?" * len(probes))
    kid_marks = ", ".join("?" * len(kids))
    return [_key(r) for r in tx.rows(
        f"{_SELECT} WHERE probe_name IN ({marks}) OR kid IN ({kid_marks})",
        (*probes, *kids))]


def _current(keys: Sequence[ProbeKey]) -> ProbeKey | None:
    return next((k for k in keys if k.bound_until is None), None)


def _in_the_way(keys: Sequence[ProbeKey], name: str, kid: str) -> ProbeKey | None:
    """What forbids binding ``kid`` to ``name`` anew: the key in this probe's history
    (past or revoked), or revoked on another probe. Held now by another probe is no bar."""
    return next((k for k in keys if k.kid == kid and k.probe_name == name), None) or \
        next((k for k in keys if k.kid == kid and k.revoked_at is not None), None)


def _end(tx: Tx, name: str, kid: str, at: str) -> None:
    tx.run("UPDATE probe_keys SET bound_until = ? WHERE probe_name = ? AND kid = ? "
           "AND bound_until IS NULL", (at, name, kid))


def _insert(tx: Tx, key: ProbeKey) -> None:
    tx.run(_INSERT, (key.probe_name, key.kid, key.jwk, key.source, key.first_seen_at,
                     key.first_seen_address, key.bound_from, key.bound_until,
                     key.revoked_at, key.revoked_reason, key.rotation_jws))


def _key(row: Sequence[Any]) -> ProbeKey:
    (probe_name, kid, jwk, source, first_seen_at, address, bound_from, bound_until,
     revoked_at, revoked_reason, rotation_jws) = row
    return ProbeKey(probe_name, kid, jwk, cast(KeySource, source), first_seen_at, address,
                    bound_from, bound_until, revoked_at, revoked_reason, rotation_jws)
