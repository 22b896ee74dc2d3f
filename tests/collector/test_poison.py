"""No single writer can blind the fleet: the poison-isolation state machine
(tests/poison_machine.py) against a real collector, on SQLite and on PostgreSQL.

In CI a short run per backend (25 examples on SQLite and 12 on PostgreSQL, or
``BBPROBE_POISON_EXAMPLES``, of at most ``BBPROBE_POISON_STEPS`` steps: about a
minute in all). ``BBPROBE_POISON_SECONDS=N`` runs each backend for about N seconds
instead, in rounds of fresh random examples until the budget is spent (``make fuzz``:
300, ten minutes in all). Either way the figures (examples, steps, rules, surfaces,
time) are printed at the end.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import run_state_machine_as_test

from collector.config import StorageConfig
from tests.poison_machine import Figures, machine

# SQLite's examples cost a third of PostgreSQL's (a database made and migrated, and a
# connection pool per CLI command), so the short run spends more of them there.
EXAMPLES = {backend: int(os.environ.get("BBPROBE_POISON_EXAMPLES", default))
            for backend, default in (("sqlite", "25"), ("postgresql", "12"))}
STEPS = int(os.environ.get("BBPROBE_POISON_STEPS", "15"))
SECONDS = float(os.environ.get("BBPROBE_POISON_SECONDS", "0"))
# A failing example is kept (var/ is ignored by git) and replayed first next time.
DATABASE = DirectoryBasedExampleDatabase(
    str(Path(__file__).resolve().parents[2] / "var" / "hypothesis-poison"))

Storage = Callable[[], tuple[StorageConfig | None, Callable[[], None]]]


def _sqlite() -> tuple[StorageConfig | None, Callable[[], None]]:
    return None, lambda: None


def _run(backend: str, storage: Storage, capsys: pytest.CaptureFixture[str]) -> None:
    figures = Figures()
    cls = machine(backend, storage, figures)
    budget_ends = time.monotonic() + SECONDS
    # The collector logs each refused or odd input as a warning, thousands a run, and
    # pytest would keep them all for a failure's report; its errors still show.
    log = logging.getLogger("bbprobe.collector")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        while True:
            # A long run: rounds of 10 examples, each round with fresh random choices,
            # until the budget is spent (Hypothesis has no time budget of its own; a
            # round overruns it by up to a minute on PostgreSQL). It shrinks and reports
            # every distinct failure; a short run only the first (shrinking one takes up
            # to five minutes).
            run_state_machine_as_test(cls, settings=settings(
                max_examples=10 if SECONDS else EXAMPLES[backend],
                stateful_step_count=20 if SECONDS else STEPS,
                deadline=None, database=DATABASE, print_blob=True,
                report_multiple_bugs=bool(SECONDS),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much]))
            if time.monotonic() >= budget_ends:
                break
    finally:
        log.setLevel(level)
        with capsys.disabled():
            print("\n" + figures.summary(backend))


@pytest.mark.slow
def test_no_hostile_writer_changes_a_read_about_another_probe_sqlite(
        capsys: pytest.CaptureFixture[str]) -> None:
    """On SQLite: hostile writes never get a 5xx, never change a read about the victim
    and never make a read unsafe."""
    _run("sqlite", _sqlite, capsys)


@pytest.mark.slow
def test_no_hostile_writer_changes_a_read_about_another_probe_postgresql(
        pg_cluster: object, capsys: pytest.CaptureFixture[str]) -> None:
    """On PostgreSQL (a fresh database per example): the same."""
    from tests.pg import Cluster

    assert isinstance(pg_cluster, Cluster)
    cluster = pg_cluster

    def fresh() -> tuple[StorageConfig | None, Callable[[], None]]:
        name = cluster.create_database()
        return (StorageConfig(backend="postgresql", url=cluster.url(name), pool_size=4),
                lambda: cluster.drop_database(name))

    _run("postgresql", fresh, capsys)
