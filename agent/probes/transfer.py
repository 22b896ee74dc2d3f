"""Shared machinery of the HTTP download and upload probes.

A *test* is up to ``attempts`` *attempts*; each attempt runs ``streams`` parallel HTTP
requests. Every attempt is recorded, failed or not: failed attempts are the numerator of
the transfer failure rate (Allegato 2: "rapporto tra le trasmissioni dei dati fallite e il
numero totale dei tentativi di trasmissione").

A *refused* attempt is one the measurement server turned away: 429 or 503 for
capacity, marked as its own with spec.REFUSED_HEADER (server_refused), or 403 for the
ticket the request presented (ticket_refused). It is the server's shortfall, not the
line's: it does not use up one of the test's attempts, it is recorded with its own reason
and retried, within the limits ``Access`` keeps for the whole session (spec.REFUSAL_*;
agent/budget.py plans them). A 429 or 503 without the mark (a captive portal, an
operator's proxy) and a ticket refusal of a request that presented none stay the line's
failures (http_status), as any other status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent import live, neterrors, spec, stats
from agent.client import parse_retry_after
from agent.errors import AgentError
from agent.probes.wire import WireError, reason_code, server_refused, ticket_refusal
from agent.schema import (
    REFUSAL_REASONS,
    Direction,
    FailureReason,
    TransferAttempt,
    TransferMethod,
)
from agent.ticket import Ticket

SampleList = list[tuple[float, int]]


class StreamFailure(AgentError):
    """One stream could not complete; carries the reason recorded in the attempt, and for
    a refusal what it said: ``retry_after_s`` (server_refused) or the server's
    ``ticket_code`` (ticket_refused)."""

    def __init__(
        self, reason: FailureReason, message: str, http_status: int | None = None, *,
        retry_after_s: float | None = None, ticket_code: str | None = None,
        connection_refused: bool = False,
    ) -> None:
        super().__init__(message)
        self.reason: FailureReason = reason
        self.http_status = http_status
        self.retry_after_s = retry_after_s
        self.ticket_code = ticket_code
        # The server's host answered that nothing listens (agent/neterrors.py refused).
        self.connection_refused = connection_refused

    @property
    def refused(self) -> bool:
        return self.reason in REFUSAL_REASONS


@dataclass(slots=True)
class StreamState:
    """Raw observations of one stream, filled in as bytes move (kept even on failure)."""

    samples: SampleList = field(default_factory=list)
    total: int = 0
    failure: StreamFailure | None = None
    http_status: int | None = None
    last_sample_t: float = float("-inf")

    def record(self, t: float, interval: float, *, force: bool = False) -> None:
        # To the microsecond, as ndt7's samples (agent/probes/ndt7.py): samples are 100 ms
        # apart and the clock's jitter is far above 1 us, while a full double costs three
        # times the JSON; the collector then stores the times as integers
        # (collector/storage/codec.py). Rates are computed from these rounded samples, so
        # the document still recomputes exactly.
        t = round(t, 6)
        if force or t - self.last_sample_t >= interval:
            if self.samples and self.samples[-1][0] == t:
                self.samples[-1] = (t, self.total)
            else:
                self.samples.append((t, self.total))
            self.last_sample_t = t


_WIRE_REASONS: dict[str, FailureReason] = {
    "connect": "connect_error",
    "http": "http_status",
    "broken": "broken_connection",
    "protocol": "broken_connection",
}


def classify(exc: BaseException, now: datetime | None = None) -> StreamFailure:
    """Map a transfer exception to a failure record (the one translation point). A 429 or
    503 the server marked as its own (wire.server_refused) is server_refused, with the
    wait its Retry-After asks for (an HTTP-date is read against ``now``) and the
    server's reason in the error text; a 403 refusing the ticket the request presented
    (wire.ticket_refusal) is ticket_refused, its code in the error text; any other
    status, an unmarked 429 or 503 included, stays http_status."""
    if isinstance(exc, StreamFailure):
        return exc
    if isinstance(exc, WireError):
        if server_refused(exc):
            assert exc.refused is not None
            wait = parse_retry_after(exc.retry_after, now or datetime.now(UTC))
            return StreamFailure(
                "server_refused", f"refused for capacity ({reason_code(exc.refused)}): "
                                  f"{exc}", exc.status, retry_after_s=wait)
        if (code := ticket_refusal(exc)) is not None:
            return StreamFailure("ticket_refused", f"ticket refused ({code}): {exc}",
                                 exc.status, ticket_code=code)
        return StreamFailure(_WIRE_REASONS[exc.kind], str(exc), exc.status,
                             connection_refused=exc.kind == "connect" and
                             neterrors.refused(exc.__cause__))
    if isinstance(exc, TimeoutError):
        return StreamFailure("timeout", "deadline passed")
    if isinstance(exc, OSError):
        return StreamFailure("broken_connection", f"{type(exc).__name__}: {exc}")
    raise exc  # a bug, not a measurement outcome


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What a direction-specific runner observed; ``conclude`` turns it into a record."""

    streams: list[SampleList]
    bytes_total: int
    failure: StreamFailure | None
    http_status: int | None
    duration_s: float


def conclude(
    direction: Direction,
    method: TransferMethod,
    test_index: int,
    attempt: int,
    started_at: str,
    outcome: AttemptOutcome,
    measured_at: str,
) -> TransferAttempt:
    """Pure: compute the window and the rate and decide ok/failed."""
    failure = outcome.failure
    if method.mode == "duration":
        window = stats.window_throughput(outcome.streams, method.warmup_s)
    else:
        window = stats.whole_transfer(outcome.streams)
    if failure is None and outcome.bytes_total == 0:
        failure = StreamFailure("zero_bytes", "no payload bytes were transferred")
    short = window.length_s < method.window_s * spec.MIN_WINDOW_SHARE
    if failure is None and method.mode == "duration" and short:
        failure = StreamFailure(
            "short_transfer",
            f"measurement window lasted {window.length_s:.3f} s of the "
            f"{method.window_s:g} s configured",
        )
    if failure is None and method.mode == "file":
        assert method.file_size_bytes is not None
        if outcome.bytes_total < method.file_size_bytes:
            failure = StreamFailure(
                "short_transfer",
                f"{outcome.bytes_total} of {method.file_size_bytes} bytes transferred",
            )
    ok = failure is None
    return TransferAttempt(
        direction=direction,
        test_index=test_index,
        attempt=attempt,
        status="ok" if ok else "failed",
        failure_reason=None if failure is None else failure.reason,
        error=None if failure is None else str(failure),
        http_status=outcome.http_status,
        started_at=started_at,
        duration_s=outcome.duration_s,
        streams=max(len(outcome.streams), 1),
        bytes_total=outcome.bytes_total,
        window_bytes=round(window.bytes) if ok else None,
        window_s=window.length_s if ok else None,
        throughput_bps=window.throughput_bps if ok else None,
        measured_at="server" if measured_at == "server" else "client",
        stream_samples=tuple(tuple(s) for s in outcome.streams),
    )


def file_shares(method: TransferMethod) -> list[int] | None:
    """File mode: the test file split over the streams as evenly as possible; else None."""
    if method.mode != "file" or not method.file_size_bytes:
        return None
    streams = max(method.streams, 1)
    base, extra = divmod(method.file_size_bytes, streams)
    return [base + (1 if i < extra else 0) for i in range(streams)]


def adaptive_stream_count(rate_bps: float) -> int:
    """Streams for a line running at ``rate_bps`` (Ne.Me.Sys table, spec.py). Pure."""
    for below, streams in spec.ADAPTIVE_STREAMS:
        if rate_bps < below:
            return max(streams, spec.ADAPTIVE_START_STREAMS)
    return spec.ADAPTIVE_MAX_STREAMS


def _quiet(_: str) -> None:
    pass


@dataclass(slots=True)
class Access:
    """A session's terms with its measurement server, one object shared by all
    of the session's tests: the ticket its transfers present (None: none, or dropped
    after the server refused it) and its one allowance for refusals.

    The allowance bounds what refusals may add to the session's plan: each retry after a
    refusal is charged the refused attempt's time and bytes plus the wait before the
    retry, and is made only while the charges stay within ``allowance_s`` and
    ``allowance_bytes`` (agent/budget.py refusal_allowance: what the plan leaves under
    the session limits, at most spec.REFUSAL_WAIT_SESSION_S). A refused attempt that is
    not retried ends its test in the time the plan gave the attempt, so the session's
    worst case stays planned."""

    ticket: Ticket | None = None
    allowance_s: float = spec.REFUSAL_WAIT_SESSION_S
    # No bound of its own unless the session sets one from its plan.
    allowance_bytes: int = 2**63 - 1
    progress: Callable[[str], None] = _quiet
    # The server's reason, once it refused the ticket (the session goes on without it).
    refused: str | None = None
    # Charged so far: the session's POST for its ticket (agent/probes/session.py), then retries.
    spent_s: float = 0.0
    spent_bytes: int = 0
    # The interface's (received, sent) byte counters, read around every attempt when set
    # (agent/checks.py interface_bytes): a refused attempt's streams are cut at once, and
    # what the server had already sent them still reaches the interface unread, so a
    # direction with refusals judges its cross traffic over its other attempts only.
    meter: Callable[[], tuple[int, int] | None] | None = None
    metered: list[tuple[TransferAttempt, tuple[int, int], tuple[int, int]]] = field(
        default_factory=list)
    # A test of this session met refused connections on an attempt and on its retry
    # (run_test): the server is down, so later tests make one attempt each.
    server_down: bool = False

    def headers(self) -> dict[str, str]:
        """What every transfer request carries: the ticket, while it is held."""
        return {spec.TICKET_HEADER: self.ticket.token} if self.ticket is not None else {}

    def stream_cap(self) -> int | None:
        """The most streams the ticket allows at once (adaptive growth stops there: a
        stream above it would be refused); None: no ticket, no cap of ours."""
        return self.ticket.allowance.streams if self.ticket is not None else None

    def retry_wait(self, refusal: StreamFailure, ran_s: float, ran_bytes: int,
                   retries: int) -> tuple[float | None, str]:
        """The decision (no I/O) after a refused attempt that took ``ran_s`` and moved
        ``ran_bytes``, in a test that has made ``retries`` refusal retries: (seconds to
        wait before the retry, or None for no retry; why not, for the progress line).
        A retry is charged to the allowance here; a ticket refusal drops the ticket,
        retry or not."""
        if refusal.reason == "ticket_refused":
            if self.ticket is None:
                return None, "no ticket was presented"
            self.ticket, self.refused = None, refusal.ticket_code or "unspecified"
            wait = 0.0
        else:
            asked = refusal.retry_after_s
            wait = min(spec.REFUSAL_WAIT_DEFAULT_S if asked is None else asked,
                       spec.REFUSAL_WAIT_MAX_S)
        if retries >= spec.REFUSAL_RETRIES:
            return None, f"{spec.REFUSAL_RETRIES} retries after refusals made in this test"
        if self.spent_s + ran_s + wait > self.allowance_s or \
                self.spent_bytes + ran_bytes > self.allowance_bytes:
            return None, (f"the session's allowance for refusals is spent "
                          f"({self.spent_s:.3g} of {self.allowance_s:.3g} s)")
        self.spent_s += ran_s + wait
        self.spent_bytes += ran_bytes
        return wait, ""


@dataclass(frozen=True, slots=True)
class Ran:
    """An attempt's record, and the refusal that made it a refused attempt (None: not
    refused); ``unreachable``: every stream's connection was refused (the server is
    not running: the error), so the attempt moved nothing."""

    attempt: TransferAttempt
    refusal: StreamFailure | None = None
    unreachable: str | None = None


def loaded_nothing(attempts: list[TransferAttempt]) -> bool:
    """Whether a test's attempts all failed without moving a payload byte (its server
    refused the connection, or answered only with an error status): nothing loaded
    the line, so a ping train beside them measured an idle one. Pure."""
    return bool(attempts) and all(a.status == "failed" and a.bytes_total == 0
                                  for a in attempts)


def stop_when_idle(transfer: asyncio.Task[list[TransferAttempt]],
                   train: asyncio.Task[Any]) -> None:
    """Cancel ``train`` (the RTT-under-load pings beside ``transfer``) as soon as the
    transfer ends having moved nothing (``loaded_nothing``: nothing listens at the
    server): there is no load to be under, and the session need not wait on an idle
    line for the train's whole window."""
    def done(task: asyncio.Task[list[TransferAttempt]]) -> None:
        if not task.cancelled() and task.exception() is None and \
                loaded_nothing(task.result()):
            train.cancel()

    transfer.add_done_callback(done)


AttemptRunner = Callable[[int, int], Awaitable[Ran]]
Sleep = Callable[[float], Awaitable[None]]


async def run_test(
    runner: AttemptRunner, method: TransferMethod, test_index: int,
    retry_pause_s: float = spec.RETRY_PAUSE_S, *, access: Access | None = None,
    sleep: Sleep = asyncio.sleep, clock: Callable[[], float] = time.monotonic,
) -> list[TransferAttempt]:
    """Run attempts until one succeeds or ``method.attempts`` have failed; keep them all.

    A refused attempt is kept too (numbered on) but uses up no attempt: it is retried
    after the wait ``access.retry_wait`` gives (the server's Retry-After, capped; at
    once, without the ticket, after a ticket refusal), or, when that allows no retry,
    it stays as the test's last record. Without ``access``, a fresh one (no ticket, the
    whole allowance for this test alone). An attempt whose every connection was refused
    (nothing listens at the server) is retried once, after ``retry_pause_s`` and within
    ``method.attempts`` (a server restarting, a load balancer's gap); refused again, the
    server is down (``access.server_down``): the test ends, and each later test of the
    session makes one attempt only, so a session against a dead server stays short."""
    access = access if access is not None else Access()
    attempts: list[TransferAttempt] = []
    failed = retries = 0
    refused_before = False  # an attempt of this test found nothing listening
    while True:
        started = clock()
        before = access.meter() if access.meter is not None else None
        ran = await runner(test_index, len(attempts) + 1)
        after = access.meter() if access.meter is not None else None
        if before is not None and after is not None:
            access.metered.append((ran.attempt, before, after))
        attempts.append(ran.attempt)
        if ran.refusal is None:
            if ran.attempt.status == "ok":
                return attempts
            failed += 1
            if ran.unreachable is not None:
                said = f"  attempt {ran.attempt.attempt}: the server refused the connection"
                if refused_before or access.server_down:
                    # Refused after a retry (here or in an earlier test): nothing listens,
                    # and more retries would keep the technician waiting for nothing.
                    access.server_down = True
                    if failed < method.attempts:
                        access.progress(f"{said} (not running?): not retried")
                    return attempts
                refused_before = True
                if failed < method.attempts:
                    access.progress(f"{said}: retry in {retry_pause_s:g} s")
            if failed >= method.attempts:
                return attempts
            await sleep(retry_pause_s)
            continue
        refusal = ran.refusal
        held = access.ticket is not None
        wait, why = access.retry_wait(refusal, clock() - started, ran.attempt.bytes_total,
                                      retries)
        if refusal.reason == "ticket_refused" and held:
            access.progress(f"  ticket refused ({access.refused}): measuring without it")
        what = "ticket refused" if refusal.reason == "ticket_refused" else \
            f"server refused for capacity (HTTP {refusal.http_status})"
        if wait is None:
            access.progress(f"  attempt {ran.attempt.attempt}: {what}: not retried ({why})")
            return attempts
        retries += 1
        if wait > 0:
            access.progress(f"  attempt {ran.attempt.attempt}: {what}: retry in {wait:g} s")
            await sleep(wait)


class _Refused(AgentError):
    """Raised by a refused stream to end its attempt's task group (run_attempt); also by
    the last stream whose connection was refused when every other one failed too (no
    stream left to grow the attempt from)."""


StreamFn = Callable[[int, StreamState, float, float | None], Awaitable[None]]
Finalize = Callable[[list[StreamState]], tuple[list[SampleList], int, str]]


def client_side(states: list[StreamState]) -> tuple[list[SampleList], int, str]:
    return [s.samples for s in states], sum(s.total for s in states), "client"


async def run_attempt(
    direction: Direction,
    method: TransferMethod,
    test_index: int,
    attempt: int,
    stream: StreamFn,
    finalize: Finalize = client_side,
    observe: live.Observer = live.ignore,
    stream_cap: int | None = None,
) -> Ran:
    """Run ``method.streams`` copies of ``stream`` under the attempt's deadline.

    ``stream(index, state, t0, t_stop)`` moves bytes and records (t - t0, bytes)
    samples in ``state``; ``t_stop`` is the loop time at which a duration-mode stream stops
    (None in file mode). Stream errors are caught per stream and recorded; only bugs
    propagate. A stream the server refuses (429, 503, or 403 for the ticket) ends the
    attempt at once: the attempt is refused whatever its other streams did, so they
    stop rather than hold the server's slots. Adaptive growth stops at ``stream_cap``
    (the ticket's allowance). ``observe`` gets the live view's events (agent/live.py):
    the phase, then the streams' byte count every ``live.UPDATE_INTERVAL_S``. Liveness:
    returns within ``method.timeout_s`` plus connection teardown.
    """
    from agent.schema import utc_now

    loop = asyncio.get_running_loop()
    started_at = utc_now()
    t0 = loop.time()
    t_stop = t0 + method.warmup_s + method.window_s if method.mode == "duration" else None
    adaptive = method.streams == 0
    states = [StreamState() for _ in range(spec.ADAPTIVE_START_STREAMS if adaptive
                                            else method.streams)]
    timed_out = False

    async def guarded(index: int) -> None:
        state = states[index]
        try:
            await stream(index, state, t0, t_stop)
        except (WireError, OSError, StreamFailure) as exc:
            state.failure = classify(exc)
            if state.failure.http_status is not None:
                state.http_status = state.failure.http_status
            if state.failure.refused:
                raise _Refused from None  # ends the attempt: its other streams stop
            if state.failure.connection_refused and \
                    all(s.failure is not None for s in states):
                raise _Refused from None  # no growth: it would meet the same refusal

    async def grow(group: asyncio.TaskGroup) -> None:
        """Halfway through the warm-up, raise the stream count from the rate so far; the
        rest of the warm-up lets the new streams leave slow start before the window."""
        await asyncio.sleep(method.warmup_s / 2)
        elapsed = loop.time() - t0
        rate = sum(s.total for s in states) * 8 / elapsed if elapsed > 0 else 0.0
        wanted = adaptive_stream_count(rate)
        if stream_cap is not None:
            wanted = min(wanted, max(stream_cap, len(states)))
        for _ in range(len(states), wanted):
            states.append(StreamState())
            group.create_task(guarded(len(states) - 1))

    async def feed() -> None:
        # The counters are read here, not reported by the byte loops, so a live view costs
        # the transfer nothing per chunk.
        while True:
            await asyncio.sleep(live.UPDATE_INTERVAL_S)
            observe(live.BytesMoved(loop.time(), sum(s.total for s in states)))

    observe(live.PhaseStarted(
        live.transfer_label(direction, test_index, method.tests, attempt), t0,
        method.warmup_s + method.window_s if method.mode == "duration" else None,
        transfer=True))
    async with asyncio.TaskGroup() as outer:
        # No view, no feed: without an observer the attempt runs as it always has.
        feeding = outer.create_task(feed()) if observe is not live.ignore else None
        try:
            try:
                async with asyncio.timeout(method.timeout_s), asyncio.TaskGroup() as group:
                    for index in range(len(states)):
                        group.create_task(guarded(index))
                    if adaptive and method.mode == "duration":
                        group.create_task(grow(group))
            except* _Refused:
                pass  # recorded in the refused stream's state
        except TimeoutError:
            timed_out = True
        # Taken before the feed is stopped, so a live view does not lengthen the record.
        duration_s = loop.time() - t0
        if feeding is not None:
            feeding.cancel()
            observe(live.BytesMoved(loop.time(), sum(s.total for s in states)))
    samples, bytes_total, measured_at = finalize(states)
    refusal = next((s.failure for s in states if s.failure is not None and
                    s.failure.refused), None)
    unreachable = str(states[0].failure) if bytes_total == 0 and all(
        s.failure is not None and s.failure.connection_refused for s in states) else None
    failure = refusal or next((s.failure for s in states if s.failure is not None), None)
    if timed_out and failure is None:
        failure = StreamFailure(
            "timeout", f"attempt did not finish within {method.timeout_s:g} s"
        )
    statuses = [s.http_status for s in states if s.http_status is not None]
    http_status = next((c for c in statuses if c != 200), statuses[0] if statuses else None)
    outcome = AttemptOutcome(
        streams=samples,
        bytes_total=bytes_total,
        failure=failure,
        http_status=http_status,
        duration_s=duration_s,
    )
    return Ran(conclude(direction, method, test_index, attempt, started_at, outcome,
                        measured_at), refusal, unreachable)
