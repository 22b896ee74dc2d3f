"""A session's planned worst case, in seconds and bytes, and the limits it must keep
(issue 23). Pure: a ``Method`` in, figures out.

Without a bound, an instruction such as ``download.tests=1000 download.window_s=600
ping.count=10000`` (each value within its own range) plans three weeks a session on
every probe it selects. The config is refused at load instead (agent/config.py), so the
same rule holds for a local file, the command line, the collector setting an
instruction and the agent applying one.

Duration: the phases one after the other, as agent/session.py runs them, each at its
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

Under ``server.address_family = "both"`` a slot runs the session twice (IPv4, then
IPv6): both figures double. Left out, each bounded by its own constants and covered by
the headroom under the limits: name resolution, the family preflight, choosing among
candidate servers and the host checks (seconds, not minutes).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent import spec
from agent.schema import Method, PingMethod, TransferMethod


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
    """Echo requests of a train under load (as agent/session.py's loaded_ping)."""
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


def plan(m: Method, sessions: int = 1) -> Plan:
    """The worst case of a session run with method ``m``, ``sessions`` times a slot (2
    under dual stack). A direction with tests = 0 (disabled) plans nothing."""
    parts = [_ping_part(m.ping)] if m.ping is not None else []
    parts += [_transfer_part(name, t, m.ping)
              for name, t in (("download", m.download), ("upload", m.upload)) if t.tests]
    return Plan(tuple(parts), sessions)


def limit_problem(p: Plan, max_s: float = spec.MAX_SESSION_S,
                  max_bytes: int = spec.MAX_SESSION_BYTES) -> str | None:
    """What is over a limit in plan ``p``, as a phrase naming the computed figure, how
    it was reached and the limit; or None."""
    each = "2 sessions, IPv4 then IPv6, of " if p.sessions == 2 else ""
    if p.duration_s > max_s:
        how = "; ".join(f"{x.name} {format_duration(x.duration_s)}: {x.how_long}"
                        for x in p.parts)
        return (f"would last up to {format_duration(p.duration_s)} = "
                f"{p.duration_s:.0f} s ({each}{how}), over the {max_s:g} s limit "
                f"(one 15-minute slot of a 96-a-day campaign); lower tests, attempts, "
                f"window_s, timeout_s or ping.count")
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
