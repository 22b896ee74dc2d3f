"""Delivery: the retry contract, the bounded spool with gap records, batches, and the
cases where the collector stores a result but the reply is lost (reliability.md A4-A7).
Against a real collector, through a fault-injecting proxy where a fault is needed."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent import jose, probekey
from agent.client import CollectorClient, parse_retry_after
from agent.config import DeliveryConfig
from agent.delivery import backoff_s, batches, deliver
from agent.identity import Backlog, Identity, backlog, claim, identity_file, identity_for
from agent.schema import format_utc
from agent.spool import Entry, Spool, evictions, file_id
from collector.server.testing import RunningCollector
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
    """Retry-After is read as seconds or as an HTTP date (a past date waits 0); anything else or
    none is ignored (None)."""
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
    """Spooled results are batched oldest first under both the count cap and the byte cap; a
    result larger than the byte cap travels alone."""
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


def _for(collector: RunningCollector, token: str) -> Identity:
    """Whom a spool's results are measured for: ``token`` at ``collector`` (as `bbprobe
    run` records it)."""
    return identity_for(collector.url, token)


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
    """A backlog of 7 is delivered oldest first in 3 requests (3 + 3 + 1), stored in that order,
    and leaves the spool empty with 7 counted delivered."""
    token = collector.add_probe("p1")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7), _for(collector, token))
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
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7), _for(collector, token))
    ids = _spool_results(spool, 2)
    script = [("status", 503, 7), ("status", 429, 2), ("status", 500, None), ("drop",)]
    delays: list[float] = []
    with fault_proxy(collector.url, script) as proxy:
        report = asyncio.run(_deliver(spool, proxy.url, token, spool.cfg, delays))
    assert delays == [7, 2, 4, 8]
    assert report.retries == 4 and report.delivered == ids
    assert _stored(collector) == ids


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
def test_compressed_deliveries_and_a_collector_that_refuses_them(
        collector: RunningCollector, tmp_path: Path, encoding: str) -> None:
    """Bodies go compressed and are stored as sent; a collector from before compressed bodies
    refuses the encoding (415): that request goes again as plain JSON, and so does every
    later one to it. Nothing is dead-lettered."""
    token = collector.add_probe("p1")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7), _for(collector, token))
    ids = _spool_results(spool, 3)
    with fault_proxy(collector.url, []) as proxy:
        client = CollectorClient(proxy.url, token, 10.0, compression=encoding)
        report = asyncio.run(deliver(spool, client, spool.cfg, sleep=_no_sleep))
    assert proxy.seen == [f"POST /api/v1/results/batch [{encoding}] -> 200"]
    assert report.delivered == ids and _stored(collector) == ids
    more = _spool_results(spool, 6)
    with fault_proxy(collector.url, [("refuse_encoding",)]) as proxy:
        client = CollectorClient(proxy.url, token, 10.0, compression=encoding)
        report = asyncio.run(deliver(spool, client, spool.cfg, sleep=_no_sleep))
    assert proxy.seen == [f"POST /api/v1/results/batch [{encoding}] -> 415",
                          "POST /api/v1/results/batch -> 200",
                          "POST /api/v1/results/batch -> 200"]
    assert client.compression == "none"
    assert report.delivered == more and report.dead_lettered == []
    assert sorted(_stored(collector)) == sorted(ids + more)


def test_reply_lost_after_commit_is_resent_and_stored_once(collector: RunningCollector,
                                                           tmp_path: Path) -> None:
    """The collector commits the batch, then the connection drops before the reply: the
    agent keeps the results, sends them again, and the collector keeps one row each."""
    token = collector.add_probe("p1")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7), _for(collector, token))
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
    """In one batch: a result named for another probe (p2) though spooled for p1's token
    (a wrong probe_id configured) is refused (403) and set aside with its reason, the
    others are stored; a spooled gap record reaches /api/v1/gaps first."""
    token = collector.add_probe("p1")
    collector.add_probe("p2")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7, min_free_bytes=0),
                  _for(collector, token))
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


# --- damaged spool files, 400 on a batch, replies matched by id, unnamed results


def test_a_damaged_spool_file_is_set_aside_and_the_rest_delivered(
        collector: RunningCollector, tmp_path: Path) -> None:
    """The oldest result truncated (an SD card's torn write): it moves to dead-letter
    with the reason next to it, and the others in its batch are delivered, instead of
    every batch being refused with "HTTP 400: body is not valid JSON"."""
    token = collector.add_probe("p1")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7), _for(collector, token))
    ids = _spool_results(spool, 3)
    oldest = spool.entries()[0].path
    oldest.write_bytes(oldest.read_bytes()[:500])
    report = asyncio.run(_deliver(spool, collector.url, token, spool.cfg))
    assert report.error is None
    assert report.delivered == ids[1:] and _stored(collector) == ids[1:]
    (dead,) = spool.dead_letters()
    assert dead.name == oldest.name and len(dead.read_bytes()) == 500
    reason = dead.with_suffix(".reason.txt").read_text()
    assert reason.startswith("damaged spool file, not sent: not valid JSON: ")
    assert [(Path(f).name, r) for f, r in report.dead_lettered] == [(oldest.name,
                                                                     reason.strip())]
    assert spool.entries() == []


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda raw, rid: b"\xff" + raw, "not UTF-8 text (byte 0)"),
        (lambda raw, rid: b"[1, 2]", "not a JSON object"),
        (lambda raw, rid: raw.replace(b'"summary":{', b'"summary":{"x":NaN,', 1),
         "not valid JSON: NaN is not a JSON number"),
        (lambda raw, rid: raw.replace(rid.encode(), b"0" * 8 + rid[8:].encode()),
         "result_id '00000000"),
    ],
    ids=["not-utf8", "not-an-object", "nan", "other-id"],
)
def test_each_kind_of_damage_is_named(tmp_path: Path, damage: Any, problem: str) -> None:
    """What the collector would refuse for a whole batch, or what its reply could not be
    matched by, is found before sending (no collector needed: nothing is sent)."""
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7))
    (rid,) = _spool_results(spool, 1)
    path = spool.entries()[0].path
    path.write_bytes(damage(path.read_bytes(), rid))
    report = asyncio.run(_deliver(spool, "http://127.0.0.1:9", "t", spool.cfg))
    assert report.requests == 0 and spool.entries() == []
    ((_, reason),) = report.dead_lettered
    assert reason.startswith(f"damaged spool file, not sent: {problem}"), reason


def test_a_400_on_a_batch_splits_it_and_dead_letters_only_the_refused_result(
        collector: RunningCollector, tmp_path: Path) -> None:
    """A 400 naming a document field for a batch of three halves the batches (like a 413)
    instead of stopping; for a result sent alone it is its own refusal: dead-letter, and
    the rest go."""
    token = collector.add_probe("p1")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7), _for(collector, token))
    ids = _spool_results(spool, 3)
    with fault_proxy(collector.url, [("status", 400, None, "ping"),
                                     ("status", 400, None, "ping")]) as proxy:
        report = asyncio.run(_deliver(spool, proxy.url, token, spool.cfg))
    assert proxy.seen == ["POST /api/v1/results/batch -> 400"] * 2 + \
        ["POST /api/v1/results/batch -> 200"] * 2
    assert [(Path(f).name.split("_", 1)[1], r) for f, r in report.dead_lettered] == [
        (f"{ids[0]}.json", "HTTP 400: injected")]
    assert report.delivered == ids[1:] and _stored(collector) == ids[1:]
    assert report.error is None and spool.entries() == []


def test_a_400_naming_no_field_keeps_the_whole_spool(collector: RunningCollector,
                                                      tmp_path: Path) -> None:
    """A 400 that names no document field is the request's (a proxy's header limit, a
    WAF), not any result's: delivery stops with everything kept, instead of moving the
    spool to dead-letter one result at a time."""
    token = collector.add_probe("p1")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7), _for(collector, token))
    _spool_results(spool, 3)
    with fault_proxy(collector.url, [("status", 400, None)]) as proxy:
        report = asyncio.run(_deliver(spool, proxy.url, token, spool.cfg))
    assert proxy.seen == ["POST /api/v1/results/batch -> 400"]
    assert report.error == "HTTP 400: injected" and report.dead_lettered == []
    assert len(spool.entries()) == 3 and spool.dead_letters() == []


@contextmanager
def _rewriting_proxy(upstream: str,
                     rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> Iterator[str]:
    """A proxy in front of a real collector that forwards every request and passes the
    JSON reply of each batch POST through ``rewrite``."""
    with fault_proxy(upstream, [], rewrite=rewrite) as proxy:
        yield proxy.url


def _reversed(reply: dict[str, Any]) -> dict[str, Any]:
    return {"items": reply["items"][::-1]}


def test_batch_replies_are_matched_by_result_id(collector: RunningCollector,
                                                tmp_path: Path) -> None:
    """The collector lists the outcomes in the opposite order: the refused result (named
    for another probe, 403) is the one set aside and the stored one the one deleted, not the other
    way round (which would delete a result that was never stored)."""
    token = collector.add_probe("p1")
    collector.add_probe("p2")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7), _for(collector, token))
    stranger = session("p2", started_at=format_utc(NOW - timedelta(minutes=2)))
    ours = session("p1", started_at=format_utc(NOW - timedelta(minutes=1)))
    spool.put(stranger, now=NOW)
    spool.put(ours, now=NOW)
    with _rewriting_proxy(collector.url, _reversed) as url:
        report = asyncio.run(_deliver(spool, url, token, spool.cfg))
    assert report.delivered == [ours.result_id] and _stored(collector) == [ours.result_id]
    assert [Path(f).name.split("_", 1)[1] for f, _ in report.dead_lettered] == [
        f"{stranger.result_id}.json"]
    assert "HTTP 403" in report.dead_lettered[0][1]
    assert spool.entries() == []


def _drop_last(reply: dict[str, Any]) -> dict[str, Any]:
    return {"items": reply["items"][:-1]}


def _add_one(reply: dict[str, Any]) -> dict[str, Any]:
    extra = {"result_id": "00000000-0000-4000-8000-000000000000", "status": 201}
    return {"items": [*reply["items"], extra]}


def _swap_an_id(reply: dict[str, Any]) -> dict[str, Any]:
    items = [dict(i) for i in reply["items"]]
    items[0]["result_id"] = "00000000-0000-4000-8000-000000000000"
    return {"items": items}


def _twice(reply: dict[str, Any]) -> dict[str, Any]:
    items = reply["items"]
    return {"items": [items[0], *items[:-1]]}


def _no_id(reply: dict[str, Any]) -> dict[str, Any]:
    return {"items": [{"status": 201}] * len(reply["items"])}


@pytest.mark.parametrize("rewrite", [_drop_last, _add_one, _swap_an_id, _twice, _no_id],
                         ids=["missing", "extra", "swapped", "twice", "no-id"])
def test_a_reply_that_does_not_match_the_batch_deletes_nothing(
        collector: RunningCollector, tmp_path: Path,
        rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """A missing, extra, swapped or repeated result id, or a count that differs: every
    file stays in the spool (a retryable error), nothing is dead-lettered, and a later
    run, with an honest reply, delivers them once each."""
    token = collector.add_probe("p1")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7, max_wait_s=0),
                  _for(collector, token))
    ids = _spool_results(spool, 3)
    with _rewriting_proxy(collector.url, rewrite) as url:
        report = asyncio.run(_deliver(spool, url, token, spool.cfg))
    assert report.error is not None and "batch reply" in report.error
    assert report.delivered == [] and report.dead_lettered == []
    assert [e.path.name.split("_", 1)[1] for e in spool.entries()] == [f"{i}.json"
                                                                       for i in ids]
    again = asyncio.run(_deliver(spool, collector.url, token, spool.cfg))
    assert again.delivered == ids and _stored(collector) == ids
    assert collector.count_results() == 3


def test_unnamed_results_and_gaps_are_named_at_delivery(collector: RunningCollector,
                                                        tmp_path: Path) -> None:
    """Results measured before the collector named the probe are spooled without a
    probe_id (as is the gap record of one the spool dropped); delivery asks the
    collector (whoami) and sends them under its answer, not a guess."""
    token = collector.add_probe("p1")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7, min_free_bytes=0),
                  _for(collector, token))
    ids = _spool_results(spool, 2, probe="")
    spool.cfg = replace(spool.cfg, spool_max_bytes=sum(e.size for e in spool.entries()) + 10)
    newest = session("", started_at=format_utc(NOW - timedelta(minutes=1)))
    spool.put(newest, now=NOW)  # the cap drops the oldest: an unnamed gap record
    assert json.loads(spool.gaps()[0].read_text())["probe_id"] == ""
    assert all(json.loads(e.path.read_text())["probe_id"] == ""
               for e in spool.entries())
    with fault_proxy(collector.url, []) as proxy:
        report = asyncio.run(_deliver(spool, proxy.url, token, spool.cfg))
    assert proxy.seen == ["GET /api/v1/whoami -> 200", "POST /api/v1/gaps -> 201",
                          "POST /api/v1/results/batch -> 200"]
    assert report.dead_lettered == [] and report.gaps_sent == 1
    assert report.delivered == [ids[1], newest.result_id]
    assert _stored(collector) == [ids[1], newest.result_id]
    _, gaps, _ = request("GET", collector.url + "/api/v1/gaps?probe=p1")
    assert [(g["reason"], g["dropped"]) for g in gaps["gaps"]] == [("spool_full", 1)]


def test_a_known_name_is_used_without_asking(collector: RunningCollector,
                                             tmp_path: Path) -> None:
    """The name the session already has (configured, or whoami at its start) fills
    unnamed results with no further request."""
    token = collector.add_probe("p1")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7), _for(collector, token))
    ids = _spool_results(spool, 2, probe="")
    with fault_proxy(collector.url, []) as proxy:
        report = asyncio.run(deliver(spool, CollectorClient(proxy.url, token, 5), spool.cfg,
                                     probe_id="p1", sleep=_no_sleep))
    assert proxy.seen == ["POST /api/v1/results/batch -> 200"]
    assert report.delivered == ids and _stored(collector) == ids


async def _no_sleep(_: float) -> None:
    await asyncio.sleep(0)


@pytest.mark.parametrize(("script", "seen", "error"), [
    ([("status", 503, None)], ["GET /api/v1/whoami -> 503"], "HTTP 503: injected"),
    ([("status", 401, None)], ["GET /api/v1/whoami -> 401"], "HTTP 401: injected"),
], ids=["unreachable", "refused"])
def test_unnamed_results_wait_until_the_collector_names_the_probe(
        collector: RunningCollector, tmp_path: Path, script: list[tuple[Any, ...]],
        seen: list[str], error: str) -> None:
    """While whoami fails, no unnamed result is sent (not under a guessed name either):
    all stay spooled, none is dead-lettered."""
    token = collector.add_probe("p1")
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7, max_wait_s=0),
                  _for(collector, token))
    _spool_results(spool, 2, probe="")
    with fault_proxy(collector.url, script) as proxy:
        report = asyncio.run(_deliver(spool, proxy.url, token, spool.cfg))
    assert proxy.seen == seen and report.error == error
    assert len(spool.entries()) == 2 and spool.dead_letters() == []
    assert collector.count_results() == 0


def test_a_dangling_link_in_the_spool_is_set_aside_not_looped_on(tmp_path: Path) -> None:
    """A file that is listed but cannot be opened (a dangling link) is set aside like a
    damaged one, rather than found again on every pass."""
    spool = Spool(tmp_path, replace(CFG, max_wait_s=0))
    spool.gap_dir.mkdir(parents=True)
    link = spool.gap_dir / "2026-11-22T120000.000000Z_spool_full_0c5e2f3c.json"
    link.symlink_to(tmp_path / "nowhere")
    report = asyncio.run(asyncio.wait_for(
        _deliver(spool, "http://127.0.0.1:9", "t", spool.cfg), 10))
    assert report.requests == 0 and spool.gaps() == []
    assert [r for _, r in report.dead_lettered] == [
        "damaged spool file, not sent: unreadable: No such file or directory"]


# --- a spooled result belongs to the identity it was measured for ---------------------

ID_A = identity_for("https://a.example/", "bbp_token_of_a")
ID_B = identity_for("https://b.example", "bbp_token_of_b")


@pytest.mark.parametrize(("recorded", "probe", "known", "expected"), [
    (ID_A, "a", None, "send"),  # its own token: sent (named or not, whoami names it)
    (ID_A, "", "a", "send"),
    (ID_A, "a", "b", "send"),  # a wrong probe_id is the collector's to refuse (403)
    (replace(ID_A, collector_url="http://10.0.0.9:8080"), "", None, "send"),  # moved
    (ID_B, "b", "b", "wait"),  # another token's: never sent with this one
    (ID_B, "", None, "wait"),
    (None, "a", None, "ask"),  # older spool: placed by its probe_id once a is known
    (None, "a", "a", "send"),
    (None, "b", "a", "wait"),
    (None, "", "a", "wait"),  # older spool, unnamed: nobody can tell whose it is
    (None, None, "a", "send"),  # unreadable: read, found damaged, set aside
], ids=["own-named", "own-unnamed", "own-misnamed", "own-moved", "other", "other-unnamed",
        "old-unknown", "old-match", "old-other", "old-unnamed", "old-damaged"])
def test_claim_is_decided_by_the_token_then_the_probe_id(
        recorded: Identity | None, probe: str | None, known: str | None,
        expected: str) -> None:
    """Delivering as A: the token recorded at measurement decides; a file from before
    identities goes only when its own probe_id is the name the collector gives A."""
    assert claim(recorded, probe, ID_A, known) == expected


def test_the_identity_is_recorded_beside_the_result_without_the_token(
        tmp_path: Path) -> None:
    """Measurement time, not delivery time: the collector URL and the first 16 hex
    digits of the token's SHA-256 are written (durably, no temp file left) next to the
    result, which is the document as measured; the token itself is nowhere."""
    spool = Spool(tmp_path, CFG, ID_A)
    result = session("", started_at=format_utc(NOW - timedelta(minutes=1)))
    path = spool.put(result, now=NOW)
    assert path is not None
    assert json.loads(path.read_text())["probe_id"] == ""
    assert json.loads(identity_file(path).read_text()) == {
        "collector_url": "https://a.example",
        "token_fingerprint": hashlib.sha256(b"bbp_token_of_a").hexdigest()[:16]}
    assert Spool.identity_of(path) == ID_A
    assert sorted(p.name for p in spool.dir.iterdir()) == sorted(
        [path.name, identity_file(path).name])
    assert not any(b"bbp_token_of_a" in p.read_bytes() for p in tmp_path.rglob("*")
                   if p.is_file())


def _files(spool: Spool) -> dict[str, bytes]:
    return {str(p.relative_to(spool.root)): p.read_bytes()
            for p in sorted(spool.root.rglob("*")) if p.is_file() and
            p.parent.name in ("spool", "gaps", "dead-letter")}


def test_a_technicians_two_lines_keep_their_results_apart(collector: RunningCollector,
                                                           tmp_path: Path) -> None:
    """One laptop, two customer lines, two collectors: a session for probe A measured
    while A's collector was away (unnamed) and one for B. Delivering with B's token
    sends B's only: B's collector receives nothing of A's, A's files stay byte for byte
    (not named, not dead-lettered), counted as waiting. Then A's token sends A's
    exactly once, named by A's collector."""
    from agent import health
    from collector.server.testing import running_collector

    token_a = collector.add_probe("line-a")
    a = session("", started_at=format_utc(NOW - timedelta(minutes=30)))
    Spool(tmp_path, CFG, identity_for(collector.url, token_a)).put(a, now=NOW)
    with running_collector(tmp_path / "collector-b") as other:
        token_b = other.add_probe("line-b")
        spool_b = Spool(tmp_path, CFG, identity_for(other.url, token_b))
        b = session("line-b", started_at=format_utc(NOW - timedelta(minutes=15)))
        spool_b.put(b, now=NOW)
        before = {k: v for k, v in _files(spool_b).items() if a.result_id in k}
        assert len(before) == 2  # the result and its identity
        with fault_proxy(other.url, []) as proxy:
            report = asyncio.run(deliver(spool_b, CollectorClient(proxy.url, token_b, 5),
                                         CFG, sleep=_no_sleep))
        assert proxy.seen == ["POST /api/v1/results/batch -> 200"]  # no whoami either
        assert (report.delivered, report.waiting, report.pending) == ([b.result_id], 1, 0)
        assert report.dead_lettered == [] and report.error is None
        assert _stored(other, "line-b") == [b.result_id] and other.count_results() == 1
        assert {k: v for k, v in _files(spool_b).items() if a.result_id in k} == before
        # B's health report counts B's backlog, not A's.
        assert health.build(spool_b, mode="run", campaign=None, instruction_version=None,
                            instruction_error=None).spool_results == 0
        # Delivering as B again, even knowing B's name, leaves A's as it is.
        again = asyncio.run(deliver(spool_b, CollectorClient(other.url, token_b, 5), CFG,
                                    probe_id="line-b", sleep=_no_sleep))
        assert (again.requests, again.waiting) == (0, 1) and other.count_results() == 1
    spool_a = Spool(tmp_path, CFG, identity_for(collector.url, token_a))
    with fault_proxy(collector.url, []) as proxy:
        report = asyncio.run(deliver(spool_a, CollectorClient(proxy.url, token_a, 5), CFG,
                                     sleep=_no_sleep))
    assert proxy.seen == ["GET /api/v1/whoami -> 200", "POST /api/v1/results/batch -> 200"]
    assert (report.delivered, report.waiting) == ([a.result_id], 0)
    assert _stored(collector, "line-a") == [a.result_id] and collector.count_results() == 1
    assert spool_a.entries() == [] and list(spool_a.dir.iterdir()) == []


def test_an_unnamed_result_of_token_a_is_never_named_as_b(collector: RunningCollector,
                                                          tmp_path: Path) -> None:
    """One collector, two probes: a result spooled unnamed for A's token is not sent by
    B's delivery, whether B's name is configured or asked (no whoami is spent on it),
    and is never written with B's name; A's delivery names it A."""
    token_a, token_b = collector.add_probe("a"), collector.add_probe("b")
    spool = Spool(tmp_path, CFG, _for(collector, token_a))
    (rid,) = _spool_results(spool, 1, probe="")
    for known in ("b", None):
        with fault_proxy(collector.url, []) as proxy:
            report = asyncio.run(deliver(spool, CollectorClient(proxy.url, token_b, 5), CFG,
                                         probe_id=known, sleep=_no_sleep))
        assert proxy.seen == [] and (report.waiting, report.delivered) == (1, [])
    (entry,) = spool.entries()
    assert json.loads(entry.path.read_text())["probe_id"] == ""
    assert _stored(collector, "b") == []
    report = asyncio.run(_deliver(spool, collector.url, token_a, CFG))
    assert report.delivered == [rid] and _stored(collector, "a") == [rid]
    _, stored, _ = request("GET", collector.url + f"/api/v1/results/{rid}")
    assert stored["probe_id"] == "a"


def test_gap_records_belong_to_the_identity_of_the_results_dropped(
        collector: RunningCollector, tmp_path: Path) -> None:
    """The byte cap counts every identity's results: B's sessions push A's oldest out.
    The gap record says so for A (A's name and identity), not for B whose result made
    the room; B's delivery sends B's results and no gap; A's sends A's gap under A."""
    token_a, token_b = collector.add_probe("a"), collector.add_probe("b")
    cfg = replace(CFG, spool_max_bytes=10**7, min_free_bytes=0)
    spool_a = Spool(tmp_path, cfg, _for(collector, token_a))
    a_ids = _spool_results(spool_a, 3, probe="a")
    spool_b = Spool(tmp_path, replace(cfg, spool_max_bytes=sum(
        e.size for e in spool_a.entries()) + 10), _for(collector, token_b))
    b_ids = []
    for i in range(2):
        r = session("b", started_at=format_utc(NOW - timedelta(minutes=5 - i)))
        spool_b.put(r, now=NOW)
        b_ids.append(r.result_id)
    assert sum(e.size for e in spool_b.entries()) <= spool_b.cfg.spool_max_bytes
    (gap,) = spool_b.gaps()
    assert json.loads(gap.read_text())["probe_id"] == "a"
    assert json.loads(gap.read_text())["dropped"] == 2  # merged: one record, one owner
    assert Spool.identity_of(gap) == _for(collector, token_a)
    report = asyncio.run(_deliver(spool_b, collector.url, token_b, CFG))
    assert (report.delivered, report.gaps_sent, report.waiting) == (b_ids, 0, 1)
    assert spool_b.gaps() == [gap]
    report = asyncio.run(_deliver(spool_a, collector.url, token_a, CFG))
    assert (report.delivered, report.gaps_sent) == (a_ids[2:], 1)
    _, gaps, _ = request("GET", collector.url + "/api/v1/gaps?probe=a")
    assert [(g["reason"], g["dropped"]) for g in gaps["gaps"]] == [("spool_full", 2)]
    _, gaps, _ = request("GET", collector.url + "/api/v1/gaps?probe=b")
    assert gaps["gaps"] == []


def test_an_older_spool_is_sent_only_by_its_own_probe(collector: RunningCollector,
                                                      tmp_path: Path) -> None:
    """Files spooled by a bbprobe from before identities (no .identity): one named a is
    sent once the collector names the token a; one named b waits for b; an unnamed one
    waits for good (whose it is cannot be told). None is dead-lettered or rewritten."""
    token_a = collector.add_probe("a")
    collector.add_probe("b")
    older = Spool(tmp_path, CFG)
    ours = _spool_results(older, 1, probe="a")
    _spool_results(older, 1, probe="b")
    _spool_results(older, 1, probe="")
    assert not list(older.dir.glob("*.identity"))
    with fault_proxy(collector.url, []) as proxy:
        report = asyncio.run(_deliver(older, proxy.url, token_a, CFG))
    assert proxy.seen == ["GET /api/v1/whoami -> 200", "POST /api/v1/results/batch -> 200"]
    assert (report.delivered, report.waiting, report.dead_lettered) == (ours, 2, [])
    assert sorted(json.loads(e.path.read_text())["probe_id"] for e in older.entries()) == \
        ["", "b"]
    assert sorted((b.identity, b.probe_id, b.results) for b in older.backlog()) == [
        (None, "", 1), (None, "b", 1)]


def test_dead_letters_keep_their_identity(tmp_path: Path) -> None:
    """A result set aside keeps whom it was measured for: retried, it is A's again
    (not an identity-less file); dropped, nothing of it stays."""
    spool = Spool(tmp_path, CFG, ID_A)
    path = spool.put(session("a", started_at=format_utc(NOW)), now=NOW)
    assert path is not None
    dead = spool.dead_letter(path, "HTTP 422: test")
    assert Spool.identity_of(dead) == ID_A and not identity_file(path).exists()
    back = spool.retry_dead_letter(dead)
    assert Spool.identity_of(back) == ID_A and not identity_file(dead).exists()
    spool.drop_dead_letter(spool.dead_letter(back, "HTTP 422: test"))
    assert list(spool.dead_dir.iterdir()) == [] and list(spool.dir.iterdir()) == []


def test_backlog_groups_by_token_then_by_probe_id() -> None:
    """What `bbprobe status` lists: one row per token (named by the results that carry a
    name) and, for older files, one per probe_id; gap records counted apart."""
    moved = replace(ID_A, collector_url="http://10.0.0.9")
    rows = [(ID_A, "", 100, False), (ID_B, "b", 50, False), (moved, "a", 10, False),
            (None, "c", 5, False), (ID_A, "a", 0, True), (None, "", 7, False)]
    assert backlog(rows) == [Backlog(ID_A, "a", 2, 110, 1), Backlog(ID_B, "b", 1, 50, 0),
                             Backlog(None, "c", 1, 5, 0), Backlog(None, "", 1, 7, 0)]


# --- a probe known by its client certificate alone: the certificate, not its path --------


def _openssl_fingerprint(pem: Path) -> str:
    import subprocess

    out = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-fingerprint",
                          "-sha256"], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return out.split("=", 1)[1].strip().replace(":", "").lower()[:16]


def _install(pki: Path, name: str, laptop: Path) -> tuple[str, str]:
    """Put probe ``name``'s certificate and key where the laptop's config points (the
    same two paths whichever probe's they are); those paths."""
    laptop.mkdir(exist_ok=True)
    cert, key = laptop / "client.pem", laptop / "client.key"
    cert.write_bytes((pki / f"{name}.pem").read_bytes())
    key.write_bytes((pki / f"{name}.key").read_bytes())
    return str(cert), str(key)


def test_a_client_certificate_is_known_by_itself_not_by_its_path(
        tmp_path: Path, pki: Path) -> None:
    """Two certificates put in turn at one path are two identities (the fingerprint is
    the certificate's, as openssl prints it), and a result spooled under the first is
    not claimed, nor sent, under the second; the same certificate laid out otherwise
    (CRLF, the key before it, the CA after it) is the same identity."""
    url = "http://127.0.0.1:9"
    cert, key = _install(pki, "p1", tmp_path / "laptop")
    first = identity_for(url, "", cert)
    assert first.token_fingerprint == _openssl_fingerprint(pki / "p1.pem")
    pem, ca = (pki / "p1.pem").read_bytes(), (pki / "ca.pem").read_bytes()
    for layout in (pem.replace(b"\n", b"\r\n"), (pki / "p1.key").read_bytes() + pem + ca):
        Path(cert).write_bytes(layout)
        assert identity_for(url, "", cert) == first
    spool = Spool(tmp_path / "state", CFG, first)
    path = spool.put(session("", started_at=format_utc(NOW)), now=NOW)
    assert path is not None
    _install(pki, "nobody", tmp_path / "laptop")
    second = identity_for(url, "", cert)
    assert second.token_fingerprint == _openssl_fingerprint(pki / "nobody.pem") != \
        first.token_fingerprint
    assert claim(Spool.identity_of(path), "", second, None) == "wait"
    client = CollectorClient(url, "", 5, client_cert=cert, client_key=key)
    assert client.identity == second
    report = asyncio.run(deliver(spool, client, CFG, sleep=_no_sleep))
    assert (report.requests, report.waiting, report.delivered) == (0, 1, [])
    assert spool.pending() == [path]


@pytest.mark.parametrize(("content", "problem"), [
    (None, "cannot read {cert}: No such file or directory"),
    (b"", "{cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
     "{cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
    (b"-----BEGIN CERTIFICATE-----\nnot*base64\n-----END CERTIFICATE-----\n",
     "{cert} holds a PEM certificate that is not base64"),
], ids=["missing", "empty", "key-only", "not-base64"])
def test_a_client_certificate_that_cannot_be_read_is_named(
        tmp_path: Path, content: bytes | None, problem: str) -> None:
    """No token and a certificate file that is missing or holds no certificate: a
    ConfigError naming the key, the file and what is wrong, when the identity is made
    (the client too), never a traceback."""
    from agent.errors import ConfigError

    cert = tmp_path / "client.pem"
    if content is not None:
        cert.write_bytes(content)
    message = f"collector.client_cert: {problem.format(cert=cert)}"
    with pytest.raises(ConfigError) as raised:
        identity_for("http://127.0.0.1:9", "", str(cert))
    assert str(raised.value) == message
    with pytest.raises(ConfigError) as raised:
        CollectorClient("http://127.0.0.1:9", "", 5, client_cert=str(cert))
    assert str(raised.value) == message
    # A token is the credential then: the certificate is TLS's to load, not read here.
    assert identity_for("http://127.0.0.1:9", "tok", str(cert)) == \
        identity_for("http://127.0.0.1:9", "tok")


def test_a_certificate_replaced_while_the_client_loads_it_is_refused(
        tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is swapped between the identity's read and TLS's: which certificate
    would be presented cannot be told, so the client is not made."""
    import ssl

    from agent.errors import ConfigError

    cert, key = _install(pki, "p1", tmp_path / "laptop")
    load = ssl.SSLContext.load_cert_chain

    def swapped(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        _install(pki, "nobody", tmp_path / "laptop")
        load(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", swapped)
    with pytest.raises(ConfigError) as raised:
        CollectorClient("https://127.0.0.1:9", "", 5, client_cert=cert, client_key=key)
    assert str(raised.value) == (f"collector.client_cert: {cert} changed while it was "
                                 "being loaded; try again")


def test_a_laptop_swapping_certificates_never_stores_a_as_b(tmp_path: Path,
                                                            pki: Path) -> None:
    """The spool's identities with client certificates (TLS collector, no tokens): a session
    for p1 measured while its name was not known is spooled; p2's certificate then
    replaces p1's at the same path. p2's delivery sends p2's result only: the collector
    stores nothing as p2 that p1 measured. Put back, p1's certificate sends p1's, named
    p1 by the collector."""
    from collector.config import CollectorConfig, ServerConfig
    from collector.server.testing import running_collector
    from tests.conftest import _openssl

    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "p2.key", "-out", "p2.csr",
             "-subj", "/CN=p2", cwd=pki)
    _openssl("x509", "-req", "-in", "p2.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "p2.pem", "-days", "2", cwd=pki)
    cfg = replace(CollectorConfig(), server=replace(
        ServerConfig(), query_auth=False, tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"), client_cert="optional",
        client_ca=str(pki / "ca.pem")))
    laptop, state = tmp_path / "laptop", tmp_path / "state"

    def client(name: str) -> CollectorClient:
        cert, key = _install(pki, name, laptop)
        return CollectorClient(collector.url, "", 10, ca_file=str(pki / "ca.pem"),
                               client_cert=cert, client_key=key)

    def stored() -> list[tuple[str, str]]:
        store = collector.open_store()
        try:
            return sorted((r.result_id, r.probe_name) for r in store.results())
        finally:
            store.close()

    with running_collector(tmp_path / "collector", cfg) as collector:
        collector.add_probe("p1")
        collector.add_probe("p2")
        as_p1 = client("p1")
        a = session("", started_at=format_utc(NOW - timedelta(minutes=30)))
        Spool(state, CFG, as_p1.identity).put(a, now=NOW)
        as_p2 = client("p2")
        spool_p2 = Spool(state, CFG, as_p2.identity)
        b = session("", started_at=format_utc(NOW - timedelta(minutes=15)))
        spool_p2.put(b, now=NOW)
        report = asyncio.run(deliver(spool_p2, as_p2, CFG, sleep=_no_sleep))
        assert (report.delivered, report.waiting, report.error) == ([b.result_id], 1, None)
        assert stored() == [(b.result_id, "p2")]
        as_p1 = client("p1")
        report = asyncio.run(deliver(Spool(state, CFG, as_p1.identity), as_p1, CFG,
                                     sleep=_no_sleep))
        assert (report.delivered, report.waiting) == ([a.result_id], 0)
        assert stored() == sorted([(a.result_id, "p1"), (b.result_id, "p2")])


# --- signed results (issue 27): sent as signed, refused when changed


def _signed_spool(collector: RunningCollector, token: str, state: Path) -> Spool:
    """A spool whose results are signed with the probe's key, enrolled with the collector
    first (as `bbprobe run` does before delivering), so the collector verifies them."""
    said: list[str] = []

    async def enrol() -> str:
        return await probekey.enrol(CollectorClient(collector.url, token, 5), state,
                                    said.append, environ={})

    assert asyncio.run(enrol()) == "enrolled", said
    key = probekey.load(state, {})
    assert key is not None
    return Spool(state, replace(CFG, spool_max_bytes=10**7), _for(collector, token),
                 key.private)


def test_signed_results_are_sent_unchanged_and_stored_verified(
        collector: RunningCollector, tmp_path: Path) -> None:
    """Each spooled JWS goes as the batch item, unchanged: the collector verifies it with
    the probe's key and keeps exactly the protected header and signature the probe made;
    one spooled before the name was known is named by the collector, not by the agent
    (renaming it would break the signature), with no whoami asked."""
    token = collector.add_probe("p1")
    spool = _signed_spool(collector, token, tmp_path / "state")
    ids = _spool_results(spool, 2)
    unnamed = session("", started_at=format_utc(NOW - timedelta(minutes=1)))
    spool.put(unnamed, now=NOW)
    ids.append(unnamed.result_id)
    files = {file_id(p): json.loads(p.read_bytes()) for p in spool.pending()}
    assert all(set(doc) == {"protected", "payload", "signature"} for doc in files.values())
    with fault_proxy(collector.url, []) as proxy:
        report = asyncio.run(_deliver(spool, proxy.url, token, spool.cfg))
    assert proxy.seen == ["POST /api/v1/results/batch -> 200"]
    assert report.delivered == ids and report.dead_lettered == []
    assert _stored(collector) == ids
    store = collector.open_store()
    try:
        kept = store.result_signatures(ids)
    finally:
        store.close()
    assert {rid: (s.status, s.protected, s.signature) for rid, s in kept.items()} == {
        rid: ("verified", doc["protected"], doc["signature"]) for rid, doc in files.items()}


def test_a_sample_changed_in_a_signed_spool_file_is_refused_and_set_aside(
        collector: RunningCollector, tmp_path: Path) -> None:
    """One RTT sample edited in a spooled signed result (the signature left as it was):
    the collector refuses that one item with 422 saying the signature does not verify,
    the agent moves it to dead-letter with that reason, and the untouched one is stored."""
    token = collector.add_probe("p1")
    spool = _signed_spool(collector, token, tmp_path / "state")
    tampered_id, good_id = _spool_results(spool, 2)
    [path] = [p for p in spool.pending() if file_id(p) == tampered_id]
    jws = json.loads(path.read_bytes())
    doc = json.loads(jose.b64url_decode(jws["payload"], "payload", 10**7))
    assert doc["ping"]["samples"][1]["rtt_ms"] == 11.0
    doc["ping"]["samples"][1]["rtt_ms"] = 1.0  # a better line than was measured
    jws["payload"] = jose.b64url(json.dumps(doc, separators=(",", ":")).encode())
    path.write_text(json.dumps(jws))
    report = asyncio.run(_deliver(spool, collector.url, token, spool.cfg))
    assert report.delivered == [good_id] and _stored(collector) == [good_id]
    [(target, reason)] = report.dead_lettered
    assert Path(target).name == path.name
    assert reason.startswith("HTTP 422") and "does not verify" in reason, reason
    assert Path(target).with_suffix(".reason.txt").read_text().strip() == reason
    assert spool.entries() == []
    # Still readable where it waits: `bbprobe status` and `dead-letter list` show it.
    assert Spool.facts(Path(target)) == (1, "p1")


def test_a_signed_gap_record_is_sent_unchanged_and_stored_verified(
        collector: RunningCollector, tmp_path: Path) -> None:
    """Review H1: the gap record of a dropped signed result is the probe's JWS; delivery
    sends it unchanged (one recorded before the name was known too: the collector names
    it), and the collector keeps it whole, verified, so a bundle carries it exactly."""
    token = collector.add_probe("p1")
    spool = _signed_spool(collector, token, tmp_path / "state")
    spool.put(session("", started_at=format_utc(NOW - timedelta(minutes=30))), now=NOW)
    spool.cfg = replace(spool.cfg, spool_max_bytes=sum(e.size for e in spool.entries()) + 10)
    spool.put(session("p1", started_at=format_utc(NOW - timedelta(minutes=1))), now=NOW)
    [gap] = spool.gaps()
    sent = json.loads(gap.read_bytes())
    assert set(sent) == {"protected", "payload", "signature"}
    assert json.loads(jose.b64url_decode(sent["payload"], "payload", 10**6))["probe_id"] == ""
    report = asyncio.run(_deliver(spool, collector.url, token, spool.cfg))
    assert report.gaps_sent == 1 and report.dead_lettered == [] and spool.gaps() == []
    store = collector.open_store()
    try:
        [kept] = store.gap_evidence("p1")
    finally:
        store.close()
    assert (kept.status, kept.jws, kept.seq_ranges) == ("verified", sent, ((1, 1),))


def test_a_signature_stripped_in_the_spool_shows_as_a_downgrade(
        collector: RunningCollector, tmp_path: Path) -> None:
    """Review H2, the spool side: the last signed result replaced in the spool by an
    edited plain document is taken as unsigned (nothing tells it from an older agent's),
    and the chain shows it: an unsigned link after a signed one, a change."""
    from agent.evidence import chain_breaks, undocumented

    token = collector.add_probe("p1")
    spool = _signed_spool(collector, token, tmp_path / "state")
    first, last = _spool_results(spool, 2)
    [path] = [p for p in spool.pending() if file_id(p) == last]
    jws = json.loads(path.read_bytes())
    doc = json.loads(jose.b64url_decode(jws["payload"], "payload", 10**7))
    doc["ping"]["samples"][1]["rtt_ms"] = 1.0
    path.write_text(json.dumps(doc))
    report = asyncio.run(_deliver(spool, collector.url, token, spool.cfg))
    assert report.delivered == [first, last]
    store = collector.open_store()
    try:
        links = store.chain_links("p1", None, None)
    finally:
        store.close()
    assert [(link.seq, link.signed) for link in links] == [(1, True), (2, False)]
    assert [(b.kind, b.result_id) for b in undocumented(chain_breaks(links))] == \
        [("downgrade", last)]
