"""How a figure reads on a human page (text and HTML, reports and certificates), pure:
an indicator's short name, a value in its page unit (speeds in Mbit/s with two
decimals, as MisuraInternet publishes them; ratios in %), its 95 % interval or "not
enough data" (the minimum-sample rule, collector/compliance/uncertainty.py), a session's
speeds and RTTs, and the attempts a measurement server refused.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from collector.compliance.evaluate import IndicatorResult
from collector.safetext import terminal

SHORT_NAMES = {
    "download_p95_kbps": "Download, banda massima (p95)",
    "download_p5_kbps": "Download, banda minima (p5)",
    "upload_p95_kbps": "Upload, banda massima (p95)",
    "upload_p5_kbps": "Upload, banda minima (p5)",
    "download_failure_ratio": "Download failure rate",
    "upload_failure_ratio": "Upload failure rate",
    "delay_mean_ms": "Delay, mean",
    "delay_stdev_ms": "Delay, std deviation",
    "loss_ratio": "Packet loss rate",
    "jitter_mean_ms": "Jitter, mean",
}


def indicator_name(indicator_id: str, delay_basis: str = "rtt_half") -> str:
    """An indicator's short name, the delay named for the statistic the report judges
    (mean of RTT / 2, or of the round trip: targets.Options.delay_basis)."""
    name = SHORT_NAMES.get(indicator_id, indicator_id)
    if indicator_id.startswith("delay_"):
        word = "One-way delay (RTT / 2)" if delay_basis == "rtt_half" else "Round-trip time"
        name = name.replace("Delay", word)
    return name


def short_name(r: IndicatorResult, delay_basis: str = "rtt_half") -> str:
    return indicator_name(r.id, delay_basis)


def format_value(value: float | None, unit: str) -> str:
    """A value for a human page: speeds stored in kbit/s shown in Mbit/s (two
    decimals, as MisuraInternet publishes them), ratios in %, delays in ms."""
    if value is None:
        return "—"
    if unit == "ratio":
        return f"{value * 100:.3g} %"
    if unit == "kbit/s":
        # No thousands separator: "21,032.93" reads as 21 to an Italian reader.
        return f"{value / 1000:.2f} Mbit/s"
    if unit == "ms":
        return f"{value:.3f} ms"
    return f"{value:g} {unit}"


def format_interval(interval: Any, unit: str, min_samples: int) -> str:
    """A figure's 95 % interval for a human page: "[low \u2013 high unit]", or "not enough
    data" under the minimum-sample rule (uncertainty.py), with why."""
    if interval is None:
        return "—"
    if not interval.enough:
        if interval.samples < min_samples:
            return f"not enough data (n < {min_samples})"
        return "not enough data (no interval)"
    low = format_value(interval.low, unit)
    high = format_value(interval.high, unit)
    # The unit once, after the high end ("[12.10 - 14.30 Mbit/s]", an en dash).
    unit_text = high.rsplit(" ", 1)[1] if " " in high else ""
    if unit_text and low.endswith(" " + unit_text):
        low = low[: -len(unit_text) - 1]
    return f"[{low} \u2013 {high}]"


def labelled(label: str, text: str, width: int = 100) -> str:
    """``label`` and a long sentence, wrapped under its first line (a terminal's width)."""
    return textwrap.fill(text, width, initial_indent=f"{label:<10}",
                         subsequent_indent=" " * 10, break_on_hyphens=False)


# Servers a refusal sentence names (text, HTML); the rest are counted.
SERVERS_NAMED = 10


def server_label(server: str) -> str:
    """A server key (facts.server_key) as shown: printable, and named when empty."""
    return terminal(server) if server else "server not recorded"


def refused_sentence(by_server: Sequence[tuple[str, int]], known: bool = True) -> str:
    """How many transfer attempts the measurement server refused, per server: a capacity
    refusal says an under-sized server, not an unreliable line, so never in the failure rate."""
    if not known:
        return ("not recorded in this input (a samples file cannot tell a refusal from a "
                "failure: its failed rows are all the line's)")
    if not by_server:
        return "no transfer attempt in scope was refused by a measurement server"
    total = sum(n for _, n in by_server)
    # The most refused first; a sentence names a few (the JSON and CSV name them all).
    ranked = sorted(by_server, key=lambda pair: (-pair[1], pair[0]))
    servers = ", ".join(f"{server_label(server)} {n}" for server, n in
                        ranked[:SERVERS_NAMED])
    if len(ranked) > SERVERS_NAMED:
        servers += f" and {len(ranked) - SERVERS_NAMED} more server(s)"
    return (f"{total} transfer attempt(s) refused by the measurement server ({servers}): "
            "for capacity (HTTP 429, or 503 from a bbprobe server) or its ticket; counted "
            "apart, not in the failure rate")


def refusals_dict(by_server: Sequence[tuple[str, int]], known: bool = True) -> dict[str, Any]:
    """The JSON of the refusals: ``attempts`` (transfer attempts refused, in all),
    ``attempts_by_server`` ({server origin: attempts}), ``recorded`` (False: the input
    could not tell refusals from failures)."""
    return {"attempts": sum(n for _, n in by_server) if known else None,
            "attempts_by_server": dict(by_server), "recorded": known}


def show_speeds(values: tuple[float | None, ...]) -> str:
    return ", ".join("failed" if v is None else format_value(v, "kbit/s")
                     for v in values) or "—"


def show_rtts(values: tuple[float | None, ...]) -> str:
    return ", ".join("lost" if v is None else f"{v:.2f}" for v in values) or "—"
