"""Packed result bodies: they lose nothing, the C decoder agrees with the schema's own, a
result resent across the upgrade stays a duplicate, and concurrent deliveries share
transactions without sharing failures.

The documents are real: the agent measures a session against a collector on 127.0.0.1
(``bbprobe run --no-push --json``), and the older schema versions are that document with
the fields of later versions taken out, as an older agent wrote them.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import re
import sqlite3
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.decoding import SchemaError, parse_result
from agent.schema import SCHEMA_VERSION, to_dict
from collector.decode import fast_result
from collector.errors import ApiError
from collector.intake import ingest
from collector.intake.commit import GroupCommit
from collector.lines import LineMetadata
from collector.server.testing import running_collector
from collector.storage import codec
from collector.storage.model import NewResult
from collector.storage.sql.sqlite import SqliteStore
from collector.storage.store import Store
from tests.conftest import FAST_AGENT
from tests.httpclient import request

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def agent_document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One session measured by the current agent on loopback (two streams a direction)."""
    tmp = tmp_path_factory.mktemp("agent")
    config = tmp / "agent.toml"
    config.write_text(FAST_AGENT.format(state=tmp / "state"))
    with running_collector(tmp / "collector") as running:
        token = running.add_probe("probe-1")
        done = subprocess.run(
            [sys.executable, "-m", "agent", "run", "--collector", running.url, "--token",
             token, "--probe-id", "probe-1", "--config", str(config), "--no-push", "--json",
             "--quiet"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    doc: dict[str, Any] = json.loads(done.stdout)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert sum(len(s) for t in doc["transfers"] for s in t["stream_samples"]) > 20
    return doc


def _older(doc: dict[str, Any], version: int) -> dict[str, Any]:
    """``doc`` as an agent of schema ``version`` wrote it (agent/schema.py's history)."""
    old = copy.deepcopy(doc)
    old["schema_version"] = version
    if version < 6:
        for key in ("address_family", "address_family_requested", "local_addresses",
                    "remote_addresses"):
            old.pop(key, None)
    if version < 4:
        old.pop("session_seq", None)
    if version < 3:
        for key in ("validity", "clock", "context"):
            old.pop(key, None)
    if version < 2:
        for key in ("ping_download", "ping_upload"):
            old.pop(key, None)
        for key in ("rtt_download_mean_ms", "rtt_upload_mean_ms"):
            old["summary"].pop(key, None)
        if old["method"]["ping"] is not None:
            old["method"]["ping"].pop("loaded_interval_s", None)
        for direction in ("download", "upload"):
            old["method"][direction]["streams"] = max(1, old["method"][direction]["streams"])
    return old


def _full_precision(doc: dict[str, Any]) -> dict[str, Any]:
    """Sample times as agents before packed bodies kept them: every bit of the double."""
    old = copy.deepcopy(doc)
    for transfer in old["transfers"]:
        transfer["stream_samples"] = [[[t + 1.2345678901e-9 if t else t, b] for t, b in s]
                                      for s in transfer["stream_samples"]]
    return old


def _variants(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for version in range(1, SCHEMA_VERSION + 1):
        yield f"v{version}", _older(doc, version)
    yield "full-precision times", _full_precision(doc)
    edge = copy.deepcopy(doc)
    edge["transfers"][0]["stream_samples"] = [[], [[-0.0, 0], [0.5, 10], [1, 20]],
                                              [[1e-7, 1], [999999.000001, 10**15]]]
    yield "empty stream, -0.0, integer time, extremes", edge
    bare = copy.deepcopy(doc)
    bare["transfers"] = []
    yield "no transfers", bare


def test_packed_bodies_are_lossless_for_every_version(agent_document: dict[str, Any]) -> None:
    """unpack(pack(r)) is the canonical JSON, byte for byte, for real documents of every
    schema version and for the edge cases of the columns."""
    for name, doc in _variants(agent_document):
        result = parse_result(doc)
        canonical = codec.canonical(result)
        packed = codec.pack(result)
        assert codec.unpack(packed) == canonical, name
        assert parse_result(orjson.loads(codec.unpack(packed))) == result, name
        # Packed again from its canonical text: the same bytes.
        assert codec.pack(parse_result(orjson.loads(canonical))) == packed, name
        # Fields a later version added are left out of an older document, as before.
        assert (b'"session_seq"' in canonical) == (doc.get("session_seq") is not None), name
        assert (b'"address_family"' in canonical) == ("address_family" in doc), name
    samples = sum(len(s) for t in agent_document["transfers"] for s in t["stream_samples"])
    canonical = codec.canonical(parse_result(agent_document))
    packed = codec.pack(parse_result(agent_document))
    # Even this short session (a few dozen samples; a 20-stream one has thousands, and
    # packs to a sixth) takes well under half its JSON.
    assert len(packed) < len(canonical) / 2, (len(packed), len(canonical), samples)


def test_a_damaged_packed_body_is_an_error(agent_document: dict[str, Any]) -> None:
    """A packed body with a wrong header, a flipped byte, or a zstd frame declaring a terabyte
    is a CodecError, the last before anything is allocated."""
    packed = bytearray(codec.pack(parse_result(agent_document)))
    with pytest.raises(codec.CodecError, match="not a packed result body"):
        codec.unpack(b"{}" + bytes(packed))
    packed[len(packed) // 2] ^= 0x55
    with pytest.raises(codec.CodecError, match="corrupt"):
        codec.unpack(bytes(packed))
    # A header that declares a terabyte is refused before anything is allocated.
    liar = (codec.MAGIC + struct.pack("<IB", 0xFD2FB528, 0xE0)
            + (2**40).to_bytes(8, "little") + (1 | 2 << 3).to_bytes(3, "little") + b"{}")
    with pytest.raises(codec.CodecError, match="declares 1099511627776 bytes"):
        codec.unpack(liar)


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Paths to every field and the first items of every array (not each sample)."""
    if isinstance(value, dict):
        yield path
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        yield path
        for index, item in enumerate(value[:2]):
            yield from _leaves(item, (*path, index))
    else:
        yield path


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    out = copy.deepcopy(doc)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


MUTATIONS: tuple[Any, ...] = (None, "x", -1, 0, 1.5, 10**20, -1e300, True, [], {}, [1, 2],
                              "2026-13-01T00:00:00Z", str(uuid.uuid4()))


@pytest.mark.slow
def test_the_c_decoder_agrees_with_the_schema(agent_document: dict[str, Any]) -> None:
    """For every field of real documents, each mutation is accepted by both decoders
    with the same result, or refused by both: the fast path never lets through what the
    schema refuses, nor refuses what it accepts (the caller then asks the schema, which
    names the field)."""
    checked = 0
    for name, doc in list(_variants(agent_document))[: SCHEMA_VERSION + 1]:
        for path in _leaves(doc):
            if not path:
                continue
            mutated_docs = [_set(doc, path, m) for m in MUTATIONS]
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            if isinstance(parent, dict):
                removed = copy.deepcopy(doc)
                target = removed
                for key in path[:-1]:
                    target = target[key]
                del target[path[-1]]
                mutated_docs.append(removed)
                mutated_docs.append(_set(doc, (*path[:-1], "unknown_field"), 1))
            for mutated in mutated_docs:
                try:
                    slow: Any = parse_result(mutated)
                except SchemaError:
                    slow = None
                fast = fast_result(json.dumps(mutated).encode())
                assert fast == slow, (name, path, mutated if len(str(mutated)) < 300 else "")
                checked += 1
    assert checked > 1000


def test_refusals_still_name_the_field(agent_document: dict[str, Any]) -> None:
    """What the fast path refuses gets the schema's own message (422 naming the field)."""
    doc = _set(agent_document, ("transfers", 0, "stream_samples", 0, 1, 1), -5)
    with pytest.raises(ApiError) as caught:
        ingest.parse_body(orjson.dumps(doc))
    assert caught.value.status == 422
    assert caught.value.message == "transfers[0].stream_samples[0][1][1]: must be >= 0, got -5"
    doc = _set(agent_document, ("duration_s",), 10**400)
    with pytest.raises(ApiError) as caught:
        ingest.parse_body(json.dumps(doc).encode())
    assert (caught.value.status, caught.value.field) == (422, "duration_s")


def _old_canonical(doc: dict[str, Any]) -> str:
    """How releases before packed bodies canonicalised (sorted keys, the json module)."""
    return json.dumps(to_dict(parse_result(doc)), sort_keys=True, separators=(",", ":"),
                      allow_nan=False)


def test_a_result_resent_across_the_upgrade_is_a_duplicate(
        tmp_path: Path, agent_document: dict[str, Any]) -> None:
    """A row stored by an older release (other canonical bytes, other hash, a text body)
    and the same result delivered again: 200 duplicate, not 409; other content: 409. The
    old row reads back as it was stored."""
    doc = {**agent_document, "result_id": str(uuid.uuid4())}
    with running_collector(tmp_path) as running:
        token = running.add_probe("probe-1")
        old = _old_canonical(doc)
        accepted = ingest.parse_body(old.encode())
        assert accepted.body != old  # the two canonical forms differ...
        store = running.open_store()
        try:
            assert store.insert_results([NewResult(
                result_id=doc["result_id"], probe_name="probe-1",
                schema_version=doc["schema_version"], started_at=accepted.started_at,
                ended_at=accepted.ended_at, received_at="2026-11-30T00:00:00.000000Z",
                body=old, body_sha256=hashlib.sha256(old.encode()).hexdigest(),
                facts=accepted.facts)]) == ["stored"]
        finally:
            store.close()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        url = running.url + "/api/v1/results"
        status, reply, _ = request("POST", url, orjson.dumps(doc), headers)
        assert (status, reply["duplicate"]) == (200, True)  # ...the content is the same
        other = {**doc, "duration_s": doc["duration_s"] + 1}
        status, reply, _ = request("POST", url, orjson.dumps(other), headers)
        assert status == 409, reply
        status, body, _ = request("GET", f"{url}/{doc['result_id']}")
        assert status == 200 and body == json.loads(old)


def test_posted_documents_read_back_as_canonical(tmp_path: Path,
                                                 agent_document: dict[str, Any]) -> None:
    """Through HTTP and the store: each version's document comes back equal to what was
    posted, after canonicalisation, and the store keeps it packed."""
    with running_collector(tmp_path) as running:
        token = running.add_probe("probe-1")
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        url = running.url + "/api/v1/results"
        for name, variant in _variants(agent_document):
            doc = {**variant, "result_id": str(uuid.uuid4())}
            status, reply, _ = request("POST", url, json.dumps(doc).encode(), headers)
            assert status == 201, (name, reply)
            status, raw, _ = request("GET", f"{url}/{doc['result_id']}", raw=True)
            assert raw == codec.canonical(parse_result(doc)), name
        store = running.open_store()
        try:
            stored = store.results()
        finally:
            store.close()
        with sqlite3.connect(running.db_path) as db:
            kinds = db.execute("SELECT body = '', body_packed IS NOT NULL FROM results"
                               ).fetchall()
        assert kinds and all(k == (1, 1) for k in kinds), kinds
        assert len(stored) == len(list(_variants(agent_document)))


def _new_result(accepted: ingest.Accepted, probe: str) -> NewResult:
    r = accepted.result
    return NewResult(result_id=r.result_id, probe_name=probe, schema_version=r.schema_version,
                     started_at=accepted.started_at, ended_at=accepted.ended_at,
                     received_at="2026-11-30T00:00:00.000000Z", body=accepted.body,
                     body_sha256=accepted.body_sha256, facts=accepted.facts,
                     packed=accepted.packed)


def test_group_commit_shares_transactions_not_failures(
        store: Store, agent_document: dict[str, Any]) -> None:
    """60 deliveries at once go in fewer transactions than deliveries; one that cannot be
    stored (its probe does not exist: a foreign key) fails alone, and every other is
    stored and answered; on each backend."""
    store.add_probe("probe-1", "a" * 64, "2026-11-30T00:00:00.000000Z", LineMetadata())
    threads = ThreadPoolExecutor(max_workers=1)

    def items(probe: str) -> list[NewResult]:
        doc = {**agent_document, "result_id": str(uuid.uuid4()), "probe_id": probe}
        return [_new_result(ingest.parse_body(orjson.dumps(doc)), probe)]

    async def deliver(deliveries: list[list[NewResult]]) -> tuple[GroupCommit, list[Any]]:
        loop = asyncio.get_running_loop()
        commits = GroupCommit(lambda fn: loop.run_in_executor(threads, fn, store), slots=1)
        answers = await asyncio.gather(*(commits.insert(d) for d in deliveries),
                                       return_exceptions=True)
        await commits.close()
        return commits, answers

    try:
        commits, answers = asyncio.run(deliver([items("probe-1") for _ in range(60)]))
        assert answers == [["stored"]] * 60
        assert commits.results == 60
        assert commits.groups < 60  # shared transactions
        with_ghost = [items("probe-1") for _ in range(20)]
        with_ghost[10] = items("ghost")
        commits, answers = asyncio.run(deliver(with_ghost))
        assert re.search("foreign key", str(answers[10]), re.I), answers[10]
        assert [a for i, a in enumerate(answers) if i != 10] == [["stored"]] * 19
        assert store.count_results() == 79
    finally:
        threads.shutdown()


def test_compact_packs_old_text_bodies(tmp_path: Path, agent_document: dict[str, Any]
                                       ) -> None:
    """Rows stored as text by an older release: ``compact`` packs them (the file
    shrinks after --vacuum), each reads back as the same result in today's canonical
    form, a body the schema cannot read stays as it was, and a resent result is still a
    duplicate. Run again, it has nothing left to pack. On an SQLite file built with
    `SqliteStore`: the test edits rows in place and measures the file after VACUUM."""
    from click.testing import CliRunner

    from collector.cli.main import main

    db = tmp_path / "old.sqlite3"
    store = SqliteStore(db)
    store.add_probe("probe-1", "a" * 64, "2026-11-30T00:00:00.000000Z", LineMetadata())
    docs = [{**agent_document, "result_id": str(uuid.uuid4())} for _ in range(40)]
    for doc in docs:
        old = _old_canonical(doc)
        accepted = ingest.parse_body(old.encode())
        store.insert_results([NewResult(
            result_id=doc["result_id"], probe_name="probe-1",
            schema_version=doc["schema_version"], started_at=accepted.started_at,
            ended_at=accepted.ended_at, received_at="2026-11-30T00:00:00.000000Z",
            body=old, body_sha256=hashlib.sha256(old.encode()).hexdigest(),
            facts=accepted.facts)])
    # A row an older schema let through and today's refuses: kept as it is.
    store._db.execute("UPDATE results SET body = replace(body, '\"duration_s\":', "
                      "'\"duration_s\":1e300,\"x\":') WHERE result_id = ?",
                      (docs[0]["result_id"],))
    store.close()
    runner = CliRunner()
    before = db.stat().st_size
    done = runner.invoke(main, ["--db", str(db), "compact", "--batch", "7", "--vacuum"])
    assert done.exit_code == 0, done.output
    assert "packed 39 result bodies; 1 left as text" in done.output
    assert len(re.findall(r"([\d.]+) MiB", done.output)) == 2, done.output
    # A short session (a few dozen samples) packs to about a third of its text; the
    # file's bytes, not the message's rounded MiB (a few pages of schema tipped them).
    now = db.stat().st_size
    assert now < before * 0.75, (before, now, done.output)
    again = runner.invoke(main, ["--db", str(db), "compact"])
    assert "packed 0 result bodies; 1 left as text" in again.output
    store = SqliteStore(db)
    try:
        for doc in docs[1:]:
            stored = store.result(doc["result_id"])
            assert stored is not None
            assert stored.body.encode() == codec.canonical(parse_result(doc))
        accepted = ingest.parse_body(json.dumps(docs[5]).encode())
        item = _new_result(accepted, "probe-1")
        assert store.insert_results([item]) == ["duplicate"]
        # Still the old text (sorted keys), with the edit today's schema refuses.
        assert '"duration_s":1e300,"x":' in store.result(docs[0]["result_id"]).body
    finally:
        store.close()


def test_group_commit_under_cancellation(store: Store,
                                         agent_document: dict[str, Any]) -> None:
    """A delivery cancelled while it waits is never committed nor answered; a leader
    cancelled while its transaction runs leaves it to finish, and answers the others in
    its group; never two transactions at once on one slot; nothing hangs; on each
    backend."""
    store.add_probe("probe-1", "a" * 64, "2026-11-30T00:00:00.000000Z", LineMetadata())
    threads = ThreadPoolExecutor(max_workers=4)  # more threads than slots, on purpose
    gate = threading.Event()
    running, most = [0], [0]
    lock = threading.Lock()

    def items() -> list[NewResult]:
        doc = {**agent_document, "result_id": str(uuid.uuid4())}
        return [_new_result(ingest.parse_body(orjson.dumps(doc)), "probe-1")]

    def slow(fn: Any) -> Any:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            gate.wait(10)
            return fn(store)
        finally:
            with lock:
                running[0] -= 1

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        commits = GroupCommit(lambda fn: loop.run_in_executor(threads, slow, fn), slots=1)
        leader = asyncio.create_task(commits.insert(items()))
        await asyncio.sleep(0.05)  # the leader's transaction is running, held at the gate
        waiting = [asyncio.create_task(commits.insert(items())) for _ in range(3)]
        await asyncio.sleep(0.05)
        waiting[1].cancel()  # never committed
        leader.cancel()  # its transaction goes on
        await asyncio.sleep(0.05)
        gate.set()
        answers = await asyncio.wait_for(
            asyncio.gather(leader, *waiting, return_exceptions=True), 20)
        await commits.close()
        return answers

    try:
        answers = asyncio.run(main())
        assert isinstance(answers[0], asyncio.CancelledError)
        assert isinstance(answers[2], asyncio.CancelledError)
        assert answers[1] == answers[3] == ["stored"]
        assert store.count_results() == 3  # the cancelled leader's, and the two others
        assert most[0] == 1
    finally:
        gate.set()
        threads.shutdown()
