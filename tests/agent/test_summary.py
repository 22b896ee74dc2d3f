"""Summaries computed from raw samples: ping statistics and session headline numbers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent import summary
from agent.schema import PingSample, TransferAttempt
from tests.factories import attempt


def test_ping_summary_from_raw_samples() -> None:
    """Lost pings count in loss, not in RTT statistics; one-way delay is RTT / 2."""
    samples = [
        PingSample(seq=0, sent_offset_s=0.0, rtt_ms=10.0),
        PingSample(seq=1, sent_offset_s=1.0, rtt_ms=None, error="timeout"),
        PingSample(seq=2, sent_offset_s=2.0, rtt_ms=14.0),
        PingSample(seq=3, sent_offset_s=3.0, rtt_ms=12.0),
    ]
    s = summary.ping_summary(samples)
    assert (s.packets_sent, s.packets_received) == (4, 3)
    assert s.loss_ratio == pytest.approx(0.25)
    assert s.rtt_mean_ms == pytest.approx(12.0)
    assert s.rtt_stdev_ms == pytest.approx(2.0)  # sample stdev of 10, 14, 12
    assert s.rtt_median_ms == pytest.approx(12.0)
    assert s.jitter_ms == pytest.approx(3.0)  # |14-10|, |12-14|
    assert s.one_way_delay_mean_ms == pytest.approx(6.0)
    assert s.one_way_delay_stdev_ms == pytest.approx(1.0)


def test_all_lost_has_no_rtt_statistics() -> None:
    """Total loss: loss 1.0 and every RTT statistic None (never 0)."""
    s = summary.ping_summary([PingSample(seq=i, sent_offset_s=i, rtt_ms=None) for i in range(3)])
    assert s.loss_ratio == 1.0
    assert s.rtt_mean_ms is None
    assert s.one_way_delay_mean_ms is None


def test_session_summary_failure_ratio_and_median_speed() -> None:
    """Failure ratio counts every attempt; the speed is the median of successful tests."""
    transfers = [
        attempt("download", 0, 1, ok=False),
        attempt("download", 0, 2, bps=100e6),
        attempt("download", 1, 1, bps=80e6),
        attempt("download", 2, 1, bps=90e6),
        attempt("upload", 0, 1, bps=20e6),
    ]
    s = summary.session_summary(None, transfers)
    assert s.download_bps == pytest.approx(90e6)
    assert s.download_failure_ratio == pytest.approx(0.25)
    assert s.upload_failure_ratio == 0.0
    assert s.upload_bps == pytest.approx(20e6)
    assert s.rtt_mean_ms is None


def test_session_summary_failure_ratio_leaves_refused_attempts_out() -> None:
    """An attempt the measurement server refused (server_refused, ticket_refused) is the
    server's, not the line's: the ratio is of the line's attempts only (1 failed of 2),
    and a direction with only refused attempts has no ratio at all."""
    def refused(direction: str, number: int, reason: str) -> TransferAttempt:
        return replace(attempt(direction, 0, number, ok=False), failure_reason=reason,
                       error="refused", http_status=429)

    transfers = [
        refused("download", 1, "server_refused"),
        refused("download", 2, "ticket_refused"),
        attempt("download", 0, 3, ok=False),
        attempt("download", 0, 4, bps=100e6),
        refused("upload", 1, "server_refused"),
    ]
    s = summary.session_summary(None, transfers)
    assert s.download_failure_ratio == pytest.approx(0.5)
    assert s.download_bps == pytest.approx(100e6)
    assert (s.upload_failure_ratio, s.upload_bps) == (None, None)
