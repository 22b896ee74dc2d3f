"""ICMP echo ping train: icmplib sockets, kernel receive timestamps, our own statistics.

icmplib opens the socket (raw with CAP_NET_RAW, else an unprivileged ICMP socket) and
sends each echo request, stamping it with the wall clock immediately before ``sendto``.
Replies are read with ``recvmsg`` and the kernel's receive timestamp (``SO_TIMESTAMPNS``,
the same wall clock), as iputils ping does. The RTT therefore never includes the event
loop's wake-up latency, which on a busy or virtualised host is 0.1-1 ms and would bias
every delay figure. icmplib's own ``ping()`` rounds RTTs and loss, so it is not used.

Requests go out on a fixed schedule (t0 + i * interval), replies are matched by
identifier and sequence, and ICMP errors quoting our request are recorded as the reason.

Liveness: the train ends at most ``(count - 1) * interval + timeout`` seconds after the
first send, plus name resolution (bounded by ``spec.RESOLVE_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import family, live, spec
from agent.errors import ProbeSetupError
from agent.schema import PingMethod, PingSample, utc_now

# ICMP message types: echo reply, and the errors that carry our request back to us.
_ECHO_REPLY = {4: 0, 6: 129}
_ERRORS = {
    4: {3: "unreachable", 11: "time_exceeded", 12: "parameter_problem"},
    6: {1: "unreachable", 2: "packet_too_big", 3: "time_exceeded", 4: "parameter_problem"},
}


@dataclass(frozen=True, slots=True)
class PingObservation:
    target: str
    address: str
    privileged: bool
    started_at: str
    samples: tuple[PingSample, ...]


def permission_hint() -> str:
    """How to allow ICMP for this user, naming the capability and the sysctl."""
    try:
        group_range = Path("/proc/sys/net/ipv4/ping_group_range").read_text().split()
        current = f"is '{' '.join(group_range)}'"
    except OSError:
        current = "could not be read"
    return (
        "ICMP needs a raw socket or an unprivileged ICMP socket: run as root, or grant "
        "CAP_NET_RAW (systemd: AmbientCapabilities=CAP_NET_RAW; shell: "
        "sudo setcap cap_net_raw+ep <python binary>), or allow your group in "
        f"net.ipv4.ping_group_range (it {current}; "
        "sudo sysctl -w net.ipv4.ping_group_range='0 2147483647')"
    )


async def resolve(target: str, af: int = socket.AF_UNSPEC) -> tuple[str, int]:
    """(address, IP version) of ``target`` in family ``af`` (agent/family.py); with
    AF_UNSPEC, IPv4 is preferred when a name has both. ``ProbeSetupError`` naming the
    family when the target has no address of it."""
    problem = family.literal_problem(target, af)
    if problem is not None:
        raise ProbeSetupError(f"ping target: {problem}")
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(target)
        return str(ip), ip.version
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(spec.RESOLVE_TIMEOUT_S):
            infos = await loop.getaddrinfo(target, None, family=af, type=socket.SOCK_DGRAM)
    except TimeoutError:
        raise ProbeSetupError(f"cannot resolve ping target {target!r}: timed out after "
                              f"{spec.RESOLVE_TIMEOUT_S:g} s") from None
    except OSError as exc:
        if af == socket.AF_UNSPEC:
            raise ProbeSetupError(f"cannot resolve ping target {target!r}: {exc}") from None
        raise ProbeSetupError(f"ping target: {family.unresolved(target, af, exc)}") from None
    infos.sort(key=lambda info: 0 if info[0] == socket.AF_INET else 1)
    address = str(infos[0][4][0])
    return address, ipaddress.ip_address(address).version


# Linux: SO_TIMESTAMPNS asks the kernel to attach a struct timespec receive time.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")


def _open_socket(version: int, privileged: bool | None) -> tuple[Any, bool]:
    from icmplib import ICMPv4Socket, ICMPv6Socket, SocketPermissionError

    factory = ICMPv4Socket if version == 4 else ICMPv6Socket
    order = [True, False] if privileged is None else [privileged]
    for mode in order:
        try:
            icmp_socket = factory(privileged=mode)
        except SocketPermissionError:
            continue
        except OSError as exc:
            raise ProbeSetupError(f"cannot open an ICMP socket: {exc}") from None
        icmp_socket.blocking = False
        with contextlib.suppress(OSError):
            icmp_socket.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        return icmp_socket, mode
    raise ProbeSetupError(permission_hint())


@dataclass(frozen=True, slots=True)
class Reply:
    type: int
    ident: int
    seq: int


def parse_reply(packet: bytes, version: int, has_ip_header: bool) -> Reply | None:
    """Type, identifier and sequence of an echo reply, or of the request an ICMP error
    quotes (RFC 792: the error carries the original IP header + 8 bytes). Pure."""
    offset = 0
    if version == 4 and has_ip_header:
        if len(packet) < 20:
            return None
        offset = (packet[0] & 0x0F) * 4
    if len(packet) < offset + 8:
        return None
    icmp_type = packet[offset]
    if icmp_type in _ERRORS[version]:
        inner = offset + 8
        if version == 4:
            if len(packet) < inner + 20:
                return None
            inner += (packet[inner] & 0x0F) * 4
        else:
            inner += 40  # fixed IPv6 header
        if len(packet) < inner + 8:
            return None
        ident, seq = struct.unpack_from("!HH", packet, inner + 4)
        return Reply(icmp_type, ident, seq)
    ident, seq = struct.unpack_from("!HH", packet, offset + 4)
    return Reply(icmp_type, ident, seq)


def _kernel_time(ancdata: list[tuple[int, int, bytes]]) -> float | None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return float(sec) + float(nsec) / 1e9
    return None


async def run(
    target: str, method: PingMethod, *, privileged: bool | None = None,
    observe: live.Observer = live.ignore, af: int = socket.AF_UNSPEC,
) -> PingObservation:
    """Send ``method.count`` echo requests to ``target`` and observe the replies.

    Raises ``ProbeSetupError`` only when the train cannot start (no permission, name does
    not resolve); lost or failed pings are samples with ``rtt_ms=None``. Each RTT is
    also given to ``observe`` as it arrives (the live view). ``af`` restricts the
    target to one family (agent/family.py): ICMPv4 or ICMPv6 (RFC 4443) follows from the
    address, so icmplib's own ``family`` resolution is not needed.
    """
    from icmplib import ICMPRequest, ICMPSocketError

    address, version = await resolve(target, af)
    icmp_socket, used_privileged = _open_socket(version, privileged)
    sock: socket.socket = icmp_socket.sock
    # Raw IPv4 sockets deliver the IP header; unprivileged and IPv6 sockets do not.
    has_ip_header = used_privileged and version == 4
    loop = asyncio.get_running_loop()
    started_at = utc_now()
    ident = secrets.randbelow(0x10000)
    count = method.count
    sent_wall: list[float | None] = [None] * count
    sent_mono: list[float | None] = [None] * count
    rtt_ms: list[float | None] = [None] * count
    errors: list[str | None] = [None] * count
    all_answered = asyncio.Event()
    t0 = time.monotonic()

    def settled() -> bool:
        return all(rtt_ms[i] is not None or errors[i] is not None for i in range(count))

    def on_readable() -> None:
        while True:
            try:
                packet, ancdata, _, _ = sock.recvmsg(2048, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            received = _kernel_time(ancdata) or time.time()
            reply = parse_reply(packet, version, has_ip_header)
            if reply is None or reply.ident != ident or not 0 <= reply.seq < count:
                continue  # someone else's packet, or our own request looped back
            seq = reply.seq
            sent = sent_wall[seq]
            if sent is None or rtt_ms[seq] is not None or errors[seq] is not None:
                continue  # not sent by us yet, or a duplicate
            if reply.type == _ECHO_REPLY[version]:
                elapsed = received - sent
                if elapsed <= method.timeout_s:
                    rtt = rtt_ms[seq] = max(elapsed, 0.0) * 1000.0
                    observe(live.RttSampled(sent_mono[seq] or t0, rtt))
            elif reply.type in _ERRORS[version]:
                errors[seq] = _ERRORS[version][reply.type]
            if sent_mono[count - 1] is not None and settled():
                all_answered.set()

    async def sender() -> None:
        nonlocal ident
        for seq in range(count):
            delay = t0 + seq * method.interval_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            request = ICMPRequest(
                destination=address, id=ident, sequence=seq, payload_size=method.payload_bytes
            )
            sent_mono[seq] = time.monotonic()
            try:
                icmp_socket.send(request)
                # icmplib stamps request.time with time.time() right before sendto.
                sent_wall[seq] = request.time
            except ICMPSocketError as exc:
                errors[seq] = f"send_error: {exc}"
            # Unprivileged Linux sockets: the kernel picks the identifier.
            ident = request.id

    loop.add_reader(sock.fileno(), on_readable)
    try:
        await sender()
        last = max(m for m in sent_mono if m is not None)
        remaining = last + method.timeout_s - time.monotonic()
        if not settled() and remaining > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await all_answered.wait()
    finally:
        loop.remove_reader(sock.fileno())
        icmp_socket.close()

    samples = tuple(
        PingSample(
            seq=seq,
            sent_offset_s=max(0.0, (sent_mono[seq] or t0) - t0),
            rtt_ms=rtt_ms[seq],
            error=None if rtt_ms[seq] is not None else (errors[seq] or "timeout"),
        )
        for seq in range(count)
    )
    return PingObservation(
        target=target,
        address=address,
        privileged=used_privileged,
        started_at=started_at,
        samples=samples,
    )
