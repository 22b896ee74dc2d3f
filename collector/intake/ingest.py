"""Pure ingestion: request body bytes -> validated ``SessionResult``, its canonical form
and the packed form the store keeps (collector/storage/codec.py).

JSON is read with orjson: three to four times faster than the standard library on these
documents, and as strict about NaN and Infinity; what it refuses is read again by the
standard library (``parse_json``).

Status hints (after h11's ``error_status_hint``): 400 for a body that is not JSON, 422 for
JSON that is not a valid result; the message names the field.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson
import zstandard

from agent.decoding import SchemaError, encodes, parse_result, timestamps
from agent.schema import SessionResult, format_utc, parse_utc
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


# Content-Encodings a probe may send: zstd (what the agent sends by default) and gzip
# (what any HTTP client can). Anonymous routes accept none.
ENCODINGS = ("identity", "zstd", "gzip")


# A body may inflate to at most this many times its size (and never past the body
# limit). A result compresses 2-4 times with zstd or gzip, a batch of them 3-6 times;
# a bomb, thousands: refused before it is parsed, since JSON parsed into Python objects
# takes some 8-25 times its bytes (2 KB of zstd would otherwise make 16 MiB of "{}"
# and half a gigabyte of dicts).
MAX_INFLATION = 32
# zstd frames with a window larger than this are refused (the decoder would reserve it):
# 8 MiB, what zstd's own levels use up to level 19.
MAX_ZSTD_WINDOW_BYTES = 8 * 1024**2


def inflated_bound(raw: bytes, encoding: str, limit: int) -> int:
    """The most bytes ``raw`` can become once inflated (``inflate``'s own bound): what
    decides whether it is decoded beside the event loop, not its compressed size."""
    if encoding == "identity":
        return len(raw)
    return min(limit, max(64 * 1024, MAX_INFLATION * len(raw)))


def inflate(raw: bytes, encoding: str, limit: int) -> bytes:
    """A probe's body as it was before its Content-Encoding, never longer than
    ``limit`` nor MAX_INFLATION times its compressed size: inflation stops one byte
    past the bound (413), so a compression bomb costs the collector that bound and the
    CPU to make it, no more. A truncated or damaged stream is a 400."""
    if encoding == "identity":
        return raw
    bound = inflated_bound(raw, encoding, limit)
    why = (f"past the {limit}-byte limit" if bound == limit else
           f"to more than {MAX_INFLATION} times its {len(raw)} bytes")
    if encoding == "gzip":
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out = inflater.decompress(raw, bound + 1)
        except zlib.error as exc:
            raise ApiError(400, f"gzip body cannot be inflated: {exc}") from None
        if len(out) > bound or inflater.unconsumed_tail:
            raise ApiError(413, f"gzip body inflates {why}")
        if not inflater.eof or inflater.unused_data:
            raise ApiError(400, "gzip body is truncated or has bytes after its end")
        return out
    if encoding == "zstd":
        return _inflate_zstd(raw, bound, why)
    raise ApiError(415, f"Content-Encoding {encoding!r} is not accepted; send one of "
                   f"{', '.join(ENCODINGS)}")


def _inflate_zstd(raw: bytes, bound: int, why: str) -> bytes:
    """One whole zstd frame, inflated within ``bound`` (see ``inflate``)."""
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW_BYTES)
    try:
        declared = zstandard.frame_content_size(raw)  # -1: the frame does not say
        if declared > bound:
            raise ApiError(413, f"zstd body declares {declared} bytes: it would inflate "
                           f"{why}")
        # Counted, not kept, whatever the header says: stop one byte past the bound.
        size = 0
        with decompressor.stream_reader(raw, read_across_frames=False) as reader:
            while size <= bound and (chunk := reader.read(bound + 1 - size)):
                size += len(chunk)
                del chunk
        if size > bound:
            raise ApiError(413, f"zstd body inflates {why}")
        # Within the bound: now inflate it whole, and check it is one complete frame
        # (the reader above says nothing of a frame cut short).
        inflater = decompressor.decompressobj()
        out = inflater.decompress(raw)
    except zstandard.ZstdError as exc:
        raise ApiError(400, f"zstd body cannot be inflated: {exc}") from None
    if not inflater.eof or inflater.unused_data or len(out) > bound:
        raise ApiError(400, "zstd body is truncated or has bytes after its frame")
    return out


# Every timestamp a writer supplies lies in a plausible window: one result dated 0999
# sorted as its probe's newest session and broke every reader of the fleet. Nothing
# bbprobe measures predates 2000; a probe's clock more than a day ahead of ours is wrong
# (its results would sort ahead of every honest one), and such a result is refused (422:
# the agent keeps it in its dead letters, nothing is lost). Plans (a campaign's deadline,
# a suppression's end, the next session) may lie further ahead, but not beyond a year:
# suppression windows last at most 31 days, campaigns 72 h.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
AHEAD_S = 86400.0
PLANNED_AHEAD_S = 366 * 86400.0
PLANNED = frozenset({"deadline_at", "suppressed_until", "next_session_at"})


def check_times(document: Any, now: datetime, ahead_s: float | None = None) -> None:
    """Refuse (422, naming the field) a decoded document with a timestamp outside
    [EARLIEST, now + AHEAD_S] (PLANNED fields: now + PLANNED_AHEAD_S; every field:
    now + ``ahead_s`` when given)."""
    for path, text in timestamps(document):
        ahead = ahead_s if ahead_s is not None else \
            PLANNED_AHEAD_S if path.rsplit(".", 1)[-1] in PLANNED else AHEAD_S
        moment = parse_utc(text)  # the schema has checked the form
        if moment < EARLIEST or (moment - now).total_seconds() > ahead:
            raise ApiError(422, f"{path}: {text[:40]!r} is outside the plausible window "
                           f"from {EARLIEST:%Y-%m-%d} to {ahead / 86400:g} day(s) after "
                           f"the collector's clock ({format_utc(now)})", field=path)


class _Batch(msgspec.Struct, forbid_unknown_fields=True):
    results: list[msgspec.Raw]


def batch_items(raw: bytes) -> list[bytes] | None:
    """The bytes of each result in a batch body ``{"results": [...]}``, found by msgspec
    without building them (each then takes the fast path, ``parse_body``); None for a
    body of another shape, or JSON msgspec will not read: the caller reads it the
    standard way, which names the fault."""
    try:
        return [bytes(item) for item in _BATCH.decode(raw).results]
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None


_BATCH = msgspec.json.Decoder(_Batch)


def encoded_size(item: Any) -> int:
    """The bytes of a batch item that the standard reader decoded (msgspec, which hands
    over each item's own bytes, would not split the batch): its compact JSON's length,
    so the per-result limit holds on either path."""
    try:
        return len(orjson.dumps(item))
    except (TypeError, orjson.JSONEncodeError):  # a 400-digit int: the schema refuses it
        return len(json.dumps(item, separators=(",", ":")).encode("utf-8", "replace"))


def parse_body(raw: bytes, name_as: str | None = None, *, pack: bool = True) -> Accepted:
    """One result's body: validated in C when it is valid (collector/decode.py), else
    by the schema's own decoder, which names what is wrong. ``name_as``: the probe a
    document with probe_id "" is named for (a signed payload spooled before its probe
    knew its name: intake/signed.py). ``pack`` false: for reading only (an evidence
    bundle's verifier), ``packed`` is left empty (a sixth of the work)."""
    fast = fast_accept(raw, pack=pack)
    if fast is not None:
        return fast
    data = parse_json(raw)
    if name_as is not None and isinstance(data, dict) and data.get("probe_id") == "":
        data["probe_id"] = name_as
    return accept(data, pack=pack)


def fast_accept(raw: bytes, *, pack: bool = True) -> Accepted | None:
    """A valid result's body validated in C, or None for anything else (the caller
    reads it the standard way, which names the fault, or finds a signed result)."""
    result = fast_result(raw)
    return None if result is None else _accepted(result, pack)


def parse_json(raw: bytes) -> Any:
    """Bytes -> JSON data; 400 naming the problem (NaN/Infinity are not JSON).

    orjson reads nearly every body. What it refuses goes to the standard library, which
    either names the fault in its own words (the byte that is not UTF-8, the NaN) or
    reads it: JSON allows a 400-digit number that orjson will not hold, and the schema
    then refuses it by field name (422), the same answer as without orjson."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise ApiError(400, f"body is not UTF-8: byte {bad.start}") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as why:
        raise ApiError(400, f"body is not valid JSON: {why}") from None
    where = lone_surrogate(data)
    if where is not None:
        raise ApiError(400, f"body is not valid Unicode: {where[:100]!a} holds an escaped lone "
                       "surrogate (\\ud800-\\udfff without its pair)")
    return data


def lone_surrogate(data: Any) -> str | None:
    """Where ``data`` holds a string (or key) that is not valid Unicode, or None.

    orjson refuses an escaped lone surrogate, the standard library reads it into a str
    that no UTF-8 writer can encode: one such string in a health report or an
    instruction made every later read of the fleet fail. This is the one door every JSON
    body passes (results, health reports, admin bodies, browser results). Iterative: the
    body may be nested deeply."""
    stack: list[tuple[str, Any]] = [("body", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not encodes(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                if not encodes(key):
                    return f"{path} (a key)"
                stack.append((f"{path}.{key}", item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def accept(data: Any, *, pack: bool = True) -> Accepted:
    """Decoded JSON -> a validated result with its canonical body and facts; 422 naming
    the field."""
    try:
        result = parse_result(data)
    except SchemaError as exc:
        raise ApiError(422, str(exc), field=exc.path or None) from None
    except (ArithmeticError, ValueError, RecursionError) as exc:  # a decoder bug: still 4xx
        raise ApiError(422, f"result cannot be decoded: {type(exc).__name__}: {exc}") \
            from None
    return _accepted(result, pack)


def _accepted(result: SessionResult, pack: bool = True) -> Accepted:
    try:
        body = codec.canonical(result)
        started_at = format_utc(parse_utc(result.started_at))
        return Accepted(
            result=result,
            body=body.decode(),
            body_sha256=hashlib.sha256(body).hexdigest(),
            packed=codec.pack(result) if pack else b"",
            started_at=started_at,
            ended_at=format_utc(parse_utc(result.ended_at)),
            facts=of_result(result, started_at),
        )
    except (ArithmeticError, ValueError, TypeError) as exc:
        # orjson.JSONEncodeError is a TypeError. The schema bounds every number, so this
        # should not happen; if a document still defeats the arithmetic, it is the
        # sender's to fix (4xx: the agent does not retry it forever), never a 500.
        raise ApiError(422, f"result cannot be evaluated: {type(exc).__name__}: {exc}") \
            from None
