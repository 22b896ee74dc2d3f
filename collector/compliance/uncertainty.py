"""The 95 % confidence interval of every figure a report or certificate publishes (pure).

Issue 28 §3: each indicator carries its interval and the number of samples behind it, and
a minimum-sample rule marks a figure "not enough data" instead of a number a regulator
could not defend (Ofcom publishes a figure only when its interval is narrow enough). The
methods, each written out in the ``Interval.method`` string so a reader can reproduce it:

- **Percentiles** (speeds p5/p95, delay p95 of a certificate): distribution-free, from
  order statistics. If B ~ Binomial(n, p/100) counts the samples below the true
  percentile, the 0-based order statistics x[j] and x[k] bound it with probability
  P(j < B <= k) (exact for continuous values, at least that for ties; Hahn & Meeker,
  "Statistical Intervals", 1991, §5.2; Conover, "Practical Nonparametric Statistics",
  §3.2). We take the equal-tailed pair (each tail at most (1 - c)/2); when n is too small
  for it (for p5, n < 72) the pair of fewest ranks reaching coverage c with j >= 0 and
  k <= n - 1, and None when no pair reaches it (for p5 and p95, n < 59).
  The binomial is computed exactly at any n: its probabilities relative to the mode's,
  outwards by the ratio recurrence P(k+1)/P(k) = (n-k)/(k+1)·q/(1-q), renormalised over
  the window outside which they fall below 1e-25 of the mode's (the binomial is
  log-concave, so the neglected tails are geometric and below 1e-20 in all); no
  factorials, no overflow, and millions of samples cost a few thousand terms, with no
  normal approximation (tested against exact enumeration with ``math.comb``).
- **Proportions** (failure ratios, packet loss): Wilson's score interval (Wilson 1927;
  Newcombe 1998 recommends it over the Wald interval, which collapses at 0 and 1). The
  per-packet loss 1 - sqrt(1 - R) maps the interval of R through the same monotone
  function. Assumes independent trials: losses come in bursts, so for loss it is narrow.
- **Mean delay**: Student t with n - 1 degrees of freedom on the sample variance.
  Assumes independent samples: the pings of one train are not (queues persist over
  seconds), so the interval is optimistic; it says what the sample can say, no more.
- **Delay standard deviation**: chi-square with n - 1 degrees of freedom,
  s·sqrt((n-1)/χ²(1 - alpha/2)) .. s·sqrt((n-1)/χ²(alpha/2)); assumes independent normal samples
  (delays are skewed, so it is indicative).
- **Jitter**: the store keeps only the sum of |ΔRTT| and the number of pairs, not their
  spread, so no interval can be estimated from the jitter's own values. We bound the
  spread instead: Var|D| <= E[D²] = 2·Var(RTT)·(1 - r1) <= 2·Var(RTT) for lag-1
  autocorrelation r1 >= 0 (what queueing gives); the pooled RTT variance of the scope
  includes the variation between sessions, which only widens it. The interval is then
  normal with that bounded spread over the pairs, taken as independent; it is a bound
  on the uncertainty, not an estimate of it.

Quantiles without scipy (not a dependency):
- normal: inversion of ``math.erfc`` (correctly rounded to a few ulp) by bisection and
  Newton steps, to 1e-15;
- Student t: exact inversion of the regularized incomplete beta (continued fraction,
  modified Lentz, Numerical Recipes §6.4) by bisection for df <= 1000; above, the
  Cornish-Fisher expansion of Abramowitz & Stegun 26.7.5 to the 1/df³ term, whose error
  at df > 1000 is below 1e-11 (checked against the exact inversion at the threshold);
- chi-square: exact inversion of the regularized lower gamma (series and continued
  fraction, Numerical Recipes §6.2) for df <= 100000; above, Wilson-Hilferty (1931),
  whose relative error at df > 100000 is below 1e-8 (checked at the threshold).

The minimum-sample rule: ``enough = n >= min_samples and the interval exists``. It marks
a figure on the page and in the published layouts; it never changes a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent import stats

CONFIDENCE = 0.95
# Below 30 samples the normal reasoning behind the t and Wilson intervals is weak and a
# percentile's distribution-free interval rarely exists (the usual rule of thumb; Ofcom
# suppresses figures on small panels). Configurable: [reports] min_samples.
DEFAULT_MIN_SAMPLES = 30

# The largest df computed by exact inversion; beyond, the stated approximations.
T_EXACT_MAX_DF = 1000
CHI2_EXACT_MAX_DF = 100_000


@dataclass(frozen=True)
class Interval:
    """A two-sided interval of one figure. ``enough`` False: not enough data under the
    minimum-sample rule (low/high then may be None, or present but not to be published)."""

    low: float | None
    high: float | None
    confidence: float
    method: str
    samples: int
    enough: bool


def _none(method: str, samples: int, confidence: float = CONFIDENCE) -> Interval:
    return Interval(None, None, confidence, method, samples, False)


# --- Binomial, exactly ------------------------------------------------------------------


def binomial_window(n: int, q: float) -> tuple[int, list[float]]:
    """(lo, probs): P(B = lo + i) = probs[i] for B ~ Binomial(n, q), over the window
    outside which the total mass is below about 1e-20."""
    if n < 0 or not 0 <= q <= 1:
        raise ValueError(f"need n >= 0 and 0 <= q <= 1, got n={n}, q={q}")
    if q == 0 or n == 0:
        return 0, [1.0]
    if q == 1:
        return n, [1.0]
    mode = min(n, max(0, math.floor((n + 1) * q)))
    odds = q / (1 - q)
    # Relative to the mode's probability (1.0), normalised at the end: no factorial is
    # ever formed, and rounding stays relative (a few ulp per step).
    cut = 1e-25
    up = [1.0]
    k, term = mode, 1.0
    while k < n:
        term *= (n - k) / (k + 1) * odds
        k += 1
        if term < cut:
            break
        up.append(term)
    down: list[float] = []
    k, term = mode, 1.0
    while k > 0:
        term *= k / (n - k + 1) / odds
        k -= 1
        if term < cut:
            break
        down.append(term)
    probs = down[::-1] + up
    total = math.fsum(probs)
    return mode - len(down), [p / total for p in probs]


def _binomial_cdf(n: int, q: float) -> tuple[int, list[float]]:
    """(lo, cdf): P(B <= lo + i) = cdf[i]; 0 below lo, 1 beyond the window."""
    lo, probs = binomial_window(n, q)
    cdf, acc = [], 0.0
    for p in probs:
        acc += p
        cdf.append(min(acc, 1.0))
    cdf[-1] = 1.0
    return lo, cdf


def binomial_cdf(k: int, n: int, q: float) -> float:
    """P(B <= k) for B ~ Binomial(n, q)."""
    lo, cdf = _binomial_cdf(n, q)
    if k < lo:
        return 0.0
    return 1.0 if k - lo >= len(cdf) else cdf[k - lo]


def percentile_interval_ranks(n: int, p: float,
                              confidence: float = CONFIDENCE) -> tuple[int, int] | None:
    """0-based ranks (j, k) with P(j < B <= k) >= confidence, B ~ Binomial(n, p/100):
    the equal-tailed pair, else the pair of fewest ranks; None when none exists."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    q = p / 100
    if n < 2 or q in (0.0, 1.0):
        return None
    lo, cdf = _binomial_cdf(n, q)

    def f(k: int) -> float:
        if k < lo:
            return 0.0
        return 1.0 if k - lo >= len(cdf) else cdf[k - lo]

    tail = (1 - confidence) / 2
    # Equal-tailed: j the largest with P(B <= j) <= tail, k the smallest with
    # P(B <= k) >= 1 - tail. Searched within the window only (F is 0 below, 1 above).
    j = lo - 1
    while f(j + 1) <= tail:
        j += 1
    k = max(lo, j + 1)
    while f(k) < 1 - tail:
        k += 1
    if j >= 0 and k <= n - 1:
        return j, k
    # Too few samples for equal tails: fewest ranks with j >= 0, k <= n - 1. Only small
    # n get here (for p in (0, 100), (1-q)^n > tail or q^n > tail), so O(n²) is cheap.
    best: tuple[int, int] | None = None
    best_key: tuple[int, float] = (n + 1, 2.0)
    for jj in range(0, n - 1):
        for kk in range(jj + 1, n):
            cover = f(kk) - f(jj)
            if cover >= confidence:
                key = (kk - jj, abs(f(jj) - (1 - f(kk))))
                if key < best_key:
                    best, best_key = (jj, kk), key
                break
    return best


def coverage(n: int, p: float, ranks: tuple[int, int]) -> float:
    """P(j < B <= k): the exact coverage of the order statistics (j, k)."""
    j, k = ranks
    return binomial_cdf(k, n, p / 100) - binomial_cdf(j, n, p / 100)


def percentile_interval(ranked: Mapping[int, float], n: int, p: float,
                        min_samples: int = DEFAULT_MIN_SAMPLES,
                        confidence: float = CONFIDENCE) -> Interval:
    """The distribution-free interval of the p-th percentile from the order statistics
    ``ranked`` (0-based index -> value; at least ``percentile_interval_ranks``)."""
    ranks = percentile_interval_ranks(n, p, confidence)
    if ranks is None:
        return _none(f"order statistics: no pair of the {n} values reaches "
                     f"{confidence:.0%} coverage for p{p:g}", n, confidence)
    j, k = ranks
    method = (f"order statistics {j + 1} and {k + 1} of {n} (1-based, ascending), exact "
              f"binomial coverage {coverage(n, p, ranks):.4f} (distribution-free)")
    return Interval(ranked[j], ranked[k], confidence, method, n, n >= min_samples)


def needed_ranks(n: int) -> frozenset[int]:
    """Every 0-based order statistic a report may read of n speeds: p5 and p95 under
    both percentile methods, and their interval ranks."""
    ranks: set[int] = set()
    for p in (5, 95):
        for method in ("linear", "nearest_rank"):
            ranks.update(stats.percentile_ranks(n, p, method))
        pair = percentile_interval_ranks(n, p)
        if pair is not None:
            ranks.update(pair)
    return frozenset(ranks)


# --- Normal, t and chi-square quantiles ----------------------------------------------------


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def normal_quantile(prob: float) -> float:
    """Φ⁻¹(prob) by inverting ``math.erfc``: bisection, then Newton to 1e-15."""
    if not 0 < prob < 1:
        raise ValueError(f"probability must be within (0, 1), got {prob}")
    lo, hi = -40.0, 40.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if normal_cdf(mid) < prob:
            lo = mid
        else:
            hi = mid
    x = (lo + hi) / 2
    for _ in range(3):
        density = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        if density == 0:
            break
        x -= (normal_cdf(x) - prob) / density
    return x


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta (modified Lentz; NR §6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-16:
            break
    return h


def beta_inc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * beta_inc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


def t_quantile(prob: float, df: int) -> float:
    """The Student t quantile: exact inversion up to ``T_EXACT_MAX_DF`` df, Cornish-Fisher
    (A&S 26.7.5) above."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if not 0 < prob < 1:
        raise ValueError(f"probability must be within (0, 1), got {prob}")
    if df > T_EXACT_MAX_DF:
        z = normal_quantile(prob)
        v = float(df)
        return (z + (z**3 + z) / (4 * v)
                + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
                + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))
    if prob < 0.5:
        return -t_quantile(1 - prob, df)
    return _inverse(lambda t: t_cdf(t, df), prob, 1.0, 200)


def _inverse(cdf: Callable[[float], float], prob: float, hi: float, rounds: int) -> float:
    """The x >= 0 with cdf(x) = prob, by bisection to 1e-14 relative (cdf increasing,
    cdf(0) <= prob): the upper bound doubled from ``hi`` until it holds prob."""
    lo = 0.0
    while cdf(hi) < prob:
        hi *= 2
    for _ in range(rounds):
        mid = (lo + hi) / 2
        if cdf(mid) < prob:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * hi:
            break
    return (lo + hi) / 2


def gamma_inc(a: float, x: float) -> float:
    """The regularized lower incomplete gamma P(a, x) (series below a + 1, continued
    fraction above; NR §6.2)."""
    if x <= 0:
        return 0.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1 / a
        ap = a
        for _ in range(100_000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return min(1.0, total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 100_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-16:
            break
    return max(0.0, 1 - math.exp(log_front) * h)


def chi2_quantile(prob: float, df: int) -> float:
    """The chi-square quantile: exact inversion up to ``CHI2_EXACT_MAX_DF`` df,
    Wilson-Hilferty above."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if not 0 < prob < 1:
        raise ValueError(f"probability must be within (0, 1), got {prob}")
    if df > CHI2_EXACT_MAX_DF:
        return wilson_hilferty(prob, df)
    return _inverse(lambda x: gamma_inc(df / 2, x / 2), prob, max(1.0, 2.0 * df), 300)


def wilson_hilferty(prob: float, df: int) -> float:
    """χ²(prob, df) ≈ df·(1 - 2/(9df) + z·sqrt(2/(9df)))³ (Wilson & Hilferty 1931)."""
    z = normal_quantile(prob)
    h = 2 / (9 * df)
    return df * (1 - h + z * math.sqrt(h)) ** 3


# --- Intervals of the report's figures ---------------------------------------------------


def _z(confidence: float) -> float:
    return normal_quantile(1 - (1 - confidence) / 2)


def wilson_interval(part: int, whole: int, min_samples: int = DEFAULT_MIN_SAMPLES,
                    confidence: float = CONFIDENCE, per_packet: bool = False) -> Interval:
    """Wilson's score interval of ``part / whole``; ``per_packet``: of 1 - sqrt(1 - R)."""
    if whole <= 0:
        return _none("Wilson score: no trials", 0, confidence)
    if not 0 <= part <= whole:
        raise ValueError(f"part ({part}) must be within 0..whole ({whole})")
    z = _z(confidence)
    phat = part / whole
    denom = 1 + z * z / whole
    centre = (phat + z * z / (2 * whole)) / denom
    half = z / denom * math.sqrt(phat * (1 - phat) / whole + z * z / (4 * whole * whole))
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    # At 0 and at whole the bound is exactly 0 or 1 (centre - half cancels in algebra,
    # not in floating point: 1e-19 is not "no loss").
    if part == 0:
        low = 0.0
    if part == whole:
        high = 1.0
    method = f"Wilson score, z = {z:.5f}, {part}/{whole}; assumes independent trials"
    if per_packet:
        low, high = stats.pair_loss_ratio(low), stats.pair_loss_ratio(high)
        method += "; mapped through 1 - sqrt(1 - R)"
    return Interval(low, high, confidence, method, whole, whole >= min_samples)


def mean_interval(m: stats.Moments, min_samples: int = DEFAULT_MIN_SAMPLES,
                  scale: float = 1.0, confidence: float = CONFIDENCE) -> Interval:
    """Student t interval of the mean of the values ``m`` describes, times ``scale``."""
    m = m.scaled(scale)
    sd = m.sample_stdev
    if sd is None:
        return _none("Student t: fewer than 2 samples", m.n, confidence)
    t = t_quantile(1 - (1 - confidence) / 2, m.n - 1)
    half = t * sd / math.sqrt(m.n)
    method = (f"Student t, {m.n - 1} df, t = {t:.4f}, mean ± t·s/sqrt(n); assumes "
              "independent samples (pings of one train are not: optimistic)")
    return Interval(m.mean - half, m.mean + half, confidence, method, m.n,
                    m.n >= min_samples)


def stdev_interval(m: stats.Moments, min_samples: int = DEFAULT_MIN_SAMPLES,
                   scale: float = 1.0, confidence: float = CONFIDENCE) -> Interval:
    """Chi-square interval of the standard deviation, times ``scale``."""
    m = m.scaled(scale)
    sd = m.sample_stdev
    if sd is None:
        return _none("chi-square: fewer than 2 samples", m.n, confidence)
    df = m.n - 1
    alpha = 1 - confidence
    upper_q, lower_q = chi2_quantile(1 - alpha / 2, df), chi2_quantile(alpha / 2, df)
    exact = "exact" if df <= CHI2_EXACT_MAX_DF else "Wilson-Hilferty"
    method = (f"chi-square ({exact} quantiles), {df} df, s·sqrt(df/χ²); assumes "
              "independent normal samples (delays are skewed: indicative)")
    return Interval(sd * math.sqrt(df / upper_q), sd * math.sqrt(df / lower_q), confidence,
                    method, m.n, m.n >= min_samples)


def jitter_interval(jitter_ms: float | None, pairs: int, rtt: stats.Moments,
                    min_samples: int = DEFAULT_MIN_SAMPLES,
                    confidence: float = CONFIDENCE) -> Interval:
    """A normal interval of the jitter with its spread bounded by sqrt(2)·s(RTT) (the
    store keeps only the sum of |ΔRTT| and the pairs: see the module docstring)."""
    sd = rtt.sample_stdev
    if jitter_ms is None or pairs < 2 or sd is None:
        return _none("jitter: no spread known (the store keeps only the sum of |ΔRTT| "
                     "and the pairs)", pairs, confidence)
    z = _z(confidence)
    half = z * math.sqrt(2) * sd / math.sqrt(pairs)
    method = (f"normal, z = {z:.5f}, spread bounded by sqrt(2)·s(RTT) (the store keeps "
              "only the sum of |ΔRTT| and the pairs; assumes lag-1 autocorrelation >= 0 "
              "and independent pairs): a bound, not an estimate")
    return Interval(max(0.0, jitter_ms - half), jitter_ms + half, confidence, method,
                    pairs, pairs >= min_samples)
