"""Plots as inline SVG, pure: plain data in, markup out. No JavaScript and no plotting
library, so a report is one standalone file that any browser, mail client or archive can
show, and the numbers drawn are exactly the numbers computed.

Every drawn datum carries class ``mark``; every plot is an ``<svg class="plot">`` with a
``data-plot`` name, a title and an accessible label. A plot with nothing to draw says so
in words instead of drawing empty axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

from collector.safetext import html as escape

WIDTH, HEIGHT = 680, 280
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 36, 48
# An estimate of an 11 px sans-serif character's width, to keep tick labels inside the
# plot (an SVG has no text measurement without a browser).
CHAR_PX = 6.6
Y_LABEL_PX = 24  # room for the rotated y-axis label left of the tick labels
COLOURS = {"download": "#1f77b4", "upload": "#ff7f0e", "delay": "#2ca02c", "loss": "#d62728",
           "target": "#b00020", "observed": "#333333", "jitter": "#9467bd"}


@dataclass(frozen=True, slots=True)
class VLine:
    """A vertical reference line (a target or an observed percentile)."""

    x: float
    label: str
    colour: str
    dashed: bool = False


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    points: tuple[tuple[float, float], ...]
    colour: str


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5 or 5 times a power of ten);
    ``integer``: whole numbers only (an axis of counts: no "1.5 tests")."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    if integer:
        raw = max(raw, 1.0)
    power = 10 ** math.floor(math.log10(raw))
    multiples = (1, 2, 5, 10) if integer and power == 1 else (1, 2, 2.5, 5, 10)
    step = next(m * power for m in multiples if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    k = 0
    while True:
        value = first + k * step
        ticks.append(round(value, 12))
        if value >= hi - 1e-12 * step:
            return ticks
        k += 1


TIME_STEPS_H = (1, 2, 3, 6, 12, 24, 48, 96, 168, 336, 672)


def time_ticks(lo: float, hi: float, zone: tzinfo, count: int = 7) -> tuple[list[float], int]:
    """Ticks on local wall-clock boundaries (whole hours, midnights, weeks) covering the
    epoch-second range [lo, hi]; returns the ticks and the step in hours."""
    span_h = max(hi - lo, 3600.0) / 3600
    step = next((h for h in TIME_STEPS_H if span_h / h <= count), TIME_STEPS_H[-1])
    start = datetime.fromtimestamp(lo, zone).replace(hour=0, minute=0, second=0,
                                                    microsecond=0)
    ticks: list[float] = []
    k = 0
    while True:
        # Aware arithmetic is wall-clock arithmetic: ticks stay on local hours across DST.
        moment = start + timedelta(hours=k * step)
        stamp = moment.timestamp()
        k += 1
        if stamp + step * 3600 <= lo:
            continue
        ticks.append(stamp)
        if stamp >= hi:
            return ticks, step


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.6g}"


class _Canvas:
    def __init__(self, name: str, title: str, x_label: str, y_label: str) -> None:
        self.name = name
        self.title = title
        self.parts: list[str] = []
        self.x_label = x_label
        self.y_label = y_label
        self.x0, self.x1 = LEFT, WIDTH - RIGHT
        self.y0, self.y1 = HEIGHT - BOTTOM, TOP

    def frame(self, xticks: Sequence[float], yticks: Sequence[float],
              xfmt: Callable[[float], str] = _fmt, yfmt: Callable[[float], str] = _fmt) -> None:
        self.xlo, self.xhi = xticks[0], xticks[-1]
        self.ylo, self.yhi = yticks[0], yticks[-1]
        # Wide tick labels ("1,000,000", "0.025 %") move the plot right rather than run
        # into the rotated y-axis label or off the edge.
        widest = max(len(yfmt(t)) for t in yticks)
        self.x0 = max(LEFT, round(Y_LABEL_PX + 6 + CHAR_PX * widest))
        p = self.parts
        for t in yticks:
            y = self.y(t)
            p.append(f'<line class="grid" x1="{self.x0}" x2="{self.x1}" y1="{y:.1f}" '
                     f'y2="{y:.1f}"/><text class="tick" x="{self.x0 - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{escape(yfmt(t))}</text>')
        for t in xticks:
            x = self.x(t)
            label = xfmt(t)
            half = CHAR_PX * len(label) / 2
            # The first and last labels are anchored at their tick's side when centring
            # would cut them at the plot's edge.
            anchor = "end" if x + half > WIDTH - 2 else "start" if x - half < 2 \
                else "middle"
            p.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{self.y0}" '
                     f'y2="{self.y0 + 4}"/><text class="tick" x="{x:.1f}" y="{self.y0 + 17}" '
                     f'text-anchor="{anchor}">{escape(label)}</text>')
        p.append(f'<line class="axis" x1="{self.x0}" x2="{self.x1}" y1="{self.y0}" '
                 f'y2="{self.y0}"/><line class="axis" x1="{self.x0}" x2="{self.x0}" '
                 f'y1="{self.y0}" y2="{self.y1}"/>')
        p.append(f'<text class="label" x="{(self.x0 + self.x1) / 2:.0f}" y="{HEIGHT - 8}" '
                 f'text-anchor="middle">{escape(self.x_label)}</text>')
        p.append(f'<text class="label" transform="translate(14 {(self.y0 + self.y1) / 2:.0f}) '
                 f'rotate(-90)" text-anchor="middle">{escape(self.y_label)}</text>')

    def x(self, v: float) -> float:
        span = self.xhi - self.xlo or 1.0
        return self.x0 + (v - self.xlo) / span * (self.x1 - self.x0)

    def y(self, v: float) -> float:
        span = self.yhi - self.ylo or 1.0
        return self.y0 - (v - self.ylo) / span * (self.y0 - self.y1)

    def legend(self, items: Sequence[tuple[str, str, bool]]) -> None:
        x: float = self.x0 + 8
        for label, colour, dashed in items:
            dash = ' stroke-dasharray="5 3"' if dashed else ""
            self.parts.append(
                f'<line x1="{x}" x2="{x + 18}" y1="{TOP - 14}" y2="{TOP - 14}" '
                f'stroke="{colour}" stroke-width="2.5"{dash}/>'
                f'<text class="legend" x="{x + 22}" y="{TOP - 10}">{escape(label)}</text>')
            x += 30 + 6.5 * len(label)

    def render(self, empty: str | None = None) -> str:
        body = "".join(self.parts)
        if empty is not None:
            body = (f'<text class="empty" x="{WIDTH / 2:.0f}" y="{HEIGHT / 2:.0f}" '
                    f'text-anchor="middle">{escape(empty)}</text>')
        return (f'<svg class="plot" data-plot="{escape(self.name)}" role="img" '
                f'aria-label="{escape(self.title)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
                f'width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">'
                f'<title>{escape(self.title)}</title>'
                f'<text class="plot-title" x="{WIDTH - RIGHT}" y="14" text-anchor="end">'
                f'{escape(self.title)}</text>{body}</svg>')


def histogram(name: str, title: str, values: Sequence[float], x_label: str,
              lines: Sequence[VLine] = (), colour: str = COLOURS["download"],
              bins: int = 30) -> str:
    """Counts of ``values`` in equal bins, with reference lines drawn over them."""
    canvas = _Canvas(name, title, x_label, "tests")
    if not values:
        return canvas.render("no successful tests in this scope")
    lo = 0.0
    hi = max([*values, *(v.x for v in lines)]) * 1.05 or 1.0
    width = hi / bins
    counts = [0] * bins
    for v in values:
        counts[min(int(v / width), bins - 1)] += 1
    xticks = nice_ticks(lo, hi, 6)
    canvas.frame(xticks, nice_ticks(0, max(counts), 4, integer=True))
    for i, c in enumerate(counts):
        if c:
            x_a, x_b = canvas.x(i * width), canvas.x((i + 1) * width)
            canvas.parts.append(
                f'<rect class="mark" x="{x_a:.1f}" y="{canvas.y(c):.1f}" '
                f'width="{max(x_b - x_a - 1, 1):.1f}" height="{canvas.y0 - canvas.y(c):.1f}" '
                f'fill="{colour}" fill-opacity="0.75"><title>{_fmt(i * width)}-'
                f'{_fmt((i + 1) * width)}: {c}</title></rect>')
    for line in lines:
        x = canvas.x(line.x)
        dash = ' stroke-dasharray="5 3"' if line.dashed else ""
        canvas.parts.append(
            f'<line class="ref" x1="{x:.1f}" x2="{x:.1f}" y1="{canvas.y0}" y2="{canvas.y1}" '
            f'stroke="{line.colour}" stroke-width="2"{dash}><title>{escape(line.label)}: '
            f'{_fmt(line.x)}</title></line>')
    canvas.legend([(v.label, v.colour, v.dashed) for v in lines])
    return canvas.render()


def lines_plot(name: str, title: str, series: Sequence[Series], x_label: str, y_label: str,
               xticks: Sequence[float] | None = None,
               xfmt: Callable[[float], str] = _fmt, y_floor_zero: bool = True) -> str:
    """One line with point markers per series."""
    canvas = _Canvas(name, title, x_label, y_label)
    points = [p for s in series for p in s.points]
    if not points:
        return canvas.render("no data in this scope")
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    ticks_x = list(xticks) if xticks is not None else nice_ticks(min(xs), max(xs), 6)
    ticks_y = nice_ticks(0.0 if y_floor_zero else min(ys), max(ys), 4)
    canvas.frame(ticks_x, ticks_y, xfmt)
    radius = 3 if len(points) <= 200 else 1.5
    for s in series:
        if not s.points:
            continue
        path = " ".join(f"{'M' if i == 0 else 'L'}{canvas.x(x):.1f},{canvas.y(y):.1f}"
                        for i, (x, y) in enumerate(s.points))
        canvas.parts.append(f'<path class="mark" d="{path}" fill="none" stroke="{s.colour}" '
                            f'stroke-width="1.8"/>')
        canvas.parts.extend(
            f'<circle class="mark" cx="{canvas.x(x):.1f}" cy="{canvas.y(y):.1f}" r="{radius}" '
            f'fill="{s.colour}"><title>{escape(s.name)} {escape(xfmt(x))}: {_fmt(y)}</title>'
            f'</circle>' for x, y in s.points)
    canvas.legend([(s.name, s.colour, False) for s in series if s.points])
    return canvas.render()


def bars_plot(name: str, title: str, bars: Sequence[tuple[float, float]], bar_width: float,
              x_label: str, y_label: str, colour: str,
              xfmt: Callable[[float], str] = _fmt, yfmt: Callable[[float], str] = _fmt,
              xticks: Sequence[float] | None = None) -> str:
    """Bars of ``bar_width`` starting at each x (a value per time bucket)."""
    canvas = _Canvas(name, title, x_label, y_label)
    if not bars:
        return canvas.render("no data in this scope")
    xs = [b[0] for b in bars]
    top = max(b[1] for b in bars)
    ticks_x = list(xticks) if xticks is not None else nice_ticks(min(xs), max(xs) + bar_width,
                                                                   6)
    canvas.frame(ticks_x, nice_ticks(0.0, top if top > 0 else 1.0, 4), xfmt, yfmt)
    for x, v in bars:
        x_a, x_b = canvas.x(x), canvas.x(x + bar_width)
        height = canvas.y0 - canvas.y(v)
        # A zero still gets a hairline: "measured, nothing lost" differs from "no data".
        canvas.parts.append(
            f'<rect class="mark" x="{x_a:.1f}" y="{canvas.y0 - max(height, 1):.1f}" '
            f'width="{max(x_b - x_a - 0.5, 0.8):.1f}" height="{max(height, 1):.1f}" '
            f'fill="{colour}"><title>{escape(xfmt(x))}: {escape(yfmt(v))}</title></rect>')
    return canvas.render()
