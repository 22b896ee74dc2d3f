"""Group commit: results delivered at the same moment share one transaction and one
fsync.

Each delivery waits for a commit slot (one for SQLite, which has one writer; the pool's
size for PostgreSQL). Whoever gets a slot commits every delivery waiting at that moment,
its own and the others', in one ``insert_results`` call, and hands each its outcomes.
A delivery is answered only after the transaction holding it committed, so an
acknowledged result is as durable as before (SQLite ``synchronous=FULL``: it survives a
power cut; tests/integration/test_crash.py kills the collector right after acks).

What a group shares is only the transaction: if it fails as a whole, each delivery is
committed again on its own, so one that cannot be stored (a probe deleted meanwhile) fails
alone and the others are kept. The commit runs as a task the group owns, shielded from
the request that started it: a client that goes away does not cancel the transaction
that other deliveries wait on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

from collector.storage.model import InsertOutcome, NewResult
from collector.storage.store import ResultStore

log = logging.getLogger("bbprobe.collector")

# At most this many results in one transaction: a backlog of batches is committed in
# steps of bounded length (each delivery whole, so one larger batch still goes alone).
MAX_GROUP_RESULTS = 512


class _Delivery:
    __slots__ = ("done", "items", "taken")

    def __init__(self, items: Sequence[NewResult], done: asyncio.Future[list[InsertOutcome]]
                 ) -> None:
        self.items = items
        self.done = done
        self.taken = False  # in a group being committed
        # Mark an outcome nobody awaits any more (its request was cancelled) as read.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())


class GroupCommit:
    """Commits deliveries in groups; ``insert`` answers once the delivery's group
    committed. ``run(fn)`` runs ``fn(store)`` on a database thread. A commit holds its
    slot until its transaction ends, even if the request that started it is cancelled:
    there are never more transactions at once than slots."""

    def __init__(self, run: Callable[[Callable[[ResultStore], list[InsertOutcome]]],
                                     Awaitable[list[InsertOutcome]]],
                 slots: int) -> None:
        self._run = run
        self._slots = asyncio.Semaphore(slots)
        self._waiting: deque[_Delivery] = deque()
        self._commits: set[asyncio.Task[None]] = set()
        # How many transactions and results so far (the benchmark reads them).
        self.groups = 0
        self.results = 0

    async def insert(self, items: Sequence[NewResult]) -> list[InsertOutcome]:
        delivery = _Delivery(items, asyncio.get_running_loop().create_future())
        self._waiting.append(delivery)
        try:
            # Until a group takes it: by this caller's commit, or by another's. A group
            # is bounded, so the oldest deliveries may fill it and this one waits for
            # the next.
            while not delivery.taken:
                await self._slots.acquire()
                if delivery.taken:
                    self._slots.release()
                    break
                task = asyncio.get_running_loop().create_task(self._commit(self._take()))
                self._commits.add(task)
                task.add_done_callback(self._commits.discard)
                await asyncio.shield(task)
        except asyncio.CancelledError:
            if not delivery.taken:
                self._waiting.remove(delivery)  # never committed, never answered
            raise
        return await delivery.done

    def _take(self) -> list[_Delivery]:
        """The waiting deliveries, oldest first, up to MAX_GROUP_RESULTS results (the
        first always, whatever its size)."""
        group: list[_Delivery] = []
        count = 0
        while self._waiting and (not group or
                                 count + len(self._waiting[0].items) <= MAX_GROUP_RESULTS):
            delivery = self._waiting.popleft()
            delivery.taken = True
            group.append(delivery)
            count += len(delivery.items)
        return group

    async def _commit(self, group: list[_Delivery]) -> None:
        """Commit ``group``, answer each delivery in it, then give the slot back."""
        try:
            await self._commit_group(group)
        finally:
            self._slots.release()

    async def _commit_group(self, group: list[_Delivery]) -> None:
        items = [item for delivery in group for item in delivery.items]
        try:
            outcomes = await self._run(partial(_insert, items))
        except Exception as exc:  # each delivery is retried alone below
            if len(group) == 1:
                _settle(group[0], exc)
                return
            log.info("a group of %d deliveries failed to commit (%s); committing each "
                     "alone", len(group), exc)
            for delivery in group:
                alone = delivery.items
                try:
                    _settle(delivery, await self._run(partial(_insert, alone)))
                except Exception as one:  # that delivery's answer
                    _settle(delivery, one)
                else:
                    self.groups += 1
                    self.results += len(alone)
            return
        self.groups += 1
        self.results += len(items)
        at = 0
        for delivery in group:
            _settle(delivery, outcomes[at:at + len(delivery.items)])
            at += len(delivery.items)

    async def close(self) -> None:
        """Wait for the commits in flight (the store closes after them)."""
        if self._commits:
            await asyncio.gather(*self._commits, return_exceptions=True)


def _insert(items: Sequence[NewResult], store: ResultStore) -> list[InsertOutcome]:
    return store.insert_results(items)


def _settle(delivery: _Delivery, outcome: list[InsertOutcome] | BaseException) -> None:
    if delivery.done.done():
        return
    if isinstance(outcome, BaseException):
        delivery.done.set_exception(outcome)
    else:
        delivery.done.set_result(outcome)
