"""One measurement session: ping train, then downloads, then uploads (Ne.Me.Sys order).

Every test runs under its own deadline; a test that cannot run becomes a failed record in
the result, never an exception out of ``run``. Only bugs propagate.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agent import __version__, budget, checks, clock, family, live, spec, summary, units
from agent.config import AgentConfig, measurement_server, method, ping_target
from agent.errors import ProbeSetupError
from agent.probes import http_download, http_upload, icmp, select
from agent.probes.transfer import Access, loaded_nothing, stop_when_idle
from agent.report import describe_method
from agent.schema import (
    REFUSAL_REASONS,
    SCHEMA_VERSION,
    AddressFamily,
    HostContext,
    Method,
    PingMethod,
    PingSample,
    PingTest,
    Server,
    ServerSelection,
    SessionResult,
    TransferAttempt,
    TransferMethod,
    Validity,
    format_utc,
    utc_now,
)
from agent.ticket import Ticket
from agent.tickets import short_id, use_record

if TYPE_CHECKING:
    from agent.tickets import TicketSource

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def ping_deadline_s(m: PingMethod) -> float:
    """Worst-case runtime of a ping train, with room for resolution and start-up."""
    return (m.count - 1) * m.interval_s + m.timeout_s + spec.RESOLVE_TIMEOUT_S + 5.0


PREFLIGHT_S = 3.0


async def _preferred_family(host: str, port: int | None = None) -> AddressFamily | None:
    """The family the system prefers for ``host`` (getaddrinfo's order): with a
    ``port``, the first family whose first address accepts a TCP connection within
    PREFLIGHT_S (a host whose IPv6 is routed but broken falls back to IPv4, as happy
    eyeballs would, RFC 8305; none connecting: the first). None when it does not
    resolve (the probes then record why)."""
    try:
        async with asyncio.timeout(10):
            infos = await asyncio.to_thread(socket.getaddrinfo, host, port,
                                            socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        return None
    first: dict[int, Any] = {}
    for info in infos:
        if info[0] in (socket.AF_INET, socket.AF_INET6):
            first.setdefault(info[0], info[4])
    order: list[AddressFamily] = ["ipv4" if af == socket.AF_INET else "ipv6" for af in first]
    if port is None or len(order) < 2:
        return order[0] if order else None
    for af, sockaddr in first.items():
        try:
            async with asyncio.timeout(PREFLIGHT_S):
                _reader, writer = await asyncio.open_connection(sockaddr[0], sockaddr[1])
            writer.close()
            return "ipv4" if af == socket.AF_INET else "ipv6"
        except (OSError, TimeoutError):
            continue
    return order[0]


async def _resolves(host: str, af: int) -> bool:
    try:
        async with asyncio.timeout(10):
            await asyncio.to_thread(socket.getaddrinfo, host, None, af, socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        return False
    return True


async def run_ping(target: str, m: PingMethod, progress: Progress = _quiet,
                   observe: live.Observer = live.ignore,
                   af: int = socket.AF_UNSPEC) -> PingTest:
    """A ping train as a ``PingTest``; setup failures (a target with no address of
    family ``af`` among them) become ``status="failed"``. ``observe`` gets each RTT as
    it arrives (the live view)."""
    started_at = utc_now()
    progress(f"ping {target}: {m.count} echo requests, {m.interval_s:g} s apart")
    try:
        async with asyncio.timeout(ping_deadline_s(m)):
            obs = await icmp.run(target, m, observe=observe, af=af)
    except ProbeSetupError as exc:
        return PingTest(
            status="failed", error=str(exc), target=target, address=None, privileged=None,
            started_at=started_at, samples=(), summary=summary.ping_summary(()),
        )
    except TimeoutError:
        return PingTest(
            status="failed", error="ping train exceeded its deadline", target=target,
            address=None, privileged=None, started_at=started_at, samples=(),
            summary=summary.ping_summary(()),
        )
    samples: tuple[PingSample, ...] = obs.samples
    ping_summary = summary.ping_summary(samples)
    received = ping_summary.packets_received
    return PingTest(
        status="ok" if received > 0 else "failed",
        error=None if received > 0 else "no echo reply received",
        target=target,
        address=obs.address,
        privileged=obs.privileged,
        started_at=obs.started_at,
        samples=samples,
        summary=ping_summary,
    )


async def loaded_ping(target: str, ping: PingMethod, transfer: TransferMethod,
                      progress: Progress, observe: live.Observer = live.ignore,
                      af: int = socket.AF_UNSPEC) -> PingTest:
    """A ping train over a transfer's measurement window (latency under load)."""
    assert ping.loaded_interval_s is not None
    await asyncio.sleep(transfer.warmup_s)
    count = budget.loaded_count(transfer.window_s, ping.loaded_interval_s)
    train = replace(ping, count=count, interval_s=ping.loaded_interval_s)
    return await run_ping(target, train, progress, observe, af)


async def run_transfers(
    direction: str, base_url: str, m: TransferMethod, progress: Progress = _quiet,
    loaded: tuple[str, PingMethod] | None = None, observe: live.Observer = live.ignore,
    af: int = socket.AF_UNSPEC, endpoints: family.Endpoints | None = None,
    access: Access | None = None,
) -> tuple[list[TransferAttempt], PingTest | None]:
    """All tests of one direction. With ``loaded`` = (target, ping method), a ping train
    runs during the first test's window and is returned apart, unless that test's first
    attempt was refused (see below). ``observe`` gets the live view's events (phases,
    bytes, RTT under load). Connections and pings use address family ``af``; each
    connection's addresses go to ``endpoints``. ``access``: the session's ticket and
    refusal allowance, shared by its tests.

    The train starts warmup_s after the test does, timed for the first attempt's
    window. A refused first attempt ends at once and its retry waits for the server (up
    to spec.REFUSAL_WAIT_MAX_S), so the train would have sampled an idle line, or one
    loaded for only part of the train, and reported it as under load: it is discarded
    (None), and the progress line says why. Restarting the train with each retry would
    keep it, but would also put it outside the time the plan gives it (agent/budget.py),
    for a figure the next session measures anyway."""
    on_connect = endpoints.add if endpoints is not None else None
    probe = http_download if direction == "download" else http_upload
    attempts: list[TransferAttempt] = []
    under_load: PingTest | None = None
    for test_index in range(m.tests):
        progress(f"{direction} test {test_index + 1}/{m.tests}: {describe_method(m)}")
        if test_index == 0 and loaded is not None and m.mode == "duration":
            async with asyncio.TaskGroup() as group:
                transfer = group.create_task(probe.run(base_url, m, test_index, observe,
                                                       af, on_connect, access=access))
                pinging = group.create_task(loaded_ping(loaded[0], loaded[1], m, _quiet,
                                                        observe, af))
                stop_when_idle(transfer, pinging)
            results = transfer.result()
            under_load = None if pinging.cancelled() or loaded_nothing(results) \
                else pinging.result()
            first = results[0] if results else None
            # A first attempt that moved nothing (its connection refused, then retried)
            # left the train on an idle line too, as a refused one does.
            if first is not None and (first.failure_reason in REFUSAL_REASONS or (
                    loaded_nothing([first]) and not loaded_nothing(results))):
                under_load = None
                progress(f"  RTT under load discarded: attempt 1 was refused "
                         f"({first.failure_reason}), so the ping train ran while the "
                         f"{direction} waited, not under its load")
        else:
            results = await probe.run(base_url, m, test_index, observe, af, on_connect,
                                      access=access)
        for a in results:
            if a.status == "ok" and a.throughput_bps is not None:
                progress(f"  attempt {a.attempt}: {units.speed(a.throughput_bps)} "
                         f"({a.streams} stream(s))")
            else:
                progress(f"  attempt {a.attempt}: failed ({a.failure_reason}: {a.error})")
        if under_load is not None and under_load.summary.rtt_mean_ms is not None:
            progress(f"  RTT under load: mean {units.latency(under_load.summary.rtt_mean_ms)}, "
                     f"loss {units.percent(under_load.summary.loss_ratio or 0)}")
        attempts.extend(results)
    return attempts, under_load


def _cross_traffic(direction: str, attempts: list[TransferAttempt], interface_bytes: int,
                   access: Access, overhead: float) -> float | None:
    """The direction's cross-traffic ratio: over all its tests, as always; over the
    attempts the server did not refuse when it refused any (checks.line_cross_traffic)."""
    if not attempts:
        return None
    if any(a.failure_reason in REFUSAL_REASONS for a in attempts):
        return checks.line_cross_traffic(access.metered, direction, overhead)
    return checks.cross_traffic_ratio(interface_bytes, checks.own_bytes(attempts), overhead)


def _thresholds(cfg: AgentConfig) -> checks.Thresholds:
    c = cfg.checks
    return checks.Thresholds(
        max_cpu_percent=c.max_cpu_percent, max_memory_used_ratio=c.max_memory_used_ratio,
        min_memory_bytes=c.min_memory_bytes, reject_wireless=c.reject_wireless,
        min_link_mbps=c.min_link_mbps, max_cross_traffic_ratio=c.max_cross_traffic_ratio,
        max_lan_hosts=c.max_lan_hosts)


async def run(
    cfg: AgentConfig,
    probe_id: str,
    progress: Progress = _quiet,
    *,
    tests: frozenset[str] = frozenset({"ping", "download", "upload"}),
    instruction_version: str | None = None,
    observe: live.Observer = live.ignore,
    tickets: TicketSource | None = None,
    refusals: budget.RefusalAllowance | None = None,
) -> SessionResult:
    """Run one session and return its result (never raises for a failed measurement).
    ``observe`` gets the live view's events (agent/live.py); it never changes the
    result. The session runs in ``cfg.server.address_family`` ("any", "ipv4" or
    "ipv6"; a "both" config is split by ``run_all``). A session that transfers takes
    a measurement ticket from ``tickets`` (None: none, the per-address rule) and may
    spend ``refusals`` on refused transfers (None: this config's allowance for one
    session, agent/budget.py)."""
    requested = cfg.server.address_family
    if requested == "both":
        raise ValueError("a dual-stack config is run by session.run_all, once a family")
    af = family.socket_family(requested)
    endpoints = family.Endpoints()
    started = datetime.now(UTC)
    t0 = time.monotonic()
    clock_state = clock.read()
    m = method(cfg)
    # Record only what this session runs: a test left out has tests = 0 in its method.
    if "download" not in tests:
        m = replace(m, download=replace(m.download, tests=0))
    if "upload" not in tests:
        m = replace(m, upload=replace(m.upload, tests=0))
    if "ping" not in tests:
        m = replace(m, ping=None)
    if refusals is None:
        refusals = budget.refusal_allowance(budget.plan(
            method(cfg), candidates=cfg.server.candidates,
            select_pings=cfg.server.select_pings))
    held: Ticket | None = None
    withheld: Ticket | None = None
    ticket_s = 0.0
    if tickets is not None and (m.download.tests or m.upload.tests):
        # A POST for the ticket is charged to the refusal allowance (agent/budget.py),
        # and may wait no longer than the allowance.
        taken = await tickets.take(refusals.duration_s)
        held, ticket_s = taken.ticket, taken.spent_s
        if taken.note:
            progress(taken.note)
        withheld = _withheld(held, m, progress)
        if withheld is not None:
            held = None
    selection: ServerSelection | None = None
    refused_at: dict[str, str] = {}
    busy: tuple[str, ...] = ()
    if cfg.server.candidates and (m.download.tests or m.upload.tests or m.ping):
        progress(f"choosing among {len(cfg.server.candidates)} measurement servers")
        choice = await select.choose(cfg.server.candidates, cfg.server.select_pings, af,
                                     ticket=held)
        selection, refused_at, busy = choice.selection, choice.ticket_refused, choice.busy
        for f in selection.failovers:
            progress(f"  passed over {f.url}: {f.error}")
        # None chosen: the best-ranked is used, and its transfers fail (recorded).
        best = selection.chosen_url or \
            selection.candidates[select.rank(selection.candidates)[0]].url
        cfg = replace(cfg, server=replace(cfg.server, url=best, candidates=()))
        if best in busy:
            progress(f"  every candidate that answers is busy ({', '.join(busy)}): the "
                     "best-ranked is used, its transfers retry when refused")
        progress(f"  measuring against {best}")
    base_url = measurement_server(cfg) if (m.download.tests or m.upload.tests) else None
    access = _access(held, base_url, refused_at, refusals, progress)
    access.spent_s = ticket_s
    pinned: AddressFamily | None = None
    if requested == "any":
        # One family for the whole session: the ping and every transfer stream take the
        # family the host's address selection gives first (getaddrinfo's order, RFC
        # 6724), or the ping target's when it is an address literal; else the ping
        # could run over IPv4 and the load over IPv6, and the streams could split.
        target = ping_target(cfg) if m.ping is not None else None
        parts = urlsplit(base_url) if base_url else None
        server_host = parts.hostname if parts else None
        literal = family.family_of(target) or family.family_of(server_host)
        host = server_host or target
        port = (parts.port or (443 if parts.scheme == "https" else 80)) if parts else None
        preferred = None if literal or not host else await _preferred_family(host, port)
        pinned = family.pinned_family(target, server_host, preferred)
        # A ping target by another name, with no address of that family: pin nothing
        # (each part as before) rather than fail the ping.
        if pinned is not None and target and target != server_host and \
                family.family_of(target) is None and \
                not await _resolves(target, family.socket_family(pinned)):
            pinned = None
        if pinned is not None:
            af = family.socket_family(pinned)
    ping_test: PingTest | None = None
    loaded: tuple[str, PingMethod] | None = None
    if m.ping is not None:
        target = ping_target(cfg)
        observe(live.PhaseStarted("ping", time.monotonic(),
                                  (m.ping.count - 1) * m.ping.interval_s, transfer=False))
        ping_test = await run_ping(target, m.ping, progress, observe, af)
        if m.ping.loaded_interval_s is not None and ping_test.address is not None:
            loaded = (target, m.ping)
    transfers: list[TransferAttempt] = []
    ping_download: PingTest | None = None
    ping_upload: PingTest | None = None
    context: HostContext | None = None
    if cfg.checks.enabled:
        observe(live.PhaseStarted("host checks", time.monotonic(), None, transfer=False))
        host = urlsplit(base_url).hostname if base_url else ping_target(cfg)
        context = await asyncio.to_thread(checks.observe_host, host or "127.0.0.1", 0.5,
                                          cfg.checks.scan_lan, [ping_target(cfg)], af)
    unmeasured = checks.cross_traffic_unmeasured(context) if context is not None else None
    if unmeasured is not None and base_url is not None:
        progress(unmeasured)
    if base_url is not None:
        iface = context.interface if context is not None and unmeasured is None else None
        if iface is not None:
            access.meter = partial(checks.interface_bytes, iface)
        before = checks.interface_bytes(iface)
        down, ping_download = await run_transfers("download", base_url, m.download,
                                                  progress, loaded, observe, af, endpoints,
                                                  access)
        middle = checks.interface_bytes(iface)
        up, ping_upload = await run_transfers("upload", base_url, m.upload, progress, loaded,
                                              observe, af, endpoints, access)
        after = checks.interface_bytes(iface)
        transfers = down + up
        if context is not None and before and middle and after:
            overhead = checks.wire_overhead(context.mtu)
            context = replace(
                context,
                download_cross_traffic_ratio=_cross_traffic(
                    "download", down, middle[0] - before[0], access, overhead),
                upload_cross_traffic_ratio=_cross_traffic(
                    "upload", up, after[1] - middle[1], access, overhead))
    validity = None
    if context is not None:
        reasons = checks.assess(context, _thresholds(cfg))
        validity = Validity(valid=not reasons, reasons=reasons)
        for r in reasons:
            progress(f"invalid: {r.detail}")
    ended = datetime.now(UTC)
    # Under "any", the family the session was pinned to; else (literals of both
    # families, or nothing resolved) the one family its connections and ping used, if
    # they used one.
    seen = {f for f in (*(family.family_of(a) for a in endpoints.remote),
                        family.family_of(ping_test.address if ping_test else None)) if f}
    used = pinned or (next(iter(seen)) if len(seen) == 1 else None)
    ticket_use = use_record(held, base_url, access.refused) if held is not None else None
    if withheld is not None:
        ticket_use = use_record(withheld, base_url, None, withheld=True)
    return SessionResult(
        schema_version=SCHEMA_VERSION,
        result_id=str(uuid.uuid4()),
        probe_id=probe_id,
        agent_version=__version__,
        started_at=format_utc(started),
        ended_at=format_utc(max(ended, started)),
        duration_s=time.monotonic() - t0,
        clock=clock_state,
        context=context,
        validity=validity,
        method=m,
        server=Server(url=base_url, ping_target=ping_test.target if ping_test else None),
        ping=ping_test,
        transfers=tuple(transfers),
        summary=summary.session_summary(
            ping_test.summary if ping_test else None, transfers,
            ping_download.summary if ping_download else None,
            ping_upload.summary if ping_upload else None,
        ),
        ping_download=ping_download,
        ping_upload=ping_upload,
        instruction_version=instruction_version,
        server_selection=selection,
        address_family=used if requested == "any" else requested,
        address_family_requested=cfg.server.address_family,
        local_addresses=tuple(endpoints.local),
        remote_addresses=tuple(endpoints.remote),
        ticket=ticket_use,
        busy_servers=busy,
    )


def _withheld(held: Ticket | None, m: Method, progress: Progress) -> Ticket | None:
    """``held`` when the session must not present it: a fixed stream count
    (transfer.streams > 0) above the ticket's allowance.streams, which the server would
    refuse on every attempt (429 ticket_streams), so that nothing would be measured; the
    session then measures under the per-address rule. Adaptive streams stop at the
    allowance instead (transfer.Access.stream_cap)."""
    if held is None:
        return None
    streams = max((t.streams for t in (m.download, m.upload) if t.tests), default=0)
    if streams <= held.allowance.streams:
        return None
    progress(f"ticket {short_id(held)} allows {held.allowance.streams} streams at once, "
             f"this method fixes {streams}: measuring without it, under the server's "
             "per-address rule")
    return held


def _access(held: Ticket | None, base_url: str | None, refused_at: dict[str, str],
            refusals: budget.RefusalAllowance, progress: Progress) -> Access:
    """The session's terms with its server: the ticket presented when it names the
    server (and the server did not refuse it when asked about its capacity), and the
    refusal allowance."""
    access = Access(allowance_s=refusals.duration_s, allowance_bytes=refusals.bytes,
                    progress=progress)
    if held is None or base_url is None:
        return access
    named = f"ticket {short_id(held)}"
    if not held.covers(base_url):
        progress(f"{named} does not name {base_url} (servers: {', '.join(held.servers)}): "
                 "measuring under the server's per-address rule")
    elif base_url in refused_at:
        access.refused = refused_at[base_url]
        progress(f"{named} refused ({access.refused}): measuring without it")
    else:
        access.ticket = held
        progress(f"measuring under {named} (servers: {', '.join(held.servers)})")
    return access


async def run_all(
    cfg: AgentConfig,
    probe_id: str,
    progress: Progress = _quiet,
    *,
    tests: frozenset[str] = frozenset({"ping", "download", "upload"}),
    instruction_version: str | None = None,
    observe: live.Observer = live.ignore,
    on_result: Callable[[SessionResult], None] | None = None,
    tickets: TicketSource | None = None,
) -> list[SessionResult]:
    """``run`` once per session the config's address family stands for: one result,
    or under "both" (dual stack) an IPv4 session then an IPv6 one, each a whole
    session with its own result (address_family_requested = "both" in both).
    ``on_result`` gets each result as soon as its session ends (the caller spools it:
    a stop during the IPv6 session keeps the IPv4 result). Each session takes its own
    ticket from ``tickets`` and has its own refusal allowance (the slot's plan's)."""
    requested = cfg.server.address_family
    results: list[SessionResult] = []
    families = family.session_families(requested)
    refusals = budget.refusal_allowance(budget.plan(
        method(cfg), len(families), candidates=cfg.server.candidates,
        select_pings=cfg.server.select_pings))
    for one in families:
        session_cfg = replace(cfg, server=replace(cfg.server, address_family=one))
        if requested == "both":
            progress(f"dual-stack session over {family.label(one)}")
        result = await run(session_cfg, probe_id, progress, tests=tests,
                           instruction_version=instruction_version, observe=observe,
                           tickets=tickets, refusals=refusals)
        result = replace(result, address_family_requested=requested)
        if on_result is not None:
            on_result(result)
        results.append(result)
    return results
