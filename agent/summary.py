"""Pure: raw observations -> the summaries stored next to them in a result."""

from __future__ import annotations

from collections.abc import Sequence

from agent import stats
from agent.schema import (
    REFUSAL_REASONS,
    PingSample,
    PingSummary,
    SessionSummary,
    TransferAttempt,
)


def _half(value: float | None) -> float | None:
    return None if value is None else value / 2


def ping_summary(samples: Sequence[PingSample]) -> PingSummary:
    """Statistics of one ping train from its raw samples (unrounded).

    One-way delay is estimated as RTT / 2: ICMP echo cannot separate the two directions
    without synchronised clocks, so the path is assumed symmetric; the standard deviation
    of RTT / 2 is half that of the RTT.
    """
    rtts = [s.rtt_ms for s in samples if s.rtt_ms is not None]
    stdev = stats.sample_stdev(rtts)
    return PingSummary(
        packets_sent=len(samples),
        packets_received=len(rtts),
        loss_ratio=stats.loss_ratio(len(samples), len(rtts)),
        rtt_min_ms=min(rtts) if rtts else None,
        rtt_mean_ms=stats.mean(rtts),
        rtt_median_ms=stats.median(rtts),
        rtt_p95_ms=stats.percentile(rtts, 95),
        rtt_max_ms=max(rtts) if rtts else None,
        rtt_stdev_ms=stdev,
        rtt_pstdev_ms=stats.population_stdev(rtts),
        jitter_ms=stats.jitter(rtts),
        one_way_delay_mean_ms=_half(stats.mean(rtts)),
        one_way_delay_stdev_ms=_half(stdev),
    )


def failure_ratio(attempts: Sequence[TransferAttempt]) -> float | None:
    """Failed attempts / attempts, of the line's attempts only: an attempt the
    measurement server refused (REFUSAL_REASONS) is the server's, not the line's, and is
    left out of both, as the collector's Allegato 2 indicator does."""
    line = [a for a in attempts if a.failure_reason not in REFUSAL_REASONS]
    return stats.ratio(sum(1 for a in line if a.status == "failed"), len(line))


def test_speeds(attempts: Sequence[TransferAttempt], direction: str) -> list[float]:
    """Per-test speeds: the rate of each successful attempt in one direction."""
    return [
        a.throughput_bps
        for a in attempts
        if a.direction == direction and a.status == "ok" and a.throughput_bps is not None
    ]


def session_summary(
    ping: PingSummary | None, transfers: Sequence[TransferAttempt],
    ping_download: PingSummary | None = None, ping_upload: PingSummary | None = None,
) -> SessionSummary:
    downloads = [a for a in transfers if a.direction == "download"]
    uploads = [a for a in transfers if a.direction == "upload"]
    return SessionSummary(
        download_bps=stats.median(test_speeds(transfers, "download")),
        upload_bps=stats.median(test_speeds(transfers, "upload")),
        rtt_mean_ms=ping.rtt_mean_ms if ping else None,
        rtt_stdev_ms=ping.rtt_stdev_ms if ping else None,
        loss_ratio=ping.loss_ratio if ping else None,
        download_failure_ratio=failure_ratio(downloads),
        upload_failure_ratio=failure_ratio(uploads),
        one_way_delay_mean_ms=ping.one_way_delay_mean_ms if ping else None,
        one_way_delay_stdev_ms=ping.one_way_delay_stdev_ms if ping else None,
        rtt_download_mean_ms=ping_download.rtt_mean_ms if ping_download else None,
        rtt_upload_mean_ms=ping_upload.rtt_mean_ms if ping_upload else None,
    )
