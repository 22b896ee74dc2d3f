"""Bounded, type-checked reading of JSON fields (pure): the field checkers of the
evidence payload reader (payload.py) and of the bundle members built on it.

A bundle is hostile input: every value is checked for its type and bounded in size
(texts, arrays, nesting, count of values) and in magnitude (integers within IEEE 754's
exact range, RFC 7493 §2.2 I-JSON; finite floats), and the first fault is one line
naming the field (``PayloadError``: "payload.sessions[3].sha256: ..."), never a
traceback.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from agent.schema import parse_utc

MAX_TEXT = 1_000
MAX_NODES = 5_000_000  # JSON values inside the free-form members (certificate, targets)
MAX_DEPTH = 16
# JSON numbers: integers within IEEE 754's exact range (RFC 7493 §2.2, I-JSON), finite
# floats of sane magnitude.
MAX_INT = 2**53
MAX_FLOAT = 1e15
MAX_NUMBER_CHARS = 40  # a JSON number token longer than this is refused unparsed


class PayloadError(ValueError):
    """A payload that is not one this reader accepts; the message names the field."""


def obj(value: Any, where: str, required: Sequence[str],
        optional: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(f"{where}: expected an object, not {kind_of(value)}")
    for name in required:
        if name not in value:
            raise PayloadError(f"{where}.{name}: missing")
    allowed = set(required) | set(optional)
    extra = sorted(str(k)[:40] for k in value if k not in allowed)
    if extra:
        raise PayloadError(f"{where}.{extra[0]}: not a field of this format")
    return value


def kind_of(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "text", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(value),
                                                                        type(value).__name__)


def array(value: Any, where: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise PayloadError(f"{where}: expected an array, not {kind_of(value)}")
    if len(value) > limit:
        raise PayloadError(f"{where}: {len(value)} items, more than {limit}")
    return value


def text(value: Any, where: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise PayloadError(f"{where}: expected text, not {kind_of(value)}")
    if len(value) > limit:
        raise PayloadError(f"{where}: {len(value)} characters, more than {limit}")
    return value


def text_or_none(value: Any, where: str, limit: int = MAX_TEXT) -> str | None:
    return None if value is None else text(value, where, limit)


def match(value: Any, where: str, pattern: re.Pattern[str], what: str) -> str:
    found = text(value, where, 200)
    if not pattern.fullmatch(found):
        raise PayloadError(f"{where}: not {what} ({found[:40]!r})")
    return found


def choice(value: Any, where: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        shown = repr(value[:40]) if isinstance(value, str) else kind_of(value)
        raise PayloadError(f"{where}: expected one of {', '.join(choices)}, not {shown}")
    return value


def integer(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{where}: expected an integer, not {kind_of(value)}")
    if not lo <= value <= hi:
        raise PayloadError(f"{where}: {value} outside [{lo}, {hi}]")
    return value


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise PayloadError(f"{where}: expected true or false, not {kind_of(value)}")
    return value


def utc(value: Any, where: str) -> str:
    found = text(value, where, 40)
    try:
        parse_utc(found)
    except ValueError:
        raise PayloadError(f"{where}: not a UTC time with an offset ({found!r})") from None
    return found


def utc_or_none(value: Any, where: str) -> str | None:
    return None if value is None else utc(value, where)


def fixed(value: Any, where: str, size: int) -> list[Any]:
    items = array(value, where, size)
    if len(items) != size:
        raise PayloadError(f"{where}: expected {size} items, not {len(items)}")
    return items


def number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"{where}: expected a number, not {kind_of(value)}")
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise PayloadError(f"{where}: an integer beyond 2^53")
        return value
    if not math.isfinite(value) or abs(value) > MAX_FLOAT:
        raise PayloadError(f"{where}: a number beyond {MAX_FLOAT:g}")
    return value


def free(value: Any, where: str) -> dict[str, Any]:
    """A free-form JSON object (the certificate, the targets table), bounded: depth,
    count of values, text lengths and numbers; its meaning is the verifier's to check
    (it recomputes the certificate and compares)."""
    if not isinstance(value, dict):
        raise PayloadError(f"{where}: expected an object, not {kind_of(value)}")
    budget = [MAX_NODES]

    def walk(v: Any, path: str, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise PayloadError(f"{where}: more than {MAX_NODES} values")
        if depth > MAX_DEPTH:
            raise PayloadError(f"{path}: nested deeper than {MAX_DEPTH}")
        if isinstance(v, dict):
            for k, item in v.items():
                text(k, f"{path} (a key)", 200)
                walk(item, f"{path}.{k}", depth + 1)
        elif isinstance(v, list):
            for n, item in enumerate(v):
                walk(item, f"{path}[{n}]", depth + 1)
        elif isinstance(v, str):
            text(v, path, 10_000)
        elif isinstance(v, bool) or v is None:
            pass
        else:
            number(v, path)

    walk(value, where, 0)
    return value


def loads(data: bytes) -> Any:
    """JSON text of a payload, bounded: no number token longer than MAX_NUMBER_CHARS
    (Python would build any big integer), no NaN/Infinity, no deep nesting."""
    def token(digits: str) -> float | int:
        if len(digits) > MAX_NUMBER_CHARS:
            raise PayloadError(f"payload: a number of {len(digits)} digits")
        return float(digits) if any(c in digits for c in ".eE") else int(digits)

    def constant(name: str) -> None:
        raise PayloadError(f"payload: {name} is not JSON")

    try:
        return json.loads(data.decode("utf-8"), parse_int=token, parse_float=token,
                          parse_constant=constant)
    except UnicodeDecodeError:
        raise PayloadError("payload: not UTF-8") from None
    except RecursionError:
        raise PayloadError("payload: nested too deep") from None
    except ValueError as exc:
        if isinstance(exc, PayloadError):
            raise
        raise PayloadError(f"payload: not JSON ({str(exc).splitlines()[0][:80]})") from None
