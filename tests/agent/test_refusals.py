"""Refusals on the agent's side: a transfer the measurement server refuses (429 and 503
for capacity, 403 for the ticket) is the server's, recorded apart, retried within the
session's allowance without using up an attempt; the allowance is planned (agent/budget.py);
a busy candidate is passed over as busy, not broken."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from agent import budget, config, report, spec
from agent.errors import ConfigError
from agent.probes import http_download, http_upload, select, session, transfer, wire
from agent.probes.transfer import Access, Ran, StreamFailure, StreamState
from agent.schema import PingMethod, PingTest, TransferAttempt, TransferMethod
from agent.ticket import Ticket
from tests.agent.measure_fakes import (
    MeasurementServer,
    answering_mid_body,
    refusal,
    serving,
    ticket,
)
from tests.factories import TRANSFER, attempt, ping_test

# --- classification ---------------------------------------------------------------------

NOW = datetime(2026, 12, 7, 10, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(("error", "reason", "wait", "code"), [
    (wire.WireError("http", "HTTP 429 Too Many Requests", 429, retry_after="7",
                    refused="per_client"), "server_refused", 7.0, None),
    (wire.WireError("http", "HTTP 503 Service Unavailable", 503, refused="busy",
                    retry_after="Mon, 07 Dec 2026 10:00:12 GMT"), "server_refused", 12.0, None),
    (wire.WireError("http", "HTTP 503", 503, refused="ledger_full"), "server_refused", None,
     None),
    (wire.WireError("http", "HTTP 403", 403, ticket_refused="expired", ticket_presented=True),
     "ticket_refused", None, "expired"),
    (wire.WireError("http", "HTTP 403", 403, ticket_refused=" Wrong_Server ",
                    ticket_presented=True), "ticket_refused", None, "wrong_server"),
    (wire.WireError("http", "HTTP 403", 403, ticket_refused="\x1b[2Jgone",
                    ticket_presented=True), "ticket_refused", None, "unspecified"),
    (wire.WireError("http", "HTTP 403", 403, ticket_presented=True), "http_status", None,
     None),
    (wire.WireError("http", "HTTP 500", 500, retry_after="3"), "http_status", None, None),
    (wire.WireError("connect", "refused"), "connect_error", None, None),
    # What anything on the path may send: the line's failures, as they always were.
    (wire.WireError("http", "HTTP 429", 429, retry_after="7"), "http_status", None, None),
    (wire.WireError("http", "HTTP 503", 503, retry_after="7"), "http_status", None, None),
    (wire.WireError("http", "HTTP 403", 403, ticket_refused="expired"), "http_status", None,
     None),
    (wire.WireError("http", "HTTP 500", 500, refused="busy"), "http_status", None, None),
])
def test_classify_refusals(error: wire.WireError, reason: str, wait: float | None,
                           code: str | None) -> None:
    """A 429/503 the server marked (Bbprobe-Refused) is its capacity (with the wait
    Retry-After asks, seconds or an HTTP-date); a 403 refusing the ticket the request
    presented is ticket_refused with the code in the error (a header that is no code is
    "unspecified"); an unmarked 429/503, a ticket refusal of a request that presented
    none, and anything else stay the line's failures."""
    failure = transfer.classify(error, NOW)
    assert (failure.reason, failure.retry_after_s, failure.ticket_code,
            failure.http_status) == (reason, wait, code, error.status)
    assert failure.refused == (reason in ("server_refused", "ticket_refused"))
    if code is not None:
        assert f"ticket refused ({code})" in str(failure)
    if reason == "server_refused":
        assert f"refused for capacity ({error.refused}): HTTP" in str(failure)


# --- run_test: what a refusal costs -----------------------------------------------------


class Script:
    """A test's attempts as a table: each entry is what one attempt does ("ok",
    "failed", ("refused", retry_after_s), ("ticket", code)), taking ``each_s`` on a fake
    clock; the waits are recorded, not slept."""

    def __init__(self, steps: list[Any], each_s: float = 0.0, moved: int = 0) -> None:
        self.steps = list(steps)
        self.each_s = each_s
        self.moved = moved
        self.now = 0.0
        self.waits: list[float] = []
        self.headers: list[dict[str, str]] = []
        self.access: Access | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    async def runner(self, test_index: int, number: int) -> Ran:
        step = self.steps.pop(0)
        self.now += self.each_s
        self.headers.append(self.access.headers() if self.access else {})
        base = attempt("download", test_index, number)
        if step == "ok":
            return Ran(base)
        failed = replace(base, status="failed", throughput_bps=None, window_bytes=None,
                         window_s=None, bytes_total=self.moved)
        if step == "failed":
            return Ran(replace(failed, failure_reason="broken_connection", error="reset"))
        kind, value = step
        if kind == "refused":
            why = StreamFailure("server_refused", "refused for capacity: HTTP 429", 429,
                                retry_after_s=value)
        else:
            why = StreamFailure("ticket_refused", f"ticket refused ({value})", 403,
                                ticket_code=value)
        return Ran(replace(failed, failure_reason=why.reason, error=str(why),
                           http_status=why.http_status), why)

    def run(self, method: TransferMethod = TRANSFER, access: Access | None = None,
            test_index: int = 0) -> list[TransferAttempt]:
        self.access = access
        return asyncio.run(transfer.run_test(self.runner, method, test_index, 1.0,
                                             access=access, sleep=self.sleep,
                                             clock=self.clock))


def _outcomes(attempts: list[TransferAttempt]) -> list[tuple[int, str, str | None]]:
    return [(a.attempt, a.status, a.failure_reason) for a in attempts]


def test_a_refused_attempt_uses_up_no_attempt() -> None:
    """One attempt allowed, refused twice (Retry-After 7 s, then none: 5 s), then
    measured: three records numbered on, the refusals kept, the waits the server's."""
    script = Script([("refused", 7.0), ("refused", None), "ok"])
    attempts = script.run(replace(TRANSFER, attempts=1))
    assert _outcomes(attempts) == [(1, "failed", "server_refused"),
                                   (2, "failed", "server_refused"), (3, "ok", None)]
    assert script.waits == [7.0, spec.REFUSAL_WAIT_DEFAULT_S]


def test_refusals_and_failures_are_counted_apart() -> None:
    """Two attempts allowed: a failure uses one up (then the 1 s pause), a refusal does
    not, so the test ends at the second failure, four records later."""
    script = Script(["failed", ("refused", 0.0), ("refused", 2.0), "failed", "ok"])
    attempts = script.run(replace(TRANSFER, attempts=2))
    assert _outcomes(attempts) == [(1, "failed", "broken_connection"),
                                   (2, "failed", "server_refused"),
                                   (3, "failed", "server_refused"),
                                   (4, "failed", "broken_connection")]
    assert script.waits == [1.0, 2.0]  # the pause, then the server's 2 s (0 s: no sleep)
    assert script.steps == ["ok"]


def test_refusal_retries_are_capped_per_test_and_waits_per_refusal() -> None:
    """A server that always refuses: REFUSAL_RETRIES retries, each after at most
    REFUSAL_WAIT_MAX_S however long Retry-After asks, then the refusal is the record."""
    script = Script([("refused", 3600.0)] * 10)
    attempts = script.run(access=Access(allowance_s=1e6))
    assert len(attempts) == spec.REFUSAL_RETRIES + 1
    assert {a.failure_reason for a in attempts} == {"server_refused"}
    assert script.waits == [spec.REFUSAL_WAIT_MAX_S] * spec.REFUSAL_RETRIES


def test_the_session_allowance_is_shared_by_its_tests() -> None:
    """One allowance of 12 s a session: the first test waits 10 s once (10 + 10 > 12: no
    second retry); the second test, same session, cannot wait the 3 s it is asked."""
    access = Access(allowance_s=12.0)
    first = Script([("refused", 10.0), ("refused", 10.0), "ok"])
    assert _outcomes(first.run(access=access)) == [(1, "failed", "server_refused"),
                                                   (2, "failed", "server_refused")]
    assert first.waits == [10.0]
    second = Script([("refused", 3.0), "ok"])
    assert _outcomes(second.run(access=access, test_index=1)) == [
        (1, "failed", "server_refused")]
    assert second.waits == []
    assert access.spent_s == 10.0


def test_a_refused_attempt_is_charged_its_time_and_bytes() -> None:
    """A refused attempt that took 3 s is charged with its 1 s wait: 4 s of a 9 s
    allowance a retry, so two retries fit and a third does not; bytes a refused
    attempt moved count against the byte allowance likewise."""
    slow = Script([("refused", 1.0)] * 5 + ["ok"], each_s=3.0)
    access = Access(allowance_s=9.0)
    assert len(slow.run(access=access)) == 3
    assert (slow.waits, access.spent_s) == ([1.0, 1.0], 8.0)
    heavy = Script([("refused", 0.0)] * 3 + ["ok"], moved=600)
    access = Access(allowance_bytes=1000)
    assert len(heavy.run(access=access)) == 2
    assert access.spent_bytes == 600


def test_a_refused_ticket_is_dropped_and_the_attempt_retried_at_once() -> None:
    """403 for the ticket: the session drops it (the code kept), the attempt is retried
    without waiting and without the ticket, as a refusal retry; a later test of the
    same session presents none."""
    held = ticket(["http://m.example"])
    access = Access(ticket=held)
    script = Script([("ticket", "expired"), "ok"])
    assert _outcomes(script.run(access=access)) == [(1, "failed", "ticket_refused"),
                                                    (2, "ok", None)]
    assert script.headers == [{spec.TICKET_HEADER: held.token}, {}]
    assert (access.ticket, access.refused, script.waits) == (None, "expired", [])
    # With no ticket left, a 403 naming one is not retried: nothing would change.
    again = Script([("ticket", "expired"), "ok"])
    assert _outcomes(again.run(access=access)) == [(1, "failed", "ticket_refused")]


# --- run_attempt: one refused stream refuses the attempt -------------------------------


def test_a_refused_stream_ends_the_attempt_whatever_the_others_did() -> None:
    """Stream 0 breaks, stream 1 is refused (429), stream 2 would run for an hour: the
    attempt is server_refused with the 429, and stream 2 is stopped, not waited for."""
    stopped: list[int] = []

    async def stream(index: int, state: StreamState, t0: float, t_stop: float | None
                     ) -> None:
        if index == 0:
            raise OSError("reset")
        if index == 1:
            await asyncio.sleep(0.05)
            raise wire.WireError("http", "HTTP 429", 429, retry_after="2",
                                 refused="busy")
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.append(index)

    method = replace(TRANSFER, streams=3, timeout_s=3600.0)
    ran = asyncio.run(transfer.run_attempt("download", method, 0, 1, stream))
    assert (ran.attempt.status, ran.attempt.failure_reason, ran.attempt.http_status) == (
        "failed", "server_refused", 429)
    assert ran.refusal is not None and ran.refusal.retry_after_s == 2.0
    assert stopped == [2]


def test_adaptive_growth_stops_at_the_tickets_streams() -> None:
    """Adaptive streams start at 2 and grow from the rate; under a ticket allowing 3 at
    once, the growth stops at 3 (a fourth would be refused)."""
    started: list[int] = []

    async def stream(index: int, state: StreamState, t0: float, t_stop: float | None
                     ) -> None:
        started.append(index)
        state.total += 10**9  # a fast line: the table asks for many streams
        state.record(0.0, 0.0, force=True)
        await asyncio.sleep(0.2)

    method = replace(TRANSFER, streams=0, warmup_s=0.1, window_s=0.1, timeout_s=5.0)
    asyncio.run(transfer.run_attempt("download", method, 0, 1, stream, stream_cap=3))
    assert sorted(started) == [0, 1, 2]


# --- the probes against a real server ---------------------------------------------------

# One stream: each attempt is exactly one request, so a script of refusals is exact (of
# two streams, the second may or may not reach the server before the first's refusal
# ends the attempt).
ONE = TransferMethod(mode="duration", streams=1, warmup_s=0.1, window_s=0.3,
                     file_size_bytes=None, tests=1, attempts=1, sample_interval_s=0.05,
                     timeout_s=5.0)


def _run(server: MeasurementServer,
         body: Callable[[str], Awaitable[list[TransferAttempt]]]) -> list[TransferAttempt]:
    async def main() -> list[TransferAttempt]:
        async with serving(server.app()) as url:
            return await body(url)

    return asyncio.run(main())


@pytest.mark.parametrize("probe", [http_download, http_upload])
def test_a_server_at_capacity_is_waited_for(probe: Any) -> None:
    """The first two requests get 429 (Retry-After: 0): with one attempt allowed the
    test still measures: two refused attempts (429, server_refused), then an ok one."""
    def policy(kind: str, _ticket: str | None, n: int) -> web.Response | None:
        return refusal(429, retry_after="0") if n < 2 else None

    server = MeasurementServer(policy)
    attempts = _run(server, lambda url: probe.run(
        url, ONE, 0, access=Access(allowance_s=30.0, allowance_bytes=10**9)))
    assert [(a.attempt, a.status, a.failure_reason, a.http_status) for a in attempts] == [
        (1, "failed", "server_refused", 429), (2, "failed", "server_refused", 429),
        (3, "ok", None, 200)], attempts
    assert "refused for capacity (busy): HTTP 429" in (attempts[0].error or "")


@pytest.mark.parametrize("probe", [http_download, http_upload])
def test_a_refused_ticket_is_retried_without_it(probe: Any) -> None:
    """Every request carries the ticket until the server refuses it (403, expired): the
    attempt is ticket_refused, and its retry goes without the ticket and measures."""
    def policy(kind: str, presented: str | None, n: int) -> web.Response | None:
        return refusal(403, ticket_refused="expired") if presented else None

    server = MeasurementServer(policy)
    accesses: list[Access] = []

    async def body(url: str) -> list[TransferAttempt]:
        accesses.append(Access(ticket=ticket([url]), allowance_bytes=10**9))
        done: list[TransferAttempt] = await probe.run(url, ONE, 0, access=accesses[0])
        return done

    attempts = _run(server, body)
    assert [(a.attempt, a.status, a.failure_reason) for a in attempts] == [
        (1, "failed", "ticket_refused"), (2, "ok", None)], attempts
    assert "ticket refused (expired)" in (attempts[0].error or "")
    access = accesses[0]
    assert (access.refused, access.ticket, access.headers()) == ("expired", None, {})
    # The first request carried the ticket; the retry went without.
    first, retry = (t for _, t in server.seen)
    assert first is not None and first.count(".") == 2 and retry is None


def test_wire_errors_carry_what_a_refusal_says() -> None:
    """A download refused with 503 + Retry-After and an upload refused before its body
    with 403 + Bbprobe-Ticket-Refused: the WireError keeps both headers as sent."""
    def policy(kind: str, _ticket: str | None, _n: int) -> web.Response | None:
        if kind == "download":
            return refusal(503, retry_after="4")
        return refusal(403, ticket_refused="allowance_bytes")

    server = MeasurementServer(policy)
    errors: list[wire.WireError] = []

    async def main() -> None:
        async with serving(server.app()) as url:
            def ignore(_: int) -> None:
                pass

            loop = asyncio.get_running_loop()
            for call in (
                    wire.download(url, spec.DOWNLOAD_PATH + "?bytes=10", ignore, ignore, None,
                                  headers={spec.TICKET_HEADER: "a.b.c"}),
                    wire.upload(url, spec.UPLOAD_PATH + "?bytes=10", 10, ignore, None,
                                loop.time, headers={spec.TICKET_HEADER: "a.b.c"})):
                with pytest.raises(wire.WireError) as info:
                    await call
                errors.append(info.value)

    asyncio.run(main())
    assert [(e.status, e.retry_after, e.refused, e.ticket_refused, e.ticket_presented)
            for e in errors] == [(503, "4", "busy", None, True),
                                 (403, None, None, "allowance_bytes", True)]
    assert server.seen == [("download", "a.b.c"), ("upload", "a.b.c")]


@pytest.mark.parametrize("probe", [http_download, http_upload])
def test_an_unmarked_429_is_the_lines_failure(probe: Any) -> None:
    """A 429 without Bbprobe-Refused (a captive portal, an operator's proxy at a
    congested hour): http_status, the line's failure, using up the one attempt allowed,
    not retried and not left out of the failure ratio."""
    def proxy(kind: str, _ticket: str | None, _n: int) -> web.Response | None:
        return refusal(429, retry_after="0", marked=None)

    server = MeasurementServer(proxy)
    attempts = _run(server, lambda url: probe.run(
        url, ONE, 0, access=Access(allowance_s=30.0, allowance_bytes=10**9)))
    assert [(a.attempt, a.status, a.failure_reason, a.http_status) for a in attempts] == [
        (1, "failed", "http_status", 429)], attempts


def test_a_forged_ticket_refusal_without_a_ticket_is_the_lines_failure() -> None:
    """A 403 saying Bbprobe-Ticket-Refused to a request that presented no ticket is no
    ticket refusal (there was none to refuse): http_status."""
    def forged(kind: str, _ticket: str | None, _n: int) -> web.Response | None:
        return refusal(403, ticket_refused="expired")

    attempts = _run(MeasurementServer(forged), lambda url: http_download.run(
        url, ONE, 0, access=Access(allowance_s=30.0, allowance_bytes=10**9)))
    assert [(a.attempt, a.status, a.failure_reason) for a in attempts] == [
        (1, "failed", "http_status")], attempts


@pytest.mark.parametrize(("status", "headers", "reason"), [
    (403, {spec.TICKET_REFUSED_HEADER: "allowance_bytes"}, "ticket_refused"),
    (429, {spec.REFUSED_HEADER: "ticket_streams", "Retry-After": "3"}, "server_refused"),
])
def test_an_upload_refused_mid_body_is_classified_from_the_answer(
        status: int, headers: dict[str, str], reason: str) -> None:
    """The server answers an upload after 64 KiB of its body (a ticket's bytes used up:
    403; or 429) and closes: the upload fails with the server's answer and what it
    says, classified as the refusal it is, not as the broken connection its close
    makes (the agent stops sending when the answer comes, before the reset that would
    erase it)."""
    errors: list[wire.WireError] = []

    async def main() -> None:
        async with answering_mid_body(status, headers) as url:
            loop = asyncio.get_running_loop()
            with pytest.raises(wire.WireError) as info:
                await wire.upload(url, spec.UPLOAD_PATH, None, lambda _: None,
                                  loop.time() + 0.4, loop.time,
                                  headers={spec.TICKET_HEADER: "a.b.c"})
            errors.append(info.value)

    asyncio.run(main())
    error = errors[0]
    assert (error.kind, error.status, error.ticket_presented) == ("http", status, True)
    assert str(error).startswith(f"HTTP {status}") and f"refused ({status})" in str(error)
    assert transfer.classify(error, NOW).reason == reason


def _loaded(server: MeasurementServer, monkeypatch: pytest.MonkeyPatch
            ) -> tuple[PingTest | None, list[str]]:
    """A download direction run with a ping train under load (the train itself faked:
    a fixed result, so no ICMP), and its progress lines."""
    canned = ping_test([20.0, 30.0])

    async def train(*_: object, **__: object) -> PingTest:
        return canned

    monkeypatch.setattr(session, "loaded_ping", train)
    lines: list[str] = []
    loaded = ("198.18.0.1", PingMethod(count=3, interval_s=1.0, payload_bytes=56,
                                       timeout_s=1.0, loaded_interval_s=0.1))

    async def main() -> PingTest | None:
        async with serving(server.app()) as url:
            _, under_load = await session.run_transfers(
                "download", url, ONE, lines.append, loaded,
                access=Access(allowance_s=30.0, allowance_bytes=10**9))
            return under_load

    under_load = asyncio.run(main())
    assert under_load in (None, canned)
    return under_load, lines


def test_the_train_under_load_is_discarded_when_the_first_attempt_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first download is refused (429, marked): the train timed for its window ran
    while the download waited, so it is no latency under load: None, and said why.
    Not refused: the train is kept."""
    def once(kind: str, _ticket: str | None, n: int) -> web.Response | None:
        return refusal(429, retry_after="0") if n == 0 else None

    under_load, lines = _loaded(MeasurementServer(once), monkeypatch)
    assert under_load is None
    assert "  RTT under load discarded: attempt 1 was refused (server_refused), so the " \
           "ping train ran while the download waited, not under its load" in lines
    kept, lines = _loaded(MeasurementServer(), monkeypatch)
    assert kept is not None and kept.summary.rtt_mean_ms == 25.0
    assert not any("discarded" in line for line in lines)


def test_the_report_counts_refused_attempts_apart() -> None:
    """Text output: a refused attempt is not among the "failed" (the line's), but
    counted as refused by the server, and listed as refused."""
    refused = replace(attempt("download", 0, 1, ok=False), failure_reason="server_refused",
                      error="refused for capacity (busy): HTTP 429", http_status=429)
    failed = attempt("download", 0, 2, ok=False)
    lines = report.format_transfers("download", [refused, failed, attempt("download", 0, 3)],
                                    TRANSFER, 50e6)
    assert lines[0].endswith("3 attempt(s), 1 failed, 1 refused by the server")
    assert lines[2:] == [
        "  attempt 1 refused: server_refused: refused for capacity (busy): HTTP 429",
        "  attempt 2 failed: connect_error: cannot connect: refused"]
    assert report.format_transfers("download", [failed], TRANSFER, None)[0].endswith(
        "1 attempt(s), 1 failed")


# --- choosing a server: busy is not broken ----------------------------------------------


def _choose(servers: list[MeasurementServer], extra: Sequence[str] = (),
            held: Callable[[list[str]], Ticket] | None = None) -> select.Choice:
    """select.choose among ``servers`` (served now, in this order) then ``extra``, one
    ping a host (unanswered without privilege: the list order decides the rank)."""
    async def main() -> select.Choice:
        async with contextlib.AsyncExitStack() as stack:
            urls = [await stack.enter_async_context(serving(s.app())) for s in servers]
            urls += extra
            return await select.choose(urls, 1, ticket=held(urls) if held else None)

    return asyncio.run(main())


def _busy(kind: str, _ticket: str | None, _n: int) -> web.Response | None:
    return refusal(429, retry_after="5") if kind == "echo" else None


def test_a_busy_candidate_is_passed_over_as_busy() -> None:
    """The first candidate answers the capacity ask 429: passed over, recorded "busy:"
    and listed busy; the second, an older server answering "ok", is chosen."""
    busy = MeasurementServer(_busy)
    older = MeasurementServer()
    choice = _choose([busy, older])
    sel = choice.selection
    first, second = (c.url for c in sel.candidates)
    assert sel.chosen_url == second
    assert [(f.url, f.error) for f in sel.failovers] == [
        (first, "busy: HTTP 429 (Retry-After: 5 s)")]
    assert choice.busy == (first,)
    assert busy.seen == [("echo", None)]


def test_an_unmarked_429_does_not_make_a_candidate_busy() -> None:
    """A 429 without Bbprobe-Refused at the capacity ask is not the server's (a proxy on
    the path): the candidate is not busy, and is chosen as any other."""
    def proxy(kind: str, _ticket: str | None, _n: int) -> web.Response | None:
        return refusal(429, retry_after="5", marked=None) if kind == "echo" else None

    choice = _choose([MeasurementServer(proxy), MeasurementServer()])
    first = choice.selection.candidates[0].url
    assert (choice.selection.chosen_url, choice.selection.failovers, choice.busy) == (
        first, (), ())


def test_busy_beats_broken_when_every_candidate_is_busy() -> None:
    """A broken candidate (nothing listens) is passed over as today; when every one that
    answers is busy, the best-ranked busy one is used (its transfers retry)."""
    closed = "http://127.0.0.1:9"
    choice = _choose([MeasurementServer(_busy), MeasurementServer(_busy)], extra=[closed])
    sel = choice.selection
    first, second, _ = (c.url for c in sel.candidates)
    assert sel.chosen_url == first
    assert choice.busy == (first, second)
    # The one used is no failover (it was not passed over); the other busy one is.
    assert [f.url for f in sel.failovers] == [second, closed]
    assert sel.failovers[0].error.startswith("busy: HTTP 429")
    broken = [f.error for f in sel.failovers if f.url == closed]
    assert len(broken) == 1 and broken[0].startswith("TCP connect to 127.0.0.1:9 failed")


def test_the_capacity_ask_presents_the_ticket_and_asks_again_without() -> None:
    """The ticket goes with the capacity ask where it names the candidate; a 403 for it
    is asked again without it (200: not busy), and the refusal is handed to the session.
    A candidate the ticket does not name is asked without it."""
    def refuses_tickets(kind: str, presented: str | None, _n: int) -> web.Response | None:
        return refusal(403, ticket_refused="wrong_server") if presented else None

    named = MeasurementServer(refuses_tickets)
    choice = _choose([named], held=lambda urls: ticket([urls[0]]))
    url = choice.selection.chosen_url
    assert url is not None and choice.ticket_refused == {url: "wrong_server"}
    assert [t is not None for _, t in named.seen] == [True, False]
    other = MeasurementServer()
    choice = _choose([other], held=lambda urls: ticket(["http://elsewhere.example"]))
    assert other.seen == [("echo", None)] and choice.ticket_refused == {}


# --- the plan: refusals within the session limits ---------------------------------------


def _plan(data: Mapping[str, Any], sessions: int = 1) -> budget.Plan:
    cfg = config.parse(data)
    return budget.plan(config.method(cfg), sessions, candidates=cfg.server.candidates,
                       select_pings=cfg.server.select_pings)


def test_the_refusal_allowance_in_figures() -> None:
    """Defaults: 117 s planned, so the whole 60 s, and the 75 GB 60 s move at 10 Gbit/s;
    dual stack: 60 s each, and each session's share of the bytes left (180 GB planned
    and the pings' few kB: just under 60 GB)."""
    assert budget.refusal_allowance(_plan({})) == budget.RefusalAllowance(60.0, 75 * 10**9)
    dual = _plan({"server": {"address_family": "both"}}, 2)
    assert budget.refusal_allowance(dual) == budget.RefusalAllowance(
        60.0, (spec.MAX_SESSION_BYTES - dual.bytes) // 2)
    assert 59.99e9 < (spec.MAX_SESSION_BYTES - dual.bytes) // 2 < 60e9


def test_a_plan_near_the_limit_leaves_refusals_what_is_left() -> None:
    """file-131-06 choosing among 14 candidates plans 890.6 s: 9.4 s for refusals; a
    session that transfers nothing has none; a plan over a limit (refused at load
    anyway) none."""
    near = {"profile": "file-131-06",
            "server": {"candidates": [f"http://s{i}.example" for i in range(14)]}}
    assert budget.refusal_allowance(_plan(near)).duration_s == pytest.approx(9.4)
    idle = config.method(config.parse({"download": {"enabled": False},
                                       "upload": {"enabled": False}}))
    assert budget.refusal_allowance(budget.plan(idle)) == budget.RefusalAllowance(0.0, 0)
    over = budget.plan(replace(config.method(config.parse({})),
                               download=replace(TRANSFER, tests=100)))
    assert budget.refusal_allowance(over) == budget.RefusalAllowance(0.0, 0)


@pytest.mark.parametrize("profile", list(config.PROFILES))
@pytest.mark.parametrize("family", ["any", "both"])
def test_refusals_never_take_a_session_over_the_limits(profile: str, family: str) -> None:
    """On every profile, single and dual stack, with the most selection: the plan plus
    each session's refusal allowance stays within both limits, and what refusals get
    never exceeds REFUSAL_WAIT_SESSION_S."""
    sessions = 2 if family == "both" else 1
    for candidates in ([], [f"http://s{i}.example" for i in range(16)]):
        data = {"profile": profile,
                "server": {"address_family": family, "candidates": candidates}}
        try:
            plan = _plan(data, sessions)
        except ConfigError:
            continue  # over a limit already: refused at load
        allowance = budget.refusal_allowance(plan)
        assert allowance.duration_s <= spec.REFUSAL_WAIT_SESSION_S
        assert plan.duration_s + sessions * allowance.duration_s <= spec.MAX_SESSION_S
        assert plan.bytes + sessions * allowance.bytes <= spec.MAX_SESSION_BYTES


def test_the_capacity_ask_shares_the_connects_deadline(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """A candidate's connect and capacity ask run under one CONNECT_TIMEOUT_S deadline
    (what budget.py plans a candidate); an ask with no answer by then is not busy: the
    candidate is used, as any other."""
    deadlines: list[float] = []
    connected: list[float] = []
    real_timeout_at = asyncio.timeout_at

    def timeout_at(when: float | None) -> asyncio.Timeout:
        assert when is not None
        deadlines.append(when)
        return real_timeout_at(asyncio.get_running_loop().time())  # expire at once

    async def connect(url: str, af: int = 0) -> None:
        connected.append(asyncio.get_running_loop().time())

    async def never(*_: object, **__: object) -> tuple[str | None, str | None]:
        await asyncio.sleep(3600)
        return "busy", None

    monkeypatch.setattr(asyncio, "timeout_at", timeout_at)
    monkeypatch.setattr(select, "_connect", connect)
    monkeypatch.setattr(select, "capacity", never)
    monkeypatch.setattr(select, "_rtts", lambda *_: asyncio.sleep(0, ((), "no ping")))
    # The clock the deadline is taken from, read once a candidate (before its connect).
    readings = iter([100.0])
    choice = asyncio.run(select.choose(["http://a.example", "http://b.example"], 1,
                                       clock=lambda: next(readings)))
    assert (choice.selection.chosen_url, choice.selection.failovers) == (
        "http://a.example", ())
    assert len(connected) == 1
    assert deadlines == [100.0 + spec.SELECT_CONNECT_TIMEOUT_S]
