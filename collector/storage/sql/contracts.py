"""Each line's contract history (collector/lines.py ``ContractVersion``): the versions of a
probe's line metadata, numbered from 1, each with from when it applies, who changed it and
when. Appended, never changed: a correction is a new version (``retroactive``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from agent.schema import parse_utc
from collector.errors import NotFound, Unacceptable
from collector.lines import ContractVersion, LineMetadata
from collector.storage.sql.base import SqlBase, Tx

LINE_COLUMNS = tuple(f.name for f in fields(LineMetadata))

CONTRACT_COLUMNS = ("probe_name", "version", "valid_from", "changed_at", "changed_by",
                    "retroactive", *LINE_COLUMNS)


def add_version(tx: Tx, name: str, valid_from: str | None, changed_at: str, changed_by: str,
                line: LineMetadata, retroactive: bool = False) -> int:
    """Append the next version of ``name``'s contract inside ``tx``; its number."""
    row = tx.one("SELECT MAX(version) FROM line_contracts WHERE probe_name = ?", (name,))
    version = int(row[0] or 0) + 1 if row else 1
    tx.run(f"INSERT INTO line_contracts ({', '.join(CONTRACT_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(CONTRACT_COLUMNS))})",
           [name, version, valid_from, changed_at, changed_by, int(retroactive),
            *(getattr(line, c) for c in LINE_COLUMNS)])
    return version


class ContractQueries(SqlBase):
    """The line_contracts table."""

    def line_contracts(self, name: str) -> list[ContractVersion]:
        """Every version of probe ``name``'s contract, oldest first (empty: no such
        probe)."""
        return [_version(r) for r in self._read(
            f"SELECT {', '.join(CONTRACT_COLUMNS[1:])} FROM line_contracts "
            "WHERE probe_name = ? ORDER BY version", (name,))]

    def change_contract(self, name: str, changes: Mapping[str, Any], valid_from: str,
                        changed_at: str, changed_by: str) -> ContractVersion:
        """Change some of ``name``'s line metadata and append the new version valid from
        ``valid_from``, at once. Refused (Unacceptable) from before the version in force
        last began: history is appended, never reordered. NotFound: no such probe."""
        unknown = set(changes) - set(LINE_COLUMNS)
        if unknown:
            raise ValueError(f"not line metadata: {sorted(unknown)}")

        def work(tx: Tx) -> ContractVersion:
            row = tx.one(f"SELECT {', '.join(LINE_COLUMNS)} FROM probes WHERE name = ? "
                         f"{self.dialect.for_update}", (name,))
            if row is None:
                raise NotFound(f"no probe named {name!r}", "probe_id")
            last = tx.one("SELECT valid_from FROM line_contracts WHERE probe_name = ? "
                          "ORDER BY version DESC LIMIT 1", (name,))
            if last is not None and last[0] is not None and _after(last[0], valid_from):
                raise Unacceptable(
                    f"from: {valid_from} is before {last[0]}, when the latest version of "
                    f"{name!r}'s contract began (history is appended, never reordered: "
                    "`probe contract history` lists it)", "from")
            line = LineMetadata(*row)
            merged = LineMetadata(**{**{c: getattr(line, c) for c in LINE_COLUMNS},
                                     **changes})
            names = sorted(changes)
            if names:
                tx.run(f"UPDATE probes SET {', '.join(f'{n} = ?' for n in names)} "
                       "WHERE name = ?", [*(changes[n] for n in names), name])
            retroactive = _after(changed_at, valid_from)
            version = add_version(tx, name, valid_from, changed_at, changed_by, merged,
                                  retroactive)
            return ContractVersion(version, valid_from, changed_at, changed_by, merged,
                                   retroactive)

        return self._transaction(work)


def _after(a: str, b: str) -> bool:
    return parse_utc(a) > parse_utc(b)


def _version(row: Sequence[Any]) -> ContractVersion:
    version, valid_from, changed_at, changed_by, retroactive, *line = row
    return ContractVersion(int(version), valid_from, changed_at, changed_by,
                           LineMetadata(*line), bool(retroactive))
