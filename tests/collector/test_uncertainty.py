"""The 95 % interval of every figure (collector/compliance/uncertainty.py): the binomial
and the percentile intervals checked by exact enumeration (fractions, no floating point),
Wilson against Newcombe's published table, the t and chi-square quantiles against closed
forms and printed tables; then reports and certificates carrying them, the minimum-sample
rule, the published layouts, and the config key."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import random
import re
import tomllib
from fractions import Fraction
from pathlib import Path

import pytest

from agent import stats
from collector.compliance import targets
from collector.compliance import uncertainty as u
from collector.compliance.certify import certify
from collector.compliance.evaluate import Observations, evaluate, observe
from collector.compliance.facts import of_result
from collector.config import ConfigError, ReportsConfig, parse
from collector.exports import CERTIFICATE_COLUMNS, certificate_rows, to_csv
from collector.reports import html as html_report
from collector.reports.text import (
    REPORT_COLUMNS,
    certificate_dict,
    format_certificate,
    format_csv,
    format_text,
    report_dict,
    report_rows,
)
from collector.scope import Scope
from tests.collector.test_certify import CONTRACT, campaign
from tests.factories import attempt, session

ROOT = Path(__file__).resolve().parents[2]
TABLE = targets.load("")
SCOPE = Scope(probes=("p1",), since=None, until=None)


def exact_cdf(k: int, n: int, q: Fraction) -> Fraction:
    """P(B <= k), B ~ Binomial(n, q), in exact rational arithmetic (math.comb)."""
    return sum((math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(k + 1)),
               Fraction(0))


# --- The binomial and the order-statistic interval, by enumeration ----------------------


@pytest.mark.parametrize(("n", "q"), [(1, Fraction(1, 2)), (10, Fraction(1, 20)),
                                      (59, Fraction(19, 20)), (60, Fraction(3, 10)),
                                      (400, Fraction(1, 20)), (2000, Fraction(19, 20))])
def test_binomial_cdf_agrees_with_exact_enumeration(n: int, q: Fraction) -> None:
    """The window-and-recurrence CDF is the exact one to 1e-12 at every k."""
    exact = Fraction(0)
    for k in range(n + 1):
        exact += math.comb(n, k) * q**k * (1 - q) ** (n - k)
        assert u.binomial_cdf(k, n, float(q)) == pytest.approx(float(exact), abs=1e-12)


@pytest.mark.parametrize("n", [59, 60, 71, 72, 100, 250, 1000])
@pytest.mark.parametrize("p", [5, 50, 95])
def test_percentile_interval_covers_exactly_95_percent(n: int, p: int) -> None:
    """P(j < B <= k) >= 0.95 exactly; equal tails (each <= 2.5 %, j largest, k smallest)
    whenever they exist within the sample, else the pair of fewest ranks that covers."""
    q = Fraction(p, 100)
    cdf, acc = [], Fraction(0)
    for i in range(n + 1):
        acc += math.comb(n, i) * q**i * (1 - q) ** (n - i)
        cdf.append(acc)
    ranks = u.percentile_interval_ranks(n, p)
    assert ranks is not None
    j, k = ranks
    assert 0 <= j < k <= n - 1
    cover = cdf[k] - cdf[j]
    assert cover >= Fraction(95, 100)
    assert u.coverage(n, p, ranks) == pytest.approx(float(cover), abs=1e-12)
    tail = Fraction(25, 1000)
    if cdf[0] <= tail and cdf[n - 1] >= 1 - tail:
        assert cdf[j] <= tail < cdf[j + 1]
        assert cdf[k - 1] < 1 - tail <= cdf[k]
    else:
        widths = [kk - jj for jj in range(n) for kk in range(jj + 1, n)
                  if cdf[kk] - cdf[jj] >= Fraction(95, 100)]
        assert k - j == min(widths)


@pytest.mark.parametrize(("n", "p"), [(1, 50), (4, 50), (30, 5), (58, 5), (58, 95)])
def test_too_few_values_have_no_percentile_interval(n: int, p: int) -> None:
    """No pair of order statistics reaches 95 % (the widest, first and last, does not)."""
    q = Fraction(p, 100)
    if n >= 2:
        assert exact_cdf(n - 1, n, q) - exact_cdf(0, n, q) < Fraction(95, 100)
    assert u.percentile_interval_ranks(n, p) is None
    got = u.percentile_interval({}, n, p, min_samples=1)
    assert (got.low, got.high, got.enough) == (None, None, False)


def test_percentile_interval_at_a_million_values_is_equal_tailed() -> None:
    """Exact at national scale, with no normal approximation: the tails each side stay
    within 2.5 % and one more rank would cross it."""
    n = 1_000_000
    j, k = u.percentile_interval_ranks(n, 5) or (0, 0)
    assert u.binomial_cdf(j, n, 0.05) <= 0.025 < u.binomial_cdf(j + 1, n, 0.05)
    assert u.binomial_cdf(k - 1, n, 0.05) < 0.975 <= u.binomial_cdf(k, n, 0.05)
    # About 1.96 standard deviations (217.9) either side of n·q = 50,000.
    assert 49_560 < j < 49_580 and 50_420 < k < 50_440


def test_the_point_percentile_lies_inside_its_interval_for_every_n() -> None:
    """Both percentile methods read ranks within the interval's, so the interval of the
    order statistics always holds the published figure."""
    for n in range(2, 1500):
        for p in (5, 95):
            ranks = u.percentile_interval_ranks(n, p)
            if ranks is None:
                continue
            for method in ("linear", "nearest_rank"):
                read = stats.percentile_ranks(n, p, method)  # type: ignore[arg-type]
                assert ranks[0] <= min(read) and max(read) <= ranks[1], (n, p, method)


def test_needed_ranks_hold_every_rank_a_report_reads() -> None:
    for n in (0, 1, 10, 59, 1000):
        want = {r for p in (5, 95) for m in ("linear", "nearest_rank")
                for r in stats.percentile_ranks(n, p, m)}  # type: ignore[arg-type]
        for p in (5, 95):
            want.update(u.percentile_interval_ranks(n, p) or ())
        assert u.needed_ranks(n) == frozenset(want)
    assert all(0 <= r < 1000 for r in u.needed_ranks(1000))


# --- Wilson, t and chi-square against references ---------------------------------------


@pytest.mark.parametrize(("part", "whole", "low", "high"), [
    # Newcombe, "Two-sided confidence intervals for the single proportion: comparison of
    # seven methods", Statistics in Medicine 17 (1998) 857-872, Table II, method 3
    # (Wilson score, no continuity correction).
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_newcombe_1998(part: int, whole: int, low: float, high: float) -> None:
    got = u.wilson_interval(part, whole, min_samples=1)
    assert (round(got.low or 0, 4), round(got.high or 0, 4)) == (low, high)
    assert got.samples == whole and got.enough


def test_wilson_of_per_packet_loss_maps_the_interval() -> None:
    plain = u.wilson_interval(10, 1000)
    pair = u.wilson_interval(10, 1000, per_packet=True)
    assert pair.low == pytest.approx(1 - math.sqrt(1 - (plain.low or 0)))
    assert pair.high == pytest.approx(1 - math.sqrt(1 - (plain.high or 0)))
    assert pair.low < stats.pair_loss_ratio(0.01) < pair.high  # type: ignore[operator]


def test_normal_quantile() -> None:
    # Abramowitz & Stegun Table 26.5 (and any statistics text): z(0.975) = 1.959963985.
    assert u.normal_quantile(0.975) == pytest.approx(1.959963984540054, abs=1e-13)
    assert u.normal_quantile(0.995) == pytest.approx(2.5758293035489, abs=1e-12)
    assert u.normal_quantile(0.5) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("prob", [0.6, 0.9, 0.975, 0.995, 0.9995])
def test_t_quantile_closed_forms(prob: float) -> None:
    """df 1 (Cauchy): tan(π(p - 1/2)); df 2: (2p - 1) / sqrt(2p(1 - p)) (exact)."""
    assert u.t_quantile(prob, 1) == pytest.approx(math.tan(math.pi * (prob - 0.5)), rel=1e-10)
    assert u.t_quantile(prob, 2) == pytest.approx(
        (2 * prob - 1) / math.sqrt(2 * prob * (1 - prob)), rel=1e-10)
    assert u.t_quantile(1 - prob, 2) == pytest.approx(-u.t_quantile(prob, 2), rel=1e-12)


@pytest.mark.parametrize(("df", "want"), [
    # NIST/SEMATECH e-Handbook of Statistical Methods §1.3.6.7.2 (critical values of
    # the t distribution, upper tail 0.025), three decimals.
    (5, 2.571), (10, 2.228), (29, 2.045), (30, 2.042), (60, 2.000), (100, 1.984)])
def test_t_quantile_against_nist_table(df: int, want: float) -> None:
    assert round(u.t_quantile(0.975, df), 3) == want


def test_t_quantile_is_continuous_across_the_expansion_threshold() -> None:
    """Cornish-Fisher above T_EXACT_MAX_DF agrees with the exact inversion at it."""
    df = u.T_EXACT_MAX_DF + 1
    expanded = u.t_quantile(0.975, df)
    saved = u.T_EXACT_MAX_DF
    try:
        u.T_EXACT_MAX_DF = 10**9
        exact = u.t_quantile(0.975, df)
    finally:
        u.T_EXACT_MAX_DF = saved
    assert abs(expanded - exact) < 1e-11
    assert u.t_quantile(0.975, 10**7) == pytest.approx(u.normal_quantile(0.975), abs=1e-6)


@pytest.mark.parametrize("prob", [0.025, 0.5, 0.975])
def test_chi2_quantile_closed_forms(prob: float) -> None:
    """df 2 (exponential, mean 2): -2 ln(1 - p); df 1: z((1 + p) / 2)²."""
    assert u.chi2_quantile(prob, 2) == pytest.approx(-2 * math.log(1 - prob), rel=1e-10)
    assert u.chi2_quantile(prob, 1) == pytest.approx(
        u.normal_quantile((1 + prob) / 2) ** 2, rel=1e-9)


@pytest.mark.parametrize(("df", "low", "high"), [
    # NIST/SEMATECH e-Handbook §1.3.6.7.4 (critical values of the chi-square
    # distribution), lower and upper 0.025 points, three decimals.
    (10, 3.247, 20.483), (29, 16.047, 45.722), (100, 74.222, 129.561)])
def test_chi2_quantile_against_nist_table(df: int, low: float, high: float) -> None:
    assert round(u.chi2_quantile(0.025, df), 3) == low
    assert round(u.chi2_quantile(0.975, df), 3) == high


def test_wilson_hilferty_beyond_the_threshold_is_within_its_stated_error() -> None:
    df = u.CHI2_EXACT_MAX_DF
    for prob in (0.025, 0.975):
        exact = u.chi2_quantile(prob, df)
        assert abs(u.wilson_hilferty(prob, df) - exact) / exact < 1e-8


def test_mean_and_stdev_intervals_by_hand() -> None:
    """Ten values 1..10: mean 5.5, s = sqrt(55/6); t(0.975, 9) = 2.262 (NIST); the chi-
    square points of 9 df are 2.700 and 19.023 (NIST)."""
    m = stats.Moments.of([float(v) for v in range(1, 11)])
    s = math.sqrt(55 / 6)
    mean = u.mean_interval(m, min_samples=10)
    assert mean.low == pytest.approx(5.5 - 2.2622 * s / math.sqrt(10), abs=1e-3)
    assert mean.high == pytest.approx(5.5 + 2.2622 * s / math.sqrt(10), abs=1e-3)
    assert mean.enough and "9 df" in mean.method and "independent" in mean.method
    sd = u.stdev_interval(m, min_samples=11)
    assert sd.low == pytest.approx(s * math.sqrt(9 / 19.023), abs=1e-3)
    assert sd.high == pytest.approx(s * math.sqrt(9 / 2.700), abs=1e-3)
    assert not sd.enough  # 10 < 11
    halved = u.mean_interval(m, scale=0.5)
    assert halved.low == pytest.approx((mean.low or 0) / 2)


def test_jitter_interval_is_a_bound_said_so() -> None:
    rtt = stats.Moments.of([10.0, 12.0, 11.0, 13.0] * 10)
    got = u.jitter_interval(1.5, 36, rtt)
    half = u.normal_quantile(0.975) * math.sqrt(2) * (rtt.sample_stdev or 0) / 6
    assert (got.low, got.high) == pytest.approx((1.5 - half, 1.5 + half))
    assert got.enough and "bound" in got.method
    assert u.jitter_interval(None, 0, rtt).enough is False


# --- Reports and certificates -------------------------------------------------------------


def _many_sessions(count: int, seed: int = 7) -> list:  # type: ignore[type-arg]
    rng = random.Random(seed)
    return [session(rtts=[rng.uniform(8, 40) for _ in range(5)] + [None] * (i % 7 == 0),
                    transfers=[attempt("download", bps=rng.uniform(20e6, 90e6)),
                               attempt("download", 0, 2, ok=i % 11 != 0),
                               attempt("upload", bps=rng.uniform(2e6, 9e6))])
            for i in range(count)]


def _contains(i: object) -> None:
    for r in i:  # type: ignore[attr-defined]
        assert r.interval is not None, r.id
        if r.observed is not None and r.interval.low is not None:
            assert r.interval.low <= r.observed <= r.interval.high, r.id


def test_every_figure_of_a_report_carries_an_interval_holding_it() -> None:
    report = evaluate(observe(_many_sessions(300)), TABLE)
    _contains(report.indicators)
    _contains(report.informational)
    got = {r.id: r.interval for r in (*report.indicators, *report.informational)}
    assert all(i is not None and i.enough for i in got.values())
    assert "order statistics" in got["download_p5_kbps"].method  # type: ignore[union-attr]
    assert got["download_failure_ratio"].samples == 600  # type: ignore[union-attr]
    assert "Wilson" in got["loss_ratio"].method  # type: ignore[union-attr]
    assert "Student t" in got["delay_mean_ms"].method  # type: ignore[union-attr]
    assert "chi-square" in got["delay_stdev_ms"].method  # type: ignore[union-attr]


def test_the_intervals_of_a_store_selected_scope_equal_the_list_ones() -> None:
    """A report reads the percentile and its interval from order statistics only (what
    a store selects, speeds.Speeds): the same figures as from the whole list."""
    obs = observe(_many_sessions(120))
    ranked_only = Observations(**{f: getattr(obs, f) for f in obs.__slots__})  # type: ignore[attr-defined]

    class Selected:
        def __init__(self, values: list[float]) -> None:
            ordered = sorted(values)
            self._n = len(values)
            self._ranked = {r: ordered[r] for r in u.needed_ranks(self._n)}

        def __len__(self) -> int:
            return self._n

        def ranked(self, ranks):  # type: ignore[no-untyped-def]
            return {r: self._ranked[r] for r in ranks}

        def plot_values(self, limit: int) -> list[float]:
            return []

    ranked_only.download_kbps = Selected(list(obs.download_kbps))  # type: ignore[assignment]
    ranked_only.upload_kbps = Selected(list(obs.upload_kbps))  # type: ignore[assignment]
    assert evaluate(ranked_only, TABLE).indicators == evaluate(obs, TABLE).indicators


def test_minimum_sample_rule_marks_small_scopes_without_changing_verdicts() -> None:
    sessions = _many_sessions(20)
    small = evaluate(observe(sessions), TABLE)
    assert small.min_samples == u.DEFAULT_MIN_SAMPLES
    got = {r.id: r for r in small.indicators}
    # 20 download speeds: fewer than 30, and too few for any p5 interval at all.
    assert got["download_p5_kbps"].interval.enough is False  # type: ignore[union-attr]
    assert got["download_p5_kbps"].interval.low is None  # type: ignore[union-attr]
    # 100+ pings: enough for the delay figures.
    assert got["delay_mean_ms"].interval.enough is True  # type: ignore[union-attr]
    text = format_text(small, SCOPE)
    assert "not enough data (n < 30)" in text
    assert re.search(r"\[\d+\.\d{3} \u2013 \d+\.\d{3} ms\]", text)
    strict = evaluate(observe(sessions), TABLE, min_samples=10**6)
    assert [r.passed for r in strict.indicators] == [r.passed for r in small.indicators]
    assert strict.verdict == small.verdict
    assert not any(r.interval.enough for r in strict.indicators)  # type: ignore[union-attr]
    assert "not enough data (n < 1000000)" in format_text(strict, SCOPE)
    # Enough samples but no interval (a p5 of 40 speeds at min_samples 30).
    forty = evaluate(observe(_many_sessions(40)), TABLE)
    assert "not enough data (no interval)" in format_text(forty, SCOPE)


def test_report_json_csv_and_html_carry_the_interval() -> None:
    report = evaluate(observe(_many_sessions(100)), TABLE)
    doc = report_dict(report, SCOPE)
    assert doc["min_samples"] == 30
    for ind in (*doc["indicators"], *doc["informational"]):
        assert set(ind["ci95"]) == {"low", "high", "method", "samples", "enough_data"}
        assert "interval" not in ind
        assert ind["ci95"]["samples"] == ind["samples"]
    rows = list(csv.DictReader(io.StringIO(format_csv(report_rows(report, SCOPE),
                                                      REPORT_COLUMNS))))
    assert list(rows[0])[-4:] == ["ci95_low", "ci95_high", "ci_method", "enough_data"]
    p5 = next(r for r in rows if r["id"] == "download_p5_kbps")
    assert float(p5["ci95_low"]) <= float(p5["observed"]) <= float(p5["ci95_high"])
    assert p5["enough_data"] == "true"
    page = html_report.render(report, SCOPE, observe(_many_sessions(100)), [],
                              "Europe/Rome", "2026-11-21T10:00:00Z")
    assert "<th>95 % interval</th>" in page
    assert page.count('title="order statistics') >= 4


def test_certificate_checks_carry_intervals_holding_the_observed_value() -> None:
    line = dataclasses.replace(CONTRACT, download_normal_kbps=30_000,
                               download_nominal_kbps=60_000)
    cert = certify("p1", line, [of_result(r, r.started_at) for r in campaign()])
    assert cert.verdict == "no_breach"
    for c in cert.checks:
        assert c.interval is not None, c.id
        if c.interval.low is not None and c.observed is not None:
            assert c.interval.low <= c.observed <= c.interval.high, c.id
    got = {c.id: c.interval for c in cert.checks}
    assert got["download_p5_kbps"].enough  # type: ignore[union-attr]
    assert got["delay_p95_ms"].samples == 288  # type: ignore[union-attr]
    assert "Wilson" in got["loss_ratio"].method  # type: ignore[union-attr]
    assert "Wilson" in got["download_normal_share"].method  # type: ignore[union-attr]
    doc = certificate_dict(cert)
    assert doc["min_samples"] == 30
    assert all("ci95" in c and "interval" not in c for c in doc["checks"])
    header = to_csv(certificate_rows(cert), CERTIFICATE_COLUMNS).splitlines()[0]
    assert header.endswith(",ci95_low,ci95_high,ci_method,enough_data")
    assert "95 % interval" in format_certificate(cert)
    page = html_report.certificate_page(cert, "2026-11-21T10:00:00Z")
    assert "<th>95 % interval</th>" in page


def test_a_short_campaign_is_marked_not_enough_data_with_its_verdict_kept() -> None:
    results = [of_result(r, r.started_at) for r in campaign(count=20, step_min=60)]
    loose = certify("p1", CONTRACT, results, min_samples=1)
    strict = certify("p1", CONTRACT, results, min_samples=100)
    assert [c.breach for c in loose.checks] == [c.breach for c in strict.checks]
    assert loose.verdict == strict.verdict
    p5 = {c.id: c for c in strict.checks}["download_p5_kbps"]
    assert p5.interval is not None and not p5.interval.enough
    assert "not enough data (n < 100)" in format_certificate(strict)


# --- Configuration ----------------------------------------------------------------------


def test_min_samples_config_default_bounds_and_example() -> None:
    assert ReportsConfig().min_samples == u.DEFAULT_MIN_SAMPLES
    assert parse({"reports": {"min_samples": 59}}).reports.min_samples == 59
    with pytest.raises(ConfigError, match=r"reports\.min_samples: must be >= 1, got 0"):
        parse({"reports": {"min_samples": 0}})
    # Every key of [reports] is in the example, commented out, with its default.
    text = (ROOT / "configs" / "collector.example.toml").read_text(encoding="utf-8")
    section = text.split("\n[reports]\n", 1)[1].split("\n[", 1)[0]
    keys = re.findall(r"^# ([a-z_]+) = (.+)$", section, re.M)
    uncommented = tomllib.loads("\n".join(f"{k} = {v}" for k, v in keys))
    assert set(uncommented) == set(ReportsConfig.__dataclass_fields__)
    assert parse({"reports": uncommented}).reports == ReportsConfig()


def test_cli_report_and_certificate_take_min_samples_from_the_config(tmp_path: Path) -> None:
    """[reports] min_samples reaches `report` and `certify` (JSON says which rule)."""
    from click.testing import CliRunner

    from collector.cli.main import main
    from tests.collector.test_certify import _store

    db = tmp_path / "c.sqlite3"
    _store(db, campaign())
    config = tmp_path / "collector.toml"
    config.write_text("[reports]\nmin_samples = 500\n")
    base = ["--config", str(config), "--db", str(db)]
    result = CliRunner().invoke(main, [*base, "report", "--probe", "p1", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["min_samples"] == 500
    by_id = {i["id"]: i["ci95"] for i in doc["indicators"]}
    assert by_id["delay_mean_ms"]["samples"] == 288
    assert by_id["delay_mean_ms"]["enough_data"] is False  # 288 < 500
    result = CliRunner().invoke(main, [*base, "certify", "--probe", "p1", "--format", "csv"])
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {r["enough_data"] for r in rows} == {"false"}
    result = CliRunner().invoke(main, [*base, "certify", "--probe", "p1"])
    assert "not enough data (n < 500)" in result.stdout
