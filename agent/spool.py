"""The durable on-disk spool: results, gap records and dead letters in the state directory.

Contract (shared/reference/reliability.md A1-A9; agent.delivery sends what is here):
- A finished session is written to the spool first (temp file, fsync, rename, fsync of the
  directory), and removed only when delivery has the collector's 2xx for that result id,
  so a crash or an unreachable collector loses nothing. A full disk (ENOSPC) is a counted
  drop, never a crash and never a torn file.
- Each spooled result and gap record is written with the identity it was measured for
  beside it (``NAME.identity``, agent.identity), before the document itself, and moves
  with it to ``dead-letter/`` and back. The files themselves are never rewritten.
- A result refused for good, or a damaged file, moves to ``dead-letter/`` with the reason
  next to it; ``bbprobe status`` lists them, ``bbprobe dead-letter retry|drop`` puts them
  back for delivery or deletes them. Nothing is dropped silently.
- The spool is bounded: beyond ``spool_max_bytes``, below ``min_free_bytes`` of free disk,
  or past ``max_age_days``, the oldest results are dropped, counted, and a gap record
  (``agent.schema.GapRecord``, one per identity and reason, merged into one not yet sent
  for the same) is spooled and sent in their place, under the identity of the results it
  stands for. The bounds count every identity's results.
- Each identity numbers its own results (``session_seq``, C8: its collector counts the
  numbers it never received), in ``state_dir/session_seq.FINGERPRINT``: a laptop used for
  probe A, then B, then A again gives A no holes. ``state_dir/session_seq``, the one
  counter of a bbprobe from before, seeds each identity's counter the first time that
  identity numbers a result here, and is not written after: an upgraded device goes on
  from its last number under whichever identity it uses, never repeating one (the holes
  the one counter already made stay). A gap record names its results' own numbers.
- With the probe's key (agent/probekey.py) each result is signed once numbered, and the
  spool file is its JWS (agent/spooldoc.py), chained to the previous result of the same
  identity through ``state_dir/chain.FINGERPRINT`` (``chain`` without an identity),
  written under the counter's lock before the file: a result dropped after that (a full
  disk, an eviction) leaves the chain naming it, and its gap record documents the hole.
  No key, or a failed signature, spools it unsigned. Gap records are signed likewise
  (spooldoc.gap_text). A new token for the same probe carries counter and chain on.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import canonical, spooldoc
from agent.config import DeliveryConfig
from agent.identity import Backlog, Identity, backlog, identity_file, owner_of
from agent.jose import JoseError
from agent.schema import (
    MAX_SEQ_RANGES,
    SCHEMA_VERSION,
    GapRecord,
    SessionResult,
    format_utc,
    merge_ranges,
    seq_ranges,
    to_dict,
    utc_now,
)

_STAMP = "%Y%m%dT%H%M%S.%fZ"


# --- pure --------------------------------------------------------------------------------


def result_json(result: SessionResult) -> str:
    return json.dumps(to_dict(result), separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True, slots=True)
class Entry:
    """A spooled result: its file, size and session start."""

    path: Path
    size: int
    started_at: datetime


def evictions(entries: Sequence[Entry], incoming: int, cfg: DeliveryConfig, free_bytes: int,
              now: datetime) -> list[tuple[Entry, str]]:
    """Which spooled results to drop (oldest first) before writing ``incoming`` bytes, and
    why: past the age cap ("too_old"), then over the byte cap ("spool_full"), then under
    the free-disk floor ("disk_full"). Pure."""
    out: list[tuple[Entry, str]] = []
    keep = list(entries)
    cutoff = now - timedelta(days=cfg.max_age_days)
    while keep and keep[0].started_at < cutoff:
        out.append((keep.pop(0), "too_old"))
    total = sum(e.size for e in keep)
    while keep and total + incoming > cfg.spool_max_bytes:
        victim = keep.pop(0)
        total -= victim.size
        out.append((victim, "spool_full"))
    freed = sum(e.size for e, _ in out)
    while keep and free_bytes + freed - incoming < cfg.min_free_bytes:
        victim = keep.pop(0)
        freed += victim.size
        out.append((victim, "disk_full"))
    return out


def file_id(path: Path) -> str:
    """The result or gap id a spool file is named after (``STAMP_ID.json`` and
    ``STAMP_REASON_ID.json``; a UUID has no underscore)."""
    return path.stem.rsplit("_", 1)[-1]


# --- the spool ---------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(final: Path, data: str) -> None:
    """temp + fsync + rename + fsync(dir): the file is whole or absent, never torn."""
    tmp = final.with_name(final.name + ".tmp")
    try:
        # Raw writes: no buffered flush left to fail (and leak the file) on a full disk.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data.encode())
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


def _chain_state(path: Path) -> spooldoc.ChainState | None:
    try:
        return spooldoc.ChainState.parse(path.read_bytes())
    except OSError:
        return None  # none yet, or lost


@dataclass(frozen=True, slots=True)
class _Dropped:
    entry: Entry
    seq: int | None
    probe_id: str
    identity: Identity | None

class Spool:
    """The state directory's spool, gap records and dead letters. ``identity`` is whom
    this process measures for: recorded beside each result and gap record it writes
    (None: a reader, such as ``bbprobe status``, or a test of an older spool)."""

    def __init__(self, state_dir: str | Path, cfg: DeliveryConfig | None = None,
                 identity: Identity | None = None,
                 signing_key: Ed25519PrivateKey | None = None) -> None:
        self.root = Path(state_dir)
        self.dir = self.root / "spool"
        self.dead_dir = self.root / "dead-letter"
        self.gap_dir = self.root / "gaps"
        self.stats_path = self.root / "delivery.json"
        self.cfg = cfg or DeliveryConfig()
        self.identity = identity
        # The last result written, as written (numbered): what `bbprobe run` shows.
        self.last_put: SessionResult | None = None
        # Whose key signs what ``put`` writes (None: written unsigned), the JWS of the
        # last result written (None: unsigned), and why the last one is unsigned although
        # there is a key (the caller says it; the result is spooled all the same).
        self.signing_key = signing_key
        self.last_jws: dict[str, str] | None = None
        self.unsigned_reason: str | None = None

    # identities ------------------------------------------------------------------------

    @staticmethod
    def identity_of(path: Path) -> Identity | None:
        """The identity recorded for a spooled document; None when none was (older
        spools) or it cannot be read."""
        try:
            return Identity.parse(identity_file(path).read_bytes())
        except OSError:
            return None

    def foreign(self, path: Path) -> bool:
        """Recorded for another token than this spool's."""
        recorded = self.identity_of(path)
        return self.identity is not None and recorded is not None and \
            recorded.token_fingerprint != self.identity.token_fingerprint

    def backlog(self) -> list[Backlog]:
        """Spooled results and gap records per owner (``backlog``): what ``bbprobe
        status`` lists. Reads every document."""
        rows = [(self.identity_of(e.path), self.facts(e.path)[1], e.size, False)
                for e in self.entries()]
        rows += [(self.identity_of(p), self.facts(p)[1], 0, True) for p in self.gaps()]
        return backlog(rows)

    @staticmethod
    def _carry(path: Path, target: Path) -> None:
        """Copy ``path``'s identity beside ``target`` before the document moves there, so
        no crash leaves a document without the identity it was spooled with."""
        try:
            raw = identity_file(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        _write_durably(identity_file(target), raw)

    @staticmethod
    def _unlink(path: Path) -> None:
        """The document, then its identity (a crash between leaves only a stray
        ``.identity``, never a document without one)."""
        path.unlink(missing_ok=True)
        identity_file(path).unlink(missing_ok=True)

    # results ---------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Spooled results, oldest first (file names sort by session start)."""
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                started = datetime.strptime(path.name.split("_", 1)[0], _STAMP)
                out.append(Entry(path, path.stat().st_size, started.replace(tzinfo=UTC)))
            except (ValueError, OSError):
                continue  # not ours, or gone meanwhile
        return out

    def pending(self) -> list[Path]:
        return [e.path for e in self.entries()]

    def put(self, result: SessionResult, now: datetime | None = None) -> Path | None:
        """Write ``result`` durably, first dropping what the bounds require. Returns the
        file, or None when the disk refused it (counted and reported as a gap)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = datetime.fromisoformat(result.started_at).astimezone(UTC).strftime(_STAMP)
        final = self.dir / f"{stamp}_{result.result_id}.json"
        # Room first, for the document as it will be written (numbered, signed): the
        # number itself is taken only once there is room.
        size = self._size(result if result.session_seq is not None else
                          replace(result, session_seq=self._peek_seq()))
        now = now or datetime.now(UTC)
        vfs = os.statvfs(self.dir)
        victims = evictions(self.entries(), size, self.cfg, vfs.f_bavail * vfs.f_frsize, now)
        self._drop(result.probe_id, victims)
        self.last_jws = self.unsigned_reason = None
        try:
            with self._locked():
                self._inherit(result.probe_id)
                if result.session_seq is None:
                    # Numbered only once there is room: a full disk that refuses the
                    # counter has used no number, so completeness sees no hole for it.
                    result = replace(result, session_seq=self._take_seq())
                # Signed and chained under the counter's lock: a daemon and a
                # technician's `bbprobe run` sharing the state directory each name the
                # result numbered just before theirs.
                text, jws = self._seal(result)
            if self.identity is not None:
                # Whom it was measured for, before the result itself: a result is never
                # in the spool without it (a crash between leaves a stray .identity).
                _write_durably(identity_file(final), self.identity.to_json())
            _write_durably(final, text)
            self.last_put, self.last_jws = result, jws
        except OSError as exc:
            identity_file(final).unlink(missing_ok=True)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            started = datetime.fromisoformat(result.started_at).astimezone(UTC)
            self._drop(result.probe_id, [(Entry(final, 0, started), "disk_full")],
                       {final: result.session_seq})
            self.note(last_error=f"spool write failed: {exc.strerror}; result dropped")
            return None
        s = result.summary
        recent = [{"result_id": result.result_id, "started_at": result.started_at,
                   "download_bps": s.download_bps, "upload_bps": s.upload_bps,
                   "rtt_mean_ms": s.rtt_mean_ms, "loss_ratio": s.loss_ratio,
                   "valid": result.valid,
                   # The host checks that failed (the fleet health report flags a
                   # check that keeps failing).
                   "invalid_codes": [r.code for r in result.validity.reasons]
                   if result.validity is not None else []},
                  *self.stats().get("last_results", [])][:5]
        self.note(last_results=recent)
        return final

    def _seq_path(self) -> Path:
        """This identity's session counter (``session_seq.FINGERPRINT``, a hex digest);
        ``session_seq``, the one counter from before identities, for a spool without
        one."""
        if self.identity is None:
            return self.root / "session_seq"
        return self.root / f"session_seq.{self.identity.token_fingerprint}"

    @staticmethod
    def _read_counter(path: Path) -> int | None:
        try:
            return int(path.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The state directory's counter lock: a daemon and a technician's `bbprobe run`
        may share the state directory."""
        with (self.root / "session_seq.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _take_seq(self) -> int:
        """The next session sequence number (C8) of this spool's identity, kept durably
        (``_seq_path``), so its collector can tell which sessions never arrived. Under
        ``_locked``. A counter not there yet (or lost) starts after the highest number
        known for this identity: the old single counter (the seed, for an upgraded
        device) and what is still here (spool, dead letters, gap records); a collector
        sees a restart below that as a discontinuity."""
        path = self._seq_path()
        last = self._read_counter(path)
        if last is None:
            last = self._highest_known_seq()
            if self.identity is not None:
                last = max(last, self._read_counter(self.root / "session_seq") or 0)
        _write_durably(path, str(last + 1))
        return last + 1

    def _chain_path(self) -> Path:
        """This identity's chain state, beside its counter (agent/spooldoc.py)."""
        if self.identity is None:
            return self.root / "chain"
        return self.root / f"chain.{self.identity.token_fingerprint}"

    def _seal(self, result: SessionResult) -> tuple[str, dict[str, str] | None]:
        """The numbered result's spool file text, signed and chained when there is a key,
        and its JWS; the chain state moves on to it either way (an unsigned result is a
        link the next signed one names: its canonical JSON is what the collector
        hashes). Under ``_locked``; OSError when the chain state cannot be written."""
        payload = canonical.canonical(result)
        path = self._chain_path()
        state = _chain_state(path)  # None: a new chain (the collector sees a restart)
        text, jws = result_json(result), None
        if self.signing_key is not None:
            try:
                text = spooldoc.signed_text(self.signing_key, payload,
                                            state.sha256 if state else None)
                jws = json.loads(text)
            except (JoseError, ValueError, TypeError) as exc:
                # A result that cannot be signed is still a result: spooled plain, said.
                self.unsigned_reason = f"result {result.result_id} not signed: {exc}"
        assert result.session_seq is not None
        url = self.identity.collector_url if self.identity is not None else None
        _write_durably(path, spooldoc.ChainState(
            result.session_seq, canonical.sha256_hex(payload), url,
            result.probe_id or None).to_json())
        return text, jws

    def _inherit(self, probe_id: str) -> None:
        """Review M3: a new token for the same probe is a new identity; with no counter
        yet, it carries on the counter and chain of another identity of the same
        collector URL and probe name (spooldoc.inherited), rather than repeat numbers
        and restart the chain. Under ``_locked``."""
        if self.identity is None or not probe_id or self._seq_path().exists() or \
                self._chain_path().exists():
            return
        found = spooldoc.inherited(
            ((_chain_state(p), self._read_counter(self.root / ("session_seq." + p.name[6:])))
             for p in self.root.glob("chain.*")), self.identity.collector_url, probe_id)
        if found is not None:
            _write_durably(self._chain_path(), found[1].to_json())
            _write_durably(self._seq_path(), str(max(found[0], self._highest_known_seq())))

    def _size(self, numbered: SessionResult) -> int:
        """The bytes ``numbered`` will take in the spool, signed or not (at most)."""
        if self.signing_key is None:
            return len(result_json(numbered).encode())
        return spooldoc.signed_size(len(canonical.canonical(numbered)))

    def _peek_seq(self) -> int:
        """The number the next session would get (for sizing only; no lock, no write)."""
        last = self._read_counter(self._seq_path())
        if last is None:
            last = self._read_counter(self.root / "session_seq")
        return (last or 0) + 1

    def _highest_known_seq(self) -> int:
        """The highest session_seq still here of this identity's documents and of those
        from before identities (numbered by the old counter, which seeded this one); of
        every document for a spool without an identity."""
        def counted(path: Path) -> bool:
            if self.identity is None:
                return True
            recorded = self.identity_of(path)
            return recorded is None or \
                recorded.token_fingerprint == self.identity.token_fingerprint

        known = [s for p in [*self.pending(), *self.dead_letters()]
                 if counted(p) and (s := self._seq_of(p)) is not None]
        for gap in self.gaps():
            if not counted(gap):
                continue
            try:
                known += [int(b) for _, b in spooldoc.gap_of(
                    json.loads(gap.read_text(encoding="utf-8")))["dropped_seq_ranges"]]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return max(known, default=0)

    @staticmethod
    def _seq_of(path: Path) -> int | None:
        return Spool.facts(path)[0]

    @staticmethod
    def facts(path: Path) -> tuple[int | None, str | None]:
        """A spooled document's session_seq and probe_id, plain or signed (each None when
        unreadable)."""
        try:
            data = spooldoc.document_of(json.loads(path.read_bytes()))
        except (OSError, ValueError):
            return None, None
        if not isinstance(data, dict):
            return None, None
        seq, probe = data.get("session_seq"), data.get("probe_id")
        return (seq if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0
                else None, probe if isinstance(probe, str) else None)

    def _drop(self, probe_id: str, victims: Sequence[tuple[Entry, str]],
              known_seqs: Mapping[Path, int | None] | None = None) -> None:
        """Delete ``victims`` and account for them in one pending gap record per identity
        and reason (merged into any not yet sent for the same, so a long squeeze does not
        fill the disk with gap records). A gap record belongs to whom its results were
        measured for, read from each file (a file never written, in ``known_seqs``: this
        spool's identity and ``probe_id``), not to the result that needed the room."""
        groups: dict[tuple[tuple[str, str], str], list[_Dropped]] = {}
        for entry, reason in victims:
            # Before it goes: the gap record names it and whose it was.
            probe: str | None
            if known_seqs is not None and entry.path in known_seqs:
                seq, probe, recorded = known_seqs[entry.path], probe_id, self.identity
            else:
                (seq, probe), recorded = self.facts(entry.path), self.identity_of(entry.path)
            self._unlink(entry.path)
            groups.setdefault((owner_of(recorded, probe), reason), []).append(
                _Dropped(entry, seq, probe or "", recorded))
        for (owner, reason), dropped in groups.items():
            self.count("dropped_total", len(dropped))
            first = min(d.entry.started_at for d in dropped)
            last = max(d.entry.started_at for d in dropped)
            count = len(dropped)
            ranges = list(seq_ranges(d.seq for d in dropped if d.seq is not None))
            names = [d.probe_id for d in dropped if d.probe_id]
            earlier = []
            for path in self.gaps():
                if f"_{reason}_" not in path.name:
                    continue
                try:
                    old = spooldoc.gap_of(json.loads(path.read_text(encoding="utf-8")))
                except (OSError, ValueError):
                    old = None
                old_probe = old.get("probe_id") if isinstance(old, dict) else None
                if owner_of(self.identity_of(path), old_probe if isinstance(old_probe, str)
                             else None) != owner:
                    continue  # another identity's: its own record
                earlier.append(path)
                if not isinstance(old, dict):
                    continue  # unreadable: replaced by the new record, as before
                try:
                    count += int(old["dropped"])
                    first = min(first, datetime.fromisoformat(old["first_started_at"]))
                    last = max(last, datetime.fromisoformat(old["last_started_at"]))
                    ranges.extend((int(a), int(b)) for a, b in
                                  old.get("dropped_seq_ranges", ()))
                except (ValueError, KeyError, TypeError):
                    continue
                if old_probe:
                    names.insert(0, old_probe)
            gap = GapRecord(
                schema_version=SCHEMA_VERSION, gap_id=str(uuid.uuid4()),
                probe_id=names[-1] if names else "",
                recorded_at=utc_now(), reason=reason,  # type: ignore[arg-type]
                dropped=count, first_started_at=format_utc(first),
                last_started_at=format_utc(last),
                dropped_seq_ranges=merge_ranges(ranges)[-MAX_SEQ_RANGES:],
            )
            final = self.gap_dir / f"{gap.recorded_at.replace(':', '')}_{reason}_" \
                                   f"{gap.gap_id}.json"
            try:
                self.gap_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                if dropped[-1].identity is not None:
                    _write_durably(identity_file(final), dropped[-1].identity.to_json())
                text, unsigned = spooldoc.gap_text(self.signing_key, gap)  # signed if a key
                _write_durably(final, text)
                if unsigned is not None:
                    self.note(last_error=unsigned)
            except OSError as exc:
                identity_file(final).unlink(missing_ok=True)
                # Even the gap record does not fit: the counter still says how many.
                self.note(last_error=f"cannot record a gap of {len(dropped)}: {exc.strerror}")
                continue
            for path in earlier:  # merged into the new record
                self._unlink(path)
        if victims:
            _fsync_dir(self.dir)

    def remove(self, path: Path) -> None:
        self._unlink(path)
        _fsync_dir(path.parent)

    def gaps(self) -> list[Path]:
        if not self.gap_dir.is_dir():
            return []
        return sorted(self.gap_dir.glob("*.json"))

    def dead_letter(self, path: Path, reason: str) -> Path:
        self.dead_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.dead_dir / path.name
        target.with_suffix(".reason.txt").write_text(reason + "\n", encoding="utf-8")
        self._carry(path, target)  # a retry sends it under its own identity again
        try:
            path.replace(target)
        except FileNotFoundError:  # another deliverer (daemon and a run) took it first
            target.with_suffix(".reason.txt").unlink(missing_ok=True)
            if not target.exists():
                identity_file(target).unlink(missing_ok=True)
            return target
        identity_file(path).unlink(missing_ok=True)
        _fsync_dir(self.dead_dir)
        _fsync_dir(path.parent)
        self.count("dead_lettered_total")
        return target

    def dead_letters(self) -> list[Path]:
        if not self.dead_dir.is_dir():
            return []
        return sorted(self.dead_dir.glob("*.json"))

    @staticmethod
    def is_gap(path: Path) -> bool:
        """A gap record's file (named by its recording time), not a result's (named by
        the session start in ``_STAMP``, which a gap's name never parses as)."""
        try:
            datetime.strptime(path.name.split("_", 1)[0], _STAMP)
        except ValueError:
            return True
        return False

    def retry_dead_letter(self, path: Path) -> Path:
        """Move a dead-lettered result (or gap record) back to where delivery takes it
        from; its reason goes, the next refusal writes a new one."""
        home = self.gap_dir if self.is_gap(path) else self.dir
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = home / path.name
        self._carry(path, target)
        path.replace(target)
        path.with_suffix(".reason.txt").unlink(missing_ok=True)
        identity_file(path).unlink(missing_ok=True)
        _fsync_dir(home)
        _fsync_dir(path.parent)
        return target

    def drop_dead_letter(self, path: Path) -> None:
        self._unlink(path)
        path.with_suffix(".reason.txt").unlink(missing_ok=True)
        _fsync_dir(path.parent)

    # counters (best effort: they describe, the files are the truth) --------------------

    def stats(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.stats_path.read_text(encoding="utf-8"))
            return data
        except (OSError, ValueError):
            return {}

    def note(self, add: dict[str, int] | None = None, **values: Any) -> None:
        """Set ``values`` and add to the counters in ``add``, in one write."""
        data = self.stats()
        data.update(values)
        for name, n in (add or {}).items():
            data[name] = int(data.get(name, 0)) + n
        self._save(data)

    def count(self, name: str, n: int = 1) -> None:
        self.note(add={name: n})

    def _save(self, data: dict[str, Any]) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_durably(self.stats_path, json.dumps(data, sort_keys=True))
        except OSError:
            pass  # a full disk must not stop measuring for the sake of a counter
