"""Incompressible payload for throughput tests, shared by the agent and the collector.

One buffer of random bytes is generated per process on first use; transfers slice it in
rotation, so the measurement loop never calls the RNG (RMBT and BEREC require random,
incompressible data; methodology.md §3.1-3.2). Stdlib only.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from agent import spec

_buffer: memoryview | None = None
_file: BinaryIO | None = None


def buffer() -> memoryview:
    global _buffer
    if _buffer is None:
        _buffer = memoryview(os.urandom(spec.PAYLOAD_BUFFER_BYTES))
    return _buffer


def chunks(total: int | None, chunk_bytes: int = spec.CHUNK_BYTES) -> Iterator[memoryview]:
    """Yield slices of the random buffer: ``total`` bytes in all, or forever if None."""
    data = buffer()
    size = len(data)
    offset = 0
    remaining = total
    while remaining is None or remaining > 0:
        n = chunk_bytes if remaining is None else min(chunk_bytes, remaining)
        n = min(n, size - offset)
        yield data[offset : offset + n]
        offset = (offset + n) % size
        if remaining is not None:
            remaining -= n


def file() -> BinaryIO:
    """The random buffer as an unlinked temporary file, for ``loop.sendfile``: the kernel
    sends it from the page cache, so a transfer costs no copy from user memory."""
    global _file
    if _file is None:
        handle = tempfile.TemporaryFile()  # noqa: SIM115 - lives for the whole process
        handle.write(buffer())
        handle.flush()
        _file = handle
    return _file
