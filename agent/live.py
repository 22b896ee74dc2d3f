"""The technician's live view as data: what the measurement code reports while it runs,
the state those reports add up to, and the one line of text that state reads as.

Pure: no clock reads, no I/O, no terminal. The probes emit events through an optional
``observe`` callback (``ignore`` by default, and then no feed task runs beside them);
``agent/liveview.py`` draws the line on a terminal and ``cli.py`` decides when.

- Times are monotonic seconds: ``time.monotonic()``, which asyncio's ``loop.time()`` is
  too, so the transfer loops, the ping train and the view share one clock.
- Byte counts are cumulative over all streams of the current phase, counted where the
  probe counts them: received payload (download, ndt7 download) or bytes handed to the
  socket (upload: the server's report arrives only at the end). At a steady rate the
  upload's two counts differ by what waits in the socket buffer, an offset that a rate
  over one second does not see; it shows in the first second's figure.
- The displayed rates are only a view: nothing here is stored or feeds a result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from agent import units

# How often the transfer loops' counters are read for the view (transfer.run_attempt):
# ten times a second keeps the "now" rate smooth without adding work to the byte loops,
# which never call back themselves.
UPDATE_INTERVAL_S = 0.1
# The "now" rate is taken over about the last second: short enough to follow a change
# of rate, long enough that single 100 ms reads (and TCP's bursts) do not make it jump.
CURRENT_SPAN_S = 1.0


@dataclass(frozen=True, slots=True)
class PhaseStarted:
    """A phase began at monotonic ``t``; it is planned to last ``planned_s`` seconds (None:
    as long as its bytes take, file mode). ``transfer``: bytes are counted in it."""

    label: str
    t: float
    planned_s: float | None
    transfer: bool


@dataclass(frozen=True, slots=True)
class BytesMoved:
    """At monotonic ``t``, ``bytes_total`` bytes had moved since the phase started."""

    t: float
    bytes_total: int


@dataclass(frozen=True, slots=True)
class RttSampled:
    """A round trip of ``rtt_ms`` for a probe sent at monotonic ``sent_t`` (an echo
    request; for a server's TCP_INFO, when its measurement arrived): the time places the
    sample in its phase."""

    sent_t: float
    rtt_ms: float


LiveEvent = PhaseStarted | BytesMoved | RttSampled
Observer = Callable[[LiveEvent], None]


def ignore(event: LiveEvent) -> None:
    """The default observer: no view. Probes compare against it to skip the feed."""


def transfer_label(direction: str, test_index: int, tests: int, attempt: int) -> str:
    """``download test 1/3 attempt 2`` (``test_index`` counts from 0, as the schema's)."""
    return f"{direction} test {test_index + 1}/{tests} attempt {attempt}"


@dataclass(frozen=True, slots=True)
class LiveState:
    """The current phase and its recent (t, bytes) reads; immutable, so a drawing thread
    reads one consistent state while the event loop swaps in the next."""

    label: str = ""
    started_t: float = 0.0
    planned_s: float | None = None
    transfer: bool = False
    # (t, bytes_total) over about the last CURRENT_SPAN_S, oldest first.
    recent: tuple[tuple[float, int], ...] = ()
    rtt_ms: float | None = None


def advance(state: LiveState, event: LiveEvent) -> LiveState:
    """The state after ``event``."""
    if isinstance(event, PhaseStarted):
        return LiveState(label=event.label, started_t=event.t, planned_s=event.planned_s,
                         transfer=event.transfer,
                         recent=((event.t, 0),) if event.transfer else ())
    if isinstance(event, BytesMoved):
        if not state.transfer:
            return state
        return replace(state, recent=_trim((*state.recent, (event.t, event.bytes_total))))
    # A reply to a probe sent before this phase began (the loaded ping's last replies
    # after its transfer ended) belongs to the previous phase.
    if event.sent_t < state.started_t:
        return state
    return replace(state, rtt_ms=event.rtt_ms)


def _trim(recent: tuple[tuple[float, int], ...]) -> tuple[tuple[float, int], ...]:
    """Keep the newest read at or before CURRENT_SPAN_S ago and everything after it, so
    the "now" rate spans a full second once there is one."""
    cutoff = recent[-1][0] - CURRENT_SPAN_S
    for i in range(len(recent) - 1, -1, -1):
        if recent[i][0] <= cutoff:
            return recent[i:]
    return recent


def current_bps(state: LiveState) -> float | None:
    """Bits per second over the recent reads (about the last second); None before two."""
    if len(state.recent) < 2:
        return None
    (t0, b0), (t1, b1) = state.recent[0], state.recent[-1]
    return (b1 - b0) * 8 / (t1 - t0) if t1 > t0 else None


def mean_bps(state: LiveState) -> float | None:
    """Bits per second from the phase's start to its latest read; None before one."""
    if len(state.recent) < 2:
        return None
    t, b = state.recent[-1]
    return b * 8 / (t - state.started_t) if t > state.started_t else None


def format_line(state: LiveState, now: float) -> str:
    """The live line at monotonic ``now``, e.g. ``download test 1/1 attempt 1 · 4.1 s /
    12 s · now 93.41 Mbit/s · mean 91.02 Mbit/s · RTT 14.20 ms``, its figures as the
    summary writes them (agent/units.py); empty before any phase."""
    if not state.label:
        return ""
    elapsed = f"{max(now - state.started_t, 0.0):.1f} s"
    if state.planned_s is not None:
        elapsed += f" / {state.planned_s:g} s"
    parts = [state.label, elapsed]
    if state.transfer:
        parts += [f"now {units.mbit(current_bps(state))} Mbit/s",
                  f"mean {units.mbit(mean_bps(state))} Mbit/s"]
    if state.rtt_ms is not None:
        parts.append(f"RTT {units.latency(state.rtt_ms)}")
    return " · ".join(parts)
