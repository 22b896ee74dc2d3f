"""The export, orchestrated: the months of a scope, each month's partitions streamed
from the store page by page, a manifest of the finished partitions (a re-run resumes
and skips them), and the data dictionary at the end.

One dataset, one snapshot: the first run pins the export's end (``until``, at most the
run's start) and a "received before" bound (the run's start) in the manifest, and every
later run into the same ``out`` reads the store through them, so a resumed export
finishes the SAME dataset, whatever probes delivered meanwhile (late spools, new
sessions). ``refresh`` (the CLI's --refresh), or another ``out``, begins a new dataset
at a new snapshot. Beginning a dataset removes every file of the layout below already in
``out`` (partitions and their temporary files), listed in a manifest or not: a partition
an earlier run renamed into place before it could list it (it stopped part-way through a
month), or a temporary file a killed run left, would otherwise sit beside the new
dataset, raw next to open data.

Memory is bounded whatever the scope's size: one page of sessions (storage/sql/
exports.py EXPORT_PAGE), rows handed to the writers a session at a time, and per open
table at most writer.BATCH row dicts and one row group of columns (writer.py); the
open-data count keeps at most k probes per cell and month (opendata.CellCounter) and,
per month, the names of the probes with sessions in it.

Open data publishes, in each month's files, only the cells the count confirmed to hold
at least k probes in that month (an allow-list: a cell the count never saw is
suppressed, not published). k-anonymity holds per month, the publication unit: each
month's files may be published alone, and so may any set of whole months (a semester, a
year), since every row published sits in a (month, cell) group of at least k probes and
its month is in the row. A cell counted over the whole dataset would not do: it can
hold k probes over a year and one in a given month's files. Records a digest
of that set in the manifest (a resumed run that would decide otherwise stops), keeps
no raw probe name in the manifest (a keyed digest of the scope's probes instead) and
writes each month's probes in the order of their pseudonyms, not of their names (rows
in name order would hand the names back to anyone who knows the fleet's naming scheme).

Layout of ``out``::

    manifest.json                       settings, snapshot, finished partitions
    dictionary.json, dictionary.md      the data dictionary (columns.py)
    sessions/month=2026-05/part-0.parquet
    attempts/month=2026-05/part-0.parquet
    pings/month=2026-05/part-0.parquet

A month is the UTC month a session started in; a session's attempts and pings are in
the same month's partitions as the session, so a month is a unit a reader can take alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.schema import SCHEMA_VERSION, utc_now
from collector.compliance.facts import SessionFacts
from collector.errors import InputError, StoreError
from collector.export import opendata, rows
from collector.export.columns import (
    EXPORT_SCHEMA_VERSION,
    TABLES,
    OpenDataNote,
    dictionary,
    dictionary_markdown,
)
from collector.export.writer import SUFFIX, PartitionWriter, check, durable_replace, open_partition
from collector.lines import LineMetadata
from collector.scope import Scope
from collector.storage.model import StoredResult
from collector.storage.store import ExportStore, ProbeStore

MANIFEST = "manifest.json"
HOUR_BAND_TZ = "Europe/Rome"  # the campaign's hour bands (244/08/CSP), as reports use
# The only names a manifest may list (it is read back), and the files a new dataset
# removes from ``out`` (with their temporary files, writer.py's ".part-0.parquet.tmp").
PARTITION_NAME = re.compile(r"(?:sessions|attempts|pings)/month=[0-9]{4}-[0-9]{2}/"
                            r"part-0\.(?:parquet|csv)")
TEMP_NAME = re.compile(r"(?:sessions|attempts|pings)/month=[0-9]{4}-[0-9]{2}/"
                       r"\.part-0\.(?:parquet|csv)\.tmp")
_SCOPE_LABEL = b"bbprobe export scope\x00"


class Exporting(ProbeStore, ExportStore, Protocol):
    """The probes (their line metadata) and the export's paged reads."""


@dataclass(frozen=True, slots=True)
class Options:
    out: Path
    fmt: str  # "parquet" | "csv"
    scope: Scope
    tables: tuple[str, ...] = tuple(TABLES)
    open_data: bool = False
    key: bytes | None = None  # the open-data pseudonym key
    k: int = opendata.DEFAULT_K
    refresh: bool = False  # begin a new dataset (new snapshot) in ``out``


@dataclass(slots=True)
class Summary:
    """What a run did: partitions written and skipped (already finished), rows per
    table in the whole export, rows suppressed per table (open data), and the
    snapshot the dataset is pinned to."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    suppressed: dict[str, int] = field(default_factory=dict)
    snapshot: dict[str, str] = field(default_factory=dict)


def months(first: str, last: str) -> list[str]:
    """Every "YYYY-MM" from ``first``'s month to ``last``'s (ISO times)."""
    year, month = int(first[:4]), int(first[5:7])
    end = (int(last[:4]), int(last[5:7]))
    out = []
    while (year, month) <= end:
        out.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out


def month_bounds(month: str, scope: Scope) -> tuple[str, str]:
    """[since, until) of a month, clipped to the scope's bounds."""
    year, mon = int(month[:4]), int(month[5:7])
    nxt = f"{year + 1:04d}-01" if mon == 12 else f"{year:04d}-{mon + 1:02d}"
    lo, hi = f"{month}-01T00:00:00.000000Z", f"{nxt}-01T00:00:00.000000Z"
    if scope.since is not None and scope.since > lo:
        lo = scope.since
    if scope.until is not None and scope.until < hi:
        hi = scope.until
    return lo, hi


def partition(table: str, month: str, fmt: str) -> str:
    return f"{table}/month={month}/part-0{SUFFIX[fmt]}"


def scope_digest(key: bytes, probes: Sequence[str]) -> str:
    """A keyed digest of a scope's probe list (HMAC-SHA256 under the pseudonym key,
    with a label of its own): tells two scopes apart, and names no probe, for an
    open-data manifest that is published with the data."""
    text = "\x00".join(sorted(probes)).encode("utf-8", "surrogatepass")
    return hmac.new(key, _SCOPE_LABEL + text, hashlib.sha256).hexdigest()


def settings(options: Options) -> dict[str, Any]:
    """What a resumed run must share with the run that began the export (a partition
    made under other settings would not belong to the same dataset)."""
    s = options.scope
    key_check = None
    probes: Any = list(s.probes) if s.probes is not None else None
    if options.open_data and options.key is not None:
        # A pseudonym of a fixed label: tells two keys apart, reveals nothing of either.
        key_check = opendata.Pseudonymiser(options.key).probe("bbprobe export key check")
        if probes is not None:
            probes = {"hmac_sha256": scope_digest(options.key, probes)}
    return {"export_schema_version": EXPORT_SCHEMA_VERSION, "format": options.fmt,
            "probes": probes, "since": s.since, "until": s.until, "family": s.family,
            "open_data": options.open_data, "k": options.k if options.open_data else None,
            "key_check": key_check}


def pin(scope: Scope, now: str) -> dict[str, str]:
    """The snapshot a new dataset is pinned to: sessions started before ``until`` (the
    scope's, at most ``now``) and received before ``now``."""
    until = now if scope.until is None or scope.until > now else scope.until
    return {"taken_at": now, "until": until, "received_before": now}


def _load_manifest(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputError(f"--out: cannot read {path}: {exc}; remove it or use --refresh") \
            from None
    snapshot = doc.get("snapshot") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or not isinstance(doc.get("partitions"), dict) \
            or not isinstance(snapshot, dict) \
            or not all(isinstance(snapshot.get(k), str)
                       for k in ("taken_at", "until", "received_before")):
        raise InputError(f"--out: {path} is not an export manifest; use --refresh to "
                         "replace it, or another --out")
    return doc


def write_json(path: Path, doc: Any) -> None:
    write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Whole or not at all, and durably (temp file, fsync, rename, fsync of the
    directory: writer.durable_replace)."""
    temp = path.with_name(f".{path.name}.tmp")
    try:
        temp.write_text(text, encoding="utf-8")
        durable_replace(temp, path)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None


def _clear(out: Path) -> list[str]:
    """Remove every file of the export's layout found in ``out`` (partitions and their
    temporary files), whatever a manifest lists: the names removed. Only names of the
    layout, and only files that resolve inside ``out`` (a directory of it may be a
    symbolic link elsewhere)."""
    root = out.resolve()
    removed = []
    for table in TABLES:
        if not (out / table).is_dir():
            continue
        for month in sorted((out / table).iterdir()):
            if not month.is_dir():
                continue
            for path in sorted(month.iterdir()):
                name = path.relative_to(out).as_posix()
                if not (PARTITION_NAME.fullmatch(name) or TEMP_NAME.fullmatch(name)):
                    continue
                if path.is_file() and path.resolve().is_relative_to(root):
                    path.unlink(missing_ok=True)
                    removed.append(name)
    return removed


@dataclass(slots=True)
class Cells:
    """The open-data first pass: per UTC month, the cells confirmed to hold at least k
    probes in that month (the only ones its files publish), and the probes with a
    session in it."""

    published: dict[str, frozenset[opendata.Cell]]
    probes_by_month: dict[str, set[str]]

    def publishes(self, month: str, cell: opendata.Cell) -> bool:
        return cell in self.published.get(month, frozenset())

    def digest(self) -> str:
        pairs = sorted((month, *cell) for month, cells in self.published.items()
                       for cell in cells)
        text = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def count_cells(store: Exporting, scope: Scope, received_before: str,
                lines: dict[str, LineMetadata], k: int) -> Cells:
    """Distinct probes per cell in each UTC month of the (pinned) scope, from the
    distinct (probe, UTC hour) pairs (the hour gives the local hour band: every zone a
    campaign uses is a whole number of hours from UTC; its first seven characters, the
    month of the partitions the session's rows go to)."""
    counters: dict[str, opendata.CellCounter] = {}
    by_month: dict[str, set[str]] = {}
    probes = list(scope.probes) if scope.probes is not None else None
    for probe, hour in store.export_probe_hours(probes, scope.since, scope.until,
                                                scope.family,
                                                received_before=received_before):
        month = hour[:7]
        band = opendata.hour_band(f"{hour}:00:00.000000Z", HOUR_BAND_TZ)
        counter = counters.get(month)
        if counter is None:
            counter = counters[month] = opendata.CellCounter(k)
        counter.add(rows.line_cell(lines.get(probe), band), probe)
        by_month.setdefault(month, set()).add(probe)
    published = {month: frozenset(cell for cell, n in counter.probes_per_cell().items()
                                  if n >= k)
                 for month, counter in counters.items()}
    return Cells(published, by_month)


def run(store: Exporting, options: Options,
        progress: Callable[[str], None] | None = None) -> Summary:
    """Export ``options.scope`` to ``options.out`` (see the module docstring); a re-run
    with the same settings resumes the same dataset unless ``refresh``."""
    say = progress or (lambda _line: None)
    out = options.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out: cannot create {out}: {exc.strerror or exc}") from None
    if options.open_data and options.key is None:
        raise InputError("--open-data needs --pseudonym-key FILE")
    wanted = settings(options)
    # --refresh replaces whatever is there: the old manifest is not read (an unreadable
    # one would otherwise stop the very option that replaces it).
    manifest = None if options.refresh else _load_manifest(out / MANIFEST)
    if manifest is not None and manifest.get("settings") != wanted:
        raise InputError(f"--out: {out} holds an export made with other options (scope, "
                         "format or open-data settings); use --refresh to replace it, or "
                         "another --out")
    if manifest is None:
        # A new dataset: every earlier partition goes, listed or not (module docstring),
        # or a reader's glob would mix two datasets.
        _clear(out)
        manifest = {"settings": wanted, "snapshot": pin(options.scope, utc_now()),
                    "partitions": {}}
    snapshot: dict[str, str] = manifest["snapshot"]
    received_before = snapshot["received_before"]
    scope = dataclasses.replace(options.scope, until=snapshot["until"])
    done: dict[str, Any] = manifest["partitions"]
    lines = {p.name: p.line for p in store.probes()}
    publisher = None
    cells: Cells | None = None
    if options.open_data:
        assert options.key is not None
        publisher = rows.Publisher(opendata.Pseudonymiser(options.key))
        say("open data: counting distinct probes per cell")
        cells = count_cells(store, scope, received_before, lines, options.k)
        if manifest.get("cells") not in (None, cells.digest()):
            raise InputError(f"--out: the open-data cells of {out} changed since the "
                             "export began (line metadata changed or sessions deleted); "
                             "use --refresh to make the dataset again")
        manifest["cells"] = cells.digest()
    probes = list(scope.probes) if scope.probes is not None else None
    span = store.export_span(probes, scope.since, scope.until, scope.family,
                             received_before=received_before)
    summary = Summary(snapshot=dict(snapshot))
    for month in months(*span) if span is not None else []:
        todo = [t for t in options.tables if not _finished(out, options.fmt, done,
                                                           partition(t, month, options.fmt))]
        summary.skipped += [partition(t, month, options.fmt) for t in options.tables
                            if t not in todo]
        if not todo:
            say(f"{month}: already exported, skipped")
            continue
        order = None
        if cells is not None and publisher is not None:
            order = sorted(cells.probes_by_month.get(month, ()), key=publisher.probe)
        counts = _export_month(store, options, scope, received_before, month, todo, lines,
                               publisher, cells, order, say)
        for table, (written, suppressed) in counts.items():
            name = partition(table, month, options.fmt)
            done[name] = {"rows": written, "suppressed": suppressed,
                          "bytes": (out / name).stat().st_size}
            summary.written.append(name)
        write_json(out / MANIFEST, manifest)
    write_json(out / MANIFEST, manifest)
    # The dictionary describes every table of the dataset: this run's and those earlier
    # runs into the same out wrote (--tables may differ between runs).
    present = {name.split("/", 1)[0] for name in done}
    described = tuple(t for t in TABLES if t in options.tables or t in present)
    for table in described:
        parts = [v for name, v in done.items() if name.startswith(f"{table}/")]
        summary.rows[table] = sum(int(v["rows"]) for v in parts)
        summary.suppressed[table] = sum(int(v["suppressed"]) for v in parts)
    note = OpenDataNote(options.k, summary.suppressed, HOUR_BAND_TZ) \
        if options.open_data else None
    doc = dictionary(described, options.fmt, summary.rows, SCHEMA_VERSION, note)
    write_json(out / "dictionary.json", doc)
    write_text(out / "dictionary.md", dictionary_markdown(doc))
    return summary


def _finished(out: Path, fmt: str, done: dict[str, Any], name: str) -> bool:
    """Whether the manifest lists ``name`` as finished and its file is still whole (a
    partition cut short by a crash, or deleted, is written again)."""
    entry = done.get(name)
    if not isinstance(entry, dict):
        return False
    size = entry.get("bytes")
    return check(out / name, fmt, int(entry.get("rows", -1)),
                 size if isinstance(size, int) else None)


def _export_month(store: Exporting, options: Options, scope: Scope, received_before: str,
                  month: str, tables: Sequence[str], lines: dict[str, LineMetadata],
                  publisher: rows.Publisher | None, cells: Cells | None,
                  order: list[str] | None, say: Callable[[str], None]
                  ) -> dict[str, tuple[int, int]]:
    """One month's partitions of ``tables``, from one pass over its sessions: (rows
    written, rows suppressed) per table."""
    lo, hi = month_bounds(month, scope)
    writers: dict[str, PartitionWriter] = {}
    suppressed = dict.fromkeys(tables, 0)
    sessions = 0
    try:
        for table in tables:
            writers[table] = open_partition(
                options.fmt, options.out / partition(table, month, options.fmt), table,
                options.open_data)
        for page in _pages(store, scope, received_before, lo, hi, order):
            for facts, stored in page:
                # Every table has columns only the body holds (without stream samples).
                body = rows.decode_body(stored)
                band = opendata.hour_band(facts.started_at, HOUR_BAND_TZ)
                line = lines.get(facts.probe_id)
                made = _rows_of(tables, facts, stored, body, line, band)
                if cells is not None and not cells.publishes(month,
                                                             rows.line_cell(line, band)):
                    for table, got in made.items():
                        suppressed[table] += len(got)
                    continue
                # Straight to the writers, a session at a time: they hold at most a batch
                # of row dicts each (writer.BATCH), whatever a page's bodies hold.
                for table, got in made.items():
                    writers[table].write(got if publisher is None else [
                        publisher.published(table, r) for r in got])
            sessions += len(page)
            if page:
                say(f"{month}: {sessions:,} sessions")
        counts = {}
        for table in tables:
            counts[table] = (writers.pop(table).close(), suppressed[table])
        return counts
    finally:
        for writer in writers.values():
            writer.abort()


def _rows_of(tables: Sequence[str], facts: SessionFacts, stored: StoredResult | None,
             body: dict[str, Any] | None, line: LineMetadata | None, band: int
             ) -> dict[str, list[rows.Row]]:
    made: dict[str, list[rows.Row]] = {}
    if "sessions" in tables:
        made["sessions"] = [rows.session_row(facts, stored, body, line, band)]
    if "attempts" in tables:
        made["attempts"] = rows.attempt_rows(facts, body)
    if "pings" in tables:
        made["pings"] = rows.ping_rows(facts, body)
    return made


def _pages(store: Exporting, scope: Scope, received_before: str, lo: str, hi: str,
           order: list[str] | None
           ) -> Iterator[list[tuple[SessionFacts, StoredResult | None]]]:
    """A month's sessions: by probe name, or (open data) a probe at a time in the
    order given (its pseudonym's), each probe's sessions by start time."""
    if order is None:
        probes = list(scope.probes) if scope.probes is not None else None
        yield from store.export_sessions(probes, lo, hi, scope.family,
                                         received_before=received_before)
        return
    for probe in order:
        yield from store.export_sessions([probe], lo, hi, scope.family,
                                         received_before=received_before)
