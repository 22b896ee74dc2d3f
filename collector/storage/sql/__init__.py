"""The store's queries, written once for every SQL backend (SQLite and PostgreSQL), the
two backends, their migrations, and the factory that opens one (backends.py).

A backend (sqlite.py, postgres.py) opens connections, runs its own
migrations and says how it runs a transaction; everything a query means is here, so both
backends store and answer alike (the conformance suite, tests/collector/test_conformance.py,
holds them to it). Queries are written with ``?`` placeholders and the SQL both engines
share: upserts with ``ON CONFLICT``, ``RETURNING``, ``CAST``, ``substr``. The few
differences are ``Dialect`` fields (base.py).

One module per aggregate, each a mixin over ``SqlBase`` (base.py: the dialect, the two
transactions a backend gives, the WHERE clause of a scope); ``SqlStore`` is all of them:

    probes.py     probes and tokens            results.py    results, gaps, packing
    probe_keys.py the probes' public keys      signatures.py signed results, chains
    facts.py      the facts tables as rows     reports.py    observations, rollups, facts
    outbox.py     the InfluxDB outbox          anonymous.py  browser and ndt7 tests
    fleet.py      rules, suppressions, health  alerts.py     alerts and their deliveries
    copy.py       every table, for a copy      contracts.py  each line's contract history
    exports.py    the analysts' export, paged

Arithmetic over rows (the day rollup, RTT moments, counts) is in
collector/compliance/rollup.py, in Python: a database's float sums depend on the order
it reads rows in, and the report must not depend on the engine.
"""

from __future__ import annotations

from collector.storage.sql.alerts import AlertQueries
from collector.storage.sql.anonymous import AnonymousQueries
from collector.storage.sql.contracts import ContractQueries
from collector.storage.sql.copy import CopyQueries
from collector.storage.sql.exports import ExportQueries
from collector.storage.sql.fleet import FleetQueries
from collector.storage.sql.outbox import OutboxQueries
from collector.storage.sql.probe_keys import ProbeKeyQueries
from collector.storage.sql.probes import ProbeQueries
from collector.storage.sql.reports import ReportQueries
from collector.storage.sql.results import ResultQueries
from collector.storage.sql.signatures import SignatureQueries


class SqlStore(ProbeQueries, ProbeKeyQueries, ResultQueries, SignatureQueries,
               ReportQueries, OutboxQueries, AnonymousQueries, FleetQueries, AlertQueries,
               CopyQueries, ContractQueries, ExportQueries):
    """The collector's master copy of every probe and result, over one SQL backend
    (collector/storage/store.py ``Store``: each role protocol is one of the mixins)."""
