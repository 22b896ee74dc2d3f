"""The wall clock's synchronisation state, read from the kernel (adjtimex(2), read only).

A result's timestamps are only as good as the probe's clock. RIPE Atlas attaches ``lts``
(seconds since the last sync) to every result; bbprobe records whether the kernel
considers the clock synchronised (an NTP/chrony/timesyncd daemon clears STA_UNSYNC and the
call returns something other than TIME_ERROR) and the kernel's maximum error bound. The
collector separately measures skew against its own clock at delivery (X-Bbprobe-Sent-At).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from agent.schema import ClockState

STA_UNSYNC = 0x0040
TIME_ERROR = 5


class _Timex(ctypes.Structure):
    # struct timex, <sys/timex.h> (Linux, glibc); the trailing padding is 11 ints.
    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long), ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long), ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long), ("shift", ctypes.c_int), ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int), ("padding", ctypes.c_int * 11),
    ]


def interpret(ret: int, status: int, maxerror_us: int) -> ClockState:
    """Pure: the adjtimex reply -> the recorded state."""
    synced = ret != TIME_ERROR and not status & STA_UNSYNC
    return ClockState(synchronized=synced,
                      max_error_ms=maxerror_us / 1000 if synced else None, source="adjtimex")


def read() -> ClockState:
    """The current state; ``synchronized=None`` where the kernel cannot be asked (not
    Linux, or a seccomp filter such as systemd's ProtectClock= refuses the call)."""
    unknown = ClockState(synchronized=None, max_error_ms=None, source="unknown")
    if not sys.platform.startswith("linux"):
        return unknown
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return unknown
    tx = _Timex()  # modes = 0: read only, allowed without privileges
    ret = libc.adjtimex(ctypes.byref(tx))
    if ret < 0:
        return unknown
    return interpret(ret, tx.status, tx.maxerror)
