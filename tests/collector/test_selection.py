"""Exact order statistics by selection (collector/compliance/selection.py) against
``sorted``, and the store's paged, selecting read of a scope against the list path it
replaces: the same figures to the last digit on both backends."""

from __future__ import annotations

import json
import math
import random
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import fields, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.stats import Moments
from collector.compliance import rollup, selection, targets, uncertainty
from collector.compliance.evaluate import Observations, evaluate
from collector.compliance.rollup import (
    DayRollup,
    ExactSum,
    GrandMoments,
    SessionRow,
    TransferRow,
    pack_speeds,
)
from collector.compliance.speeds import SpeedList, StoredSpeeds
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.reports import service
from collector.scope import Scope
from collector.storage.sql import reports
from collector.storage.sql.base import Tx
from collector.storage.sql.facts import DAY_COLUMNS, day_rollup
from collector.storage.store import Store
from tests.factories import attempt, session, store_result

TABLE = targets.load("")

speeds = st.lists(
    st.one_of(st.floats(min_value=0.0, max_value=1e7, allow_nan=False),
              st.sampled_from([0.0, 1.0, 50_000.0, 50_000.000000000015, 2.5e-310])),
    min_size=1, max_size=400)


def _chunks(values: Sequence[float], size: int) -> selection.Chunks:
    """The values in chunks of ``size``, alternately packed bytes and arrays."""
    def chunks() -> Iterator[selection.Chunk]:
        for i, start in enumerate(range(0, len(values), size)):
            part = values[start:start + size]
            yield pack_speeds(part) if i % 2 else np.array(part, dtype=np.float64)
    return chunks


def _same_bits(a: float, b: float) -> bool:
    return struct.pack("<d", a) == struct.pack("<d", b)


@settings(max_examples=300, deadline=None)
@given(speeds, st.data())
def test_selection_equals_sorted(values: list[float], data: st.DataObject) -> None:
    """Any ranks of any non-negative values, however chunked and however small the cap
    (which forces the refining passes down to single bit patterns): sorted()'s values,
    bit for bit."""
    n = len(values)
    ranks = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=8))
    size = data.draw(st.integers(1, 50))
    cap = data.draw(st.sampled_from([1, 2, 7, 64, selection.CAP]))
    hold = data.draw(st.sampled_from([0, 100, selection.HOLD]))  # 0: always the passes
    got = selection.select(_chunks(values, size), ranks, cap=cap, hold=hold)
    ordered = sorted(values)
    assert got.n == n
    assert set(got.ranked) == set(ranks)
    for r in ranks:
        assert _same_bits(got.ranked[r], ordered[r]), (r, got.ranked[r], ordered[r])


def test_ties_across_bucket_edges() -> None:
    """Values one bit pattern either side of pass-1 bucket edges, each repeated: every
    rank is sorted()'s."""
    shift = 63 - selection.TOP_BITS
    keys = [(b << shift) + d for b in (0x40E86, 0x40E87, 0x40E88) for d in (-1, 0, 1)]
    values = [struct.unpack("<d", struct.pack("<Q", k))[0] for k in keys] * 3
    random.Random(7).shuffle(values)
    ordered = sorted(values)
    for cap in (1, 3, selection.CAP):
        got = selection.select(_chunks(values, 4), range(len(values)), cap=cap, hold=0)
        assert [got.ranked[r] for r in range(len(values))] == ordered


def test_all_equal_many_chunks_and_single_value() -> None:
    """A million equal values in a thousand chunks with a cap of ten: resolved without
    keeping them (one bit pattern); one value alone; zeros, -0.0 among them."""
    many = np.full(1000, 12_345.678)
    got = selection.select(lambda: (many for _ in range(1000)), [0, 499_999, 999_999],
                           cap=10, hold=0)
    assert got.n == 1_000_000
    assert set(got.ranked.values()) == {12_345.678}
    assert selection.select(lambda: [pack_speeds([3.5])], [0]).ranked == {0: 3.5}
    zeros = [0.0, -0.0, 0.0, 1.0, -0.0]
    got = selection.select(_chunks(zeros, 2), range(5), cap=1, hold=0)
    assert [got.ranked[r] for r in range(5)] == sorted(zeros)  # -0.0 == 0.0


def test_many_chunks_simulate_a_large_scope() -> None:
    """Two million speeds in 20,000 probe-day chunks, with a cap that forces refinement:
    the report's ranks are sorted()'s."""
    rng = np.random.default_rng(5)
    days = [np.round(rng.lognormal(10.5, 0.4, 100), 1) for _ in range(20_000)]
    everything = np.sort(np.concatenate(days))
    n = everything.size
    ranks = uncertainty.needed_ranks(n)
    for hold in (0, selection.HOLD):  # the passes, and held in memory
        got = selection.select(lambda: iter(days), ranks, cap=1000, hold=hold)
        assert got.n == n
        assert got.ranked == {r: float(everything[r]) for r in ranks}


def test_bad_values_and_ranks_are_refused() -> None:
    """NaN or a negative speed, or a rank past the values: a one-line error naming it."""
    with pytest.raises(ValueError, match="got nan"):
        selection.select(lambda: [np.array([1.0, math.nan])], [0])
    with pytest.raises(ValueError, match=r"got -2\.0"):
        selection.select(lambda: [pack_speeds([1.0, -2.0])], [0])
    with pytest.raises(ValueError, match="rank 3 is outside the 3 values"):
        selection.select(lambda: [pack_speeds([1.0, 2.0, 3.0])], [0, 3])


def test_values_that_change_between_passes_are_an_error() -> None:
    """Passes must read the same values (one snapshot): a change is caught, not
    answered."""
    reads = iter([[pack_speeds([1.0, 2.0, 3.0])], [pack_speeds([1.0, 2.0])]])
    with pytest.raises(RuntimeError, match="changed between passes"):
        selection.select(lambda: next(reads), [2], hold=0)


def test_selector_keeps_a_small_scope_in_order() -> None:
    """At most ``keep`` values: one pass, and the values as fed (the list path's order)."""
    sel = selection.Selector(lambda n: [0, n - 1], keep=5)
    for chunk in (pack_speeds([3.0, 1.0]), np.array([2.0, 5.0])):
        sel.feed(chunk)
    assert sel.end_pass()
    assert sel.kept_all and sel.kept() == [3.0, 1.0, 2.0, 5.0]
    assert sel.result().ranked == {0: 1.0, 3: 5.0}


def test_stored_speeds_name_what_was_not_selected() -> None:
    """A rank the store did not select is an error naming it; the plot's stand-ins follow
    the histogram (about ``limit`` of them, each within a 512th of an octave)."""
    got = selection.select(_chunks([float(v) for v in range(1, 1001)], 100), [0, 999])
    stored = StoredSpeeds(got.n, got.ranked, got.histogram.stand_ins)
    assert len(stored) == 1000 and stored.ranked([999]) == {999: 1000.0}
    with pytest.raises(LookupError, match="order statistic 5 of 1000 speeds"):
        stored.ranked([5])
    plot = stored.plot_values(100)
    assert len(plot) == 100
    assert min(plot) > 0.99 and max(plot) < 1000 * 1.002
    assert len(stored.plot_values(10_000)) == 1000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(-1e12, 1e12, allow_nan=False), max_size=30), max_size=12))
def test_exact_sum_equals_fsum_of_everything(pages: list[list[float]]) -> None:
    """Summed page by page, the same float as math.fsum of every term at once."""
    total = ExactSum()
    for page in pages:
        total.add(page)
    assert _same_bits(total.total(), math.fsum(x for page in pages for x in page))


def test_grand_moments_in_pages_equal_the_whole() -> None:
    """The RTT moments of many parts, kept or read twice: ``_grand``'s floats."""
    rng = random.Random(3)
    parts = [(rng.randint(1, 20), rng.uniform(5, 80), rng.uniform(0, 900)) for _ in range(500)]
    want = _grand(parts)
    for keep in (0, 10_000):
        g = GrandMoments(keep)
        for i in range(0, 500, 37):
            g.feed(parts[i:i + 37])
        if not g.end_pass():
            for i in range(0, 500, 91):
                g.feed(parts[i:i + 91])
            assert g.end_pass()
        assert g.result == want


# --- The list path: the reference the store's paged read is held to -------------------
# Before the paged read (rollup.ScopeFold), every row of a scope was read into lists and
# folded once, by these (then in collector/compliance/rollup.py). They stay here, not
# in the collector, as the reference: the same figures, to the last digit.


def _unpack_speeds(blob: bytes) -> list[float]:
    packed = array("d")
    packed.frombytes(blob)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tolist()



def _grand_moments(parts: Iterable[Moments]) -> Moments:
    """The moments of many parts at once: the grand mean, then M2 about it (Chan's
    pairwise formula in closed form), each a correctly rounded sum."""
    return _grand([(m.n, m.mean, m.m2) for m in parts if m.n])


def _grand(rows: list[tuple[int, float, float]]) -> Moments:
    """The moments of many parts at once: the grand mean, then M2 about it."""
    n = sum(r[0] for r in rows)
    if not n:
        return Moments()
    grand = math.fsum(k * mean for k, mean, _ in rows) / n
    m2 = math.fsum(part + k * (mean - grand) * (mean - grand) for k, mean, part in rows)
    return Moments(n, grand, m2)


def _observe_days(obs: Observations, days: Iterable[DayRollup]) -> None:
    """Fold whole-day rollups into ``obs`` (valid sessions only: a rollup holds no
    invalid session's figures)."""
    rows = list(days)
    obs.sessions += sum(d.sessions for d in rows)
    obs.pings_sent += sum(d.pings_sent for d in rows)
    obs.pings_lost += sum(d.pings_lost for d in rows)
    obs.download_attempts += sum(d.download_attempts for d in rows)
    obs.download_failed += sum(d.download_failed for d in rows)
    obs.upload_attempts += sum(d.upload_attempts for d in rows)
    obs.upload_failed += sum(d.upload_failed for d in rows)
    obs.rtt = obs.rtt.merge(_grand_moments(d.rtt for d in rows))
    obs.jitter_sum_ns += sum(d.jitter_sum_ns for d in rows)
    obs.jitter_pairs += sum(d.jitter_pairs for d in rows)
    obs.speed_list("download").extend(_unpack_speeds(b"".join(d.download_kbps for d in rows)))
    obs.speed_list("upload").extend(_unpack_speeds(b"".join(d.upload_kbps for d in rows)))
    for d in rows:
        if d.refused_servers != "{}":
            for server, count in json.loads(d.refused_servers).items():
                obs.add_refused(server, count)
        if d.invalid_sessions:
            obs.invalid_sessions += d.invalid_sessions
            for code, count in json.loads(d.invalid_codes).items():
                obs.invalid_reasons[code] = obs.invalid_reasons.get(code, 0) + count


def _observe_sessions(obs: Observations, sessions: Iterable[SessionRow],
                     transfers: Iterable[TransferRow]) -> None:
    """Fold session rows into ``obs``: invalid sessions are counted by reason, and join
    the figures only when ``obs.invalid_included``. (Tight loops over tuples: this is
    the path of a scope read without the day rollup, millions of rows.)"""
    included = obs.invalid_included
    reasons = obs.invalid_reasons
    counted: list[tuple[int, float, float]] = []
    sessions_n = sent_n = lost_n = invalid_n = 0
    for sent, lost, n, mean, m2, valid, codes in sessions:
        if not valid:
            invalid_n += 1
            for code in set(codes.split()):
                reasons[code] = reasons.get(code, 0) + 1
            if not included:
                continue
        sessions_n += 1
        sent_n += sent
        lost_n += lost
        if n:
            counted.append((n, mean, m2))
    obs.sessions += sessions_n
    obs.pings_sent += sent_n
    obs.pings_lost += lost_n
    obs.invalid_sessions += invalid_n
    obs.rtt = obs.rtt.merge(_grand(counted))
    down, up = obs.speed_list("download"), obs.speed_list("upload")
    attempts = {"download": 0, "upload": 0}
    failed = {"download": 0, "upload": 0}
    for direction, ok, kbps, valid in transfers:
        if not (valid or included):
            continue
        attempts[direction] += 1
        if not ok:
            failed[direction] += 1
        elif kbps is not None:
            (down if direction == "download" else up).append(kbps)
    obs.download_attempts += attempts["download"]
    obs.download_failed += failed["download"]
    obs.upload_attempts += attempts["upload"]
    obs.upload_failed += failed["upload"]


# --- The store's read of a scope against the list path --------------------------------


def _campaign() -> list:  # type: ignore[type-arg]
    """Four probes over three days, every three hours: speeds with ties across probes,
    failed attempts, invalid sessions, both IP families, a session without pings."""
    rng = random.Random(11)
    out = []
    for probe in ("p1", "p2", "p3", "p4"):
        for day in ("01", "02", "03"):
            for hour in range(0, 24, 3):
                k = len(out)
                speeds_ = [rng.choice([40e6, 55.5e6, rng.uniform(1e6, 90e6)]) for _ in range(3)]
                transfers = [attempt("download", bps=speeds_[0]),
                             attempt("download", 0, 2, bps=speeds_[1], ok=k % 7 != 0),
                             attempt("upload", bps=speeds_[2] / 5)]
                result = session(
                    probe, started_at=f"2026-03-{day}T{hour:02d}:00:00.000000Z",
                    rtts=[] if k % 11 == 0 else [rng.uniform(8, 60) for _ in range(4)],
                    transfers=transfers, invalid=["wifi"] if k % 9 == 4 else [])
                out.append(replace(result, address_family="ipv6" if k % 5 == 0 else "ipv4",
                                   address_family_requested="both"))
    return out


@pytest.fixture
def filled(store: Store) -> Store:
    for name in ("p1", "p2", "p3", "p4"):
        register_probe(store, name, LineMetadata())
    for result in _campaign():
        store_result(store, result)
    store.add_browser_result("2026-03-02T11:00:00.000000Z", "203.0.113.7", json.dumps(
        {"download_bps": 40e6, "upload_bps": 5e6, "rtts_ms": [9.0]}))
    return store


def _old_observations(store, probes, since, until, include_invalid=False,  # type: ignore[no-untyped-def]
                      family=None) -> Observations:
    """The store's read as it was before the paged path: every row in lists, one query
    each, _observe_days / _observe_sessions (the list path)."""
    obs = Observations(invalid_included=include_invalid)
    days = None if include_invalid or family else rollup.whole_days(since, until)
    with store._reading() as tx:
        def sessions(lo, hi, fam=None):  # type: ignore[no-untyped-def]
            where, params = store._scope(probes, lo, hi, family=fam)
            t_where, t_params = store._scope(probes, lo, hi, family=fam,
                                             table="transfer_facts")
            _observe_sessions(obs, tx.rows(
                "SELECT pings_sent, pings_lost, rtt_n, rtt_mean_ms, rtt_m2, valid, "
                f"invalid_codes FROM session_facts WHERE {where} "
                "ORDER BY probe_name, started_at, result_id", params), tx.rows(
                f"SELECT direction, ok, kbps, valid FROM transfer_facts WHERE {t_where} "
                "ORDER BY probe_name, started_at, result_id, seq", t_params))
            store._session_sums(tx, obs, probes, lo, hi, fam)

        if days is None:
            sessions(since, until, family)
            return obs
        lo, hi = days
        where, params = store._scope(probes, lo and lo[:10], hi and hi[:10], column="day")
        _observe_days(obs, [day_rollup(r) for r in tx.rows(
            f"SELECT {', '.join(DAY_COLUMNS)} FROM day_facts WHERE {where} "
            "ORDER BY probe_name, day", params)])
        if since is not None and lo is not None and since < lo:
            sessions(since, lo)
        if until is not None and hi is not None and hi < until:
            sessions(hi, until)
    return obs


def _assert_identical(new: Observations, old: Observations, selected: bool) -> None:
    for f in fields(Observations):
        if f.name not in ("download_kbps", "upload_kbps"):
            assert getattr(new, f.name) == getattr(old, f.name), f.name
    assert _same_bits(new.rtt.mean, old.rtt.mean) and _same_bits(new.rtt.m2, old.rtt.m2)
    for direction in ("download", "upload"):
        got = getattr(new, f"{direction}_kbps")
        want = getattr(old, f"{direction}_kbps")
        assert isinstance(got, StoredSpeeds if selected and want else SpeedList)
        if not selected:
            assert got == want  # the very list, in the same order
        ordered = sorted(want)
        ranks = uncertainty.needed_ranks(len(want))
        assert len(got) == len(want) and got.ranked(ranks) == {r: ordered[r] for r in ranks}
    assert evaluate(new, TABLE) == evaluate(old, TABLE)


SCOPES = [
    (None, None, None),                                                  # whole days, open
    (None, "2026-03-02T00:00:00.000000Z", "2026-03-04T00:00:00.000000Z"),  # whole days
    (None, "2026-03-01T13:30:00.000000Z", "2026-03-03T07:00:00.000000Z"),  # partial ends
    (("p2", "p4"), "2026-03-02T04:00:00.000000Z", None),                 # partial, named
    (None, "2026-03-02T03:00:00.000000Z", "2026-03-02T17:00:00.000000Z"),  # inside a day
]


@pytest.fixture(params=["in-memory", "held", "passes"])
def selected(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """In memory: a small scope's lists. Held: the speeds selected in memory after one
    read. Passes: every threshold lowered so that every scope is read again (RTT parts
    too), in pages of one probe, with refining passes."""
    if request.param != "in-memory":
        monkeypatch.setattr(rollup, "IN_MEMORY", 0)
    if request.param == "passes":
        monkeypatch.setattr(rollup, "PARTS_IN_MEMORY", 0)
        monkeypatch.setattr(selection, "HOLD", 0)
        monkeypatch.setattr(selection, "CAP", 2)
        monkeypatch.setattr(reports, "PROBES_PER_PAGE", 1)
    return request.param != "in-memory"


@pytest.mark.parametrize(("probes", "since", "until"), SCOPES)
def test_store_read_equals_the_list_path(filled: Store, selected: bool,
                                         probes: tuple[str, ...] | None, since: str | None,
                                         until: str | None) -> None:
    """Whole days, partial days, named probes, with and without invalid sessions, and
    one family: every figure and the report identical to the list path's."""
    names = list(probes) if probes is not None else None
    for include_invalid in (False, True):
        _assert_identical(filled.observations(names, since, until, include_invalid),
                          _old_observations(filled, names, since, until, include_invalid),
                          selected)
    for family in ("ipv4", "ipv6"):
        _assert_identical(filled.observations(names, since, until, family=family),
                          _old_observations(filled, names, since, until, family=family),
                          selected)


def test_customer_speeds_join_before_selection(filled: Store, selected: bool) -> None:
    """Customers' included speeds are among the selected ones (the list path appended
    them after the store's read): the same figures."""
    where = Scope(None, "2026-03-02T00:00:00.000000Z", "2026-03-03T00:00:00.000000Z")
    customers = service.Customers(include=True)
    new = service.observations(filled, where, customers=customers)
    old = _old_observations(filled, None, where.since, where.until)
    old.customer_included = True
    for kind, direction, kbps in filled.customer_speeds(where.since, where.until):
        old.add_customer(kind, direction, kbps)
    assert new.customer_tests == {"browser": 2}  # its download and its upload
    assert 40_000.0 in old.download_kbps  # the customer's speed is among them
    _assert_identical(new, old, selected)


def test_later_reads_leave_the_speed_blobs_no_selection_wants(
        filled: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The speeds kept after one read (a small scope), the RTT parts too many to keep:
    the second read of the day rows takes their RTT parts, not their speed blobs (most
    of a row's bytes), and the figures are the list path's all the same."""
    monkeypatch.setattr(rollup, "PARTS_IN_MEMORY", 0)
    seen: list[str] = []
    real = Tx.rows

    def rows(self: Tx, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        if "FROM day_facts" in sql:
            seen.append(sql)
        return real(self, sql, params)

    monkeypatch.setattr(Tx, "rows", rows)
    since, until = "2026-03-02T00:00:00.000000Z", "2026-03-04T00:00:00.000000Z"
    got = filled.observations(None, since, until)
    assert ["download_kbps" in sql for sql in seen] == [True, False]
    _assert_identical(got, _old_observations(filled, None, since, until), selected=False)
