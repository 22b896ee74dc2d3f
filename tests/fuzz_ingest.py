"""Coverage-guided fuzzing (atheris, libFuzzer) of what a probe token can send: the result
decoder and the ingest path down to SQLite.

The properties, for every input:
- the decoder and ingestion either accept it or refuse it with an ApiError of status
  4xx: no other exception (a 500 in the collector), no hang;
- an accepted document stores (facts, rollup, SQLite's 64-bit integers) without error;
- what is stored reads back as the same canonical document (nothing lost or changed).
Gap records go through their own decoder under the same rules.

    python tests/fuzz_ingest.py [libFuzzer flags] CORPUS_DIR     # make fuzz: 10 min

The store is `SqliteStore` on purpose: SQLite's dynamic typing and 64-bit integer limit are
what a hostile number must not break (PostgreSQL's typed columns are exercised by the
conformance suite).

The corpus starts from real documents (tests/factories.py): the fuzzer mutates JSON that
is already valid, which reaches the schema's checks far sooner than random bytes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from agent.decoding import SchemaError, parse_gap
    from collector.errors import ApiError
    from collector.intake import ingest
    from collector.lines import LineMetadata
    from collector.storage.model import NewResult
    from collector.storage.sql.sqlite import SqliteStore

_DIR = tempfile.mkdtemp(prefix="bbprobe-fuzz-")
STORE = SqliteStore(Path(_DIR) / "fuzz.sqlite3")


def one_input(data: bytes) -> None:
    for encoding in ("zstd", "gzip"):  # a probe's compressed body: a 4xx, never more
        try:
            ingest.inflate(data, encoding, 1 << 20)
        except ApiError as exc:
            if not 400 <= exc.status < 500:
                raise AssertionError(f"status {exc.status} inflating {encoding}") from exc
    try:
        accepted = ingest.parse_body(data)
    except ApiError as exc:
        if not 400 <= exc.status < 500:
            raise AssertionError(f"status {exc.status} for a bad document") from exc
        _gap(data)
        return
    item = NewResult(result_id=accepted.result.result_id, probe_name="fuzz",
                     schema_version=accepted.result.schema_version,
                     started_at=accepted.started_at, ended_at=accepted.ended_at,
                     received_at="2026-11-29T00:00:00.000000Z", body=accepted.body,
                     body_sha256=accepted.body_sha256, facts=accepted.facts,
                     session_seq=accepted.result.session_seq, packed=accepted.packed)
    outcome = STORE.insert_results([item])[0]
    stored = STORE.result(item.result_id)
    assert stored is not None, outcome
    if outcome == "stored":
        again = ingest.parse_body(stored.body.encode())
        assert again.body == accepted.body, "stored document differs after reading back"


def _gap(data: bytes) -> None:
    try:
        parse_gap(json.loads(data))
    except (ValueError, RecursionError, SchemaError):
        return


def seed(corpus: Path) -> None:
    """Write real documents into an empty corpus directory."""
    from tests.factories import attempt_with_samples, session_dict

    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return
    docs = [session_dict(probe_id="fuzz"),
            session_dict(probe_id="fuzz", rtts=(10.0, None, 12.5),
                         transfers=[attempt_with_samples("download", 1e8, streams=2,
                                                         seconds=1.0)])]
    for n, doc in enumerate(docs):
        doc["session_seq"] = n + 1
        (corpus / f"seed-{n}.json").write_text(json.dumps(doc))


def main() -> None:
    STORE.add_probe("fuzz", "0" * 64, "2026-11-29T00:00:00.000000Z", LineMetadata())
    corpora = [Path(a) for a in sys.argv[1:] if not a.startswith("-")]
    for corpus in corpora:
        seed(corpus)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
