"""Goal C8 (reliability.md): per probe per day, delivered / expected, and the missing
sequence numbers apart from those gap records document. The pure rule, then the whole
path: an agent's spool numbers its sessions, drops some under its byte cap (a gap record
names them), loses one more (a file deleted, as a broken SD card would), delivers the rest
to a real collector, and the collector's report shows each kind."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from agent.identity import identity_for
from agent.schema import format_utc
from agent.spool import Spool
from collector.cli.main import main
from collector.compliance.completeness import MAX_HOLE, completeness
from collector.server.testing import RunningCollector
from tests.agent.test_delivery import CFG, NOW, _deliver, _for
from tests.factories import session
from tests.httpclient import request


def test_holes_are_missing_unless_a_gap_record_names_them() -> None:
    """Per probe and day: sequence holes are missing unless a gap record (merged when
    overlapping) documents them; a repeated number is a duplicate; a jump beyond MAX_HOLE is
    a counter reset (a discontinuity), unless a gap record covers it."""
    rows = [("p1", 1, "2026-11-21T10:00:00Z"), ("p1", 2, "2026-11-21T11:00:00Z"),
            ("p1", 7, "2026-11-22T01:00:00Z"), ("p1", 7, "2026-11-22T01:30:00Z"),
            ("p1", 8, "2026-11-22T02:00:00Z"), ("p2", 10, "2026-11-21T09:00:00Z"),
            ("p2", 10 + MAX_HOLE + 2, "2026-11-22T09:00:00Z"),
            ("p3", 5, "2026-11-21T09:00:00Z"), ("p3", 9000, "2026-11-22T09:00:00Z")]
    days = completeness(rows, {"p1": [(3, 4), (4, 5)], "p3": [(6, 8999)]}, {"p1": 0})
    got = {(d.probe, d.day): (d.delivered, d.expected, d.documented, d.missing,
                              d.missing_ranges, d.discontinuities, d.duplicates)
           for d in days}
    assert got == {
        ("p1", "2026-11-21"): (2, 2, 0, 0, [], 0, 0),
        # 3-5 dropped by the spool (documented, overlapping records merged), 6 lost;
        # counted on the day of 7. Two results numbered 7 (a rewound counter): both
        # delivered, one duplicate.
        ("p1", "2026-11-22"): (3, 7, 3, 1, [(6, 6)], 0, 1),
        ("p2", "2026-11-21"): (1, 1, 0, 0, [], 0, 0),
        ("p2", "2026-11-22"): (1, 1, 0, 0, [], 1, 0),  # a counter reset, not holes
        ("p3", "2026-11-21"): (1, 1, 0, 0, [], 0, 0),
        # A long outage the spool documented is documented, not a discontinuity.
        ("p3", "2026-11-22"): (1, 8995, 8994, 0, [], 0, 0),
    }


def test_a_hole_across_the_start_of_the_scope_is_counted() -> None:
    """The highest number before the scope seeds the count: 11-12 missing on the first
    day in scope, whatever the query's start."""
    (day,) = completeness([("p1", 13, "2026-11-22T00:10:00Z")], {}, {"p1": 10})
    assert (day.delivered, day.missing, day.missing_ranges) == (1, 2, [(11, 12)])


def test_spool_numbers_sessions_and_the_collector_reports_what_is_missing(
        collector: RunningCollector, tmp_path: Path) -> None:
    """The spool numbers sessions 1..8; two dropped by the spool are documented by its gap
    record and one lost file is reported missing by the API and the CLI."""
    token = collector.add_probe("p1")
    spool = Spool(tmp_path / "agent", replace(CFG, spool_max_bytes=10**7))
    ids = []
    for i in range(8):
        result = session("p1", started_at=format_utc(NOW - timedelta(minutes=15 * (8 - i))))
        spool.put(result, now=NOW)
        ids.append(result.result_id)
    seqs = [json.loads(p.read_text())["session_seq"] for p in spool.pending()]
    assert seqs == list(range(1, 9))
    # The spool drops two (a gap record names 2 and 3); another file is lost.
    spool._drop("p1", [(e, "spool_full") for e in spool.entries()[1:3]])
    (gap,) = [json.loads(p.read_text()) for p in spool.gaps()]
    assert gap["dropped_seq_ranges"] == [[2, 3]] and gap["dropped"] == 2
    lost = spool.entries()[2].path  # seq 5 (the entries are now 1, 4, 5, 6, 7, 8)
    lost.unlink()
    report = asyncio.run(_deliver(spool, collector.url, token, spool.cfg))
    assert report.error is None and len(report.delivered) == 5
    status, body, _ = request("GET", collector.url + "/api/v1/completeness?probe=p1")
    assert status == 200
    (day,) = body["completeness"]
    # 1, 4, 6, 7, 8 arrived; 2 and 3 the gap record explains; 5 nobody does.
    assert (day["delivered"], day["expected"], day["documented"], day["missing_ranges"]) \
        == (5, 8, 2, [[5, 5]])
    out = CliRunner().invoke(main, ["--db", str(collector.db_path), "completeness",
                                    "--format", "csv"]).output
    assert out.splitlines()[1].split(",")[2:] == ["5", "8", "2", "1", "0", "0"]


def test_numbering_survives_a_full_disk_and_a_lost_counter(tmp_path: Path) -> None:
    """A disk-full drop's gap record carries the number it dropped (no false 'missing');
    a lost counter file restarts after the highest number still known (spool, dead
    letters, gap records), not at 1."""
    spool = Spool(tmp_path, replace(CFG, spool_max_bytes=10**7))
    for i in range(3):
        spool.put(session("p1", started_at=format_utc(NOW - timedelta(minutes=15 * i))),
                  now=NOW)
    spool._drop("p1", [(spool.entries()[0], "disk_full")])  # number 3 (the oldest start)
    (tmp_path / "session_seq").unlink()
    for path in spool.pending():
        path.unlink()  # delivered meanwhile: only the gap record remembers number 3
    spool.put(session("p1", started_at=format_utc(NOW)), now=NOW)
    (path,) = spool.pending()
    assert json.loads(path.read_text())["session_seq"] == 4


# --- one laptop, several probes: each identity numbers its own sessions ------------------


def _put(spool: Spool, probe: str, minutes_ago: int) -> int:
    """Spool a session of ``probe``; its session_seq."""
    path = spool.put(session(probe, started_at=format_utc(NOW - timedelta(
        minutes=minutes_ago))), now=NOW)
    assert path is not None
    seq: int = json.loads(path.read_text())["session_seq"]
    return seq


def _days(collector: RunningCollector, probe: str) -> list[tuple[int, int, int, Any]]:
    status, body, _ = request("GET", collector.url + f"/api/v1/completeness?probe={probe}")
    assert status == 200
    return [(d["delivered"], d["expected"], d["documented"], d["missing_ranges"])
            for d in body["completeness"]]


def test_a_laptop_used_for_a_then_b_then_a_leaves_a_complete(
        collector: RunningCollector, tmp_path: Path) -> None:
    """A, B, A in one state directory: A's sessions are 1 and 2, B's its own 1, and A's
    collector finds none of A's missing."""
    token_a, token_b = collector.add_probe("a"), collector.add_probe("b")
    cfg = replace(CFG, spool_max_bytes=10**7)
    spool_a = Spool(tmp_path / "agent", cfg, _for(collector, token_a))
    spool_b = Spool(tmp_path / "agent", cfg, _for(collector, token_b))
    assert [_put(spool_a, "a", 45), _put(spool_b, "b", 30), _put(spool_a, "a", 15)] == \
        [1, 1, 2]
    for spool, token, sent in ((spool_a, token_a, 2), (spool_b, token_b, 1)):
        report = asyncio.run(_deliver(spool, collector.url, token, cfg))
        assert (report.error, len(report.delivered)) == (None, sent)
    assert _days(collector, "a") == [(2, 2, 0, [])]
    assert _days(collector, "b") == [(1, 1, 0, [])]


def test_gap_records_name_their_own_identitys_numbers(collector: RunningCollector,
                                                     tmp_path: Path) -> None:
    """A and B take turns (A1 B1 A2 B2 A3 B3); the spool drops A2 and B2: A's gap record
    names A's 2 and B's names B's 2, so each collector report is complete but for one
    documented session."""
    token_a, token_b = collector.add_probe("a"), collector.add_probe("b")
    cfg = replace(CFG, spool_max_bytes=10**7)
    spools = {"a": Spool(tmp_path / "agent", cfg, _for(collector, token_a)),
              "b": Spool(tmp_path / "agent", cfg, _for(collector, token_b))}
    seqs = [_put(spools[p], p, 60 - 5 * i) for i, p in enumerate("ababab")]
    assert seqs == [1, 1, 2, 2, 3, 3]
    spools["b"]._drop("b", [(e, "spool_full") for e in spools["b"].entries()[2:4]])
    ranges = {Spool.identity_of(p): json.loads(p.read_text())["dropped_seq_ranges"]
              for p in spools["a"].gaps()}
    assert ranges == {spools["a"].identity: [[2, 2]], spools["b"].identity: [[2, 2]]}
    for probe, token in (("a", token_a), ("b", token_b)):
        report = asyncio.run(_deliver(spools[probe], collector.url, token, cfg))
        assert (report.error, report.gaps_sent, len(report.delivered)) == (None, 1, 2)
        assert _days(collector, probe) == [(2, 3, 1, [])]


def test_each_identity_continues_the_counter_of_before(tmp_path: Path) -> None:
    """Upgraded from one counter (41 sessions): each identity goes on from 42, the old
    counter stays as it was; a lost counter restarts after that identity's own highest
    number still here, not after another's."""
    (tmp_path / "session_seq").write_text("41")
    cfg = replace(CFG, spool_max_bytes=10**7)
    spool_a = Spool(tmp_path, cfg, identity_for("https://c.example", "token-a"))
    spool_b = Spool(tmp_path, cfg, identity_for("https://c.example", "token-b"))
    assert [_put(spool_a, "a", 50), _put(spool_b, "b", 40), _put(spool_a, "a", 30),
            _put(spool_b, "b", 20), _put(spool_b, "b", 10)] == [42, 42, 43, 43, 44]
    assert (tmp_path / "session_seq").read_text() == "41"
    assert spool_a._seq_path() != spool_b._seq_path()
    spool_a._seq_path().unlink()
    assert _put(spool_a, "a", 5) == 44  # after a's 43 (b's 44 is b's)
