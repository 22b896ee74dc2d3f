"""Compliance evaluation on hand-checked data."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.compliance import targets
from collector.compliance.evaluate import evaluate, observe
from tests.factories import attempt, session

ROOT = Path(__file__).resolve().parents[2]
TABLE = targets.load("")


def _by_id(report):  # type: ignore[no-untyped-def]
    return {r.id: r for r in report.indicators}


def test_hand_checked_campaign() -> None:
    """Four sessions: speeds 2, 4, 6, 8 Mbit/s down; one failed attempt; one lost ping."""
    sessions = [
        session(rtts=[20.0, 22.0], transfers=[attempt("download", bps=2e6),
                                              attempt("upload", bps=300e3)]),
        session(rtts=[24.0, None], transfers=[attempt("download", bps=4e6),
                                              attempt("upload", bps=400e3)]),
        session(rtts=[26.0, 28.0], transfers=[attempt("download", ok=False),
                                              attempt("download", 0, 2, bps=6e6),
                                              attempt("upload", bps=500e3)]),
        session(rtts=[30.0, 32.0], transfers=[attempt("download", bps=8e6),
                                              attempt("upload", bps=600e3)]),
    ]
    report = evaluate(observe(sessions), TABLE)
    got = _by_id(report)
    # Download kbit/s 2000, 4000, 6000, 8000: p95 h = 2.85 -> 6000 + 0.85 * 2000 = 7700
    assert got["download_p95_kbps"].observed == pytest.approx(7700)
    assert got["download_p95_kbps"].passed is True
    # p5 h = 0.15 -> 2000 + 0.15 * 2000 = 2300 >= 2200
    assert got["download_p5_kbps"].observed == pytest.approx(2300)
    assert got["download_p5_kbps"].passed is True
    assert got["download_p5_kbps"].samples == 4
    # 1 failed attempt of 5 = 20 % > 0.5 %
    assert got["download_failure_ratio"].observed == pytest.approx(0.2)
    assert got["download_failure_ratio"].passed is False
    assert got["upload_failure_ratio"].observed == 0.0
    # Upload 300..600 kbit/s: p95 = 500 + 0.85 * 100 = 585; p5 = 300 + 0.15 * 100 = 315
    assert got["upload_p95_kbps"].observed == pytest.approx(585)
    assert got["upload_p5_kbps"].observed == pytest.approx(315)
    # RTTs 20 22 24 26 28 30 32 -> one-way 10..16 step 1: mean 13, sample stdev sqrt(28/6)
    assert got["delay_mean_ms"].observed == pytest.approx(13.0)
    assert got["delay_stdev_ms"].observed == pytest.approx((28 / 6) ** 0.5)
    assert got["delay_mean_ms"].samples == 7
    # 1 lost of 8 sent
    assert got["loss_ratio"].observed == pytest.approx(0.125)
    assert got["loss_ratio"].passed is False
    assert report.verdict == "fail"
    assert report.sessions == 4
    assert len(report.not_measured) == 16


def test_all_targets_met_passes() -> None:
    """Fast, clean line: every measurable indicator passes."""
    report = evaluate(observe([session(rtts=[10.0, 10.5, 11.0])]), TABLE)
    assert report.verdict == "pass"
    assert all(r.passed for r in report.indicators)


def test_no_data_is_incomplete_never_pass() -> None:
    """Without samples an indicator has no verdict, and the report says incomplete."""
    report = evaluate(observe([]), TABLE)
    assert report.verdict == "incomplete"
    assert {r.passed for r in report.indicators} == {None}
    assert {r.samples for r in report.indicators} == {0}


def test_rtt_basis_and_pair_loss_options() -> None:
    """delay_basis = "rtt" uses the round trip; loss_formula = "pair" gives 1 - sqrt(1 - R)."""
    from dataclasses import replace

    table = replace(TABLE, options=replace(TABLE.options, delay_basis="rtt",
                                           loss_formula="pair"))
    report = evaluate(observe([session(rtts=[40.0, None, 40.0, 40.0])]), table)
    got = _by_id(report)
    assert got["delay_mean_ms"].observed == pytest.approx(40.0)
    assert got["delay_mean_ms"].passed is False
    assert got["loss_ratio"].observed == pytest.approx(1 - (0.75 ** 0.5))
