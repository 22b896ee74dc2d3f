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

from agent.delivery import Spool
from agent.schema import format_utc
from collector.cli import main
from collector.compliance.completeness import MAX_HOLE, completeness
from collector.testing import RunningCollector
from tests.agent.test_delivery import CFG, NOW, _deliver
from tests.factories import session
from tests.httpclient import request


def test_holes_are_missing_unless_a_gap_record_names_them() -> None:
    rows = [("p1", 1, "2026-11-21T10:00:00Z"), ("p1", 2, "2026-11-21T11:00:00Z"),
            ("p1", 6, "2026-11-22T01:00:00Z"), ("p1", 6, "2026-11-22T01:00:00Z"),
            ("p1", 7, "2026-11-22T02:00:00Z"), ("p2", 10, "2026-11-21T09:00:00Z"),
            ("p2", 10 + MAX_HOLE + 2, "2026-11-22T09:00:00Z")]
    days = completeness(rows, {"p1": [(3, 4)]})
    got = {(d.probe, d.day): (d.delivered, d.expected, d.documented, d.missing,
                              d.discontinuities) for d in days}
    assert got == {
        ("p1", "2026-11-21"): (2, 2, 0, [], 0),
        # 3, 4 dropped by the spool (documented), 5 lost; counted on the day of 6.
        ("p1", "2026-11-22"): (2, 5, 2, [5], 0),
        ("p2", "2026-11-21"): (1, 1, 0, [], 0),
        ("p2", "2026-11-22"): (1, 1, 0, [], 1),  # a counter reset, not a month of holes
    }


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
    assert (day["delivered"], day["expected"], day["documented"], day["missing_seqs"]) == \
        (5, 8, 2, [5])
    out = CliRunner().invoke(main, ["--db", str(collector.db_path), "completeness",
                                    "--format", "csv"]).output
    assert out.splitlines()[1].split(",")[2:] == ["5", "8", "2", "1", "0"]
