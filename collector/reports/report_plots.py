"""The compliance report page's plots (reports/html.py), pure: the report's figures and
the hourly sums put into plots.py's inline SVG.

- speed distribution per direction: histogram of per-test speeds (the samples of the
  p5/p95 indicators) with the Allegato 2 targets (solid) and the observed percentiles
  (dashed);
- hour-of-day profile: mean per-test speed per local hour band (the bands of a 244/08
  campaign), from per-hour sums, so a scope of any size costs the same;
- delay and jitter over time: mean one-way delay (or RTT, as the targets say) per hour,
  or per local day when the scope spans more than 14 days;
- packet loss over time: lost / sent pings per bucket, the same buckets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from agent import stats
from collector.compliance.evaluate import Observations, Report
from collector.reports import plots
from collector.storage.model import HourRow

HOURLY_SPAN_DAYS = 14


@dataclass(frozen=True, slots=True)
class Bucket:
    start: datetime  # aware, local time
    rtt_n: int
    rtt_sum_ms: float
    pings_sent: int
    pings_lost: int
    jitter_sum_ns: int = 0
    jitter_pairs: int = 0


def _utc_hour(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H").replace(tzinfo=UTC)


def hour_profile(rows: Sequence[HourRow], zone: ZoneInfo) -> dict[str, list[tuple[int, float,
                                                                                   int]]]:
    """Per direction, (local hour, mean kbit/s, tests) for every hour band with tests."""
    sums: dict[str, list[list[float]]] = {"download": [[0.0, 0] for _ in range(24)],
                                          "upload": [[0.0, 0] for _ in range(24)]}
    for row in rows:
        hour = _utc_hour(row.hour).astimezone(zone).hour
        for direction, n, total in (("download", row.download_n, row.download_kbps_sum),
                                    ("upload", row.upload_n, row.upload_kbps_sum)):
            sums[direction][hour][0] += total
            sums[direction][hour][1] += n
    return {d: [(h, total / n, int(n)) for h, (total, n) in enumerate(per) if n]
            for d, per in sums.items()}


def time_buckets(rows: Sequence[HourRow], zone: ZoneInfo) -> tuple[str, list[Bucket]]:
    """Hourly buckets, or local days when the rows span more than 14 days."""
    if not rows:
        return "hour", []
    first, last = _utc_hour(rows[0].hour), _utc_hour(rows[-1].hour)
    daily = last - first > timedelta(days=HOURLY_SPAN_DAYS)
    merged: dict[datetime, list[float]] = {}
    for row in rows:
        local = _utc_hour(row.hour).astimezone(zone)
        key = local.replace(hour=0) if daily else local
        acc = merged.setdefault(key, [0, 0.0, 0, 0, 0, 0])
        acc[0] += row.rtt_n
        acc[1] += row.rtt_sum_ms
        acc[2] += row.pings_sent
        acc[3] += row.pings_lost
        acc[4] += row.jitter_sum_ns
        acc[5] += row.jitter_pairs
    return ("day" if daily else "hour"), [
        Bucket(k, int(v[0]), v[1], int(v[2]), int(v[3]), int(v[4]), int(v[5]))
        for k, v in sorted(merged.items())
    ]


def _targets(report: Report) -> dict[str, float]:
    return {r.id: r.target for r in report.indicators if r.target is not None}


# A histogram's input: at most about this many values stand for a scope's speeds.
PLOT_VALUES = 200_000


def speed_plot(direction: str, obs: Observations, report: Report) -> str:
    speeds = obs.download_kbps if direction == "download" else obs.upload_kbps
    # The bars may stand for the values (a store's histogram of a large scope); the
    # lines are the report's own figures, exact, in its percentile method.
    mbps = [v / 1000 for v in speeds.plot_values(PLOT_VALUES)]
    targets = _targets(report)
    observed = {r.id: r.observed for r in report.indicators}
    lines = []
    for p, word in ((5, "minima"), (95, "massima")):
        target = targets.get(f"{direction}_p{p}_kbps")
        if target is not None:
            lines.append(plots.VLine(target / 1000, f"target banda {word} (p{p})",
                                     plots.COLOURS["target"], dashed=p == 95))
        value = observed.get(f"{direction}_p{p}_kbps")
        if value is None and f"{direction}_p{p}_kbps" not in observed and len(speeds):
            # Not in the table: the percentile all the same, as the evaluator reads it.
            n = len(speeds)
            method: stats.PercentileMethod = (
                "nearest_rank" if report.method.get("percentile", "").startswith("nearest")
                else "linear")
            value = stats.percentile_from(
                speeds.ranked(stats.percentile_ranks(n, p, method)), n, p, method)
        if value is not None:
            lines.append(plots.VLine(value / 1000, f"observed p{p}",
                                     plots.COLOURS["observed"], dashed=p == 95))
    return plots.histogram(
        f"speed-{direction}", f"{direction.capitalize()} speed per test ({len(speeds)} tests)",
        mbps, "Mbit/s", lines, plots.COLOURS[direction])


def profile_plot(rows: Sequence[HourRow], zone: ZoneInfo) -> str:
    profile = hour_profile(rows, zone)
    series = [plots.Series(f"{d} (mean)", tuple((h, kbps / 1000) for h, kbps, _ in pts),
                           plots.COLOURS[d]) for d, pts in profile.items()]
    return plots.lines_plot(
        "hour-profile", f"Mean speed by hour of day ({zone.key})", series,
        "local hour band", "Mbit/s", xticks=[0, 3, 6, 9, 12, 15, 18, 21, 24],
        xfmt=lambda h: f"{int(h):02d}")


def _time_axis(buckets: Sequence[Bucket], kind: str,
               zone: ZoneInfo) -> tuple[list[float], Callable[[float], str]]:
    """Ticks on local wall-clock boundaries and their labels, for the buckets' span."""
    lo = buckets[0].start.timestamp() if buckets else 0.0
    hi = buckets[-1].start.timestamp() + (86400 if kind == "day" else 3600) if buckets \
        else 3600.0
    ticks, step_h = plots.time_ticks(lo, hi, zone)

    def fmt(t: float) -> str:
        moment = datetime.fromtimestamp(t, zone)
        if step_h >= 24:
            return moment.strftime("%d %b")
        return moment.strftime("%d %b" if moment.hour == 0 else "%H:%M")
    return ticks, fmt


def delay_plot(kind: str, buckets: Sequence[Bucket], zone: ZoneInfo, scale: float) -> str:
    word = "one-way delay (RTT / 2)" if scale == 0.5 else "round-trip time"
    points = tuple((b.start.timestamp(), b.rtt_sum_ms / b.rtt_n * scale)
                   for b in buckets if b.rtt_n)
    ticks, fmt = _time_axis(buckets, kind, zone)
    return plots.lines_plot(
        "delay", f"Mean {word} per {kind}",
        [plots.Series(f"mean {word}", points, plots.COLOURS["delay"])],
        f"local time ({zone.key})", "ms", xticks=ticks, xfmt=fmt)


def jitter_plot(kind: str, buckets: Sequence[Bucket], zone: ZoneInfo) -> str:
    """Mean jitter per bucket (delibera 156/23/CONS), from the same ping trains."""
    points = tuple((b.start.timestamp(), b.jitter_sum_ns / b.jitter_pairs / 1e6)
                   for b in buckets if b.jitter_pairs)
    ticks, fmt = _time_axis(buckets, kind, zone)
    return plots.lines_plot(
        "jitter", f"Mean jitter per {kind} (consecutive RTTs)",
        [plots.Series("mean jitter", points, plots.COLOURS["jitter"])],
        f"local time ({zone.key})", "ms", xticks=ticks, xfmt=fmt)


def loss_plot(kind: str, buckets: Sequence[Bucket], zone: ZoneInfo) -> str:
    width = 86400.0 if kind == "day" else 3600.0
    bars = [(b.start.timestamp(), b.pings_lost / b.pings_sent * 100)
            for b in buckets if b.pings_sent]
    ticks, fmt = _time_axis(buckets, kind, zone)
    return plots.bars_plot(
        "loss", f"Packet loss per {kind}", bars, width, f"local time ({zone.key})",
        "% of pings lost", plots.COLOURS["loss"], xfmt=fmt, yfmt=lambda v: f"{v:.3g} %",
        xticks=ticks)
