"""Measurement tickets on the agent's side: where a session's measurement ticket comes from (the
instruction fetch, else a POST of its own, else none), that a session presents it
only to a server it names, and what the result says about it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent import budget, config, control, spec, tickets
from agent.client import CollectorClient
from agent.decoding import parse_result
from agent.probes import session
from agent.schema import SessionResult, to_dict
from agent.ticket import peek
from agent.tickets import Offer, TicketSource
from tests.agent.measure_fakes import (
    FakeCollector,
    MeasurementServer,
    refusal,
    serving,
    ticket,
    token,
)

T = TypeVar("T")
SERVER = "http://m.example:8081"


def _with(collector: FakeCollector, body: Callable[[CollectorClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with serving(collector.app()) as url:
            return await body(CollectorClient(url, "probe-token", 10))

    return asyncio.run(main())


def _issuer(ids: list[str]) -> Callable[[], str]:
    """Issues tickets for SERVER, each with the next id of ``ids``."""
    left = iter(ids)
    return lambda: token([SERVER], jti=next(left))


# --- reading a ticket -------------------------------------------------------------------


@pytest.mark.parametrize(("value", "problem"), [
    (None, None),
    ("  ", None),
    ("not-a-jws", "the collector's ticket is not a compact JWS"),
    ("a.b.c\r\nX-Evil: 1", "the collector's ticket is not a compact JWS"),
    ("eyJhbGciOiJub25lIn0.eyJhdWQiOiBbXX0.", "the collector's ticket is unusable: bbprobe: "
     "expected the allowance object"),
])
def test_a_ticket_that_does_not_parse_is_none_with_the_reason(value: str | None,
                                                              problem: str | None) -> None:
    """No ticket, garbage, a header-splitting value, claims missing the allowance: no
    ticket, and why (nothing raised)."""
    assert tickets.read(value, 0.0) == (None, problem)


def test_a_good_ticket_is_read_and_recorded() -> None:
    """The claims are read unverified; the record names its id, expiry and servers, and
    whether the session's server is one of them (origin: default ports written)."""
    raw = token(["http://m.example"], jti="1a2b3c4d5e6f")
    held, problem = tickets.read(raw, 0.0)
    assert problem is None and held is not None
    assert (held.ticket_id, held.servers) == ("1a2b3c4d5e6f", ("http://m.example:80",))
    assert tickets.short_id(held) == "1a2b3c4d…"
    use = tickets.use_record(held, "http://M.example:80/base", None)
    assert (use.ticket_id, use.presented, use.refused) == ("1a2b3c4d5e6f", True, None)
    assert use.expires_at.endswith("Z")
    assert tickets.use_record(held, "https://m.example", "expired").presented is False


@pytest.mark.parametrize("offset_s", [-1140.0, 0.0, 1140.0])
def test_a_tickets_life_is_counted_from_its_receipt_not_by_the_wall_clock(
        offset_s: float) -> None:
    """A 900 s ticket, received at monotonic 1000 s, is usable until 30 s before its
    lifetime ends (1870 s), whatever the probe's wall clock says of its iat and exp
    (19 minutes fast, right, 19 minutes slow)."""
    raw = token([SERVER], expires_in_s=900, issued_at_offset_s=offset_s)
    held, problem = tickets.read(raw, 1000.0)
    assert problem is None and held is not None
    assert (held.received_at, held.lifetime_s) == (1000.0, 900.0)
    assert [held.usable(t) for t in (1000.0, 1869.0, 1870.0, 2000.0)] == [
        True, True, False, False]
    assert held.remaining_s(1869.0) == 31.0


def test_a_ticket_not_received_by_the_agent_is_never_usable() -> None:
    """A ticket read with no receipt time (as the collector reads its own) has no time
    left by the agent's reckoning."""
    held = peek(token([SERVER]))
    assert (held.received_at, held.remaining_s(0.0), held.usable(0.0)) == (None, None, False)


# --- the ticket source ------------------------------------------------------------------


def _takes(collector: FakeCollector, offer: Offer | None, count: int,
           **kwargs: Any) -> tuple[list[tickets.Taken], list[str]]:
    warned: list[str] = []

    async def body(client: CollectorClient) -> list[tickets.Taken]:
        source = TicketSource(client, offer, warn=warned.append, **kwargs)
        return [await source.take() for _ in range(count)]

    return _with(collector, body), warned


def _ids(taken: list[tickets.Taken]) -> list[str | None]:
    return [t.ticket.ticket_id if t.ticket else None for t in taken]


def test_the_prefetched_ticket_first_then_one_posted_a_session() -> None:
    """Dual stack: the first session takes the ticket that came with the instruction
    (no request), the second asks for its own (one POST)."""
    collector = FakeCollector(issue=_issuer(["posted"]))
    prefetched = ticket([SERVER], jti="prefetched")
    taken, warned = _takes(collector, Offer(prefetched, answered=True), 2)
    assert _ids(taken) == ["prefetched", "posted"]
    assert collector.requests == [("POST", spec.TICKETS_PATH, None)]
    assert warned == []


def test_a_prefetched_ticket_about_to_expire_is_replaced() -> None:
    """A ticket within its expiry margin is not used: one is asked for."""
    collector = FakeCollector(issue=_issuer(["fresh"]))
    stale = ticket([SERVER], jti="stale", expires_in_s=10)
    taken, _ = _takes(collector, Offer(stale, answered=True), 1)
    assert _ids(taken) == ["fresh"]


def test_a_collector_that_answered_without_a_ticket_is_not_asked_again() -> None:
    """The instruction came with no ticket header: this collector issues none, so no
    POST is made for either session, and the note says so."""
    collector = FakeCollector(issue=None)
    taken, warned = _takes(collector, Offer(answered=True), 2)
    assert _ids(taken) == [None, None] and collector.requests == []
    assert taken[0].note is not None and "issues no measurement tickets" in taken[0].note
    assert warned == []


def test_an_older_collector_404_means_no_ticket_asked_once() -> None:
    """The fetch got no answer (offer not answered): one POST, a 404 (a collector from
    before tickets): no ticket, said once as a note, and not asked again."""
    collector = FakeCollector(issue=None)
    taken, warned = _takes(collector, Offer(), 2)
    assert _ids(taken) == [None, None]
    assert collector.requests == [("POST", spec.TICKETS_PATH, None)]
    assert taken[0].note is not None and "older collector" in taken[0].note
    assert warned == []


def test_a_garbage_header_is_ignored_with_the_reason_and_one_is_asked_for() -> None:
    """A ticket header that does not parse costs nothing but a warning: one is asked for
    by POST."""
    collector = FakeCollector(issue=_issuer(["posted"]))
    taken, warned = _takes(collector, tickets.offer_of("garbage"), 1)
    assert _ids(taken) == ["posted"]
    assert warned == ["the collector's ticket is not a compact JWS: asking for another"]


@pytest.mark.parametrize(("collector", "warning"), [
    (FakeCollector(issue=lambda: "garbage"),
     "the collector's ticket is not a compact JWS: measuring without a ticket"),
    (FakeCollector(issue=_issuer(["x"]), post_status=500),
     "no ticket: HTTP 500: no: measuring without a ticket"),
    (FakeCollector(issue=_issuer(["x"]), post_delay_s=1.0),
     "no ticket: the collector did not answer in 0.2 s: measuring without a ticket"),
    (FakeCollector(issue=lambda: token([SERVER], expires_in_s=5)),
     "is valid for 5 s from issue, not more than the 30 s margin: measuring without a "
     "ticket"),
])
def test_any_failure_to_get_a_ticket_is_no_ticket(collector: FakeCollector,
                                                  warning: str) -> None:
    """A garbage reply, an error, no answer in time, a ticket already expiring: the
    session gets no ticket and the reason is warned, never raised."""
    taken, warned = _takes(collector, Offer(), 1, timeout_s=0.2)
    assert _ids(taken) == [None]
    assert len(warned) == 1 and warned[0].endswith(warning), warned


def test_the_post_waits_no_longer_than_the_session_allows() -> None:
    """The POST is bounded by the limit the session gives (its refusal allowance) when
    that is shorter than TICKET_TIMEOUT_S; a limit of nothing makes no POST at all."""
    collector = FakeCollector(issue=_issuer(["x"]), post_delay_s=1.0)

    async def body(client: CollectorClient) -> list[tickets.Taken]:
        warned: list[str] = []
        source = TicketSource(client, Offer(), warn=warned.append)
        late = await source.take(0.2)
        assert warned == ["no ticket: the collector did not answer in 0.2 s: measuring "
                          "without a ticket"]
        none = await TicketSource(client, Offer(), warn=warned.append).take(0.0)
        return [late, none]

    late, none = _with(collector, body)
    assert (late.ticket, none.ticket) == (None, None)
    assert none.note is not None and "leaves no time" in none.note
    assert collector.requests == [("POST", spec.TICKETS_PATH, None)]


def test_the_post_reports_its_time_and_the_receipt_on_the_sources_clock() -> None:
    """The time a POST took (by the source's clock: 100 s to 103.5 s) is reported for
    the session to charge, and the ticket counts its life from 103.5 s; the ticket
    from the instruction fetch cost nothing."""
    readings = iter([100.0, 103.5])
    collector = FakeCollector(issue=_issuer(["posted"]))

    async def body(client: CollectorClient) -> list[tickets.Taken]:
        source = TicketSource(client, Offer(), clock=lambda: next(readings))
        return [await source.take()]

    (taken,) = _with(collector, body)
    assert taken.ticket is not None and taken.spent_s == 3.5
    assert taken.ticket.received_at == 103.5
    prefetched = ticket([SERVER], received_at=50.0)
    source = TicketSource(CollectorClient("http://127.0.0.1:9", "t", 2),
                          Offer(prefetched, answered=True), clock=lambda: 60.0)
    assert asyncio.run(source.take()) == tickets.Taken(prefetched)


def test_no_collector_no_ticket() -> None:
    """Without a collector (speed, run --no-push) the session stays anonymous."""
    source = TicketSource(None, Offer(ticket([SERVER]), answered=True))
    assert asyncio.run(source.take()) == tickets.Taken(None)


# --- the instruction fetch brings the ticket --------------------------------------------


def test_the_instruction_fetch_asks_for_a_ticket_and_keeps_it_on_200_and_304(
        tmp_path: Path) -> None:
    """The instruction GET carries Bbprobe-Want-Ticket: 1; the ticket comes back on the
    200 and again on the 304 (If-None-Match), and the applied config carries it."""
    collector = FakeCollector(issue=_issuer(["first", "second"]))

    async def body(client: CollectorClient) -> list[control.Fetched]:
        return [await control.fetch(client, str(tmp_path)) for _ in range(2)]

    first, second = _with(collector, body)
    assert [r[2] for r in collector.requests] == ["1", "1"]
    assert first.instruction is not None and first.source == "collector"
    assert second.source == "collector"  # the 304
    assert [f.offer.ticket.ticket_id if f.offer.ticket else None
            for f in (first, second)] == ["first", "second"]
    applied = control.apply(second, lambda c: config.load(None, {"HOME": str(tmp_path)},
                                                          central=c))
    assert applied.offer == second.offer and applied.error is None


def test_a_garbage_ticket_header_never_costs_the_instruction(tmp_path: Path) -> None:
    """A ticket header that does not parse: the instruction applies as always, and the
    reason is kept in the offer."""
    collector = FakeCollector(header="%%%")

    fetched = _with(collector, lambda client: control.fetch(client, str(tmp_path)))
    assert fetched.instruction is not None and fetched.error is None
    assert fetched.offer == Offer(None, "the collector's ticket is not a compact JWS", True)


def test_an_unreachable_collector_leaves_the_ticket_to_a_post(tmp_path: Path) -> None:
    """No answer to the fetch: the offer is not answered, so the session will POST."""
    fetched = asyncio.run(control.fetch(CollectorClient("http://127.0.0.1:9", "t", 2),
                                        str(tmp_path)))
    assert fetched.offer == Offer() and fetched.error is not None


# --- a session under a ticket -----------------------------------------------------------


def _config(tmp_path: Path, url: str, **server: Any) -> config.AgentConfig:
    small = {"attempts": 1, "warmup_s": 0.1, "window_s": 0.3, "streams": 2,
             "sample_interval_s": 0.05}
    return config.parse({
        "state_dir": str(tmp_path), "profile": "custom",
        "server": {"url": url, **server}, "checks": {"enabled": False},
        "ping": {"enabled": False}, "download": small, "upload": small,
    })


def _session(tmp_path: Path, server: MeasurementServer,
             held: Callable[[str], Any] | None,
             progress: Callable[[str], None] = lambda _: None,
             source: TicketSource | None = None,
             refusals: budget.RefusalAllowance | None = None) -> SessionResult:
    """One session against ``server`` with a prefetched ticket made by ``held(url)``
    (or the tickets of ``source``)."""
    async def main() -> SessionResult:
        async with serving(server.app()) as url:
            offer = Offer(held(url), answered=True) if held else Offer(answered=True)
            tickets = source or TicketSource(CollectorClient("http://127.0.0.1:9", "t", 2),
                                             offer)
            return await session.run(_config(tmp_path, url), "p1", progress,
                                     tickets=tickets, refusals=refusals)

    result = asyncio.run(main())
    # What the collector gets parses as it was measured.
    assert parse_result(json.loads(json.dumps(to_dict(result)))) == result
    return result


def test_a_session_presents_its_ticket_on_every_transfer(tmp_path: Path) -> None:
    """A ticket naming the server: every download and upload request carries it, and the
    result says it was presented and not refused."""
    server = MeasurementServer()
    result = _session(tmp_path, server, lambda url: ticket([url], jti="t-1"))
    assert [(a.direction, a.status) for a in result.transfers] == [
        ("download", "ok"), ("upload", "ok")]
    assert {kind for kind, _ in server.seen} == {"download", "upload"}
    presented = {t for _, t in server.seen}
    assert len(presented) == 1 and None not in presented
    assert result.ticket is not None
    assert (result.ticket.ticket_id, result.ticket.presented, result.ticket.refused) == (
        "t-1", True, None)


def test_a_ticket_for_another_server_is_not_presented(tmp_path: Path) -> None:
    """A ticket is a bearer credential: a server it does not name never sees it; the
    session measures under the per-address rule and says so."""
    server = MeasurementServer()
    result = _session(tmp_path, server, lambda url: ticket(["http://elsewhere.example"]))
    assert server.seen and all(t is None for _, t in server.seen)
    assert result.ticket is not None and result.ticket.presented is False


def test_a_session_whose_ticket_is_refused_goes_on_without_it(tmp_path: Path) -> None:
    """The server refuses the ticket (403, expired) on the first download: that attempt
    is ticket_refused, its retry and the upload go without the ticket, and the result
    records the refusal; no attempt is an ordinary failure."""
    def policy(kind: str, presented: str | None, _n: int) -> Any:
        return refusal(403, ticket_refused="expired") if presented else None

    server = MeasurementServer(policy)
    result = _session(tmp_path, server, lambda url: ticket([url]))
    assert [(a.direction, a.attempt, a.status, a.failure_reason)
            for a in result.transfers] == [
        ("download", 1, "failed", "ticket_refused"), ("download", 2, "ok", None),
        ("upload", 1, "ok", None)]
    assert result.ticket is not None
    assert (result.ticket.presented, result.ticket.refused) == (True, "expired")
    assert all(t is None for kind, t in server.seen if kind == "upload")


def test_a_ticket_allowing_fewer_streams_than_the_method_fixes_is_withheld(
        tmp_path: Path) -> None:
    """The method fixes 2 streams, the ticket allows 1 at once (the server would refuse
    every attempt, ticket_streams): the session measures without it, under the
    per-address rule, says so, and records it as not presented."""
    server = MeasurementServer()
    lines: list[str] = []
    result = _session(tmp_path, server, lambda url: ticket([url], jti="narrow", streams=1),
                      lines.append)
    assert server.seen and all(t is None for _, t in server.seen)
    assert {a.status for a in result.transfers} == {"ok"}
    assert result.ticket is not None
    assert (result.ticket.ticket_id, result.ticket.presented, result.ticket.refused) == (
        "narrow", False, None)
    assert "ticket narrow allows 1 streams at once, this method fixes 2: measuring " \
           "without it, under the server's per-address rule" in lines


class _Spent(TicketSource):
    """No ticket, after a POST that took ``spent_s``; keeps the limit it was given."""

    def __init__(self, spent_s: float) -> None:
        super().__init__(None)
        self.spent_s = spent_s
        self.limits: list[float | None] = []

    async def take(self, limit_s: float | None = None) -> tickets.Taken:
        self.limits.append(limit_s)
        return tickets.Taken(None, spent_s=self.spent_s)


@pytest.mark.parametrize(("spent_s", "outcomes"), [
    (0.0, [("download", "server_refused"), ("download", None), ("upload", None)]),
    (5.0, [("download", "server_refused"), ("upload", None)]),
])
def test_the_ticket_post_is_charged_to_the_refusal_allowance(
        tmp_path: Path, spent_s: float, outcomes: list[tuple[str, str | None]]) -> None:
    """The session gives the ticket POST its refusal allowance (5 s) as a limit, and
    charges the time the POST took: when it took all 5 s, a refused download is not
    retried (recorded as refused); when it took nothing, it is."""
    def once(kind: str, _ticket: str | None, n: int) -> Any:
        return refusal(429, retry_after="0") if kind == "download" and n == 0 else None

    source = _Spent(spent_s)
    result = _session(tmp_path, MeasurementServer(once), None, source=source,
                      refusals=budget.RefusalAllowance(5.0, 10**12))
    assert source.limits == [5.0]
    assert [(a.direction, a.failure_reason) for a in result.transfers] == outcomes


def test_without_a_ticket_the_session_is_as_before(tmp_path: Path) -> None:
    """A collector that issues none: no header anywhere, no ticket in the result (the
    document keeps its older form: no ticket key at all)."""
    server = MeasurementServer()
    result = _session(tmp_path, server, None)
    assert all(t is None for _, t in server.seen)
    assert result.ticket is None and "ticket" not in to_dict(result)
    assert result.busy_servers == ()


def test_dual_stack_sessions_each_take_their_own_ticket(tmp_path: Path) -> None:
    """Under "both" the IPv4 session measures under the ticket the instruction brought,
    the IPv6 one under a ticket it asked for (the IPv6 session fails here: the server is
    an IPv4 literal; it is a recorded failure, with its own ticket all the same)."""
    server = MeasurementServer()
    collector = FakeCollector()

    async def main() -> list[SessionResult]:
        async with serving(server.app()) as url, serving(collector.app()) as central:
            collector.issue = lambda: token([url], jti="posted")
            offer = Offer(ticket([url], jti="prefetched"), answered=True)
            source = TicketSource(CollectorClient(central, "t", 2), offer)
            cfg = _config(tmp_path, url, address_family="both")
            return await session.run_all(cfg, "p1", tickets=source)

    ipv4, ipv6 = asyncio.run(main())
    assert [(r.address_family, r.ticket.ticket_id if r.ticket else None)
            for r in (ipv4, ipv6)] == [("ipv4", "prefetched"), ("ipv6", "posted")]
    assert collector.requests == [("POST", spec.TICKETS_PATH, None)]
    assert {a.status for a in ipv4.transfers} == {"ok"}
    assert {a.failure_reason for a in ipv6.transfers} == {"connect_error"}
