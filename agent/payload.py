"""Incompressible payload for throughput tests, shared by the agent and the collector.

One buffer of random bytes is generated per process on first use and kept as an unlinked
file that transfers ``sendfile`` from, so the measurement loop never calls the RNG (RMBT
and BEREC require random, incompressible data; methodology.md §3.1-3.2). Stdlib only.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from typing import BinaryIO

from agent import spec

_buffer: memoryview | None = None
_file: BinaryIO | None = None


def buffer() -> memoryview:
    global _buffer
    if _buffer is None:
        _buffer = memoryview(os.urandom(spec.PAYLOAD_BUFFER_BYTES))
    return _buffer


def file() -> BinaryIO:
    """The random buffer as an unlinked temporary file, for ``loop.sendfile``: the kernel
    sends it from the page cache, so a transfer costs no copy from user memory."""
    global _file
    if _file is None:
        handle = tempfile.TemporaryFile()  # noqa: SIM115 - lives for the whole process
        handle.write(buffer())
        handle.flush()
        atexit.register(handle.close)
        _file = handle
    return _file
