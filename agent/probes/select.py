"""Choosing the measurement server among candidates (issue 15), at session start.

Ne.Me.Sys measures against the nearest server (methodology.md §2.1). Here "nearest" is
the lowest median of a few ICMP echo round trips to each candidate's host (the median:
one delayed reply must not decide). Candidates with no reply rank after all that
answered; ties keep the order the instruction lists them in, so an operator's list is
also its preference. Then the first candidate, in rank order, that accepts a TCP
connection is used; each one passed over is a recorded failover, so a dead server costs
a connect timeout, not the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

from agent import family
from agent.errors import ProbeSetupError
from agent.probes import icmp
from agent.schema import PingMethod, ServerCandidate, ServerFailover, ServerSelection
from agent.stats import median

# Pings a select_pings train apart, and how long one may wait for its reply.
INTERVAL_S = 0.2
REPLY_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 3.0


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
    train = PingMethod(count=pings, interval_s=INTERVAL_S, payload_bytes=56,
                       timeout_s=REPLY_TIMEOUT_S, loaded_interval_s=None)
    deadline = (pings - 1) * INTERVAL_S + REPLY_TIMEOUT_S + icmp.RESOLVE_TIMEOUT_S + 2
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
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, writer = await asyncio.open_connection(host, port, family=af)
    except TimeoutError:
        return f"TCP connect to {host}:{port} timed out after {CONNECT_TIMEOUT_S:g} s"
    except socket.gaierror as exc:
        return family.unresolved(host, af, exc)
    except OSError as exc:
        return f"TCP connect to {host}:{port} failed: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def choose(candidates: Sequence[str], pings: int,
                 af: int = socket.AF_UNSPEC) -> ServerSelection:
    """Ping every candidate's host (each host once, one train after the other), rank,
    and take the first that accepts a connection; pings and connections in address
    family ``af`` only (a candidate with no address of it ranks last, and is passed
    over, both recorded).

    One after the other: a raw ICMP socket sees every echo reply to the host, and trains
    running together could credit one host's replies to another when their random
    identifiers met. Sequential trains cost (pings - 1) x 0.2 s plus a round trip each
    (under 7 s for 16 candidates and 3 pings)."""
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
    for i in rank(ranked):
        problem = await _connect(ranked[i].url, af)
        if problem is None:
            chosen = ranked[i].url
            break
        failovers.append(ServerFailover(url=ranked[i].url, error=problem))
    return ServerSelection(method="icmp_median_rtt", candidates=tuple(ranked),
                           chosen_url=chosen, failovers=tuple(failovers))
