"""The per-test speeds behind a scope's percentiles, as the evaluator reads them: a count
and the order statistics it asks for (pure).

Allegato 2 (delibera 131/06/CSP) defines "banda minima" and "banda massima" as the 5th
and 95th percentiles of the per-test speeds: exact values, not estimates. The evaluator
never needs all the values sorted, only a handful of order statistics (the ranks a
percentile and its confidence interval read: ``agent.stats.percentile_ranks``,
``uncertainty.needed_ranks``). So a scope's speeds are a ``Speeds``: a list in memory
for a line or a small scope (``SpeedList``), or the selected order statistics a store
computed over millions of stored values without holding them (selection.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol


class Speeds(Protocol):
    """Per-test speeds (kbit/s) of a scope, by count and order statistic."""

    def __len__(self) -> int: ...

    def ranked(self, ranks: Iterable[int]) -> dict[int, float]:
        """The 0-based order statistics of the ascending values at ``ranks``."""
        ...

    def plot_values(self, limit: int) -> Sequence[float]:
        """Values for a histogram (a plot, never a figure): all of them, or at most about
        ``limit`` standing for them."""
        ...


class SpeedList(list[float]):
    """Speeds held in memory (a line, a small scope, a samples file): a list, which
    sorts itself once when asked for order statistics."""

    __slots__ = ("_sorted",)

    def __init__(self, values: Iterable[float] = ()) -> None:
        super().__init__(values)
        self._sorted: list[float] | None = None

    def ranked(self, ranks: Iterable[int]) -> dict[int, float]:
        # Sorted afresh when the list changed since (its length is the cheap check: a
        # list is only ever appended to while observations are gathered).
        if self._sorted is None or len(self._sorted) != len(self):
            self._sorted = sorted(self)
        ordered = self._sorted
        return {r: ordered[r] for r in ranks}

    def plot_values(self, limit: int) -> Sequence[float]:
        return self


class StoredSpeeds:
    """Speeds a store selected from (selection.py): their count, the order statistics
    it computed (``uncertainty.needed_ranks``), and a coarse histogram for plots. It
    holds no values; asking for a rank it did not select is an error, never a guess."""

    __slots__ = ("_n", "_plot", "_ranked")

    def __init__(self, n: int, ranked: Mapping[int, float],
                 plot: Callable[[int], Sequence[float]] | None = None) -> None:
        self._n = n
        self._ranked = dict(ranked)
        self._plot = plot

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"StoredSpeeds(n={self._n}, ranks={sorted(self._ranked)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StoredSpeeds):
            return NotImplemented
        return (self._n, self._ranked) == (other._n, other._ranked)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, as a list is

    def ranked(self, ranks: Iterable[int]) -> dict[int, float]:
        wanted = list(ranks)
        missing = [r for r in wanted if r not in self._ranked]
        if missing:
            raise LookupError(
                f"order statistic {missing[0]} of {self._n} speeds was not selected by the "
                f"store (it selected {sorted(self._ranked)}): add it to "
                "uncertainty.needed_ranks")
        return {r: self._ranked[r] for r in wanted}

    def plot_values(self, limit: int) -> Sequence[float]:
        return self._plot(limit) if self._plot is not None else []
