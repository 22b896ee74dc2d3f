"""Result delivery: a durable on-disk spool, and pushes to the collector.

A finished session is written to the spool first (temp file, fsync, rename, fsync of the
directory) and removed only after the collector answers 2xx for it, so a crash or an
unreachable collector loses nothing: the next run sends the backlog, oldest first.
A result the collector refuses for good (4xx other than 408/425/429) moves to
``dead-letter/`` with the reason next to it, never silently dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent import spec
from agent.errors import DeliveryError
from agent.schema import SessionResult, to_dict

RETRYABLE_STATUS = frozenset({408, 425, 429})


def result_json(result: SessionResult) -> str:
    return json.dumps(to_dict(result), separators=(",", ":"), allow_nan=False)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir) / "spool"
        self.dead_dir = Path(state_dir) / "dead-letter"

    def put(self, result: SessionResult) -> Path:
        """Write ``result`` durably; file names sort oldest first."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = result.started_at.replace(":", "").replace("-", "")
        final = self.dir / f"{stamp}_{result.result_id}.json"
        tmp = final.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(result_json(result))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(final)
        _fsync_dir(self.dir)
        return final

    def pending(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob("*.json"))

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        _fsync_dir(self.dir)

    def dead_letter(self, path: Path, reason: str) -> Path:
        self.dead_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.dead_dir / path.name
        target.with_suffix(".reason.txt").write_text(reason + "\n", encoding="utf-8")
        path.replace(target)
        _fsync_dir(self.dead_dir)
        _fsync_dir(self.dir)
        return target

    def dead_letters(self) -> list[Path]:
        if not self.dead_dir.is_dir():
            return []
        return sorted(self.dead_dir.glob("*.json"))


def _error_message(status: int, body: bytes) -> str:
    try:
        data: Any = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return f"HTTP {status}: {data['error']}"
    except ValueError:
        pass
    return f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"


class CollectorClient:
    """Talks to the collector's API with the probe's bearer token."""

    def __init__(self, url: str, token: str, timeout_s: float = spec.PUSH_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            timeout=self.timeout,
            trust_env=False,
            headers={"Authorization": f"Bearer {self.token}", "User-Agent": "bbprobe-agent"},
        )

    async def _request(self, method: str, path: str, data: bytes | None = None) -> Any:
        headers = {"Content-Type": "application/json"} if data is not None else {}
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


@dataclass(slots=True)
class DeliveryReport:
    delivered: list[str] = field(default_factory=list)  # result ids the collector acked
    dead_lettered: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    pending: int = 0  # still in the spool
    error: str | None = None  # why delivery stopped early


async def deliver(spool: Spool, client: CollectorClient) -> DeliveryReport:
    """Push every spooled result, oldest first; stop at the first retryable failure."""
    report = DeliveryReport()
    for path in spool.pending():
        try:
            body = path.read_bytes()
            await client.push(body)
        except DeliveryError as exc:
            if exc.retryable:
                report.error = str(exc)
                break
            target = spool.dead_letter(path, str(exc))
            report.dead_lettered.append((str(target), str(exc)))
            continue
        spool.remove(path)
        report.delivered.append(path.stem.split("_", 1)[-1])
    report.pending = len(spool.pending())
    return report
