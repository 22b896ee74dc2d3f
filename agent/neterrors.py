"""How a failed connection is said, for the transfers (agent/probes/wire.py) and the
collector API (agent/client.py) alike: the system's own words for the errno, lower case
("connection refused", "network is unreachable"), never asyncio's "Connect call failed
('127.0.0.1', 18380)" nor aiohttp's "ssl:default" (said of a plain http URL too). Pure.
"""

from __future__ import annotations

import errno
import os
import re
import ssl

# asyncio.create_connection, when every address of a name failed differently:
# OSError("Multiple exceptions: [Errno 111] ..., [Errno 101] ...") with no errno.
_ERRNOS = re.compile(r"\[Errno (-?\d+)\]")


def _errnos(exc: OSError) -> list[int]:
    if exc.errno is not None:
        return [exc.errno]
    return [int(n) for n in _ERRNOS.findall(str(exc))]


def describe(exc: OSError) -> str:
    """What went wrong, in a few words: the errno's text (every address's, when a name
    had several and they failed alike), else the exception's own text."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):  # its errno is OpenSSL's, not the system's
        return f"TLS failed: {getattr(exc, 'reason', None) or exc}"
    numbers = _errnos(exc)
    if numbers and len(set(numbers)) == 1 and numbers[0] > 0:
        said = os.strerror(numbers[0])
        said = said[:1].lower() + said[1:]
        return said if len(numbers) == 1 else f"{said} (every address)"
    text = exc.strerror if exc.errno is not None and exc.strerror else str(exc)
    return text[:1].lower() + text[1:] if text else type(exc).__name__


def refused(exc: BaseException | None) -> bool:
    """Whether the host answered that nothing listens there (ECONNREFUSED, a TCP
    reset to the SYN; every address's, when a name had several): the server is not
    running, which trying again within seconds does not change, unlike a timeout or a
    lost packet."""
    if not isinstance(exc, OSError):
        return False
    numbers = _errnos(exc)
    return bool(numbers) and all(n == errno.ECONNREFUSED for n in numbers)
