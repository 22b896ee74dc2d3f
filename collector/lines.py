"""Line vocabulary shared by the service, the fleet selectors, compliance and the storage
(pure): what is known of the line a probe sits on, and how its access technology is spelt.

Delibera 156/23/CONS brought fixed-wireless access (FWA) into scope beside the wired
accesses: a line's technology is one of ``TECHNOLOGIES``, spelt as here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from agent.schema import parse_utc

TECHNOLOGIES = ("ADSL", "VDSL", "FTTC", "FTTB", "FTTH", "FWA", "cable", "satellite",
                "other")


def canonical_technology(text: str) -> str | None:
    """The canonical spelling of a known access technology, in any case; None if
    ``text`` is none of them."""
    wanted = text.strip().lower()
    return next((t for t in TECHNOLOGIES if t.lower() == wanted), None)


@dataclass(frozen=True, slots=True)
class LineMetadata:
    """What an analyst knows about the line a probe sits on (the contract's figures)."""

    operator: str | None = None
    offer: str | None = None
    region: str | None = None
    technology: str | None = None
    download_nominal_kbps: float | None = None
    download_min_kbps: float | None = None
    upload_nominal_kbps: float | None = None
    upload_min_kbps: float | None = None
    max_delay_ms: float | None = None
    max_loss_ratio: float | None = None
    # The offer's "normally available" speeds (delibera 156/23/CONS: every offer declares
    # minimum, normally available and maximum speeds; *_nominal_kbps is the maximum).
    download_normal_kbps: float | None = None
    upload_normal_kbps: float | None = None


# The figures a certificate judges (the rest of a contract is shown, never judged).
JUDGED_FIELDS = ("download_min_kbps", "upload_min_kbps", "max_delay_ms", "max_loss_ratio")


@dataclass(frozen=True, slots=True)
class ContractVersion:
    """One version of a line's contract: its figures, from when they apply (``valid_from``,
    UTC text; None: since the beginning, a line whose start is unknown), and who changed
    it and when. ``retroactive``: applied from before it was made (an explicit correction,
    ``probe set --from`` in the past)."""

    version: int
    valid_from: str | None
    changed_at: str
    changed_by: str
    line: LineMetadata
    retroactive: bool = False


def contract_at(history: Sequence[ContractVersion],
                when: str) -> tuple[int, LineMetadata] | None:
    """(version, figures) of the contract in force at ``when`` (a session's start, UTC
    text): of the versions valid from ``when`` or before, the one valid from the latest
    instant (a later version valid from the same instant replaces an earlier one). None
    if none was in force yet (a session before the line's first contract). Pure."""
    moment = parse_utc(when)
    best: ContractVersion | None = None
    best_from: datetime | None = None
    for v in history:
        start = parse_utc(v.valid_from) if v.valid_from else None
        if start is not None and start > moment:
            continue
        if best is None or _later(start, best_from) or (
                start == best_from and v.version > best.version):
            best, best_from = v, start
    return None if best is None else (best.version, best.line)


def contract_for(history: Sequence[ContractVersion],
                 when: str) -> tuple[int, LineMetadata] | None:
    """The contract a session started at ``when`` is judged by: the one in force then;
    for a session from before the line's first version (a probe's clock set back,
    results older than its registration), the one in force at the history's first
    instant, which is the latest version valid from that instant (a correction made
    "from registration on" replaces the first figures), never merely the lowest number.
    None without a history. Pure."""
    found = contract_at(history, when)
    if found is not None or not history:
        return found
    starts = [v.valid_from for v in history if v.valid_from]
    return contract_at(history, min(starts, key=parse_utc)) if starts else None


def _later(a: datetime | None, b: datetime | None) -> bool:
    """``a`` after ``b``, None being the beginning of time."""
    if a is None:
        return False
    return b is None or a > b


# --- as JSON data (evidence bundles carry the contract a certificate was judged by) ------

LINE_FIELDS = tuple(LineMetadata.__dataclass_fields__)
_LINE_TEXT = ("operator", "offer", "region", "technology")
# A contract figure in kbit/s, ms or a ratio: anything past this is no line's (and a
# number a reader would choke on).
MAX_FIGURE = 1e12
MAX_LINE_TEXT = 200


def line_to_dict(line: LineMetadata) -> dict[str, str | float | None]:
    """The line's metadata as JSON data, every field present (None when unknown)."""
    return {name: getattr(line, name) for name in LINE_FIELDS}


def line_from_dict(data: object, where: str = "line") -> LineMetadata:
    """``line_to_dict``'s inverse, strict: exactly its fields, text or null for the
    names, a finite number in [0, MAX_FIGURE] or null for the figures. ValueError with a
    one-line reason naming the field otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, not {type(data).__name__}")
    unknown = sorted(str(k)[:40] for k in data if k not in LINE_FIELDS)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: not a line field")
    missing = [name for name in LINE_FIELDS if name not in data]
    if missing:
        raise ValueError(f"{where}.{missing[0]}: missing")
    values: dict[str, str | float | None] = {}
    for name in LINE_FIELDS:
        value = data[name]
        if value is None:
            values[name] = None
        elif name in _LINE_TEXT:
            if not isinstance(value, str) or len(value) > MAX_LINE_TEXT:
                raise ValueError(f"{where}.{name}: expected text of at most "
                                 f"{MAX_LINE_TEXT} characters or null")
            values[name] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    0 <= value <= MAX_FIGURE):  # NaN fails the comparison too
                raise ValueError(f"{where}.{name}: expected a number in [0, "
                                 f"{MAX_FIGURE:g}] or null")
            values[name] = float(value)
    return LineMetadata(**values)  # type: ignore[arg-type]


def contract_to_dict(version: ContractVersion) -> dict[str, object]:
    return {"version": version.version, "valid_from": version.valid_from,
            "changed_at": version.changed_at, "changed_by": version.changed_by,
            "line": line_to_dict(version.line), "retroactive": version.retroactive}


_CONTRACT_FIELDS = ("version", "valid_from", "changed_at", "changed_by", "line",
                    "retroactive")


def contract_from_dict(data: object, where: str = "contract") -> ContractVersion:
    """``contract_to_dict``'s inverse, strict (times are UTC text), ValueError naming the
    field."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, not {type(data).__name__}")
    unknown = sorted(str(k)[:40] for k in data if k not in _CONTRACT_FIELDS)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: not a contract field")
    missing = [name for name in _CONTRACT_FIELDS if name not in data]
    if missing:
        raise ValueError(f"{where}.{missing[0]}: missing")
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int) or not (
            0 <= version <= 2**31):
        raise ValueError(f"{where}.version: expected an integer in [0, 2^31]")
    for name, nullable in (("valid_from", True), ("changed_at", False)):
        value = data[name]
        if value is None and nullable:
            continue
        if not isinstance(value, str) or len(value) > 40:
            raise ValueError(f"{where}.{name}: expected UTC text"
                             + (" or null" if nullable else ""))
        try:
            parse_utc(value)
        except ValueError:
            raise ValueError(f"{where}.{name}: not a UTC time ({value[:40]!r})") from None
    changed_by = data["changed_by"]
    if not isinstance(changed_by, str) or len(changed_by) > MAX_LINE_TEXT:
        raise ValueError(f"{where}.changed_by: expected text of at most "
                         f"{MAX_LINE_TEXT} characters")
    if not isinstance(data["retroactive"], bool):
        raise ValueError(f"{where}.retroactive: expected true or false")
    return ContractVersion(version, data["valid_from"], data["changed_at"], changed_by,
                           line_from_dict(data["line"], f"{where}.line"),
                           data["retroactive"])
