"""Pure parts of the transfer engine: adaptive stream counts, file shares, conclusions."""

from __future__ import annotations

import pytest

from agent.probes import transfer
from agent.probes.transfer import AttemptOutcome, StreamFailure
from tests.factories import TRANSFER


@pytest.mark.parametrize(
    ("rate_bps", "streams"),
    [(1e6, 2), (30e6, 2), (80e6, 3), (150e6, 4), (450e6, 6), (900e6, 8), (1.5e9, 12),
     (4e9, 16), (9e9, 20)],
)
def test_adaptive_stream_count(rate_bps: float, streams: int) -> None:
    """Ne.Me.Sys's table, never below the 2 streams already running."""
    assert transfer.adaptive_stream_count(rate_bps) == streams


def test_file_shares_split_evenly() -> None:
    """A 10-byte file over 3 streams: 4 + 3 + 3."""
    from dataclasses import replace

    m = replace(TRANSFER, mode="file", file_size_bytes=10, streams=3)
    assert transfer.file_shares(m) == [4, 3, 3]
    assert transfer.file_shares(TRANSFER) is None


def _conclude(streams: list[list[tuple[float, int]]], failure: StreamFailure | None = None,
              total: int | None = None) -> object:
    outcome = AttemptOutcome(streams=streams, bytes_total=total if total is not None else
                             sum(s[-1][1] for s in streams if s),
                             failure=failure, http_status=200, duration_s=12.0)
    return transfer.conclude("download", TRANSFER, 0, 1, "2026-11-21T10:00:00Z", outcome,
                             "client")


def test_conclude_rate_over_the_window() -> None:
    """2 s warm-up + 10 s window: the rate counts only bytes inside [2 s, common end]."""
    stream = [(0.0, 0), (2.0, 1_000_000), (12.0, 11_000_000)]
    a = _conclude([stream, stream])
    assert a.status == "ok"  # type: ignore[attr-defined]
    assert a.window_bytes == 20_000_000  # type: ignore[attr-defined]
    assert a.throughput_bps == pytest.approx(20_000_000 * 8 / 10)  # type: ignore[attr-defined]
    assert a.streams == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("streams", "failure", "reason"),
    [
        ([[(0.0, 0)]], None, "zero_bytes"),
        ([[(0.0, 0), (2.0, 10), (5.0, 100)]], None, "short_transfer"),
        ([[(0.0, 0), (12.0, 100)]], StreamFailure("broken_connection", "reset"),
         "broken_connection"),
    ],
)
def test_conclude_failures(streams: list[list[tuple[float, int]]],
                           failure: StreamFailure | None, reason: str) -> None:
    """No bytes, a window cut short, a stream failure: each is a failed attempt with its
    reason, and no rate."""
    a = _conclude(streams, failure)
    assert (a.status, a.failure_reason, a.throughput_bps) == (  # type: ignore[attr-defined]
        "failed", reason, None)
