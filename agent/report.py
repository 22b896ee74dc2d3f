"""Pure formatting of results for people (printing happens only in ``agent.app.cli``)."""

from __future__ import annotations

from agent import family
from agent.schema import (
    REFUSAL_REASONS,
    PingTest,
    SessionResult,
    TransferAttempt,
    TransferMethod,
)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _mbps(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e6:,.2f} Mbit/s"


def format_ping(test: PingTest) -> list[str]:
    s = test.summary
    if test.status == "failed" and s.packets_sent == 0:
        return [f"Ping {test.target}: FAILED: {test.error}"]
    loss = "—" if s.loss_ratio is None else f"{s.loss_ratio * 100:.1f} %"
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
        f"{direction.capitalize()}: {_mbps(rate)} ({describe_method(m)}{streams}; counted at "
        f"the {where}; {len(attempts)} attempt(s), {len(failed)} failed{by_server})"
    ]
    lines += [f"  attempt {a.attempt} "
              f"{'refused' if a.failure_reason in REFUSAL_REASONS else 'failed'}: "
              f"{a.failure_reason}: {a.error}" for a in attempts if a.status == "failed"]
    return lines


def format_session(result: SessionResult) -> str:
    lines = [
        f"Session {result.result_id}",
        f"  probe {result.probe_id or '(not named yet)'}, started "
        f"{result.started_at}, {result.duration_s:.1f} s, "
        f"profile {result.method.profile}, server {result.server.url or '—'}",
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
                f", {s.rtt_mean_ms - idle:+.3f} ms against idle"
            lines.append(f"  RTT under load: mean {_ms(s.rtt_mean_ms)} ms, p95 "
                         f"{_ms(s.rtt_p95_ms)} ms, loss {(s.loss_ratio or 0) * 100:.1f} % "
                         f"({s.packets_sent} pings{extra})")
    return "\n".join(lines) + "\n"
