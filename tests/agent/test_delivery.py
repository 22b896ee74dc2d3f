"""Delivery: the retry contract, the bounded spool with gap records, batches, and the
cases where the collector stores a result but the reply is lost (reliability.md A4-A7).
Against a real collector, through a fault-injecting proxy where a fault is needed."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import DeliveryConfig
from agent.delivery import (
    CollectorClient,
    Entry,
    Spool,
    backoff_s,
    batches,
    deliver,
    evictions,
    parse_retry_after,
)
from agent.schema import format_utc
from collector.testing import RunningCollector
from tests.factories import session
from tests.faultproxy import fault_proxy
from tests.httpclient import request

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
CFG = DeliveryConfig(retry_min_s=1, retry_max_s=300, max_wait_s=30, batch_results=3,
                     max_requests_per_s=1000, spool_max_bytes=10_000, min_free_bytes=1000,
                     max_age_days=30)


def test_backoff_doubles_to_the_cap_with_jitter() -> None:
    """1, 2, 4 ... 300 s, times 0.5-1.5."""
    assert [backoff_s(n, 1, 300, 0.5) for n in (1, 2, 3, 9, 10, 30)] == \
        [1, 2, 4, 256, 300, 300]
    assert backoff_s(1, 1, 300, 0.0) == 0.5
    assert backoff_s(10, 1, 300, 0.999) == pytest.approx(449.7)


def test_retry_after_seconds_or_date() -> None:
    assert parse_retry_after("7", NOW) == 7
    assert parse_retry_after("Sun, 22 Nov 2026 12:00:30 GMT", NOW) == 30
    assert parse_retry_after("Sun, 22 Nov 2026 11:00:00 GMT", NOW) == 0
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after(None, NOW) is None


def _entries(*ages_h: float, size: int = 3000) -> list[Entry]:
    return [Entry(Path(f"r{i}.json"), size, NOW - timedelta(hours=h))
            for i, h in enumerate(ages_h)]


def test_evictions_oldest_first_by_reason() -> None:
    """Too old first, then over the byte cap, then under the free-disk floor."""
    entries = _entries(24 * 40, 5, 4, 3)  # one past the 30-day cap
    got = evictions(entries, 3000, CFG, free_bytes=10**9, now=NOW)
    assert [(e.path.name, why) for e, why in got] == [("r0.json", "too_old"),
                                                      ("r1.json", "spool_full")]
    got = evictions(_entries(5, 4), 3000, CFG, free_bytes=3500, now=NOW)
    assert [(e.path.name, why) for e, why in got] == [("r0.json", "disk_full")]
    assert evictions(_entries(2), 3000, CFG, free_bytes=10**9, now=NOW) == []


def test_batches_respect_both_caps() -> None:
    entries = _entries(9, 8, 7, 6, 5, size=100) + _entries(1, size=5000)
    sizes = [[e.size for e in b] for b in batches(entries, 3, 400)]
    assert sizes == [[100, 100, 100], [100, 100], [5000]]


def test_full_spool_drops_oldest_and_spools_a_gap(tmp_path: Path) -> None:
    """Over the byte cap: the oldest results go, a gap record says how many and when,
    and the counter agrees."""
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=4 * 2600, min_free_bytes=0))
    starts = [NOW - timedelta(minutes=15 * (10 - i)) for i in range(10)]
    for moment in starts:
        assert spool.put(session("p1", started_at=format_utc(moment)), now=NOW) is not None
    kept = spool.entries()
    assert 1 <= len(kept) < 10
    gaps = [json.loads(p.read_text()) for p in spool.gaps()]
    dropped = sum(g["dropped"] for g in gaps)
    assert dropped + len(kept) == 10
    assert spool.stats()["dropped_total"] == dropped
    assert {g["reason"] for g in gaps} == {"spool_full"}
    assert min(g["first_started_at"] for g in gaps) == format_utc(starts[0])
    assert kept[0].started_at == starts[dropped]


async def _deliver(spool: Spool, url: str, token: str, cfg: DeliveryConfig,
                   delays: list[float] | None = None):  # type: ignore[no-untyped-def]
    async def sleep(seconds: float) -> None:
        if delays is not None:
            delays.append(seconds)
        await asyncio.sleep(0)

    return await deliver(spool, CollectorClient(url, token, 5), cfg, sleep=sleep,
                         jitter=lambda: 0.5)


def _spool_results(spool: Spool, n: int, probe: str = "p1") -> list[str]:
    ids = []
    for i in range(n):
        r = session(probe, started_at=format_utc(NOW - timedelta(minutes=15 * (n - i))))
        spool.put(r, now=NOW)
        ids.append(r.result_id)
    return ids


def _stored(collector: RunningCollector, probe: str = "p1") -> list[str]:
    _, listing, _ = request("GET", collector.url + f"/api/v1/results?probe={probe}")
    return [r["result_id"] for r in listing["results"]]


def test_backlog_goes_oldest_first_in_batches(collector: RunningCollector,
                                              tmp_path: Path) -> None:
    token = collector.add_probe("p1")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7))
    ids = _spool_results(spool, 7)
    report = asyncio.run(_deliver(spool, collector.url, token, spool.cfg))
    assert report.delivered == ids and report.requests == 3  # 3 + 3 + 1
    assert _stored(collector) == ids
    assert spool.entries() == [] and spool.stats()["delivered_total"] == 7


def test_retryable_failures_back_off_and_honour_retry_after(collector: RunningCollector,
                                                            tmp_path: Path) -> None:
    """503 with Retry-After 7, 429 with Retry-After 2, a 500 and a dropped connection:
    each retried (waits 7 and 2 as told, then the backoff of the 3rd and 4th consecutive
    failure, 4 and 8 s), then everything arrives once."""
    token = collector.add_probe("p1")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7))
    ids = _spool_results(spool, 2)
    script = [("status", 503, 7), ("status", 429, 2), ("status", 500, None), ("drop",)]
    delays: list[float] = []
    with fault_proxy(collector.url, script) as proxy:
        report = asyncio.run(_deliver(spool, proxy.url, token, spool.cfg, delays))
    assert delays == [7, 2, 4, 8]
    assert report.retries == 4 and report.delivered == ids
    assert _stored(collector) == ids


def test_reply_lost_after_commit_is_resent_and_stored_once(collector: RunningCollector,
                                                           tmp_path: Path) -> None:
    """The collector commits the batch, then the connection drops before the reply: the
    agent keeps the results, sends them again, and the collector keeps one row each."""
    token = collector.add_probe("p1")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7))
    ids = _spool_results(spool, 3)
    with fault_proxy(collector.url, [("drop_reply",)]) as proxy:
        report = asyncio.run(_deliver(spool, proxy.url, token, spool.cfg))
    assert proxy.seen == ["POST /api/v1/results/batch -> 200 then dropped",
                          "POST /api/v1/results/batch -> 200"]
    assert report.delivered == ids
    assert _stored(collector) == ids
    assert collector.count_results() == 3


def test_refused_results_go_to_dead_letter_and_gaps_are_delivered(
        collector: RunningCollector, tmp_path: Path) -> None:
    """In one batch: a result of another probe (403) is set aside with its reason, the
    others are stored; a spooled gap record reaches /api/v1/gaps first."""
    token = collector.add_probe("p1")
    collector.add_probe("p2")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7, min_free_bytes=0))
    _spool_results(spool, 1)
    stranger = session("p2", started_at=format_utc(NOW - timedelta(minutes=2)))
    spool.put(stranger, now=NOW)
    spool.cfg = replace(spool.cfg, spool_max_bytes=sum(e.size for e in spool.entries()) + 10)
    newest = session("p1", started_at=format_utc(NOW - timedelta(minutes=1)))
    spool.put(newest, now=NOW)
    assert len(spool.gaps()) == 1  # the cap dropped the oldest
    report = asyncio.run(_deliver(spool, collector.url, token, spool.cfg))
    assert report.gaps_sent == 1
    assert [Path(f).name.split("_", 1)[1] for f, _ in report.dead_lettered] == [
        f"{stranger.result_id}.json"]
    assert "HTTP 403" in report.dead_lettered[0][1]
    _, gaps, _ = request("GET", collector.url + "/api/v1/gaps?probe=p1")
    assert [(g["reason"], g["dropped"]) for g in gaps["gaps"]] == [("spool_full", 1)]
    assert report.delivered == [newest.result_id]
    assert spool.entries() == [] and len(spool.dead_letters()) == 1


def test_revoked_token_keeps_everything(collector: RunningCollector, tmp_path: Path) -> None:
    """A 401 refuses the request, not the results: nothing is dead-lettered."""
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7))
    _spool_results(spool, 2)
    report = asyncio.run(_deliver(spool, collector.url, "bbp_not_a_token", spool.cfg))
    assert report.error is not None and "HTTP 401" in report.error
    assert len(spool.entries()) == 2 and spool.dead_letters() == []
