"""What a throughput test's sender sends, and how much of it the kernel may queue; shared
by the agent and the collector (both send: uploads, and the measurement servers).

One buffer of random bytes is generated per process on first use and kept as an unlinked
file that transfers ``sendfile`` from, so the measurement loop never calls the RNG (RMBT
and BEREC require random, incompressible data; methodology.md §3.1-3.2). Stdlib only.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import tempfile
from typing import Any, BinaryIO

from agent import spec

# Linux's value where the socket module does not name it.
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
MAX_NOTSENT_BYTES = 16 * 1024 * 1024

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


_messages: dict[int, bytes] = {}


def message(size: int) -> bytes:
    """``size`` random bytes as one object, cut from the buffer once per size (as
    ndt-server makes its messages once): a WebSocket sender sends the same object again
    and again, with no copy and no RNG per message."""
    found = _messages.get(size)
    if found is None:
        found = _messages[size] = bytes(buffer()[:size])
    return found


def unsent_bound(rate_bps: float, target_s: float, minimum_bytes: int) -> int:
    """Unsent bytes a sender lets the kernel hold (TCP_NOTSENT_LOWAT): ``target_s`` of
    data at the rate seen so far, at least ``minimum_bytes``, at most MAX_NOTSENT_BYTES.
    Without a bound the autotuned send buffer queues seconds of data on a slow line,
    which keep flowing long after the sender stops; in-flight data is not limited by it,
    so fast links are unaffected."""
    return int(min(max(rate_bps / 8 * target_s, minimum_bytes), MAX_NOTSENT_BYTES))


def limit_unsent(sock: Any, nbytes: int) -> None:
    """Set ``sock``'s TCP_NOTSENT_LOWAT to ``nbytes``, where the platform has it (else the
    sender keeps the autotuned buffer)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, nbytes)
