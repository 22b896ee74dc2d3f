"""The canonical JSON of a result: the bytes a probe signs and the collector hashes.

orjson's serialisation of the validated dataclass tree: fields in the schema's
declaration order (a field a later version added is left out while it holds its default,
as ``agent.schema.to_dict`` does), no spaces, floats in their shortest round-trip form,
non-ASCII as UTF-8. The collector's ``body_sha256`` is the SHA-256 of these bytes, and
its packed form gives them back byte for byte (collector/storage/codec.py), so a probe
that signs them lets the collector keep the signed bytes exactly without storing them
twice: the stored body *is* the payload (issue 27).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import orjson

from agent.schema import GapRecord, SessionResult

_FIELDS = tuple(f.name for f in dataclasses.fields(SessionResult))
# Fields a later schema version added: left out while they hold their default, so an
# older document keeps its form (agent/schema.py ``to_dict``).
_ADDED = tuple((f.name, f.default) for f in dataclasses.fields(SessionResult)
               if "added" in f.metadata)
_GAP_FIELDS = tuple(f.name for f in dataclasses.fields(GapRecord))
_GAP_ADDED = tuple((f.name, f.default) for f in dataclasses.fields(GapRecord)
                   if "added" in f.metadata)


def document(result: SessionResult) -> dict[str, Any]:
    """The top level as a dict (orjson writes the nested dataclasses itself)."""
    return _top(result, _FIELDS, _ADDED)


def _top(obj: Any, names: tuple[str, ...], added: tuple[tuple[str, Any], ...]
         ) -> dict[str, Any]:
    doc = {name: getattr(obj, name) for name in names}
    for name, default in added:
        if doc[name] == default:
            del doc[name]
    return doc


def canonical(result: SessionResult) -> bytes:
    """The canonical JSON of a validated result."""
    return orjson.dumps(document(result))


def canonical_gap(gap: GapRecord) -> bytes:
    """The canonical JSON of a validated gap record, by the same rules: the bytes a
    probe signs for it (agent/evidence.py ``sign_gap``) and the collector keeps."""
    return orjson.dumps(_top(gap, _GAP_FIELDS, _GAP_ADDED))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
