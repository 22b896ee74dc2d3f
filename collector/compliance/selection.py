"""Exact order statistics of many float64 values without holding them: two-pass radix
selection on the IEEE-754 bit patterns (pure, numpy).

Allegato 2 (delibera 131/06/CSP) asks for the 5th and 95th percentiles of the per-test
speeds, and a percentile's confidence interval reads two more order statistics
(uncertainty.py): a handful of exact order statistics, never an estimate. Sorting every
speed of a fleet (8.8 M at 1,000 probes, 880 M at 100,000) costs memory in proportion to
the samples; selection costs a fixed histogram plus the few values near each wanted rank.

How (after the radix select of Knuth, TAOCP vol. 3, 5.2.5, applied to IEEE 754 binary64):
for values >= 0 the bit pattern read as an unsigned 64-bit integer orders exactly as the
values do (IEEE 754-2008 3.4: sign, then biased exponent, then significand), so
- pass 1 counts the values per bucket of their top ``TOP_BITS`` bits (after the sign: the
  11 exponent bits and 9 significand bits, a bucket is at most 1/512 of an octave wide)
  and finds the bucket holding each wanted rank and the rank inside it;
- pass 2 keeps only the values of those buckets and sorts them; a bucket holding more
  than ``CAP`` values is split instead by its next ``NEXT_BITS`` bits (one more pass),
  down to single bit patterns, which need no sorting at all.
The result is the value ``sorted(values)[rank]`` itself, bit for bit.

Why here and not in the database (PostgreSQL's ``percentile_cont``): the day rollup keeps
each probe-day's speeds packed in one column (rollup.pack_speeds), which SQL cannot unnest
cheaply; ``percentile_cont`` over ``transfer_facts`` would sort every attempt row of the
scope, and SQLite has no such aggregate. The same code over both backends' rows gives the
same answer to the last digit, as the rest of rollup.py does with ``math.fsum``.

Values come as a re-iterable of chunks: a callable returning an iterator of numpy arrays or
of bytes holding packed little-endian float64 (the day rollup's form). -0.0 counts as 0.0
(they compare equal; the bit pattern of -0.0 would not order); NaN or a negative value
is refused with a ValueError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Chunk = npt.NDArray[np.float64] | bytes | bytearray | memoryview
Chunks = Callable[[], Iterable[Chunk]]
Keys = npt.NDArray[np.uint64]

# Pass 1's histogram: 2^20 buckets of int64, 8 MiB, whatever the number of values.
TOP_BITS = 20
# A refining pass splits one bucket by this many more bits (a 512 KiB histogram).
NEXT_BITS = 16
# At most this many values are kept and sorted in one pass (16 MiB as uint64); buckets
# beyond it are refined instead.
CAP = 1 << 21
# Values are processed in blocks of about this many (a chunk is one probe-day: tens).
BLOCK = 1 << 20
# Up to this many values (64 MiB as uint64) pass 1 also holds, and selects among them in
# memory (numpy's introselect partition) with no second read of the rows: a 1,000-probe
# fleet's semester (4.4 M speeds a direction) reads its rows once. Beyond it, the passes.
HOLD = 1 << 23
# The bit patterns of values >= 0 have the sign bit clear: 63 bits order them.
_VALUE_BITS = 63


@dataclass(frozen=True, slots=True)
class Histogram:
    """Counts per pass-1 bucket (nonzero buckets only), for plots: a bucket's values
    lie within 1/512 of an octave of its midpoint."""

    buckets: npt.NDArray[np.int64]  # bucket numbers (top bits of the pattern), ascending
    counts: npt.NDArray[np.int64]

    def midpoints(self) -> npt.NDArray[np.float64]:
        shift = _VALUE_BITS - TOP_BITS
        keys = (self.buckets.astype(np.uint64) << np.uint64(shift)) | np.uint64(1 << (shift - 1))
        return keys.view(np.float64)

    def stand_ins(self, limit: int) -> list[float]:
        """About ``limit`` values (all of them, as bucket midpoints, when there are no
        more) distributed as the counts are: the largest-remainder rounding of the
        cumulative counts, so the total stays ``limit`` with no drift."""
        total = int(self.counts.sum())
        if total == 0 or limit <= 0:
            return []
        if total <= limit:
            each = self.counts
        else:
            cum = np.rint(np.cumsum(self.counts) * (limit / total)).astype(np.int64)
            each = np.diff(cum, prepend=0)
        values: list[float] = np.repeat(self.midpoints(), each).tolist()
        return values


@dataclass(frozen=True, slots=True)
class Selection:
    """How many values there were, the wanted order statistics (0-based rank -> value,
    as ``sorted(values)[rank]``), and pass 1's histogram."""

    n: int
    ranked: dict[int, float]
    histogram: Histogram


def keys_of(chunk: Chunk) -> Keys:
    """The chunk's values as order-preserving unsigned bit patterns (-0.0 as 0.0)."""
    if isinstance(chunk, np.ndarray):
        values = np.asarray(chunk, dtype=np.float64)
    else:
        values = np.frombuffer(chunk, dtype="<f8").astype(np.float64, copy=False)
    if values.size and not bool((values >= 0).all()):  # NaN compares False too
        bad = float(values[~(values >= 0)][0])
        raise ValueError(f"speed values must be numbers >= 0 to select among, got {bad!r}")
    # -0.0 + 0.0 is +0.0 (IEEE 754 6.3, rounding to nearest): one pattern for zero.
    return (values + 0.0).view(np.uint64)


@dataclass(slots=True)
class _Group:
    """The values whose bit patterns start with ``prefix`` (all but the low ``shift``
    bits), ``count`` of them, and the wanted ranks among them: overall -> inner."""

    prefix: int
    shift: int
    count: int
    wanted: dict[int, int]


def _split(counts: npt.NDArray[np.int64], wanted: dict[int, int], prefix: int,
           shift: int, bits: int) -> list[_Group]:
    """The sub-buckets (``bits`` more bits) holding each wanted inner rank."""
    ends = np.cumsum(counts)
    groups: dict[int, _Group] = {}
    for rank, inner in wanted.items():
        b = int(np.searchsorted(ends, inner, side="right"))
        start = int(ends[b] - counts[b])
        group = groups.setdefault(b, _Group((prefix << bits) | b, shift - bits,
                                            int(counts[b]), {}))
        group.wanted[rank] = inner - start
    return list(groups.values())


def select(chunks: Chunks, ranks: Iterable[int], *, cap: int | None = None,
           hold: int | None = None) -> Selection:
    """The order statistics ``ranks`` (0-based, of the ascending values) of every value
    ``chunks()`` yields, exactly; ``chunks`` is called once per pass (one when there are
    at most ``hold`` values; two, or more when a bucket holds more than ``cap``). A rank
    outside 0..n-1 is a ValueError."""
    wanted = list(ranks)
    selector = Selector(lambda n: wanted, cap=cap, hold=hold)
    while True:
        for chunk in chunks():
            selector.feed(chunk)
        if selector.end_pass():
            return selector.result()


class Selector:
    """The passes of ``select`` driven from outside, so that one read of a store's rows
    feeds several selections (download and upload) and other sums at once: ``feed``
    every chunk, in any order but the same values each pass, then ``end_pass``, until it
    returns True. ``ranks(n)`` names the wanted ranks once n is known (after pass 1).
    With ``keep``, pass 1 also keeps the values (in the order fed) while there are at
    most ``keep``: then no second pass is needed, and ``kept()`` gives them."""

    def __init__(self, ranks: Callable[[int], Iterable[int]], *, keep: int = 0,
                 cap: int | None = None, hold: int | None = None) -> None:
        self._ranks = ranks
        self._keep = keep
        self._cap = CAP if cap is None else cap
        self._hold = HOLD if hold is None else hold
        self._held: list[Keys] | None = []
        self._n = 0
        self._hist: npt.NDArray[np.int64] | None = np.zeros(1 << TOP_BITS, dtype=np.int64)
        self._histogram = Histogram(np.empty(0, np.int64), np.empty(0, np.int64))
        self._values: list[npt.NDArray[np.float64]] | None = [] if keep > 0 else None
        self._pending: list[Keys] = []
        self._size = 0
        self._ranked: dict[int, float] = {}
        self._groups: list[_Group] = []
        self._kept_groups: list[_Group] = []
        self._parts: list[list[Keys]] = []
        self._split_groups: list[_Group] = []
        self._split_bits: list[int] = []
        self._counts: list[npt.NDArray[np.int64]] = []
        self._done = False
        self._first = True

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, chunk: Chunk) -> None:
        if self._done:
            raise RuntimeError("selection already done: no more passes to feed")
        keys = keys_of(chunk)
        if not keys.size:
            return
        if self._first and self._values is not None:
            if self._n + keys.size <= self._keep:
                # The values as given (a -0.0 stays -0.0 in the list).
                self._values.append(np.array(chunk, dtype=np.float64)
                                    if isinstance(chunk, np.ndarray)
                                    else np.frombuffer(chunk, dtype="<f8").astype(np.float64))
            else:
                self._values = None
        if self._first:
            if self._held is not None:
                if self._n + keys.size <= self._hold:
                    self._held.append(keys)
                else:
                    self._held = None
            self._n += keys.size
        self._pending.append(keys)
        self._size += keys.size
        if self._size >= BLOCK:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._size = [], 0
        if self._first:
            assert self._hist is not None
            self._hist += np.bincount(
                (keys >> np.uint64(_VALUE_BITS - TOP_BITS)).astype(np.intp),
                minlength=1 << TOP_BITS)
            return
        for part, g in zip(self._parts, self._kept_groups, strict=True):
            mine = keys[(keys >> np.uint64(g.shift)) == np.uint64(g.prefix)]
            if mine.size:
                part.append(mine)
        for counts, bits, g in zip(self._counts, self._split_bits, self._split_groups,
                                   strict=True):
            mine = keys[(keys >> np.uint64(g.shift)) == np.uint64(g.prefix)]
            if mine.size:
                low = (mine >> np.uint64(g.shift - bits)) & np.uint64((1 << bits) - 1)
                np.add(counts, np.bincount(low.astype(np.intp), minlength=1 << bits),
                       out=counts)

    def end_pass(self) -> bool:
        """Close the pass; True when every wanted order statistic is known."""
        if self._done:
            return True
        self._flush()
        if self._first:
            self._first = False
            hist = self._hist
            assert hist is not None
            self._hist = None
            nonzero = np.flatnonzero(hist)
            self._histogram = Histogram(nonzero.astype(np.int64), hist[nonzero])
            wanted = sorted(set(self._ranks(self._n)))
            if wanted and not 0 <= wanted[0] <= wanted[-1] < self._n:
                bad = wanted[0] if wanted[0] < 0 else wanted[-1]
                raise ValueError(f"rank {bad} is outside the {self._n} values "
                                 f"(0..{self._n - 1})")
            if self._values is not None:
                self._held = None
                ordered = sorted(self.kept())
                self._ranked = {r: ordered[r] for r in wanted}
                self._done = True
                return True
            if self._held is not None:
                held = np.concatenate(self._held) if self._held else np.empty(0, np.uint64)
                self._held = None
                if wanted:
                    held.partition(wanted)  # each wanted rank in its sorted place
                    chosen = held[wanted].view(np.float64).tolist()
                    self._ranked = dict(zip(wanted, chosen, strict=True))
                self._done = True
                return True
            self._groups = (_split(hist, {r: r for r in wanted}, 0, _VALUE_BITS, TOP_BITS)
                            if wanted else [])
        else:
            self._groups = self._resolve()
        self._plan()
        self._done = not self._groups
        return self._done

    def _plan(self) -> None:
        """Which groups the next pass keeps and which it splits."""
        self._kept_groups, self._split_groups = [], []
        room = self._cap
        remaining: list[_Group] = []
        for g in sorted(self._groups, key=lambda g: g.count):
            if g.shift == 0:  # one bit pattern: every value in it is the same
                value = float(np.array([g.prefix], dtype=np.uint64).view(np.float64)[0])
                self._ranked.update({rank: value for rank in g.wanted})
            elif g.count <= room:
                self._kept_groups.append(g)
                room -= g.count
                remaining.append(g)
            else:
                self._split_groups.append(g)
                remaining.append(g)
        self._groups = remaining
        self._parts = [[] for _ in self._kept_groups]
        self._split_bits = [min(NEXT_BITS, g.shift) for g in self._split_groups]
        self._counts = [np.zeros(1 << b, dtype=np.int64) for b in self._split_bits]

    def _resolve(self) -> list[_Group]:
        for part, g in zip(self._parts, self._kept_groups, strict=True):
            values = np.sort(np.concatenate(part) if part else np.empty(0, np.uint64))
            _same(g.count, values.size)
            chosen = values.view(np.float64)
            self._ranked.update({rank: float(chosen[inner]) for rank, inner in g.wanted.items()})
        out: list[_Group] = []
        for count, bits, g in zip(self._counts, self._split_bits, self._split_groups,
                                  strict=True):
            _same(g.count, int(count.sum()))
            out.extend(_split(count, g.wanted, g.prefix, g.shift, bits))
        return out

    @property
    def kept_all(self) -> bool:
        """Whether pass 1 kept every value (at most ``keep`` of them)."""
        return self._values is not None

    def kept(self) -> list[float]:
        """The values fed in pass 1, in order (only when there were at most ``keep``)."""
        if self._values is None:
            raise RuntimeError(f"{self._n} values were not kept (keep={self._keep})")
        return [v for part in self._values for v in part.tolist()]

    def result(self) -> Selection:
        if not self._done:
            raise RuntimeError("selection not done: feed another pass")
        return Selection(self._n, dict(self._ranked), self._histogram)


def _same(before: int, after: int) -> None:
    if before != after:
        raise RuntimeError(f"the values changed between passes ({before} in a bucket, then "
                           f"{after}): they must be read in one snapshot")
