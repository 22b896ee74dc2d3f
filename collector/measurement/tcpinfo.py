"""Linux ``struct tcp_info`` (``getsockopt(IPPROTO_TCP, TCP_INFO)``) and BBR's
``struct tcp_bbr_info`` (``TCP_CC_INFO``), decoded to the JSON names ndt7 uses
(shared/reference/protocols.md §5.5: the Go field names of m-lab/tcp-info).

Pure decoding over bytes; the socket calls are in :func:`read`. Offsets follow
include/uapi/linux/tcp.h. A kernel returns only the fields it knows (the returned length
tells), and ndt7 says a field the kernel lacks is omitted, never sent as zero.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

# (JSON name, byte offset, struct format). The first eight fields are single bytes.
_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("State", 0, "B"), ("CAState", 1, "B"), ("Retransmits", 2, "B"), ("Probes", 3, "B"),
    ("Backoff", 4, "B"), ("Options", 5, "B"), ("WScale", 6, "B"), ("AppLimited", 7, "B"),
    ("RTO", 8, "I"), ("ATO", 12, "I"), ("SndMSS", 16, "I"), ("RcvMSS", 20, "I"),
    ("Unacked", 24, "I"), ("Sacked", 28, "I"), ("Lost", 32, "I"), ("Retrans", 36, "I"),
    ("Fackets", 40, "I"), ("LastDataSent", 44, "I"), ("LastAckSent", 48, "I"),
    ("LastDataRecv", 52, "I"), ("LastAckRecv", 56, "I"), ("PMTU", 60, "I"),
    ("RcvSsThresh", 64, "I"), ("RTT", 68, "I"), ("RTTVar", 72, "I"),
    ("SndSsThresh", 76, "I"), ("SndCwnd", 80, "I"), ("AdvMSS", 84, "I"),
    ("Reordering", 88, "I"), ("RcvRTT", 92, "I"), ("RcvSpace", 96, "I"),
    ("TotalRetrans", 100, "I"),
    # Signed in m-lab/tcp-info: an unlimited MaxPacingRate (~0) shows as -1.
    ("PacingRate", 104, "q"), ("MaxPacingRate", 112, "q"),
    ("BytesAcked", 120, "Q"), ("BytesReceived", 128, "Q"),
    ("SegsOut", 136, "I"), ("SegsIn", 140, "I"), ("NotsentBytes", 144, "I"),
    ("MinRTT", 148, "I"), ("DataSegsIn", 152, "I"), ("DataSegsOut", 156, "I"),
    ("DeliveryRate", 160, "Q"), ("BusyTime", 168, "Q"), ("RWndLimited", 176, "Q"),
    ("SndBufLimited", 184, "Q"), ("Delivered", 192, "I"), ("DeliveredCE", 196, "I"),
    ("BytesSent", 200, "Q"), ("BytesRetrans", 208, "Q"), ("DSackDups", 216, "I"),
    ("ReordSeen", 220, "I"), ("RcvOooPack", 224, "I"), ("SndWnd", 228, "I"),
)
SIZE = 232  # everything above; a longer struct from a newer kernel is cut here
TCP_CC_INFO = 26  # include/uapi/linux/tcp.h; not exported by Python's socket module


def decode(raw: bytes) -> dict[str, int]:
    """The fields present in ``raw`` (as many bytes as the kernel returned)."""
    out: dict[str, int] = {}
    for name, offset, fmt in _FIELDS:
        end = offset + struct.calcsize(fmt)
        if end > len(raw):
            break
        (value,) = struct.unpack_from("=" + fmt, raw, offset)
        out[name] = value
    if "AppLimited" in out:
        out["AppLimited"] &= 1  # tcpi_delivery_rate_app_limited:1; the other bits differ
    return out


def decode_bbr(raw: bytes) -> dict[str, int] | None:
    """``struct tcp_bbr_info``: bandwidth (bytes/s), min RTT (µs), gains (x256)."""
    if len(raw) < 20:
        return None
    bw_lo, bw_hi, min_rtt, pacing_gain, cwnd_gain = struct.unpack_from("=5I", raw)
    return {"BW": bw_hi << 32 | bw_lo, "MinRTT": min_rtt, "PacingGain": pacing_gain,
            "CwndGain": cwnd_gain}


def read(sock: Any) -> dict[str, int]:
    """TCP_INFO of a connected socket; empty where the platform has none."""
    if not hasattr(socket, "TCP_INFO"):
        return {}
    try:
        return decode(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, SIZE))
    except (OSError, AttributeError):  # closed, not TCP, or no socket at all
        return {}


def congestion_control(sock: Any) -> str | None:
    try:
        raw: bytes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    except (OSError, AttributeError):
        return None
    return raw.split(b"\0", 1)[0].decode("ascii", "replace") or None


def read_bbr(sock: Any) -> dict[str, int] | None:
    try:
        return decode_bbr(sock.getsockopt(socket.IPPROTO_TCP, TCP_CC_INFO, 20))
    except (OSError, AttributeError):
        return None


def try_bbr(sock: Any) -> bool:
    """Ask for BBR, as ndt-server does (ndt7 measures a BBR flow where it can); False
    when the kernel does not offer it to this namespace."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"bbr")
    except (OSError, AttributeError):
        return False
    return congestion_control(sock) == "bbr"
