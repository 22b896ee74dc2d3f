"""Pure formatting of results for people (printing happens only in ``agent.app.cli``).
Figures are written as agent/units.py writes them, and lines fit its WIDTH."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from agent import family, units
from agent.schema import (
    REFUSAL_REASONS,
    PingTest,
    SessionResult,
    TransferAttempt,
    TransferMethod,
)

_ms = units.msec
_mbps = units.speed


def when(stamp: str) -> str:
    """``2026-12-07T14:17:34.002076Z`` as ``2026-12-07 14:17:34 UTC``: a person reads the
    second; the result keeps the microseconds."""
    day, _, time = stamp.partition("T")
    return f"{day} {time[:8]} UTC" if time else stamp


def format_ping(test: PingTest) -> list[str]:
    s = test.summary
    if test.status == "failed" and s.packets_sent == 0:
        return [f"Ping {test.target}: FAILED: {test.error}"]
    loss = units.percent(s.loss_ratio)
    lines = [
        f"Ping {test.target} ({test.address}): {s.packets_sent} sent, "
        f"{s.packets_received} received, loss {loss}",
    ]
    if s.packets_received:
        lines += [
            f"  RTT min/mean/median/p95/max {_ms(s.rtt_min_ms)}/{_ms(s.rtt_mean_ms)}/"
            f"{_ms(s.rtt_median_ms)}/{_ms(s.rtt_p95_ms)}/{_ms(s.rtt_max_ms)} ms, "
            f"stdev {_ms(s.rtt_stdev_ms)} ms, jitter {_ms(s.jitter_ms)} ms",
            f"  One-way delay (RTT/2): mean {_ms(s.one_way_delay_mean_ms)} ms, "
            f"stdev {_ms(s.one_way_delay_stdev_ms)} ms",
        ]
    return lines


def describe_method(m: TransferMethod) -> str:
    streams = "adaptive streams" if m.streams == 0 else f"{m.streams} stream(s)"
    if m.mode == "duration":
        return f"{streams}, {m.warmup_s:g} s warm-up + {m.window_s:g} s window"
    return f"{m.file_size_bytes:,} byte file over {streams}"


def format_transfers(
    direction: str, attempts: list[TransferAttempt], m: TransferMethod, rate: float | None
) -> list[str]:
    # A refused attempt is the server's, not the line's: counted apart, as the failure
    # ratio leaves it out (agent/summary.py).
    refused = [a for a in attempts if a.failure_reason in REFUSAL_REASONS]
    failed = [a for a in attempts
              if a.status == "failed" and a.failure_reason not in REFUSAL_REASONS]
    where = "server" if direction == "upload" else "client"
    used = {a.streams for a in attempts if a.status == "ok"}
    streams = f"; {'/'.join(map(str, sorted(used)))} stream(s) used" if m.streams == 0 and used \
        else ""
    by_server = f", {len(refused)} refused by the server" if refused else ""
    lines = [
        f"{direction.capitalize()}: {_mbps(rate)}, counted at the {where}; "
        f"{len(attempts)} attempt(s), {len(failed)} failed{by_server}",
        f"  method: {describe_method(m)}{streams}",
    ]
    lines += [f"  attempt {a.attempt} "
              f"{'refused' if a.failure_reason in REFUSAL_REASONS else 'failed'}: "
              f"{a.failure_reason}: {a.error}" for a in attempts if a.status == "failed"]
    return lines


def format_session(result: SessionResult) -> str:
    """The session as a person reads it after ``run`` or ``speed``: each line within
    units.WIDTH columns, whatever the names, addresses and reasons it holds."""
    lines = [
        f"Session {result.result_id}",
        f"  probe {result.probe_id or '(not named yet)'}, profile {result.method.profile}, "
        f"started {when(result.started_at)}, {result.duration_s:.1f} s",
        f"  server {result.server.url or '—'}",
    ]
    if result.address_family is not None or result.remote_addresses:
        asked = result.address_family_requested
        how = {"any": "the host's choice", "both": "dual stack"}.get(asked or "", "asked")
        route = f": {', '.join(result.local_addresses)} -> " \
                f"{', '.join(result.remote_addresses)}" if result.remote_addresses else ""
        over = family.label(result.address_family) if result.address_family else \
            "an unknown IP version"
        lines.append(f"  over {over} ({how}){route}")
    if result.ping is not None:
        lines += format_ping(result.ping)
    for direction, m, rate in (
        ("download", result.method.download, result.summary.download_bps),
        ("upload", result.method.upload, result.summary.upload_bps),
    ):
        attempts = [a for a in result.transfers if a.direction == direction]
        if attempts:
            lines += format_transfers(direction, attempts, m, rate)
        loaded = result.ping_download if direction == "download" else result.ping_upload
        if loaded is not None and loaded.summary.packets_received:
            s = loaded.summary
            idle = result.ping.summary.rtt_mean_ms if result.ping else None
            extra = "" if idle is None or s.rtt_mean_ms is None else \
                f", {units.delta(s.rtt_mean_ms - idle)} against idle"
            lines.append(f"  RTT under load: mean {_ms(s.rtt_mean_ms)} ms, p95 "
                         f"{_ms(s.rtt_p95_ms)} ms, loss {units.percent(s.loss_ratio or 0)} "
                         f"({s.packets_sent} pings{extra})")
    if result.validity is not None:
        if result.validity.valid:
            ctx = result.context
            seen = ctx is not None and (ctx.download_cross_traffic_ratio is not None
                                        or ctx.upload_cross_traffic_ratio is not None)
            lines.append("Valid: the host checks passed; cross traffic "
                         + ("within the limit" if seen else "not measured"))
        else:
            # Each reason on its own line: several are common (Wi-Fi and a busy LAN), and
            # each says what to change before measuring again.
            lines.append("INVALID (not counted in compliance):")
            lines += [f"  - {r.detail}" for r in result.validity.reasons]
    return "\n".join(units.fit(lines)) + "\n"


def instruction_line(settings: Mapping[str, Any], version: str,
                     overridden: Collection[str] = ()) -> str | None:
    """What the collector's instruction (RFC 7594's, held in ``settings``) changes for
    this session, in words; None when it sets nothing (the collector sends every probe
    an instruction, most of them empty: nothing to say then). Keys the command line
    sets too (``overridden``) are said to have no effect: the person on site decides."""
    if not settings:
        return None
    applied = [f"{k} = {_value(v)}" for k, v in sorted(settings.items())
               if k not in overridden]
    ignored = sorted(k for k in settings if k in overridden)
    said = f"sets {', '.join(applied)}" if applied else "sets nothing this run uses"
    if ignored:
        said += f" ({', '.join(ignored)} too, but the command line's value wins)"
    return f"the collector's instruction {said} (instruction {version[:8]})"


def _value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)
