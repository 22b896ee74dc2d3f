"""Reading JSON documents into the schema's records (agent/schema.py), strictly.

``decode(cls, data)`` builds dataclass ``cls`` and checks every field on the way:
unknown fields, missing fields, wrong types, non-finite numbers, values outside the
field's bounds (else its unit's physical limit, schema.physical_bounds) and text not in
the field's format raise ``SchemaError`` naming the field path, e.g.
``ping.samples[3].rtt_ms: must be >= 0, got -1``. ``parse_result``, ``parse_health`` and
``parse_gap`` add each document's own rules (its version range, cross-field checks): they
are what the collector runs at its door, and the judge its fast path (collector/decode.py)
is held to. Standard library only, like the schema, so the collector imports it cheaply.
"""

from __future__ import annotations

import dataclasses
import math
import types
import uuid
from collections.abc import Iterable
from functools import cache
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from agent.errors import AgentError
from agent.schema import (
    INSTRUCTION_VERSION_RE,
    LABEL_MAX_CHARS,
    MAX_SEQ_RANGES,
    PROBE_ID_RE,
    REASON_CODE_RE,
    SAMPLE_T_LIMIT_S,
    SCHEMA_VERSION,
    GapRecord,
    HealthReport,
    SessionResult,
    acting_char,
    parse_utc,
    physical_bounds,
)

T = TypeVar("T")


class SchemaError(AgentError, ValueError):
    """A document does not match the schema; ``path`` names the offending field. A
    ValueError too: callers that read untrusted data catch it with the standard library's
    parse errors."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def decode(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from JSON data, checking every field; raises ``SchemaError``."""
    value: T = _decode_value(cls, data, path, {})
    return value


def parse_result(data: Any) -> SessionResult:
    """Validate a decoded JSON document as a ``SessionResult``; raises ``SchemaError``."""
    if not isinstance(data, dict):
        raise SchemaError("", f"expected a JSON object, got {_json_type(data)}")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaError("schema_version", "missing or not an integer")
    if version > SCHEMA_VERSION:
        raise SchemaError(
            "schema_version",
            f"version {version} is newer than this collector supports ({SCHEMA_VERSION}); "
            "upgrade the collector",
        )
    if version < 1:
        raise SchemaError("schema_version", f"must be >= 1, got {version}")
    result = decode(SessionResult, data)
    if parse_utc(result.ended_at) < parse_utc(result.started_at):
        raise SchemaError("ended_at", "is earlier than started_at")
    if result.validity is not None and result.validity.valid == bool(result.validity.reasons):
        raise SchemaError("validity.reasons", "an invalid session needs at least one reason, "
                          "a valid one none")
    return result


def parse_health(data: Any) -> HealthReport:
    """Validate a health report; raises ``SchemaError`` naming the field."""
    report = decode(HealthReport, data)
    if not 5 <= report.schema_version <= SCHEMA_VERSION:
        raise SchemaError("schema_version", f"health reports are version 5 to "
                          f"{SCHEMA_VERSION}, got {report.schema_version}")
    for name in ("instruction_error", "last_error"):
        if len(getattr(report, name) or "") > 500:
            raise SchemaError(name, "longer than 500 characters")
    if len(report.failing_checks) > 50:
        raise SchemaError("failing_checks", "at most 50 codes")
    if len(report.agent_version) > 64:
        raise SchemaError("agent_version", "longer than 64 characters")
    return report


def parse_gap(data: Any) -> GapRecord:
    """Validate a decoded JSON document as a ``GapRecord``; raises ``SchemaError``."""
    if not isinstance(data, dict):
        raise SchemaError("", f"expected a JSON object, got {_json_type(data)}")
    gap = decode(GapRecord, data)
    if gap.schema_version > SCHEMA_VERSION or gap.schema_version < 3:
        raise SchemaError("schema_version", f"gap records are version 3 to {SCHEMA_VERSION}, "
                          f"got {gap.schema_version}")
    if len(gap.dropped_seq_ranges) > MAX_SEQ_RANGES:
        raise SchemaError("dropped_seq_ranges", f"at most {MAX_SEQ_RANGES} ranges")
    for i, (first, last) in enumerate(gap.dropped_seq_ranges):
        if not 1 <= first <= last:
            raise SchemaError(f"dropped_seq_ranges[{i}]", f"expected 1 <= first <= last, "
                                                          f"got [{first}, {last}]")
    return gap


@cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of dataclass ``cls``, worked out once per class."""
    return get_type_hints(cls)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (tuple, list):
        return "an array"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}.get(
        tp, str(tp)
    )


# A (t_s, bytes) sample: seconds since the test began, bytes so far; and the bounds of
# each of its two numbers.
SAMPLE = tuple[float, int]
_SAMPLES = tuple[SAMPLE, ...]
SAMPLE_BOUNDS = ({"ge": -SAMPLE_T_LIMIT_S, "le": SAMPLE_T_LIMIT_S}, {"ge": 0, "le": 1e15})


def _samples(value: list[Any]) -> tuple[SAMPLE, ...] | None:
    """Well-formed (t_s, bytes) samples as tuples, or None for the general path to say
    what is wrong. Checked in one tight loop: a body holds thousands of them."""
    out: list[SAMPLE] = []
    append = out.append
    limit = SAMPLE_T_LIMIT_S
    for item in value:
        if type(item) is not list or len(item) != 2:
            return None
        t, b = item
        kind = type(t)
        # A comparison is False for NaN; a huge int is refused before float() sees it.
        if (kind is not float and kind is not int) or not -limit <= t <= limit \
                or type(b) is not int or not 0 <= b <= 10**15:
            return None
        append((float(t), b))
    return tuple(out)


def _decode_value(tp: Any, value: Any, path: str, meta: dict[str, Any]) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise SchemaError(path, f"expected {_type_name(tp)}, got null")
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:
            try:
                return _decode_value(options[0], value, path, meta)
            except SchemaError as exc:
                if exc.path == path and exc.message.startswith("expected "):
                    raise SchemaError(path, f"expected {_type_name(tp)}, "
                                      f"got {_json_type(value)}") from None
                raise
        raise TypeError(f"unsupported union {tp}")  # pragma: no cover - schema bug
    if origin is Literal:
        if value not in get_args(tp) or isinstance(value, bool):
            raise SchemaError(path, f"must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if type(value) is list and tp == _SAMPLES:
            fast = _samples(value)
            if fast is not None:
                return fast  # else the general path below says what is wrong
        if not isinstance(value, list):
            raise SchemaError(path, f"expected an array, got {_json_type(value)}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            # An array's numbers are in the field's unit: its bounds hold for each.
            return tuple(
                _decode_value(args[0], item, f"{path}[{i}]", meta)
                for i, item in enumerate(value)
            )
        if len(value) != len(args):
            raise SchemaError(path, f"expected an array of {len(args)} items, got {len(value)}")
        metas = SAMPLE_BOUNDS if tp == SAMPLE else [physical_bounds("", {})] * len(args)
        return tuple(
            _decode_value(arg, item, f"{path}[{i}]", item_meta)
            for i, (arg, item, item_meta) in enumerate(zip(args, value, metas, strict=True))
        )
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(path, f"expected a boolean, got {_json_type(value)}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(path, f"expected an integer, got {_json_type(value)}")
        _check_bounds(value, path, meta)
        return value
    if tp is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise SchemaError(path, f"expected a number, got {_json_type(value)}")
        if isinstance(value, int):
            # Bounds first: math.isfinite(10**400) raises OverflowError (a 500).
            _check_bounds(value, path, meta)
        if not math.isfinite(value):
            raise SchemaError(path, f"must be a finite number, got {value!r}")
        _check_bounds(value, path, meta)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(path, f"expected a string, got {_json_type(value)}")
        if not value.isascii():
            check_unicode(value, path)
        check_format(value, path, meta.get("format"))
        return value
    raise TypeError(f"unsupported type {tp!r} at {path}")  # pragma: no cover - schema bug


_Step = tuple[str, Any, Any, Any, dict[str, Any]]


@cache
def _plan(cls: type) -> tuple[frozenset[str], tuple[_Step, ...]]:
    """A dataclass's field names, and per field: name, type, default, default factory
    (MISSING when none) and bounds, worked out once per class."""
    hints = field_types(cls)
    steps = tuple((spec.name, hints[spec.name], spec.default, spec.default_factory,
                   physical_bounds(spec.name, dict(spec.metadata)))
                  for spec in dataclasses.fields(cls))
    return frozenset(step[0] for step in steps), steps


def _decode_dataclass(cls: Any, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise SchemaError(path, f"expected an object, got {_json_type(value)}")
    names, steps = _plan(cls)
    for key in value:
        if key not in names:
            raise SchemaError(_join(path, str(key)), "unknown field")
    kwargs: dict[str, Any] = {}
    for name, hint, default, factory, meta in steps:
        if name not in value:
            if default is not dataclasses.MISSING:
                kwargs[name] = default
            elif factory is not dataclasses.MISSING:
                kwargs[name] = factory()
            else:
                raise SchemaError(_join(path, name), "missing required field")
            continue
        kwargs[name] = _decode_value(hint, value[name], _join(path, name), meta)
    return cls(**kwargs)


def _check_bounds(value: float, path: str, meta: dict[str, Any]) -> None:
    if meta.get("ge") is not None and value < meta["ge"]:
        raise SchemaError(path, f"must be >= {meta['ge']:g}, got {_shown(value)}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise SchemaError(path, f"must be > {meta['gt']:g}, got {_shown(value)}")
    if meta.get("le") is not None and value > meta["le"]:
        raise SchemaError(path, f"must be <= {meta['le']:g}, got {_shown(value)}")


def _shown(value: float) -> str:
    """A number for a message: a 400-digit one is cut, not copied whole."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} digits)"


def encodes(text: str) -> bool:
    """Whether ``text`` is valid Unicode, i.e. holds no lone surrogate (UTF-8 encodes it)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_unicode(value: str, path: str) -> None:
    """Text that is valid Unicode: the standard library's JSON reader turns an escaped
    lone surrogate (``"\\ud800"``) into a str that no UTF-8 writer can encode, so one
    stored in a health report made every reader of the fleet fail. Refused at the door,
    naming the field."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as bad:
        raise SchemaError(path, f"is not valid Unicode text: a lone surrogate "
                          f"U+{ord(value[bad.start]):04X} at character {bad.start}") from None


def check_format(value: str, path: str, fmt: str | None) -> None:
    if fmt == "label":
        if len(value) > LABEL_MAX_CHARS or acting_char(value) is not None:
            raise SchemaError(path, f"must be at most {LABEL_MAX_CHARS} characters without "
                              f"control characters, got {value[:40]!a}")
    elif fmt == "utc":
        try:
            parse_utc(value)
        except ValueError:
            raise SchemaError(
                path, f"must be an ISO 8601 timestamp with a UTC offset, got {value!r}"
            ) from None
    elif fmt == "uuid":
        try:
            uuid.UUID(value)
        except ValueError:
            raise SchemaError(path, f"must be a UUID, got {value!r}") from None
    elif fmt == "probe_id" and not PROBE_ID_RE.fullmatch(value):
        raise SchemaError(
            path, f"must be 1-64 characters of letters, digits, '.', '_', '-', got {value!r}"
        )
    elif fmt == "reason_code" and not REASON_CODE_RE.fullmatch(value):
        raise SchemaError(path, f"must be 1-40 lowercase letters, digits or '_', starting "
                          f"with a letter, got {value!r}")
    elif fmt == "instruction_version" and not INSTRUCTION_VERSION_RE.fullmatch(value):
        raise SchemaError(path, f"must be 16 lowercase hex digits, got {value[:40]!r}")


@cache
def _time_plan(cls: type) -> tuple[tuple[str, str], ...]:
    """Per field of ``cls``: ("utc", name) for a timestamp, ("one", name) for a nested
    object, ("many", name) for an array of objects; other fields are not visited (a
    transfer's thousands of samples are numbers)."""
    hints = field_types(cls)
    plan: list[tuple[str, str]] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in get_args(tp) if a is not type(None)] \
            if get_origin(tp) in (Union, types.UnionType) else [tp]
        if f.metadata.get("format") == "utc":
            plan.append(("utc", f.name))
        elif dataclasses.is_dataclass(inner[0]):
            plan.append(("one", f.name))
        elif get_origin(inner[0]) is tuple and get_args(inner[0])[1:] == (Ellipsis,) \
                and dataclasses.is_dataclass(get_args(inner[0])[0]):
            plan.append(("many", f.name))
    return tuple(plan)


def timestamps(obj: Any, path: str = "") -> Iterable[tuple[str, str]]:
    """(field path, text) of every timestamp in a decoded document, nested ones too,
    so a reader of the document can bound each (collector/intake/ingest.py)."""
    kind_of: type = type(obj)
    for kind, name in _time_plan(kind_of):
        value = getattr(obj, name)
        where = _join(path, name)
        if value is None:
            continue
        if kind == "utc":
            yield where, value
        elif kind == "one":
            yield from timestamps(value, where)
        else:
            for i, item in enumerate(value):
                yield from timestamps(item, f"{where}[{i}]")
