"""Goal C8 (reliability.md): per probe per day, delivered / expected, and the missing
sequence numbers apart from those gap records document. The pure rule, then the whole
path: an agent's spool numbers its sessions, drops some under its byte cap (a gap record
names them), loses one more (a file deleted, as a broken SD card would), delivers the rest
to a real collector, and the collector's report shows each kind."""

from __future__ import annotations

import asyncio
import json
from contextlib import closing
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.evidence import Link, open_result, sign_result
from agent.identity import identity_for
from agent.schema import format_utc
from agent.spool import Spool
from collector.cli.main import main
from collector.compliance.completeness import (
    MAX_HOLE,
    chain_summaries,
    completeness,
    format_text,
)
from collector.intake import ingest
from collector.lines import LineMetadata
from collector.reports import service
from collector.scope import resolve_scope
from collector.server.testing import RunningCollector
from collector.storage.model import ResultSignature
from collector.storage.store import Store
from tests.agent.test_delivery import CFG, NOW, _deliver, _for
from tests.factories import canonical_json, insert_result, session
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
    assert body["chains"] == []  # nothing signed: no chain to total
    out = CliRunner().invoke(main, ["--db", str(collector.db_path), "completeness",
                                    "--format", "csv"]).output
    assert out.splitlines()[0].split(",")[-2:] == ["signed", "chain_breaks"]
    assert out.splitlines()[1].split(",")[2:] == ["5", "8", "2", "1", "0", "0", "0", "0"]


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


# --- signed results: the hash chain in the report (issue 27) ----------------------------


def _links(*specs: tuple[int, str | None, bool]) -> list[Link]:
    """Links r<seq> with sha "h<seq>" (padded), naming ``prev`` ("h<n>" or None)."""
    def sha(name: str) -> str:
        return name.ljust(64, "0")

    return [Link(seq, f"r{seq}", sha(f"h{seq}"), None if prev is None else sha(prev),
                 signed) for seq, prev, signed in specs]


def test_chain_breaks_are_listed_on_the_day_they_show() -> None:
    """Signed results counted per day; a replaced link (seq 3 names another hash), a
    stripped signature (4, unsigned after a signed one) and an unexplained hole (5)
    listed by seq and result id on their day; a hole a gap record documents (7) is no
    break, nor is a restarted chain (9: the probe's own signed word, shown in bundles);
    text says "chain: N signed of M; breaks: ..." per probe, JSON per day. A probe that
    signed nothing has no chain line (its repeated number is a duplicate, not a
    break)."""
    rows = [("p1", 1, "2026-11-21T10:00:00Z"), ("p1", 2, "2026-11-21T11:00:00Z"),
            ("p1", 3, "2026-11-21T12:00:00Z"), ("p1", 4, "2026-11-22T01:00:00Z"),
            ("p1", 6, "2026-11-22T02:00:00Z"), ("p1", 8, "2026-11-22T03:00:00Z"),
            ("p1", 9, "2026-11-22T04:00:00Z"),
            ("p2", 1, "2026-11-21T10:00:00Z"), ("p2", 1, "2026-11-21T10:30:00Z")]
    links = {"p1": _links((1, None, True), (2, "h1", True), (3, "hX", True),
                          (4, "h3", False), (6, "h5", True), (8, "h7", True),
                          (9, None, True)),
             "p2": _links((1, None, False), (1, None, False))}
    days = completeness(rows, {"p1": [(7, 7)]}, {}, links)
    got = {(d.probe, d.day): (d.delivered, d.signed, d.broken,
                              [(b.kind, b.seq, b.result_id) for b in d.breaks])
           for d in days}
    assert got == {
        ("p1", "2026-11-21"): (3, 3, 1, [("mismatch", 3, "r3")]),
        ("p1", "2026-11-22"): (4, 3, 2, [("downgrade", 4, "r4"), ("missing", 6, "r6")]),
        ("p2", "2026-11-21"): (2, 0, 0, []),
    }
    day = days[1].to_dict()
    assert day["chain"] == {"signed": 3, "breaks": 2, "listed": [
        {"kind": "downgrade", "seq": 4, "result_id": "r4",
         "detail": days[1].breaks[0].detail},
        {"kind": "missing", "seq": 6, "result_id": "r6", "detail": days[1].breaks[1].detail}]}
    assert "session_seq 5 absent" in days[1].breaks[1].detail
    assert chain_summaries(days) == [{"probe": "p1", "signed": 6, "delivered": 7,
                                      "breaks": 3, "listed": [
                                          *days[0].to_dict()["chain"]["listed"],
                                          *day["chain"]["listed"]]}]
    text = format_text(days)
    (line,) = [t for t in text.splitlines() if "chain:" in t]
    assert line.startswith("p1 chain: 6 signed of 7; breaks: 3 (mismatch at seq 3 (r3): ")
    assert "missing at seq 6 (r6)" in line and "downgrade at seq 4 (r4)" in line
    assert "restart" not in line
    # Without links (or all unsigned): the report as before.
    assert all(d.signed == d.broken == 0 for d in completeness(rows, {}, {}))
    assert "chain" not in format_text(completeness(rows, {}, {}))


def test_a_whole_chain_says_no_breaks() -> None:
    rows = [("p1", 1, "2026-11-21T10:00:00Z"), ("p1", 2, "2026-11-21T11:00:00Z")]
    days = completeness(rows, {}, {}, {"p1": _links((1, None, True), (2, "h1", True))})
    assert format_text(days).splitlines()[-1] == "p1 chain: 2 signed of 2; no breaks"


def _stored_chain(store: Store) -> list[str]:
    """Five results of p1 signed in a chain, seq 4 naming a hash that is not seq 3's,
    seq 2 deleted by an operator; their ids."""
    key = Ed25519PrivateKey.generate()
    prev: str | None = None
    ids = []
    for seq in range(1, 6):
        result = replace(session("p1", started_at=f"2026-11-21T0{seq}:00:00.000000Z"),
                         session_seq=seq)
        accepted = ingest.parse_body(canonical_json(result).encode())
        # Seq 4 names a hash that is not seq 3's (seq 3 was replaced after signing).
        named = "f" * 64 if seq == 4 else prev
        jws = sign_result(key, accepted.body.encode(), named)
        opened = open_result(jws)
        insert_result(store, result_id=result.result_id, probe_name="p1",
                      schema_version=result.schema_version, started_at=accepted.started_at,
                      ended_at=accepted.ended_at, received_at="2026-11-22T00:00:00.000000Z",
                      body=accepted.body, body_sha256=accepted.body_sha256,
                      facts=accepted.facts, session_seq=seq, packed=accepted.packed,
                      signature=ResultSignature(opened.kid, jws["protected"],
                                                jws["signature"], opened.prev, None,
                                                "verified"))
        prev = accepted.body_sha256
        ids.append(result.result_id)
    assert store.delete_result(ids[1], "poisoned", "2026-11-23T00:00:00.000000Z", "ops")
    return ids


def test_the_stores_chain_in_the_completeness_report(store: Store) -> None:
    """On each backend: a signed chain stored, one result swapped for another signed
    over a different predecessor, one deleted by an operator: the report names the
    swapped one by seq and id, and the deletion is documented, not a break."""
    store.add_probe("p1", "d", "2026-11-01T00:00:00.000000Z", LineMetadata())
    ids = _stored_chain(store)
    (day,) = service.completeness(store, resolve_scope(["p1"], "2026-11-21", "2026-11-22"))
    assert (day.delivered, day.documented, day.missing, day.signed, day.broken) == \
        (4, 1, 0, 4, 1)
    (broken,) = day.breaks
    assert (broken.kind, broken.seq, broken.result_id) == ("mismatch", 4, ids[3])
    assert f"mismatch at seq 4 ({ids[3]})" in format_text([day])


def test_chain_totals_in_the_api_json_the_cli_json_and_csv(
        collector: RunningCollector) -> None:
    """The per-probe chain totals ("chains") beside the days in the route's and the
    CLI's JSON; the day's signed count and breaks as CSV columns."""
    collector.add_probe("p1")
    with closing(collector.open_store()) as store:
        ids = _stored_chain(store)
    query = "?probe=p1&since=2026-11-21&until=2026-11-22"
    status, body, _ = request("GET", collector.url + "/api/v1/completeness" + query)
    assert status == 200
    (chain,) = body["chains"]
    assert {k: chain[k] for k in ("probe", "signed", "delivered", "breaks")} == \
        {"probe": "p1", "signed": 4, "delivered": 4, "breaks": 1}
    assert [(b["kind"], b["seq"], b["result_id"]) for b in chain["listed"]] == \
        [("mismatch", 4, ids[3])]
    args = ["--db", str(collector.db_path), "completeness", "--probe", "p1", "--since",
            "2026-11-21", "--until", "2026-11-22", "--format"]
    out = CliRunner().invoke(main, [*args, "json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["chains"] == body["chains"]
    out = CliRunner().invoke(main, [*args, "csv"])
    head, row = out.stdout.splitlines()
    assert dict(zip(head.split(","), row.split(","), strict=True))["signed"] == "4"
    assert row.split(",")[-2:] == ["4", "1"]
