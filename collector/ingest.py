"""Pure ingestion: request body bytes -> validated ``SessionResult``, its canonical form
and the packed form the store keeps (collector/storage/codec.py).

JSON is read with orjson (issue 14): three to four times faster than the standard
library on these documents, and as strict (RFC 8259: no NaN or Infinity, no lone
surrogates, nesting bounded).

Status hints (after h11's ``error_status_hint``): 400 for a body that is not JSON, 422 for
JSON that is not a valid result; the message names the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import orjson

from agent.schema import SchemaError, SessionResult, format_utc, parse_result, parse_utc
from collector.compliance.facts import SessionFacts, of_result
from collector.decode import fast_result
from collector.errors import ApiError
from collector.storage import codec


@dataclass(frozen=True, slots=True)
class Accepted:
    result: SessionResult
    body: str  # canonical JSON (storage/codec.py)
    body_sha256: str
    packed: bytes  # what the store keeps: codec.unpack(packed) == body
    started_at: str  # normalised UTC, sortable as text
    ended_at: str
    facts: SessionFacts


def canonical_json(result: SessionResult) -> str:
    return codec.canonical(result).decode()


def parse_body(raw: bytes) -> Accepted:
    """One result's body: validated in C when it is valid (collector/decode.py), else
    by the schema's own decoder, which names what is wrong."""
    result = fast_result(raw)
    if result is None:
        return accept(parse_json(raw))
    return _accepted(result)


def parse_json(raw: bytes) -> Any:
    """Bytes -> JSON data; 400 naming the problem (NaN/Infinity are not JSON).

    orjson reads nearly every body. What it refuses goes to the standard library, which
    either names the fault in its own words (the byte that is not UTF-8, the NaN) or
    reads it: JSON allows a 400-digit number that orjson will not hold, and the schema
    then refuses it by field name (422), as before issue 14."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise ApiError(400, f"body is not UTF-8: byte {bad.start}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as why:
        raise ApiError(400, f"body is not valid JSON: {why}") from None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def accept(data: Any) -> Accepted:
    """Decoded JSON -> a validated result with its canonical body and facts; 422 naming
    the field."""
    try:
        result = parse_result(data)
    except SchemaError as exc:
        raise ApiError(422, str(exc), field=exc.path or None) from None
    except (ArithmeticError, ValueError, RecursionError) as exc:  # a decoder bug: still 4xx
        raise ApiError(422, f"result cannot be decoded: {type(exc).__name__}: {exc}") \
            from None
    return _accepted(result)


def _accepted(result: SessionResult) -> Accepted:
    try:
        body = codec.canonical(result)
        started_at = format_utc(parse_utc(result.started_at))
        return Accepted(
            result=result,
            body=body.decode(),
            body_sha256=hashlib.sha256(body).hexdigest(),
            packed=codec.pack(result),
            started_at=started_at,
            ended_at=format_utc(parse_utc(result.ended_at)),
            facts=of_result(result, started_at),
        )
    except (ArithmeticError, ValueError, TypeError) as exc:
        # orjson.JSONEncodeError is a TypeError. The schema bounds every number, so this
        # should not happen; if a document still
        # defeats the arithmetic, it is the sender's to fix (4xx: the agent does not retry
        # it forever), never a 500 (issue 12, finding 10).
        raise ApiError(422, f"result cannot be evaluated: {type(exc).__name__}: {exc}") \
            from None
