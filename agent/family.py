"""IP address families: what ``server.address_family`` / ``-4`` / ``-6`` ask for, and
what a session records. Pure, except ``Endpoints`` (a small accumulator).

- "any": the host's own address selection decides, as it would for any program
  (getaddrinfo's order, RFC 6724 and /etc/gai.conf), once for the session: the ping and
  every transfer stream then use that family (``pinned_family``), which is recorded.
- "ipv4" / "ipv6": every name is resolved in that family only (A or AAAA records), and
  an address literal of the other family is refused. A host with no address of the
  family is a recorded failure naming it, never an exception.
- "both": a dual-stack session, run once over IPv4 and once over IPv6, each its own
  result (RFC 6555 compares the families, but a measurement must not let one hide the
  other: each is measured whole).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from agent.schema import AddressFamily, RequestedFamily

FAMILIES: tuple[AddressFamily, ...] = ("ipv4", "ipv6")
_SOCKET = {"any": socket.AF_UNSPEC, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
_LABEL = {"ipv4": "IPv4", "ipv6": "IPv6"}
# getaddrinfo's answers for "the name exists, but not in this family" (glibc): no such
# name, no address of the family, and a literal of the other family.
_NO_ADDRESS = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA",
                                                  "EAI_ADDRFAMILY") if hasattr(socket, name)}


def session_families(requested: RequestedFamily) -> tuple[RequestedFamily, ...]:
    """The sessions a request stands for: "both" is one per family, IPv4 first."""
    return ("ipv4", "ipv6") if requested == "both" else (requested,)


def socket_family(requested: str) -> int:
    """AF_INET, AF_INET6, or AF_UNSPEC for "any" (a "both" request is split first)."""
    if requested not in _SOCKET:
        raise ValueError(f"no single socket family for {requested!r}")
    return _SOCKET[requested]


def family_of(address: str | None) -> AddressFamily | None:
    """The family of an IP address ("fe80::1%eth0" included), or None if it is not one."""
    if not address:
        return None
    try:
        version = ipaddress.ip_address(address.split("%", 1)[0]).version
    except ValueError:
        return None
    return "ipv4" if version == 4 else "ipv6"


def label(family: str) -> str:
    """ "IPv4" / "IPv6" for messages."""
    return _LABEL.get(family, family)


def literal_problem(host: str, af: int) -> str | None:
    """Why an address literal cannot be used under ``af`` (the other family), or None
    (a name, or a literal of the right family)."""
    found = family_of(host)
    if af == socket.AF_UNSPEC or found is None or socket_family(found) == af:
        return None
    wanted = "ipv4" if af == socket.AF_INET else "ipv6"
    return f"{host} is an {label(found)} address, and {label(wanted)} was asked for"


def unresolved(host: str, af: int, exc: OSError) -> str:
    """One line for a name that did not resolve under ``af``: "no IPv6 address for
    'name'" when the family is what is missing, else the resolver's own words."""
    problem = literal_problem(host, af)
    if problem is not None:
        return problem
    if af != socket.AF_UNSPEC and isinstance(exc, socket.gaierror) and \
            exc.errno in _NO_ADDRESS:
        wanted = "ipv4" if af == socket.AF_INET else "ipv6"
        return f"no {label(wanted)} address for {host!r} ({exc.strerror or exc})"
    return f"cannot resolve {host!r}: {exc.strerror or exc}"


def pinned_family(ping_target: str | None, server_host: str | None,
                  preferred: AddressFamily | None) -> AddressFamily | None:
    """The one family a session under "any" runs in: an address literal's (the ping
    target's or the server's: the config named it), else the host's preference for the
    server's name (``preferred``). None when the config names literals of both families:
    each part then keeps its own, and the result records no single family."""
    literals = {f for f in (family_of(ping_target), family_of(server_host)) if f}
    if len(literals) > 1:
        return None
    return next(iter(literals), None) or preferred


def host_only(sockaddr: object) -> str | None:
    """The address of a socket address tuple (IPv4 (host, port), IPv6 (host, port,
    flowinfo, scope_id)), or None."""
    if isinstance(sockaddr, tuple) and sockaddr and isinstance(sockaddr[0], str):
        return sockaddr[0]
    return None


@dataclass(slots=True)
class Endpoints:
    """The distinct local and remote addresses a session's connections used, in the
    order first seen (filled in by the transfers as they connect)."""

    local: dict[str, None] = field(default_factory=dict)
    remote: dict[str, None] = field(default_factory=dict)

    def add(self, local: object, remote: object) -> None:
        """Record one connection from its sockname and peername."""
        if (address := host_only(local)) is not None:
            self.local.setdefault(address, None)
        if (address := host_only(remote)) is not None:
            self.remote.setdefault(address, None)

    @property
    def family(self) -> AddressFamily | None:
        """The family of the first remote address, if any connection was made."""
        return family_of(next(iter(self.remote), None))
