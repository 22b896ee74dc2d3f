"""Shared machinery of the HTTP download and upload probes.

A *test* is up to ``attempts`` *attempts*; each attempt runs ``streams`` parallel HTTP
requests. Every attempt is recorded, failed or not: failed attempts are the numerator of
the transfer failure rate (Allegato 2: "rapporto tra le trasmissioni dei dati fallite e il
numero totale dei tentativi di trasmissione").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent import live, spec, stats
from agent.probes.wire import WireError
from agent.schema import Direction, FailureReason, TransferAttempt, TransferMethod

SampleList = list[tuple[float, int]]


class StreamFailure(Exception):
    """One stream could not complete; carries the reason recorded in the attempt."""

    def __init__(
        self, reason: FailureReason, message: str, http_status: int | None = None
    ) -> None:
        super().__init__(message)
        self.reason: FailureReason = reason
        self.http_status = http_status


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
        # the document still recomputes exactly (issue 14).
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


def classify(exc: BaseException) -> StreamFailure:
    """Map a transfer exception to a failure record (the one translation point)."""
    if isinstance(exc, StreamFailure):
        return exc
    if isinstance(exc, WireError):
        return StreamFailure(_WIRE_REASONS[exc.kind], str(exc), exc.status)
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
        window = whole_transfer(outcome.streams)
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


def whole_transfer(streams: list[SampleList]) -> stats.Window:
    """File mode: all bytes over the time from the first stream's start to the last's end."""
    active = [s for s in streams if s]
    if not active:
        return stats.Window(0.0, 0.0, 0.0)
    start = min(s[0][0] for s in active)
    end = max(s[-1][0] for s in active)
    return stats.Window(start, end, float(sum(s[-1][1] - s[0][1] for s in active)))


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


AttemptRunner = Callable[[int, int], Awaitable[TransferAttempt]]


async def run_test(
    runner: AttemptRunner, method: TransferMethod, test_index: int,
    retry_pause_s: float = spec.RETRY_PAUSE_S,
) -> list[TransferAttempt]:
    """Run attempts until one succeeds or ``method.attempts`` have failed; keep them all."""
    attempts: list[TransferAttempt] = []
    for number in range(1, method.attempts + 1):
        result = await runner(test_index, number)
        attempts.append(result)
        if result.status == "ok":
            break
        if number < method.attempts:
            await asyncio.sleep(retry_pause_s)
    return attempts


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
) -> TransferAttempt:
    """Run ``method.streams`` copies of ``stream`` under the attempt's deadline.

    ``stream(index, state, t0, t_stop)`` moves bytes and records (t - t0, bytes)
    samples in ``state``; ``t_stop`` is the loop time at which a duration-mode stream stops
    (None in file mode). Stream errors are caught per stream and recorded; only bugs
    propagate. ``observe`` gets the live view's events (agent/live.py): the phase, then
    the streams' byte count every ``live.UPDATE_INTERVAL_S``. Liveness: returns within
    ``method.timeout_s`` plus connection teardown.
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

    async def grow(group: asyncio.TaskGroup) -> None:
        """Halfway through the warm-up, raise the stream count from the rate so far; the
        rest of the warm-up lets the new streams leave slow start before the window."""
        await asyncio.sleep(method.warmup_s / 2)
        elapsed = loop.time() - t0
        rate = sum(s.total for s in states) * 8 / elapsed if elapsed > 0 else 0.0
        for _ in range(len(states), adaptive_stream_count(rate)):
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
            async with asyncio.timeout(method.timeout_s), asyncio.TaskGroup() as group:
                for index in range(len(states)):
                    group.create_task(guarded(index))
                if adaptive and method.mode == "duration":
                    group.create_task(grow(group))
        except TimeoutError:
            timed_out = True
        # Taken before the feed is stopped, so a live view does not lengthen the record.
        duration_s = loop.time() - t0
        if feeding is not None:
            feeding.cancel()
            observe(live.BytesMoved(loop.time(), sum(s.total for s in states)))
    samples, bytes_total, measured_at = finalize(states)
    failure = next((s.failure for s in states if s.failure is not None), None)
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
    return conclude(direction, method, test_index, attempt, started_at, outcome, measured_at)
