"""Pure ingestion: request body bytes -> validated ``SessionResult`` and its canonical form.

Status hints (after h11's ``error_status_hint``): 400 for a body that is not JSON, 422 for
JSON that is not a valid result; the message names the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from agent.schema import SchemaError, SessionResult, format_utc, parse_result, parse_utc, to_dict
from collector.compliance.facts import SessionFacts, of_result
from collector.errors import ApiError


@dataclass(frozen=True, slots=True)
class Accepted:
    result: SessionResult
    body: str  # canonical JSON: sorted keys, no spaces
    body_sha256: str
    started_at: str  # normalised UTC, sortable as text
    ended_at: str
    facts: SessionFacts


def canonical_json(result: SessionResult) -> str:
    return json.dumps(to_dict(result), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes) -> Accepted:
    return accept(parse_json(raw))


def parse_json(raw: bytes) -> Any:
    """Bytes -> JSON data; 400 naming the problem (NaN/Infinity are not JSON)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"body is not UTF-8: byte {exc.start}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from None


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
    try:
        body = canonical_json(result)
        started_at = format_utc(parse_utc(result.started_at))
        return Accepted(
            result=result,
            body=body,
            body_sha256=hashlib.sha256(body.encode()).hexdigest(),
            started_at=started_at,
            ended_at=format_utc(parse_utc(result.ended_at)),
            facts=of_result(result, started_at),
        )
    except (ArithmeticError, ValueError) as exc:
        # The schema bounds every number, so this should not happen; if a document still
        # defeats the arithmetic, it is the sender's to fix (4xx: the agent does not retry
        # it forever), never a 500 (issue 12, finding 10).
        raise ApiError(422, f"result cannot be evaluated: {type(exc).__name__}: {exc}") \
            from None
