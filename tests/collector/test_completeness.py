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

from click.testing import CliRunner

from agent.schema import format_utc
from agent.spool import Spool
from collector.cli import main
from collector.compliance.completeness import MAX_HOLE, completeness
from collector.testing import RunningCollector
from tests.agent.test_delivery import CFG, NOW, _deliver
from tests.factories import session
from tests.httpclient import request


def test_holes_are_missing_unless_a_gap_record_names_them() -> None:
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
