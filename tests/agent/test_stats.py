"""Pure statistics: hand-checked values for every definition the reports rely on."""

from __future__ import annotations

import math

import pytest

from agent import stats


class TestPercentile:
    # Reference values computed by hand with type 7: h = (n-1)p/100.
    @pytest.mark.parametrize(
        ("values", "p", "expected"),
        [
            ([1, 2, 3, 4], 50, 2.5),  # h = 1.5
            ([1, 2, 3, 4], 95, 3.85),  # h = 2.85 -> 3 + 0.85
            ([1, 2, 3, 4], 5, 1.15),  # h = 0.15
            ([10], 95, 10.0),
            ([3, 1, 2], 0, 1.0),
            ([3, 1, 2], 100, 3.0),
            ([15, 20, 35, 40, 50], 40, 29.0),  # h = 1.6 -> 20 + 0.6 * 15
        ],
    )
    def test_linear_type7(self, values: list[float], p: float, expected: float) -> None:
        """Linear interpolation matches spreadsheet PERCENTILE.INC."""
        assert stats.percentile(values, p) == pytest.approx(expected)

    @pytest.mark.parametrize(
        ("values", "p", "expected"),
        [([15, 20, 35, 40, 50], 5, 15), ([15, 20, 35, 40, 50], 30, 20),
         ([15, 20, 35, 40, 50], 40, 20), ([15, 20, 35, 40, 50], 50, 35),
         ([15, 20, 35, 40, 50], 100, 50)],
    )
    def test_nearest_rank(self, values: list[float], p: float, expected: float) -> None:
        """Nearest rank returns an observed value: the ceil(n p / 100)-th."""
        assert stats.percentile(values, p, "nearest_rank") == expected

    def test_empty_is_none(self) -> None:
        """No samples, no percentile (never 0)."""
        assert stats.percentile([], 95) is None

    def test_out_of_range_rejected(self) -> None:
        """p outside 0..100 is a programming error with a clear message."""
        with pytest.raises(ValueError, match=r"within 0\.\.100"):
            stats.percentile([1.0], 101)


class TestSpread:
    def test_sample_and_population_stdev(self) -> None:
        """Bessel-corrected and population deviations of 2,4,4,4,5,5,7,9."""
        values = [2, 4, 4, 4, 5, 5, 7, 9]
        assert stats.population_stdev(values) == pytest.approx(2.0)
        assert stats.sample_stdev(values) == pytest.approx(math.sqrt(32 / 7))

    def test_stdev_needs_two_values(self) -> None:
        """One RTT has no sample deviation; the population one is 0."""
        assert stats.sample_stdev([1.0]) is None
        assert stats.population_stdev([1.0]) == 0.0

    def test_jitter_mean_abs_consecutive_difference(self) -> None:
        """|2-1| + |4-2| + |1-4| over 3 pairs = 2."""
        assert stats.jitter([1, 2, 4, 1]) == pytest.approx(2.0)

    def test_loss_ratio(self) -> None:
        """Loss is lost / sent, None when nothing was sent."""
        assert stats.loss_ratio(10, 9) == pytest.approx(0.1)
        assert stats.loss_ratio(0, 0) is None
        with pytest.raises(ValueError, match="received"):
            stats.loss_ratio(2, 3)

    def test_pair_loss_ratio(self) -> None:
        """R = 19 % round-trip loss is 10 % per direction: 1 - sqrt(0.81)."""
        assert stats.pair_loss_ratio(0.19) == pytest.approx(0.1)


class TestWindowThroughput:
    def test_single_stream_interpolates_window_edges(self) -> None:
        """Bytes at 1.0 s and 3.0 s are interpolated linearly between samples."""
        samples = [(0.0, 0), (2.0, 2_000), (4.0, 6_000)]
        w = stats.window_throughput([samples], 1.0)
        # at 1.0: 1000 bytes; end = 4.0 (last sample): 6000 -> 5000 bytes in 3 s
        assert w.start_s == 1.0
        assert w.end_s == 4.0
        assert w.bytes == pytest.approx(5_000)
        assert w.throughput_bps == pytest.approx(5_000 * 8 / 3)

    def test_common_end_is_earliest_last_sample(self) -> None:
        """A stream that ended early sets the end; the others are cut there (RMBT t*)."""
        fast = [(0.0, 0), (1.0, 1_000), (2.0, 2_000), (3.0, 3_000)]
        early = [(0.0, 0), (1.0, 500), (2.0, 1_000)]
        w = stats.window_throughput([fast, early], 1.0)
        assert w.end_s == 2.0
        assert w.bytes == pytest.approx(1_000 + 500)

    def test_no_data_gives_no_rate(self) -> None:
        """Empty streams or a window that ends before it starts: no throughput."""
        assert stats.window_throughput([], 2.0).throughput_bps is None
        assert stats.window_throughput([[(0.0, 0), (1.0, 10)]], 2.0).throughput_bps is None

    def test_bytes_at_outside_samples(self) -> None:
        """Before the first sample: its count; after the last: the last count."""
        samples = [(1.0, 10), (2.0, 20)]
        assert stats.bytes_at(samples, 0.0) == 10
        assert stats.bytes_at(samples, 5.0) == 20
        assert stats.bytes_at(samples, 1.5) == 15


class TestBinomialInterval:
    def test_interval_contains_the_mean_and_excludes_far_tails(self) -> None:
        """n = 1000, p = 2 %: the 99 % interval is about 20 ± 11 lost pings."""
        lo, hi = stats.binomial_interval(1000, 0.02)
        assert 8 <= lo <= 10 and 31 <= hi <= 33
        assert lo < 20 < hi

    def test_zero_loss_interval_is_zero(self) -> None:
        """With p = 0 only zero losses are possible."""
        assert stats.binomial_interval(400, 0.0) == (0, 0)

    def test_bad_probability_rejected(self) -> None:
        """p outside 0..1 is a programming error, named."""
        with pytest.raises(ValueError, match=r"p=1\.5"):
            stats.binomial_interval(10, 1.5)


def test_presorted_percentile_is_the_same() -> None:
    """Evaluating a scope sorts each direction once and passes presorted=True."""
    values = [7.0, 1.0, 9.5, 3.25, 3.25, 12.0, 0.5]
    for p in (0, 5, 50, 95, 100):
        for method in ("linear", "nearest_rank"):
            assert stats.percentile(sorted(values), p, method, presorted=True) == \
                stats.percentile(values, p, method)  # type: ignore[arg-type]


class TestMoments:
    @pytest.mark.parametrize("split", [0, 1, 3, 7, 10])
    def test_merge_equals_whole(self, split: int) -> None:
        """Merged per-session moments give the mean and sample stdev of all the values
        (what the collector evaluates a scope from)."""
        values = [20.1, 22.4, 19.9, 35.0, 21.2, 20.0, 80.5, 20.7, 21.1, 19.8]
        merged = stats.Moments.of(values[:split]).merge(stats.Moments.of(values[split:]))
        assert merged.n == len(values)
        assert merged.value_mean == pytest.approx(stats.mean(values), rel=1e-12)
        assert merged.sample_stdev == pytest.approx(stats.sample_stdev(values), rel=1e-12)

    def test_scaled_and_empty(self) -> None:
        """Scaling by 1/2 (RTT -> one-way) halves mean and stdev; no values, no figures."""
        m = stats.Moments.of([10.0, 12.0, 14.0]).scaled(0.5)
        assert (m.value_mean, m.sample_stdev) == (pytest.approx(6.0), pytest.approx(1.0))
        assert stats.Moments().value_mean is None
        assert stats.Moments.of([5.0]).sample_stdev is None
