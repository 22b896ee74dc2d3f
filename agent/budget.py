"""A session's planned worst case, in seconds and bytes, and the limits it must keep.
Pure: a ``Method`` and the candidate servers in, figures out (the selection's deadlines
are the constants agent/probes/select.py runs by, from spec.py: this module, which the
configuration loads, imports no measurement code).

Without a bound, an instruction such as ``download.tests=1000 download.window_s=600
ping.count=10000`` (each value within its own range) plans three weeks a session on
every probe it selects. The config is refused at load instead (agent/config.py), so the
same rule holds for a local file, the command line, the collector setting an
instruction and the agent applying one.

Duration: the phases one after the other, as agent/probes/session.py runs them, each at its
deadline::

    ping train       (count - 1) x interval_s + timeout_s   (the last request's reply)
    each direction   tests x (attempts x timeout_s + (attempts - 1) x RETRY_PAUSE_S)
                     timeout_s: the attempt's deadline; unless set, warmup_s + window_s
                     + 5 s in duration mode, 300 s in file mode
    under load       the train runs alongside a direction's first test (duration
                     mode), which then takes at least warmup_s + (n - 1) x
                     loaded_interval_s + timeout_s, n = window_s / loaded_interval_s

Bytes, payload of both directions::

    file mode        tests x attempts x file_size_bytes (a failed attempt may have moved
                     nearly all of its file)
    duration mode    tests x attempts x (warmup_s + window_s) x PLANNING_LINE_RATE_BPS
    ping trains      count x payload_bytes x 2 (request and reply), loaded trains too

Choosing the measurement server (``server.candidates``, agent/probes/select.py, first in
a session that measures anything) is one phase too: every distinct candidate host gets
a train of ``select_pings`` echo requests, one host after the other (trains at once
could credit one host's replies to another, select.choose), each under the deadline
select._rtts sets, (select_pings - 1) x 0.2 s + the 1 s reply timeout + 5 s to resolve
+ 2 s; then, in rank order, a TCP connect to each candidate and its capacity ask
(whether it would admit a transfer now), together at most 3 s, until one accepts and is
not busy: every one of them when none does. 16 candidates (config.MAX_CANDIDATES) x 20
pings (the most either key allows, both settable centrally) is 16 x 11.8 s + 16 x 3 s =
236.8 s a session, 474 s dual stack; at the default 3 pings, 182 s.

Refusals: a transfer the measurement server refuses (429, 503, or 403 for the ticket) is
the server's failure, not the line's, so it does not use up an attempt; it is retried
after a wait (agent/probes/transfer.py run_test). What that adds is bounded apart from the
plan, by the session's refusal allowance (``refusal_allowance``): each retry is charged
the wait before it and the refused attempt's time and bytes, and is made only while the
charges fit the allowance; a refused attempt that is not retried ends its test within the
time the plan gave that attempt. The allowance is what the plan leaves under each limit,
shared by the slot's sessions, at most spec.REFUSAL_WAIT_SESSION_S and the bytes that time
moves at PLANNING_LINE_RATE_BPS: a session's worst case, refusals included, is the plan
plus its allowance and never over a limit, and a config within the limits with no refusal
allowance stays within them (one that leaves no room retries no refusal: it records it).

The measurement ticket (agent/ticket.py) is charged to the same allowance: a session whose
instruction fetch brought no usable ticket asks for one by POST (agent/tickets.py),
which waits at most spec.TICKET_TIMEOUT_S and never longer than the allowance, and the
time it took is spent before the first refusal is (transfer.Access.spent_s). It is not a
part of the plan: most sessions take the ticket the fetch brought and spend nothing, and
a plan near a limit would otherwise be refused for a request it may never make (one that
leaves no room asks for no ticket: it measures under the per-address rule).

Under ``server.address_family = "both"`` a slot runs the session twice (IPv4, then
IPv6): every figure doubles, the selection too (each family chooses its own server).
Left out, each bounded by its own deadline and covered by the headroom under the
limits, about 40 s a session together: the family preflight under "any" (resolution up
to 10 s and a 3 s connect a family, agent/probes/session.py; 10 s more to resolve a ping target
by another name), the ping train's resolution and slack (5 s + 5 s, agent/probes/session.py
ping_deadline_s), the host checks (0.5 s of CPU sampling, an ARP scan of up to 2 s, and
lookups bounded only by the system resolver) and connection teardown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from agent import spec
from agent.schema import Method, PingMethod, TransferMethod

# The payload of select._rtts's echo requests.
_SELECT_PAYLOAD_BYTES = 56


@dataclass(frozen=True, slots=True)
class Part:
    """One phase of the plan: its worst case and how it was reached (for messages)."""

    name: str
    duration_s: float
    bytes: int
    how_long: str
    how_much: str


@dataclass(frozen=True, slots=True)
class Plan:
    parts: tuple[Part, ...]
    sessions: int = 1  # 2 under address_family "both"

    @property
    def duration_s(self) -> float:
        return self.sessions * sum(p.duration_s for p in self.parts)

    @property
    def bytes(self) -> int:
        return self.sessions * sum(p.bytes for p in self.parts)


def _train_s(count: int, interval_s: float, timeout_s: float) -> float:
    return (count - 1) * interval_s + timeout_s


def loaded_count(window_s: float, loaded_interval_s: float) -> int:
    """Echo requests of a train under load (as agent/probes/session.py's loaded_ping)."""
    # 1e-9: 0.6 / 0.2 is 2.9999999999999996 in binary floating point.
    return max(1, int(window_s / loaded_interval_s + 1e-9))


def _ping_part(m: PingMethod) -> Part:
    return Part(
        name="ping",
        duration_s=_train_s(m.count, m.interval_s, m.timeout_s),
        bytes=m.count * m.payload_bytes * 2,
        how_long=f"{m.count} echo requests {m.interval_s:g} s apart + {m.timeout_s:g} s",
        how_much=f"{m.count} x 2 x {m.payload_bytes} B",
    )


def _transfer_part(name: str, m: TransferMethod, ping: PingMethod | None) -> Part:
    test_s = m.attempts * m.timeout_s + (m.attempts - 1) * spec.RETRY_PAUSE_S
    first_s = test_s
    ping_bytes = 0
    if ping is not None and ping.loaded_interval_s is not None and m.mode == "duration":
        n = loaded_count(m.window_s, ping.loaded_interval_s)
        first_s = max(test_s, m.warmup_s + _train_s(n, ping.loaded_interval_s,
                                                    ping.timeout_s))
        ping_bytes = n * ping.payload_bytes * 2
    tests = f"{m.tests} test{'s' if m.tests != 1 else ''} x {m.attempts} attempt" \
            f"{'s' if m.attempts != 1 else ''}"
    if m.mode == "file":
        per_attempt = m.file_size_bytes or 0
        how_much = f"{tests} x a {format_bytes(per_attempt)} file"
    else:
        moving_s = m.warmup_s + m.window_s
        per_attempt = round(moving_s * spec.PLANNING_LINE_RATE_BPS / 8)
        how_much = f"{tests} x {moving_s:g} s at " \
                   f"{spec.PLANNING_LINE_RATE_BPS / 1e9:g} Gbit/s"
    pauses = f" + {spec.RETRY_PAUSE_S:g} s between attempts" if m.attempts > 1 else ""
    return Part(
        name=name,
        duration_s=first_s + (m.tests - 1) * test_s,
        bytes=m.tests * m.attempts * per_attempt + ping_bytes,
        how_long=f"{tests} x {m.timeout_s:g} s{pauses}",
        how_much=how_much,
    )


def select_host_s(pings: int) -> float:
    """The deadline, in seconds, of one candidate host's train of ``pings`` echo
    requests (select._rtts): the train, its last reply's timeout, resolution, 2 s."""
    return (pings - 1) * spec.SELECT_PING_INTERVAL_S + spec.SELECT_REPLY_TIMEOUT_S \
        + spec.RESOLVE_TIMEOUT_S + 2


def _select_part(candidates: Sequence[str], pings: int) -> Part:
    # select.choose pings each host once (by urlsplit's lower-cased hostname, as
    # select._endpoint), but tries a connection to each candidate URL.
    hosts = len({urlsplit(url).hostname for url in candidates})
    connects = len(candidates)
    host_s = select_host_s(pings)
    train = (f"{pings} echo requests {spec.SELECT_PING_INTERVAL_S:g} s apart + "
             f"{spec.SELECT_REPLY_TIMEOUT_S:g} s + {spec.RESOLVE_TIMEOUT_S + 2:g} s to resolve "
             f"and start")
    return Part(
        name="server selection",
        duration_s=hosts * host_s + connects * spec.SELECT_CONNECT_TIMEOUT_S,
        bytes=hosts * pings * 2 * _SELECT_PAYLOAD_BYTES,
        how_long=f"{hosts} host{'s' if hosts != 1 else ''} x {host_s:.3g} s ({train}) + "
                 f"{connects} TCP connect{'s' if connects != 1 else ''} x "
                 f"{spec.SELECT_CONNECT_TIMEOUT_S:g} s",
        how_much=f"{hosts} x {pings} x 2 x {_SELECT_PAYLOAD_BYTES} B",
    )


def plan(m: Method, sessions: int = 1, *, candidates: Sequence[str] = (),
         select_pings: int = 0) -> Plan:
    """The worst case of a session run with method ``m``, ``sessions`` times a slot (2
    under dual stack), choosing its server among ``candidates`` with ``select_pings``
    echo requests a host. A direction with tests = 0 (disabled) plans nothing; a session
    that measures nothing chooses no server."""
    parts = [_ping_part(m.ping)] if m.ping is not None else []
    parts += [_transfer_part(name, t, m.ping)
              for name, t in (("download", m.download), ("upload", m.upload)) if t.tests]
    if candidates and parts:
        if select_pings < 1:
            raise ValueError("select_pings must be >= 1 to plan choosing among candidates")
        parts.insert(0, _select_part(candidates, select_pings))
    return Plan(tuple(parts), sessions)


@dataclass(frozen=True, slots=True)
class RefusalAllowance:
    """What refusals may add to one session (see the module docstring)."""

    duration_s: float
    bytes: int


def refusal_allowance(p: Plan, max_s: float = spec.MAX_SESSION_S,
                      max_bytes: int = spec.MAX_SESSION_BYTES) -> RefusalAllowance:
    """The refusal allowance of each session of plan ``p``: the room the plan leaves
    under each limit, shared by its sessions; at most spec.REFUSAL_WAIT_SESSION_S, and
    the bytes that many seconds move at PLANNING_LINE_RATE_BPS (only refused attempts
    move bytes, within the time charged for them). A POST for the session's ticket is
    charged to it too (the module docstring). Nothing for a plan with no transfer."""
    if not any(part.name in ("download", "upload") for part in p.parts):
        return RefusalAllowance(0.0, 0)
    seconds = max(0.0, min(spec.REFUSAL_WAIT_SESSION_S, (max_s - p.duration_s) / p.sessions))
    room = max(0, (max_bytes - p.bytes) // p.sessions)
    return RefusalAllowance(seconds, min(room, int(seconds * spec.PLANNING_LINE_RATE_BPS
                                                   / 8)))


def limit_problem(p: Plan, max_s: float = spec.MAX_SESSION_S,
                  max_bytes: int = spec.MAX_SESSION_BYTES) -> str | None:
    """What is over a limit in plan ``p``, as a phrase naming the computed figure, how
    it was reached and the limit; or None."""
    each = "2 sessions, IPv4 then IPv6, of " if p.sessions == 2 else ""
    if p.duration_s > max_s:
        how = "; ".join(f"{x.name} {format_duration(x.duration_s)}: {x.how_long}"
                        for x in p.parts)
        lower = "tests, attempts, window_s, timeout_s or ping.count"
        if any(x.name == "server selection" for x in p.parts):
            lower = ("tests, attempts, window_s, timeout_s, ping.count, "
                     "server.select_pings or the number of server.candidates")
        return (f"would last up to {format_duration(p.duration_s)} = "
                f"{p.duration_s:.0f} s ({each}{how}), over the {max_s:g} s limit "
                f"(one 15-minute slot of a 96-a-day campaign); lower {lower}")
    if p.bytes > max_bytes:
        # Parts under a thousandth of the total (the ping trains) would only be noise.
        how = "; ".join(f"{x.name} {format_bytes(x.bytes)}: {x.how_much}"
                        for x in p.parts if x.bytes * 1000 >= p.bytes)
        return (f"would move up to {format_bytes(p.bytes)} ({each}{how}), over the "
                f"{format_bytes(max_bytes)} limit of a session; lower tests, attempts, "
                f"file_size_bytes or window_s")
    return None


def format_duration(seconds: float) -> str:
    """Seconds in the unit a person reads best: s, min, h or days."""
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


def format_bytes(count: float) -> str:
    """Bytes in decimal units (kB = 1000 B, as line rates are counted)."""
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"
