"""Result delivery: pushes what the spool (agent.spool) holds to the collector, through
``agent.client.CollectorClient``.

Contract (shared/reference/reliability.md A1-A9):
- A spooled result is removed only after the collector's 2xx for that result id, so a
  crash or an unreachable collector loses nothing.
- Network errors, 408, 425, 429 and 5xx are retried with exponential backoff (retry_min_s
  doubling to retry_max_s, +-50 % jitter), honouring a Retry-After up to retry_max_s.
  A result the collector refuses for good moves to ``dead-letter/`` with the reason next
  to it; ``bbprobe status`` lists them, ``bbprobe dead-letter retry|drop`` sends them
  again or deletes them. Nothing is dropped silently.
- A backlog goes oldest first, in batches (``POST /api/v1/results/batch``, one collector
  transaction each), at most ``max_requests_per_s`` requests a second. Each spooled file
  is read and parsed before it joins a batch: a damaged one (an SD card's truncated write)
  moves to ``dead-letter/`` instead of making every batch it is in a 400. The collector's
  per-result replies are matched by ``result_id``; a reply that does not account for
  exactly the results sent deletes nothing (they are sent again later). A 413, a 422 or a
  400 naming a field on a batch of several halves the batch size, so one bad document
  cannot hold up the rest; a 400 that names no field is the request's, not a
  document's, and stops delivery with everything kept.
- Gap records go first, each under the identity of the results it stands for. Delivery
  sends only what was spooled for the same token (``agent.identity.claim``); the rest
  stays spooled untouched, is counted (``DeliveryReport.waiting``) and listed by
  ``bbprobe status`` per identity.
- A result measured before the collector named the probe (whoami) is spooled without a
  ``probe_id`` and named at delivery by that same token's whoami: never a guess, never
  another probe's name. A signed result (agent/spooldoc.py) is sent as its JWS,
  unchanged, as the batch item (issue 27): renaming it would break its signature, so the
  collector names an unnamed one by the token's probe; a refusal of its signature is a
  per-item 422, set aside in dead-letter with the collector's reason like any other.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.client import RETRYABLE_STATUS, CollectorClient
from agent.config import DeliveryConfig
from agent.errors import DeliveryError
from agent.identity import Claim, Identity, claim
from agent.schema import utc_now
from agent.spool import Entry, Spool, file_id
from agent.spooldoc import parse_spooled, unnamed

# --- pure policy -------------------------------------------------------------------------


def backoff_s(failures: int, lo: float, hi: float, u: float) -> float:
    """Delay before retry number ``failures`` (1, 2, ...): lo x 2^(failures-1), capped at
    hi, times a jitter factor 0.5 + u for u in [0, 1) (+-50 %)."""
    base: float = min(hi, lo * 2.0 ** max(failures - 1, 0))
    return base * (0.5 + u)


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


# --- delivery ----------------------------------------------------------------------------


@dataclass(slots=True)
class DeliveryReport:
    delivered: list[str] = field(default_factory=list)  # result ids the collector acked
    dead_lettered: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    gaps_sent: int = 0
    requests: int = 0
    retries: int = 0
    pending: int = 0  # still in the spool, this identity's
    waiting: int = 0  # spooled for another identity (or unplaceable): left as they are
    error: str | None = None  # why delivery stopped early


Sleep = Callable[[float], Awaitable[None]]


async def deliver(spool: Spool, client: CollectorClient, cfg: DeliveryConfig | None = None,
                  *, probe_id: str | None = None, clock: Callable[[], float] = time.monotonic,
                  sleep: Sleep = asyncio.sleep,
                  jitter: Callable[[], float] = random.random,
                  say: Callable[[str], None] | None = None) -> DeliveryReport:
    """Push gap records, then every spooled result oldest first in batches, retrying
    retryable failures with backoff until ``cfg.max_wait_s`` has passed. Cancelling it
    (SIGTERM) loses nothing: a result leaves the spool only after its 2xx.

    Only documents spooled for this client's token are sent (``claim``); the others stay
    as they are, counted in ``waiting``. A document spooled without a probe id is sent
    under ``probe_id`` (the configured one, or the collector's answer for this token at
    the start of this session); when that is None too, the collector is asked (whoami)
    first, and until it answers nothing unnamed is sent.

    ``say`` is told, before each wait, what delivery waits for and for how long (a
    person at a terminal is not left with a silent minute)."""
    cfg = cfg or spool.cfg
    report = DeliveryReport()
    deadline = clock() + cfg.max_wait_s
    failures = 0
    last_request = float("-inf")
    batch_results = cfg.batch_results
    known = probe_id or None
    # Whose each file is, read once: (recorded identity, probe_id if none was recorded).
    owners: dict[Path, tuple[Identity | None, str | None]] = {}

    def claimed(path: Path) -> Claim:
        if path not in owners:
            recorded = spool.identity_of(path)
            owners[path] = (recorded, None if recorded else spool.facts(path)[1])
        return claim(*owners[path], client.identity, known)

    while True:
        gaps = [p for p in spool.gaps() if claimed(p) != "wait"]
        if gaps:
            id_key, paths = "gap_id", gaps[:1]
        else:
            todo = batches([e for e in spool.entries() if claimed(e.path) != "wait"],
                           batch_results, cfg.batch_bytes)
            if not todo:
                break
            id_key, paths = "result_id", [e.path for e in todo[0]]
        try:
            docs = _read_for_sending(spool, paths, id_key, report)
        except OSError as exc:
            # Cannot even set a damaged file aside: stop rather than send around it forever.
            report.error = f"cannot move a damaged spool file to dead-letter: {exc}"
            spool.note(last_error=report.error)
            break
        if docs is None:
            continue  # something was set aside or is gone: plan the batch again
        # Unnamed, or (older spools) placed only by the name the collector gives us.
        # A signed one goes as signed: the collector names it by the token's probe.
        ask = known is None and any(unnamed(doc) or claimed(path) == "ask"
                                    for path, doc in docs)
        wait = last_request + 1 / cfg.max_requests_per_s - clock()
        if wait > 0:
            await sleep(wait)
        last_request = clock()
        report.requests += 1
        spool.note(last_attempt_at=utc_now())
        try:
            stored = 0
            if ask:
                known = await client.whoami()
                continue  # the push is the next request, paced like any other
            bodies = [(file_id(path), _body(doc, known)) for path, doc in docs]
            if id_key == "gap_id":
                await client.push_gap(bodies[0][1])
                spool.remove(paths[0])
                report.gaps_sent += 1
            else:
                outcomes = await client.push_batch(bodies)
                for path, outcome in zip(paths, outcomes, strict=True):
                    if 200 <= outcome.status < 300:
                        spool.remove(path)
                        report.delivered.append(outcome.result_id)
                        stored += 1
                    elif outcome.status >= 500 or outcome.status in RETRYABLE_STATUS:
                        continue  # stays spooled; the next pass sends it again
                    else:
                        reason = f"HTTP {outcome.status}: {outcome.error or 'refused'}"
                        target = spool.dead_letter(path, reason)
                        report.dead_lettered.append((str(target), reason))
            failures = 0
            batch_results = min(cfg.batch_results, batch_results * 2)  # grow back
            spool.note(add={"delivered_total": stored}, last_success_at=utc_now(),
                       last_error=None)
        except DeliveryError as exc:
            document_fault = exc.status in (413, 422) or (exc.status == 400 and
                                                          exc.field is not None)
            if not exc.retryable and not ask and document_fault:
                if len(paths) > 1:
                    # One document too large or refused spoils its whole batch: halve the
                    # batches (same data) until it goes alone and the rest get through.
                    batch_results = max(1, len(paths) // 2)
                    continue
                # This one document is refused for good: set it aside, go on. A 400 that
                # names no field is the request's (a proxy, a header), not the
                # document's: it stops below with everything kept, rather than moving
                # the whole spool to dead-letter one result at a time.
                target = spool.dead_letter(paths[0], str(exc))
                report.dead_lettered.append((str(target), str(exc)))
                continue
            if not exc.retryable:
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
            if say is not None:
                for line in waiting_lines(str(exc), report.retries, delay,
                                          deadline - clock()):
                    say(line)
            await sleep(delay)
    left = spool.entries()
    report.waiting = sum(claimed(e.path) == "wait" for e in left)
    report.pending = len(left) - report.waiting
    return report


def waiting_lines(error: str, retry: int, delay_s: float, left_s: float) -> list[str]:
    """What delivery says before its ``retry``-th wait: why, how long, and (the first
    time) that stopping loses nothing. Pure."""
    if retry > 1:
        return [f"delivery: still {error}; next try in {delay_s:.0f} s, "
                f"{left_s:.0f} s left"]
    return [f"delivery: {error}; trying again for up to {left_s:.0f} s "
            f"(delivery.max_wait_s), next in {delay_s:.0f} s",
            "Ctrl-C stops waiting and keeps the result in the spool (bbprobe push or "
            "the next run sends it)"]


def _body(doc: dict[str, Any], probe_id: str | None) -> bytes:
    """The document to send: named now if it was spooled unsigned before the probe's
    name was known (the spool file keeps it unnamed: a lost reply resends it under the
    same name, asked again). A signed result's JWS goes unchanged, whatever its payload
    says: renaming it would break its signature (the collector names it)."""
    if unnamed(doc):
        assert probe_id is not None  # deliver() asks whoami before sending unnamed ones
        doc = {**doc, "probe_id": probe_id}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _read_for_sending(spool: Spool, paths: Sequence[Path], id_key: str,
                      report: DeliveryReport) -> list[tuple[Path, dict[str, Any]]] | None:
    """Each file parsed (``parse_spooled``), or None when one had to be set aside in
    dead-letter (damaged, or a second file with the same id) or vanished meanwhile
    (another bbprobe delivered it): the caller plans its batch again."""
    out: list[tuple[Path, dict[str, Any]]] = []
    seen: set[str] = set()
    complete = True
    for path in paths:
        problem: str | None
        try:
            raw = path.read_bytes()
        except FileNotFoundError as exc:
            if not os.path.lexists(path):
                complete = False
                continue
            # Still listed but cannot be opened (a dangling link): set it aside, or every
            # pass would find it again.
            problem = f"unreadable: {exc.strerror or exc}"
        except OSError as exc:
            problem = f"unreadable: {exc.strerror or exc}"
        else:
            try:
                doc = parse_spooled(raw, file_id(path), id_key)
                sent_id = file_id(path)  # parse_spooled: the document's own id
                problem = None if sent_id not in seen else \
                    f"a second spool file for {id_key} {sent_id}"
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            reason = f"damaged spool file, not sent: {problem}"
            target = spool.dead_letter(path, reason)
            report.dead_lettered.append((str(target), reason))
            complete = False
            continue
        seen.add(sent_id)
        out.append((path, doc))
    return out if complete else None
