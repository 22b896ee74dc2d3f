"""Choosing the measurement server among candidates, at session start.

Ne.Me.Sys measures against the nearest server (methodology.md §2.1). Here "nearest" is
the lowest median of a few ICMP echo round trips to each candidate's host (the median:
one delayed reply must not decide). Candidates with no reply rank after all that
answered; ties keep the order the instruction lists them in, so an operator's list is
also its preference. Then the first candidate, in rank order, that accepts a TCP
connection and is not busy is used; each one passed over is a recorded failover, so a
dead server costs a connect timeout, not the session.

Busy, not broken: a candidate that accepts the connection is asked whether it
would admit a transfer from this probe now (``GET /measure/v1/echo?capacity=1``, with the
session's ticket when the ticket names the server; the server answers as a transfer
would be answered). A 429 or 503 the server marks as its own refusal (spec.REFUSED_HEADER,
the rule the transfers follow: wire.server_refused) makes it busy: passed over with a
failover whose error starts with "busy:", and listed in the result's busy_servers. A 403
refusing the ticket is asked again without it. When every candidate that accepts
connections is busy, the best-ranked busy one is used (its transfers wait and retry on
refusal, which a broken server's could not): it is the chosen one, not a failover, and
still listed busy. Any other answer (an unmarked 429 or 503 too: from something on the
path, not the server), or none within the connect's deadline, is not busy: an older
server answers 200 "ok" to any echo, and a candidate is then chosen as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from agent import budget, family, spec
from agent.errors import ProbeSetupError
from agent.probes import icmp, wire
from agent.schema import PingMethod, ServerCandidate, ServerFailover, ServerSelection
from agent.stats import median
from agent.ticket import Ticket

CAPACITY_QUERY = "?capacity=1"
BUSY = "busy: "
# budget.py imports this module (for the deadlines above), and agent/config.py imports
# budget.py, so what this module imports is loaded wherever a config is (the collector
# too): wire.py, the transfers' HTTP client, is stdlib-only and is imported; transfer.py,
# which loads agent.client and aiohttp, is not.


def rank(candidates: Sequence[ServerCandidate]) -> list[int]:
    """Indexes of ``candidates``, best first (pure): by median RTT, unanswered last,
    ties in list order."""
    return sorted(range(len(candidates)), key=lambda i: (
        candidates[i].rtt_median_ms is None, candidates[i].rtt_median_ms or 0.0, i))


def _endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None  # validated with the config
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


async def _rtts(host: str, pings: int, af: int = socket.AF_UNSPEC
                ) -> tuple[tuple[float, ...], str | None]:
    train = PingMethod(count=pings, interval_s=spec.SELECT_PING_INTERVAL_S, payload_bytes=56,
                       timeout_s=spec.SELECT_REPLY_TIMEOUT_S, loaded_interval_s=None)
    deadline = budget.select_host_s(pings)  # the one the session's budget plans
    try:
        async with asyncio.timeout(deadline):
            obs = await icmp.run(host, train, af=af)
    except ProbeSetupError as exc:
        return (), str(exc)
    except TimeoutError:
        return (), "ping train exceeded its deadline"
    return tuple(s.rtt_ms for s in obs.samples if s.rtt_ms is not None), None


async def _connect(url: str, af: int = socket.AF_UNSPEC) -> str | None:
    """None when ``url``'s host and port accept a TCP connection in family ``af``, else
    why not."""
    host, port = _endpoint(url)
    if (problem := family.literal_problem(host, af)) is not None:
        return problem
    try:
        async with asyncio.timeout(spec.SELECT_CONNECT_TIMEOUT_S):
            _, writer = await asyncio.open_connection(host, port, family=af)
    except TimeoutError:
        return f"TCP connect to {host}:{port} timed out after {spec.SELECT_CONNECT_TIMEOUT_S:g} s"
    except socket.gaierror as exc:
        return family.unresolved(host, af, exc)
    except OSError as exc:
        return f"TCP connect to {host}:{port} failed: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def _ask(url: str, af: int, headers: dict[str, str]) -> wire.WireError | None:
    """GET the capacity echo: None when admitted (200), else the server's error."""
    def ignore(_: int) -> None:
        pass

    try:
        await wire.download(url, spec.ECHO_PATH + CAPACITY_QUERY, ignore, ignore, None, af,
                            headers=headers)
    except wire.WireError as exc:
        return exc
    return None


async def capacity(url: str, af: int = socket.AF_UNSPEC, ticket: Ticket | None = None
                   ) -> tuple[str | None, str | None]:
    """Whether ``url`` would admit a transfer from this probe now: (why it is busy, or
    None; the code with which it refused the ticket, or None). Presented with
    ``ticket`` when the ticket names the server; a ticket refusal is asked again
    without it. No deadline of its own: ``choose`` gives it the rest of the connect's."""
    refused: str | None = None
    held = ticket if ticket is not None and ticket.covers(url) else None
    error = await _ask(url, af, {spec.TICKET_HEADER: held.token} if held else {})
    if error is not None and (code := wire.ticket_refusal(error)) is not None:
        refused = code
        error = await _ask(url, af, {})
    if error is not None and wire.server_refused(error):
        # Only a number of seconds is repeated: the header is the server's text.
        after = (error.retry_after or "").strip()
        wait = f" (Retry-After: {after} s)" if after.isdigit() and len(after) < 10 else ""
        return f"HTTP {error.status}{wait}", refused
    return None, refused


@dataclass(frozen=True, slots=True)
class Choice:
    selection: ServerSelection
    # The candidates that refused the session's ticket at the capacity ask: URL -> the
    # server's code (the session presents it no more there).
    ticket_refused: dict[str, str] = field(default_factory=dict)
    # The candidates found busy, in rank order (the result's busy_servers): the chosen
    # one too when every candidate that answered was busy.
    busy: tuple[str, ...] = ()


async def choose(candidates: Sequence[str], pings: int, af: int = socket.AF_UNSPEC, *,
                 ticket: Ticket | None = None,
                 clock: Callable[[], float] | None = None) -> Choice:
    """Ping every candidate's host (each host once, one train after the other), rank,
    and take the first that accepts a connection and is not busy (the module
    docstring); pings and connections in address family ``af`` only (a candidate with
    no address of it ranks last, and is passed over, both recorded). The capacity ask
    presents ``ticket`` where it names the candidate.

    One after the other: a raw ICMP socket sees every echo reply to the host, and trains
    running together could credit one host's replies to another when their random
    identifiers met. Sequential trains cost (pings - 1) x 0.2 s plus a round trip each
    (under 7 s for 16 candidates and 3 pings). ``clock``: the event loop's (tests
    inject one; the capacity ask's deadline is a loop time)."""
    measured: dict[str, tuple[tuple[float, ...], str | None]] = {}
    for url in candidates:
        host = _endpoint(url)[0]
        if host not in measured:
            measured[host] = await _rtts(host, pings, af)
    ranked: list[ServerCandidate] = []
    for url in candidates:
        rtts, error = measured[_endpoint(url)[0]]
        ranked.append(ServerCandidate(url=url, rtts_ms=rtts, rtt_median_ms=median(rtts),
                                      error=error))
    failovers: list[ServerFailover] = []
    chosen: str | None = None
    busy_urls: list[str] = []
    refused: dict[str, str] = {}
    now = clock or asyncio.get_running_loop().time
    for i in rank(ranked):
        url = ranked[i].url
        deadline = now() + spec.SELECT_CONNECT_TIMEOUT_S
        problem = await _connect(url, af)
        if problem is not None:
            failovers.append(ServerFailover(url=url, error=problem))
            continue
        busy: str | None = None
        try:
            async with asyncio.timeout_at(deadline):
                busy, code = await capacity(url, af, ticket)
            if code is not None:
                refused[url] = code
        except TimeoutError:
            pass  # no answer in time: not known to be busy, so usable
        if busy is None:
            chosen = url
            break
        failovers.append(ServerFailover(url=url, error=BUSY + busy))
        busy_urls.append(url)
    if chosen is None and busy_urls:
        # Every candidate that answered is busy: the best-ranked busy one is used, so it
        # is no failover (it was not passed over), but it stays listed busy.
        chosen = busy_urls[0]
        failovers = [f for f in failovers if f.url != chosen]
    selection = ServerSelection(method="icmp_median_rtt", candidates=tuple(ranked),
                                chosen_url=chosen, failovers=tuple(failovers))
    return Choice(selection, refused, tuple(busy_urls))
