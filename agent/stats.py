"""Pure statistics over raw samples. No I/O, no clock reads, no rounding.

Definitions used everywhere in bbprobe (docs/analyst.md, "Statistics"):
- percentile: linear interpolation between closest ranks, Hyndman & Fan (1996) type 7,
  the definition of spreadsheets' PERCENTILE/PERCENTILE.INC and numpy's default;
  ``nearest_rank`` (type 1 / the classic "ceil(p*n)-th value") is available as an option;
- standard deviation: sample (n-1, Bessel) for estimates of a population from a sample,
  population (n) where explicitly asked (BEREC reports the population one for 10 pings);
- jitter: mean absolute difference of consecutive RTTs, the IPDV-style figure most tools
  print; consecutive means consecutive *received* replies, in send order;
- loss ratio: pings with no RTT / pings sent (Allegato 2 of the seed);
- throughput: bits moved inside the measurement window over the window's length, streams
  aggregated at a common end time (RMBT specification, methodology.md §3.1).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

PercentileMethod = Literal["linear", "nearest_rank"]


def mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _sum_sq_dev(values: Sequence[float]) -> float:
    centre = math.fsum(values) / len(values)
    return math.fsum((v - centre) ** 2 for v in values)


def sample_stdev(values: Sequence[float]) -> float | None:
    """Standard deviation with Bessel's correction (divides by n-1); None below 2 values."""
    if len(values) < 2:
        return None
    return math.sqrt(_sum_sq_dev(values) / (len(values) - 1))


def population_stdev(values: Sequence[float]) -> float | None:
    """Standard deviation dividing by n; 0.0 for one value, None for none."""
    if not values:
        return None
    return math.sqrt(_sum_sq_dev(values) / len(values))


@dataclass(frozen=True, slots=True)
class Moments:
    """Count, mean and sum of squared deviations (M2) of a sample: enough for the mean and
    both standard deviations, and mergeable without the values (Chan, Golub and LeVeque,
    "Updating formulae and a pairwise algorithm for computing sample variances", 1979).
    The collector keeps one per session so a scope of millions of pings is evaluated from
    per-session rows, with the same result as from the raw values."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @staticmethod
    def of(values: Sequence[float]) -> Moments:
        if not values:
            return Moments()
        return Moments(len(values), math.fsum(values) / len(values), _sum_sq_dev(values))

    def merge(self, other: Moments) -> Moments:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        return Moments(n, self.mean + delta * other.n / n,
                       self.m2 + other.m2 + delta * delta * self.n * other.n / n)

    def scaled(self, k: float) -> Moments:
        """The moments of every value multiplied by ``k`` (RTT -> RTT / 2)."""
        return Moments(self.n, self.mean * k, self.m2 * k * k)

    @property
    def value_mean(self) -> float | None:
        return self.mean if self.n else None

    @property
    def sample_stdev(self) -> float | None:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n >= 2 else None


def percentile_ranks(n: int, p: float, method: PercentileMethod = "linear") -> tuple[int, ...]:
    """The 0-based order statistics (indices into the ascending values) the p-th
    percentile of n values reads: one for ``nearest_rank``, one or two for ``linear``.
    A store that selects order statistics instead of sorting (exact at any size) asks
    for these, and ``percentile_from`` does the same arithmetic as ``percentile``."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    if n <= 0:
        return ()
    if method == "nearest_rank":
        return (max(1, math.ceil(n * p / 100)) - 1,)
    low = math.floor((n - 1) * p / 100)
    high = min(low + 1, n - 1)
    return (low,) if high == low else (low, high)


def percentile_from(ranked: Mapping[int, float], n: int, p: float,
                    method: PercentileMethod = "linear") -> float | None:
    """The p-th percentile of n values from their order statistics ``ranked`` (0-based
    index -> value; at least ``percentile_ranks(n, p, method)``)."""
    ranks = percentile_ranks(n, p, method)
    if not ranks:
        return None
    if method == "nearest_rank":
        return ranked[ranks[0]]
    h = (n - 1) * p / 100
    low = ranks[0]
    high = ranks[-1]
    return ranked[low] + (h - low) * (ranked[high] - ranked[low])


def percentile(
    values: Sequence[float], p: float, method: PercentileMethod = "linear",
    *, presorted: bool = False,
) -> float | None:
    """The p-th percentile (0 <= p <= 100) of ``values``; None for no values.

    ``linear`` (type 7): h = (n-1)*p/100, result = x[floor h] + (h - floor h) *
    (x[floor h + 1] - x[floor h]) on the sorted values.
    ``nearest_rank`` (type 1): x[ceil(n*p/100) - 1], and x[0] for p = 0.
    ``presorted``: the caller guarantees ascending order (several percentiles of millions
    of values then cost one sort).
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    if not values:
        return None
    ordered = values if presorted else sorted(values)
    n = len(ordered)
    return percentile_from({r: ordered[r] for r in percentile_ranks(n, p, method)}, n, p,
                           method)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def jitter(rtts: Sequence[float]) -> float | None:
    """Mean absolute difference of consecutive RTTs; None below 2 values."""
    if len(rtts) < 2:
        return None
    return math.fsum(abs(b - a) for a, b in itertools.pairwise(rtts)) / (len(rtts) - 1)


def loss_ratio(sent: int, received: int) -> float | None:
    """Plain loss ratio (sent - received) / sent; None when nothing was sent."""
    if sent <= 0:
        return None
    if not 0 <= received <= sent:
        raise ValueError(f"received ({received}) must be within 0..sent ({sent})")
    return (sent - received) / sent


def pair_loss_ratio(round_trip_loss: float) -> float:
    """Per-packet loss p from round-trip loss R, assuming independent losses each way.

    An echo round trip fails if the request or the reply is lost: (1 - p)^2 = 1 - R, so
    p = 1 - sqrt(1 - R). This is the 244/08/CSP Allegato 4 reading (methodology.md §1.3);
    the seed's Allegato 2 defines the plain ratio R, which is our default.
    """
    return 1 - math.sqrt(1 - round_trip_loss)


def binomial_interval(n: int, p: float, confidence: float = 0.99) -> tuple[int, int]:
    """Central interval [lo, hi] of Binomial(n, p) holding at least ``confidence`` of the
    probability: the counts of lost pings consistent with a true loss rate ``p``."""
    if not 0 <= p <= 1 or n < 0:
        raise ValueError(f"need 0 <= p <= 1 and n >= 0, got p={p}, n={n}")
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    tail = (1 - confidence) / 2
    lo, acc = 0, 0.0
    while lo < n and acc + pmf[lo] <= tail:
        acc += pmf[lo]
        lo += 1
    hi, acc = n, 0.0
    while hi > lo and acc + pmf[hi] <= tail:
        acc += pmf[hi]
        hi -= 1
    return lo, hi


def ratio(part: int, whole: int) -> float | None:
    return part / whole if whole > 0 else None


# --- Throughput from (t, cumulative bytes) samples -------------------------------------------

Samples = Sequence[tuple[float, int]]


def bytes_at(samples: Samples, t: float) -> float:
    """Cumulative bytes at time ``t`` by linear interpolation between samples.

    Before the first sample the count is the first sample's, after the last the last's.
    """
    if not samples:
        return 0.0
    if t <= samples[0][0]:
        return float(samples[0][1])
    if t >= samples[-1][0]:
        return float(samples[-1][1])
    lo, hi = 0, len(samples) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if samples[mid][0] <= t:
            lo = mid
        else:
            hi = mid
    (t0, b0), (t1, b1) = samples[lo], samples[hi]
    if t1 == t0:
        return float(b1)
    return b0 + (b1 - b0) * (t - t0) / (t1 - t0)


@dataclass(frozen=True, slots=True)
class Window:
    start_s: float
    end_s: float
    bytes: float

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def throughput_bps(self) -> float | None:
        if self.length_s <= 0:
            return None
        return self.bytes * 8 / self.length_s


def window_throughput(streams: Sequence[Samples], start_s: float) -> Window:
    """Aggregate rate of parallel streams over [start_s, common end].

    The common end is the earliest last sample of any stream (RMBT: t* = min_k t_k), so a
    stream that finished early or straggles does not bias the aggregate; each stream's
    bytes are interpolated at both window edges. Samples must be sorted by time.
    """
    active = [s for s in streams if s]
    if not active:
        return Window(start_s, start_s, 0.0)
    end_s = min(s[-1][0] for s in active)
    if end_s <= start_s:
        return Window(start_s, start_s, 0.0)
    moved = math.fsum(bytes_at(s, end_s) - bytes_at(s, start_s) for s in active)
    return Window(start_s, end_s, moved)


def whole_transfer(streams: Sequence[Sequence[tuple[float, int]]]) -> Window:
    """File mode: all bytes over the time from the first stream's start to the last's
    end (a verifier recomputes a transfer's rate with it: pure, no network imports)."""
    active = [s for s in streams if s]
    if not active:
        return Window(0.0, 0.0, 0.0)
    start = min(s[0][0] for s in active)
    end = max(s[-1][0] for s in active)
    return Window(start, end, float(sum(s[-1][1] - s[0][1] for s in active)))
