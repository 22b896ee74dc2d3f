"""Result delivery: a bounded, durable on-disk spool, and pushes to the collector.

Contract (shared/reference/reliability.md A1-A9):
- A finished session is written to the spool first (temp file, fsync, rename, fsync of the
  directory) and removed only after the collector's 2xx for that result id, so a crash
  or an unreachable collector loses nothing.
- Network errors, 408, 425, 429 and 5xx are retried with exponential backoff (retry_min_s
  doubling to retry_max_s, +-50 % jitter), honouring a Retry-After up to retry_max_s.
  A result the collector refuses for good moves to ``dead-letter/`` with the reason next
  to it; ``bbprobe status`` lists them. Nothing is dropped silently.
- A backlog goes oldest first, in batches (``POST /api/v1/results/batch``, one collector
  transaction each), at most ``max_requests_per_s`` requests a second.
- The spool is bounded: beyond ``spool_max_bytes``, below ``min_free_bytes`` of free disk,
  or past ``max_age_days``, the oldest results are dropped, counted, and a gap record
  (``agent.schema.GapRecord``) is spooled and sent in their place. A full disk (ENOSPC)
  is a counted drop, never a crash and never a torn file.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp

from agent import spec
from agent.config import DeliveryConfig
from agent.errors import ConfigError, DeliveryError
from agent.schema import SCHEMA_VERSION, GapRecord, SessionResult, format_utc, to_dict, utc_now

RETRYABLE_STATUS = frozenset({408, 425, 429})
BATCH_PATH = spec.RESULTS_PATH + "/batch"
GAPS_PATH = "/api/v1/gaps"
_STAMP = "%Y%m%dT%H%M%S.%fZ"


def result_json(result: SessionResult) -> str:
    return json.dumps(to_dict(result), separators=(",", ":"), allow_nan=False)


# --- pure policy -------------------------------------------------------------------------


def backoff_s(failures: int, lo: float, hi: float, u: float) -> float:
    """Delay before retry number ``failures`` (1, 2, ...): lo x 2^(failures-1), capped at
    hi, times a jitter factor 0.5 + u for u in [0, 1) (+-50 %)."""
    base: float = min(hi, lo * 2.0 ** max(failures - 1, 0))
    return base * (0.5 + u)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date, RFC 9110
    §10.2.3); None when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - now).total_seconds())


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


def batches(entries: Sequence[Entry], max_results: int, max_bytes: int) -> list[list[Entry]]:
    """Consecutive batches, oldest first, within both caps (a result larger than
    ``max_bytes`` goes alone). Pure."""
    out: list[list[Entry]] = []
    current: list[Entry] = []
    size = 0
    for e in entries:
        if current and (len(current) >= max_results or size + e.size > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append(e)
        size += e.size
    if current:
        out.append(current)
    return out


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


class Spool:
    def __init__(self, state_dir: str | Path, cfg: DeliveryConfig | None = None) -> None:
        self.root = Path(state_dir)
        self.dir = self.root / "spool"
        self.dead_dir = self.root / "dead-letter"
        self.gap_dir = self.root / "gaps"
        self.stats_path = self.root / "delivery.json"
        self.cfg = cfg or DeliveryConfig()

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
        data = result_json(result)
        now = now or datetime.now(UTC)
        vfs = os.statvfs(self.dir)
        victims = evictions(self.entries(), len(data.encode()), self.cfg,
                            vfs.f_bavail * vfs.f_frsize, now)
        self._drop(result.probe_id, victims)
        try:
            _write_durably(final, data)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            started = datetime.fromisoformat(result.started_at).astimezone(UTC)
            self._drop(result.probe_id, [(Entry(final, 0, started), "disk_full")])
            self.note(last_error=f"spool write failed: {exc.strerror}; result dropped")
            return None
        s = result.summary
        recent = [{"result_id": result.result_id, "started_at": result.started_at,
                   "download_bps": s.download_bps, "upload_bps": s.upload_bps,
                   "rtt_mean_ms": s.rtt_mean_ms, "loss_ratio": s.loss_ratio,
                   "valid": result.valid}, *self.stats().get("last_results", [])][:5]
        self.note(last_results=recent)
        return final

    def _drop(self, probe_id: str, victims: Sequence[tuple[Entry, str]]) -> None:
        """Delete ``victims`` and account for them in one pending gap record per reason
        (merged into any not yet sent, so a long squeeze does not fill the disk with gap
        records)."""
        by_reason: dict[str, list[Entry]] = {}
        for entry, reason in victims:
            entry.path.unlink(missing_ok=True)
            by_reason.setdefault(reason, []).append(entry)
        for reason, dropped in by_reason.items():
            self.count("dropped_total", len(dropped))
            first = min(e.started_at for e in dropped)
            last = max(e.started_at for e in dropped)
            count = len(dropped)
            earlier = [p for p in self.gaps() if f"_{reason}_" in p.name]
            for path in earlier:
                try:
                    old = json.loads(path.read_text(encoding="utf-8"))
                    count += int(old["dropped"])
                    first = min(first, datetime.fromisoformat(old["first_started_at"]))
                    last = max(last, datetime.fromisoformat(old["last_started_at"]))
                except (OSError, ValueError, KeyError):
                    continue
            gap = GapRecord(
                schema_version=SCHEMA_VERSION, gap_id=str(uuid.uuid4()), probe_id=probe_id,
                recorded_at=utc_now(), reason=reason,  # type: ignore[arg-type]
                dropped=count, first_started_at=format_utc(first),
                last_started_at=format_utc(last),
            )
            try:
                self.gap_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                _write_durably(self.gap_dir / f"{gap.recorded_at.replace(':', '')}_{reason}_"
                                              f"{gap.gap_id}.json",
                               json.dumps(to_dict(gap), separators=(",", ":")))
            except OSError as exc:
                # Even the gap record does not fit: the counter still says how many.
                self.note(last_error=f"cannot record a gap of {len(dropped)}: {exc.strerror}")
                continue
            for path in earlier:  # merged into the new record
                path.unlink(missing_ok=True)
        if victims:
            _fsync_dir(self.dir)

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def gaps(self) -> list[Path]:
        if not self.gap_dir.is_dir():
            return []
        return sorted(self.gap_dir.glob("*.json"))

    def dead_letter(self, path: Path, reason: str) -> Path:
        self.dead_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.dead_dir / path.name
        target.with_suffix(".reason.txt").write_text(reason + "\n", encoding="utf-8")
        path.replace(target)
        _fsync_dir(self.dead_dir)
        _fsync_dir(path.parent)
        self.count("dead_lettered_total")
        return target

    def dead_letters(self) -> list[Path]:
        if not self.dead_dir.is_dir():
            return []
        return sorted(self.dead_dir.glob("*.json"))

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


# --- the collector client ----------------------------------------------------------------


def _error_message(status: int, body: bytes) -> str:
    try:
        data: Any = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return f"HTTP {status}: {data['error']}"
    except ValueError:
        pass
    return f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    result_id: str
    status: int
    error: str | None


class CollectorClient:
    """Talks to the collector's API with the probe's bearer token. Every request carries
    the probe's wall clock (X-Bbprobe-Sent-At) so the collector can measure skew."""

    def __init__(self, url: str, token: str, timeout_s: float = spec.PUSH_TIMEOUT_S, *,
                 ca_file: str = "", client_cert: str = "", client_key: str = "") -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.ssl: ssl.SSLContext | bool = True
        if ca_file or client_cert:
            try:
                context = ssl.create_default_context(cafile=ca_file or None)
                if client_cert:
                    context.load_cert_chain(client_cert, client_key or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"collector TLS: cannot load CA, certificate or key: "
                                  f"{exc}") from None
            self.ssl = context

    def _session(self) -> aiohttp.ClientSession:
        headers = {"User-Agent": "bbprobe-agent"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return aiohttp.ClientSession(
            timeout=self.timeout, trust_env=False, headers=headers,
            connector=aiohttp.TCPConnector(ssl=self.ssl),
        )

    async def _request(self, method: str, path: str, data: bytes | None = None) -> Any:
        headers = {"X-Bbprobe-Sent-At": utc_now()}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session() as session, session.request(
                method, self.url + path, data=data, headers=headers
            ) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    retryable = resp.status >= 500 or resp.status in RETRYABLE_STATUS
                    raise DeliveryError(
                        _error_message(resp.status, body), retryable=retryable,
                        status=resp.status,
                        retry_after_s=parse_retry_after(resp.headers.get("Retry-After"),
                                                        datetime.now(UTC)),
                    )
                return json.loads(body) if body else None
        except (aiohttp.ClientError, OSError) as exc:
            raise DeliveryError(
                f"cannot reach the collector at {self.url}: {exc or type(exc).__name__}",
                retryable=True,
            ) from None
        except ValueError:
            raise DeliveryError("collector sent a reply that is not JSON", retryable=True) from None

    async def whoami(self) -> str:
        reply = await self._request("GET", spec.WHOAMI_PATH)
        if not isinstance(reply, dict) or not isinstance(reply.get("probe_id"), str):
            raise DeliveryError("collector's whoami reply has no probe_id", retryable=True)
        return str(reply["probe_id"])

    async def push(self, body: bytes) -> bool:
        """Send one result; True if newly stored, False if the collector already had it."""
        reply = await self._request("POST", spec.RESULTS_PATH, body)
        return bool(isinstance(reply, dict) and reply.get("stored"))

    async def push_batch(self, bodies: Sequence[bytes]) -> list[ItemOutcome]:
        """Send results in one request (one collector transaction); an outcome each."""
        reply = await self._request("POST", BATCH_PATH,
                                    b'{"results":[' + b",".join(bodies) + b"]}")
        items = reply.get("items") if isinstance(reply, dict) else None
        if not isinstance(items, list) or len(items) != len(bodies):
            raise DeliveryError("collector's batch reply does not list every result",
                                retryable=True)
        return [ItemOutcome(str(i.get("result_id")), int(i.get("status", 0)),
                            i.get("error")) for i in items]

    async def push_gap(self, body: bytes) -> None:
        await self._request("POST", GAPS_PATH, body)


# --- delivery ----------------------------------------------------------------------------


@dataclass(slots=True)
class DeliveryReport:
    delivered: list[str] = field(default_factory=list)  # result ids the collector acked
    dead_lettered: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    gaps_sent: int = 0
    requests: int = 0
    retries: int = 0
    pending: int = 0  # still in the spool
    error: str | None = None  # why delivery stopped early


Sleep = Callable[[float], Awaitable[None]]


async def deliver(spool: Spool, client: CollectorClient, cfg: DeliveryConfig | None = None,
                  *, clock: Callable[[], float] = time.monotonic, sleep: Sleep = asyncio.sleep,
                  jitter: Callable[[], float] = random.random) -> DeliveryReport:
    """Push gap records, then every spooled result oldest first in batches, retrying
    retryable failures with backoff until ``cfg.max_wait_s`` has passed. Cancelling it
    (SIGTERM) loses nothing: a result leaves the spool only after its 2xx."""
    cfg = cfg or spool.cfg
    report = DeliveryReport()
    deadline = clock() + cfg.max_wait_s
    failures = 0
    last_request = float("-inf")
    batch_results = cfg.batch_results
    while True:
        gaps = spool.gaps()
        todo = batches(spool.entries(), batch_results, cfg.batch_bytes)
        if not gaps and not todo:
            break
        wait = last_request + 1 / cfg.max_requests_per_s - clock()
        if wait > 0:
            await sleep(wait)
        last_request = clock()
        report.requests += 1
        spool.note(last_attempt_at=utc_now())
        try:
            stored = 0
            if gaps:
                await client.push_gap(gaps[0].read_bytes())
                spool.remove(gaps[0])
                report.gaps_sent += 1
            else:
                batch = todo[0]
                outcomes = await client.push_batch([e.path.read_bytes() for e in batch])
                for entry, outcome in zip(batch, outcomes, strict=True):
                    if 200 <= outcome.status < 300:
                        spool.remove(entry.path)
                        report.delivered.append(entry.path.stem.split("_", 1)[-1])
                    elif outcome.status >= 500 or outcome.status in RETRYABLE_STATUS:
                        continue  # stays spooled; the next pass sends it again
                    else:
                        reason = f"HTTP {outcome.status}: {outcome.error or 'refused'}"
                        target = spool.dead_letter(entry.path, reason)
                        report.dead_lettered.append((str(target), reason))
                stored = sum(1 for o in outcomes if 200 <= o.status < 300)
            failures = 0
            spool.note(add={"delivered_total": stored}, last_success_at=utc_now(),
                       last_error=None)
        except DeliveryError as exc:
            if not exc.retryable:
                if exc.status == 413 and not gaps and batch_results > 1:
                    batch_results = max(1, len(todo[0]) // 2)  # smaller batches, same data
                    continue
                if exc.status in (400, 413, 422) and (gaps or len(todo[0]) == 1):
                    # This one document is refused for good: set it aside, go on.
                    path = gaps[0] if gaps else todo[0][0].path
                    target = spool.dead_letter(path, str(exc))
                    report.dead_lettered.append((str(target), str(exc)))
                    continue
                # 401/403/404...: the request, not a result, is refused. Keep everything.
                report.error = str(exc)
                spool.note(last_error=str(exc))
                break
            failures += 1
            delay = exc.retry_after_s if exc.retry_after_s is not None else \
                backoff_s(failures, cfg.retry_min_s, cfg.retry_max_s, jitter())
            delay = min(delay, cfg.retry_max_s)
            spool.note(last_error=str(exc))
            if clock() + delay > deadline:
                report.error = str(exc)
                break
            report.retries += 1
            await sleep(delay)
    report.pending = len(spool.entries())
    return report
