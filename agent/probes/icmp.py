"""ICMP echo ping train (icmplib sockets, our own timing).

We use icmplib for sockets and packet encoding only. Each request is sent on a fixed
schedule (t0 + i * interval, not "after the previous reply"), replies are matched by
identifier and sequence, and RTTs are taken from the monotonic clock around the socket
calls, unrounded. icmplib's own ``ping()`` rounds RTTs and loss, so it is not used.

Liveness: the train ends at most ``(count - 1) * interval + timeout`` seconds after the
first send, plus name resolution (bounded by ``RESOLVE_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ProbeSetupError
from agent.schema import PingMethod, PingSample, utc_now

RESOLVE_TIMEOUT_S = 5.0

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


async def resolve(target: str) -> tuple[str, int]:
    """(address, IP version) of ``target``; IPv4 preferred when a name has both."""
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(target)
        return str(ip), ip.version
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await loop.getaddrinfo(target, None, type=socket.SOCK_DGRAM)
    except (OSError, TimeoutError) as exc:
        raise ProbeSetupError(f"cannot resolve ping target {target!r}: {exc}") from None
    infos.sort(key=lambda info: 0 if info[0] == socket.AF_INET else 1)
    address = str(infos[0][4][0])
    return address, ipaddress.ip_address(address).version


def _open_socket(version: int, privileged: bool | None) -> tuple[object, bool]:
    from icmplib import AsyncSocket, ICMPv4Socket, ICMPv6Socket, SocketPermissionError

    factory = ICMPv4Socket if version == 4 else ICMPv6Socket
    order = [True, False] if privileged is None else [privileged]
    for mode in order:
        try:
            return AsyncSocket(factory(privileged=mode)), mode
        except SocketPermissionError:
            continue
        except OSError as exc:
            raise ProbeSetupError(f"cannot open an ICMP socket: {exc}") from None
    raise ProbeSetupError(permission_hint())


async def run(
    target: str, method: PingMethod, *, privileged: bool | None = None
) -> PingObservation:
    """Send ``method.count`` echo requests to ``target`` and observe the replies.

    Raises ``ProbeSetupError`` only when the train cannot start (no permission, name does
    not resolve); lost or failed pings are samples with ``rtt_ms=None``.
    """
    from icmplib import ICMPRequest, ICMPSocketError, TimeoutExceeded

    address, version = await resolve(target)
    sock, used_privileged = _open_socket(version, privileged)
    started_at = utc_now()
    ident = secrets.randbelow(0x10000)
    count = method.count
    sent_at: list[float | None] = [None] * count
    rtt_ms: list[float | None] = [None] * count
    errors: list[str | None] = [None] * count
    done = asyncio.Event()
    sender_finished = False
    t0 = time.monotonic()
    # Every reply must arrive by this time; later ones are lost by definition.
    hard_end = t0 + (count - 1) * method.interval_s + method.timeout_s

    async def sender() -> None:
        nonlocal sender_finished, ident
        for seq in range(count):
            delay = t0 + seq * method.interval_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            request = ICMPRequest(
                destination=address, id=ident, sequence=seq, payload_size=method.payload_bytes
            )
            sent_at[seq] = time.monotonic()
            try:
                sock.send(request)  # type: ignore[attr-defined]
            except ICMPSocketError as exc:
                errors[seq] = f"send_error: {exc}"
            # Unprivileged Linux sockets: the kernel picks the identifier.
            ident = request.id
        sender_finished = True

    def complete() -> bool:
        return sender_finished and all(
            rtt_ms[i] is not None or errors[i] is not None for i in range(count)
        )

    async def receiver() -> None:
        while not done.is_set():
            now = time.monotonic()
            if now >= hard_end or complete():
                return
            try:
                reply = await sock.receive(None, min(hard_end - now, 0.25))  # type: ignore[attr-defined]
            except TimeoutExceeded:
                continue
            except ICMPSocketError:
                continue
            received = time.monotonic()
            seq = reply.sequence
            sent = sent_at[seq] if reply.id == ident and 0 <= seq < count else None
            if sent is None:
                continue  # someone else's packet, or our own request looped back
            if rtt_ms[seq] is not None or errors[seq] is not None:
                continue  # duplicate
            if reply.type == _ECHO_REPLY[version]:
                elapsed = received - sent
                if elapsed <= method.timeout_s:
                    rtt_ms[seq] = elapsed * 1000.0
            elif reply.type in _ERRORS[version]:
                errors[seq] = _ERRORS[version][reply.type]

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(sender())
            group.create_task(receiver())
    finally:
        done.set()
        sock.close()  # type: ignore[attr-defined]

    samples = tuple(
        PingSample(
            seq=seq,
            sent_offset_s=max(0.0, (sent_at[seq] or t0) - t0),
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
