"""Goal C7, short: the soak benchmark's load (benchmarks/soak.py) for a few seconds. Every
request succeeds and every acknowledged result is stored exactly once; the full 10-minute
run with 200 probes is `make soak`, its figures in docs/benchmarks.md."""

from __future__ import annotations

import pytest

from benchmarks.soak import soak

pytestmark = pytest.mark.slow


def test_many_probes_at_once_lose_nothing() -> None:
    """60 probes posting to one collector for 8 s: no request fails, every probe is
    acknowledged, every acknowledged result is stored once, and the database size was
    sampled."""
    run = soak(probes=60, seconds=8, think_s=0.5)
    assert run.errors == {}
    assert run.acknowledged > 60  # every probe got through, most more than once
    assert run.stored == run.acknowledged
    assert run.samples and run.samples[-1][2] > 0  # the database was watched
