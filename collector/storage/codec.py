"""Result bodies: their canonical JSON, and the packed form the stores keep.

Pure functions over bytes and ``SessionResult`` values; no I/O.

**Canonical JSON** is orjson's serialisation of the validated dataclass tree: fields in
the schema's declaration order (a field a later version added is left out while it holds
its default, as ``agent.schema.to_dict`` does), no spaces, floats in their shortest round-trip form,
non-ASCII as UTF-8. A document's hash (``body_sha256``) is taken over these bytes, so two
deliveries of one result are recognised as duplicates whatever their key order or
number spelling. Releases before the packed form canonicalised with the standard library
(sorted keys, ``1e-05``): a row stored by one of them is compared by content, not by
hash (storage/sql/results.py).

**The packed form** keeps every raw sample, losslessly, in about a seventh of the bytes:
- Stream samples, ``(t_s, cumulative_bytes)`` pairs, are most of a session (4,000 pairs,
  90 % of a 20-stream ``agcom`` document). They leave the JSON for three int64/float64
  columns: the times as integer microseconds, delta-coded, when every time of a stream
  is exactly a whole number of microseconds (today's agents record them so), else
  as the float64 values themselves; the byte counts delta-coded.
- Each column is byte-shuffled (the n-th byte of every value together, as Blosc does), so
  the high bytes that deltas leave zero compress to nothing.
- The rest of the document stays canonical JSON, and all of it goes through one zstd
  frame (``zstandard``: the reference library's bindings; the standard library has no
  zstd before Python 3.14, and zlib is ten times slower at a worse ratio here).

``unpack(pack(result)) == canonical(result)`` byte for byte: the columns hold the same
float64 bits (microsecond times are accepted only when ``k / 1e6`` gives back the very
same double) and the same integers, and orjson writes a float the same way whether it
came from the dataclass or from the rebuilt list. tests/collector/test_codec.py checks it
over real agent documents of every schema version.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
import threading
from array import array
from collections.abc import Sequence
from itertools import accumulate, chain, repeat
from operator import mul, sub, truediv
from typing import Any

import orjson
import zstandard

from agent.canonical import canonical as _canonical
from agent.canonical import document as _document
from agent.schema import SessionResult, TransferAttempt
from collector.errors import StoreError

MAGIC = b"BBZ1"
# zstd level 3 (its default): level 9 packs 3 % smaller at six times the CPU.
LEVEL = 3
# Refuse to unpack anything declaring more than this (a corrupted header cannot make a
# reader allocate gigabytes); far above any document the collector accepts.
MAX_UNPACKED_BYTES = 256 * 1024**2
_HEADER = struct.Struct("<4I")
_LITTLE = sys.byteorder == "little"

# zstandard's (de)compressor objects must not be shared between threads (a store runs
# on several: PostgreSQL's pool): one of each per thread.
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    try:
        return _local.compressor  # type: ignore[no-any-return]
    except AttributeError:
        # With its checksum: a damaged body is an error when read, never a wrong document.
        _local.compressor = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True)
        return _local.compressor  # type: ignore[no-any-return]


def _decompressor() -> zstandard.ZstdDecompressor:
    try:
        return _local.decompressor  # type: ignore[no-any-return]
    except AttributeError:
        _local.decompressor = zstandard.ZstdDecompressor()
        return _local.decompressor  # type: ignore[no-any-return]


class CodecError(StoreError, ValueError):
    """A packed body that cannot be read back (corrupt or of an unknown format): the
    store cannot give that result (a StoreError), and, as any malformed input, a
    ValueError to the code that decodes bodies in bulk (storage/refusals.py)."""


def canonical(result: SessionResult) -> bytes:
    """The canonical JSON of a validated result (see the module docstring): the same
    bytes a probe signs (agent/canonical.py)."""
    return _canonical(result)


def pack(result: SessionResult) -> bytes:
    """The stored form of a validated result's canonical JSON."""
    shape = array("q")
    t_us = array("q")
    t_raw = array("d")
    byte_deltas = array("q")
    bare: list[TransferAttempt] = []
    for transfer in result.transfers:
        shape.append(len(transfer.stream_samples))
        for stream in transfer.stream_samples:
            shape.append(len(stream))
            if not stream:
                shape.append(1)
                continue
            times, counts = zip(*stream, strict=True)
            # map() over C functions: this loop sees 4,000 pairs a session.
            micros = list(map(round, map(mul, times, repeat(1e6))))
            # Exact, bit for bit (a -0.0 fails here and is kept as float64).
            exact = array("d", map(truediv, micros, repeat(1e6))).tobytes() == \
                array("d", times).tobytes()
            shape.append(1 if exact else 0)
            if exact:
                t_us.extend(_deltas(micros))
            else:
                t_raw.extend(times)
            byte_deltas.extend(_deltas(counts))
        bare.append(dataclasses.replace(transfer, stream_samples=()))
    doc = _document(result)
    doc["transfers"] = bare
    rest = orjson.dumps(doc)
    columns = [_shuffle(c) for c in (shape, t_us, t_raw, byte_deltas)]
    payload = b"".join([_HEADER.pack(len(rest), *(len(c) for c in columns[:3])), rest,
                        *columns])
    return MAGIC + _compressor().compress(payload)


def without_samples(packed: bytes) -> bytes:
    """The canonical JSON of a packed body with every transfer's ``stream_samples``
    empty: still a valid result document, for a reader that needs none of the samples
    (the facts: a store migration, storage/refusals.py), in a fraction of ``unpack``'s
    time (the samples are most of the work)."""
    try:
        payload = _payload(packed)
        return payload[_HEADER.size:_HEADER.size + _HEADER.unpack_from(payload)[0]]
    except CodecError:
        raise
    except (zstandard.ZstdError, struct.error) as exc:
        raise CodecError(f"packed result body is corrupt: {type(exc).__name__}: {exc}") \
            from None


def _payload(packed: bytes) -> bytes:
    if packed[:4] != MAGIC:
        raise CodecError(f"not a packed result body (starts {bytes(packed[:4])!r})")
    frame = packed[4:]
    # The header's size is checked first: zstandard allocates what a frame declares.
    declared = zstandard.frame_content_size(frame)
    if declared < 0 or declared > MAX_UNPACKED_BYTES:
        raise CodecError(f"packed result body is corrupt: it declares {declared} bytes")
    payload: bytes = _decompressor().decompress(frame, max_output_size=MAX_UNPACKED_BYTES)
    return payload


def unpack(packed: bytes) -> bytes:
    """The canonical JSON a packed body holds."""
    try:
        payload = _payload(packed)
        sizes = _HEADER.unpack_from(payload)
        at = _HEADER.size
        rest = payload[at:at + sizes[0]]
        at += sizes[0]
        shape_b, t_us_b, t_raw_b = (payload[at:at + sizes[1]],
                                    payload[at + sizes[1]:at + sizes[1] + sizes[2]],
                                    payload[at + sizes[1] + sizes[2]:
                                            at + sizes[1] + sizes[2] + sizes[3]])
        deltas_b = payload[at + sizes[1] + sizes[2] + sizes[3]:]
        shape = _unshuffle(shape_b, "q")
        t_us = _unshuffle(t_us_b, "q")
        t_raw = _unshuffle(t_raw_b, "d")
        counts = _unshuffle(deltas_b, "q")
        doc: dict[str, Any] = orjson.loads(rest)
        return _rebuild(doc, shape, t_us, t_raw, counts)
    except CodecError:
        raise
    except (zstandard.ZstdError, struct.error, ValueError, KeyError, TypeError,
            IndexError, StopIteration) as exc:
        raise CodecError(f"packed result body is corrupt: {type(exc).__name__}: {exc}") \
            from None


def _rebuild(doc: dict[str, Any], shape: Sequence[int], micros: Sequence[int],
             raw: Sequence[float], counts: Sequence[int]) -> bytes:
    at = 0
    used = 0
    mi = 0
    ri = 0
    for transfer in doc["transfers"]:
        streams = []
        for _ in range(shape[at]):
            n, exact = shape[at + 1], shape[at + 2]
            at += 2
            bytes_so = list(accumulate(counts[used:used + n]))
            used += n
            if exact:
                times = list(map(truediv, accumulate(micros[mi:mi + n]), repeat(1e6)))
                mi += n
            else:
                times = list(raw[ri:ri + n])
                ri += n
            if len(times) != n or len(bytes_so) != n:
                raise CodecError("packed result body is corrupt: a column is short")
            streams.append(list(map(_pair, times, bytes_so)))
        at += 1
        transfer["stream_samples"] = streams
    if at != len(shape) or used != len(counts) or mi != len(micros) or ri != len(raw):
        raise CodecError("packed result body is corrupt: columns do not match the document")
    return orjson.dumps(doc)


def _pair(t: float, b: int) -> list[float | int]:
    return [t, b]


def _deltas(values: Sequence[int]) -> list[int]:
    """Each value minus the one before it; the first as it is. Streams are coded one
    after another, each starting again from zero."""
    return list(map(sub, values, chain((0,), values)))


def _shuffle(column: array[Any]) -> bytes:
    """Little-endian bytes of ``column``, byte-shuffled: byte 0 of every value, then
    byte 1 of every value... (itemsize 8)."""
    if not _LITTLE:
        column = array(column.typecode, column)
        column.byteswap()
    raw = column.tobytes()
    # Slicing bytes, not a memoryview: the strided copy is about seven times faster.
    return b"".join([raw[i::8] for i in range(8)])


def _unshuffle(data: bytes, typecode: str) -> array[Any]:
    if len(data) % 8:
        raise CodecError("packed result body is corrupt: a column is not whole values")
    n = len(data) // 8
    out = bytearray(len(data))
    data = bytes(data)
    for i in range(8):
        out[i::8] = data[i * n:(i + 1) * n]
    column = array(typecode)
    column.frombytes(bytes(out))
    if not _LITTLE:
        column.byteswap()
    return column
