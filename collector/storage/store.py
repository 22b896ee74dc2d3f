"""The storage seam: what the collector asks of a database, role by role. It imports no
implementation; the implementations (storage/sql/) import it, and so does the factory
that opens the configured one (storage/sql/backends.py ``open_store``).

Each role is a narrow protocol, one per aggregate of storage/sql/ (probes, probe keys,
results, reports, outbox, anonymous tests, fleet, alerts, copy, contract history, and
the housekeeping of the database itself); ``Store`` is all of them. A module takes the
roles it uses, so a test can fake just those. Two implementations speak every role:
``SqliteStore`` (storage/sql/sqlite.py, the embedded default, one file) and
``PostgresStore`` (storage/sql/postgres.py, one database behind many collector
processes). Both take and give the plain records of storage/model.py. Every method is
synchronous; the web app runs them on database threads (``concurrency`` of them at
once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from agent.evidence import Link
from collector.compliance.evaluate import Observations
from collector.compliance.facts import SessionFacts
from collector.lines import ContractVersion, LineMetadata
from collector.storage.model import (
    AlertDelivery,
    BindOutcome,
    GapEvidence,
    GapSignature,
    HourRow,
    InsertOutcome,
    KeySource,
    NewResult,
    Probe,
    ProbeKey,
    Quota,
    RotateOutcome,
    StoredResult,
    StoredSignature,
)

OutboxRow = tuple[str, str, LineMetadata]


class Housekeeping(Protocol):
    """The database itself: where it is, how many threads may call it, its schema, its
    size on disk and the space packing frees; closed once, at the end."""

    concurrency: int
    describe: str  # where it is, for messages (never a password)

    @property
    def schema_version(self) -> int: ...

    def close(self) -> None: ...

    def size_bytes(self) -> int: ...

    def pack_text_bodies(self, after: str, limit: int) -> tuple[int, int, str | None]: ...

    def vacuum(self) -> None:
        """Give the space freed by ``pack_text_bodies`` back to the disk (SQLite), or
        refuse (PostgreSQL reuses it; Unacceptable says how to return it)."""


class ProbeStore(Protocol):
    """Probes (with their line metadata) and the analyst and admin tokens."""

    def add_probe(self, name: str, token_sha256: str, created_at: str,
                  line: LineMetadata, changed_by: str = "unknown") -> None:
        """Register a probe; ``line`` becomes version 1 of its contract, valid from
        ``created_at``, changed by ``changed_by``."""

    def revoke_probe(self, name: str, revoked_at: str) -> bool: ...

    def rotate_probe(self, name: str, token_sha256: str,
                     rotated_at: str) -> tuple[bool, str | None]:
        """Replace probe ``name``'s token digest, clear its revocation and record
        ``rotated_at``, at once; (whether the probe exists, when it had been revoked:
        None if it was live)."""

    def update_line(self, name: str, changes: Mapping[str, Any]) -> bool: ...

    def add_token(self, name: str, role: str, token_sha256: str, created_at: str) -> None: ...

    def revoke_token(self, name: str, revoked_at: str) -> bool: ...

    def tokens(self) -> list[dict[str, Any]]: ...

    def role_for_token(self, token_sha256: str) -> tuple[str, str] | None: ...

    def probe_for_token(self, token_sha256: str) -> Probe | None: ...

    def probe(self, name: str) -> Probe | None: ...

    def probes(self) -> list[Probe]: ...


class ProbeKeyStore(Protocol):
    """The probes' public keys (Ed25519, RFC 8032), bound by trust on first use or
    pinned by an admin, with their history: replaced and revoked keys stay."""

    def bind_probe_key(self, name: str, kid: str, jwk: str, source: KeySource, at: str,
                       address: str | None, *, replace: bool = False
                       ) -> tuple[BindOutcome, ProbeKey | None]:
        """Bind key ``kid`` to probe ``name`` at ``at``. Without ``replace`` (first
        use) only a probe that never had a key gets one; with it (an admin's pin) the
        current key, if any, is bound until ``at`` and stays as past. A key in this
        probe's history, or revoked on any probe, is never bound again; a key another
        probe holds may be (one device measuring several lines)."""

    def rotate_probe_key(self, name: str, old_kid: str, kid: str, jwk: str, at: str,
                         address: str | None, rotation_jws: str
                         ) -> tuple[RotateOutcome, ProbeKey | None]:
        """Bind ``kid`` to probe ``name`` (and to the other probes whose current key is
        ``old_kid``) in place of ``old_kid``, which ``rotation_jws`` (signed by it)
        introduced it with; the old key is bound until ``at``."""

    def probe_keys(self, name: str) -> list[ProbeKey]:
        """A probe's keys, oldest binding first."""

    def all_probe_keys(self, limit: int) -> list[ProbeKey]:
        """Every probe's keys (by probe, oldest first), at most ``limit``."""

    def revoke_probe_key(self, name: str, kid: str, at: str, reason: str) -> bool:
        """Revoke a key of probe ``name`` (and end its binding if current); False when
        the probe has no such key or it was revoked already."""


class ContractStore(Protocol):
    """Each line's contract history (collector/lines.py ``ContractVersion``): appended,
    never changed; reports, certificates and alerts judge a session by the version in
    force when it started (``contract_at``)."""

    def line_contracts(self, name: str) -> list[ContractVersion]:
        """Every version of probe ``name``'s contract, oldest first."""

    def change_contract(self, name: str, changes: Mapping[str, Any], valid_from: str,
                        changed_at: str, changed_by: str) -> ContractVersion:
        """Change some of the line metadata and append the new version, at once
        (NotFound: no such probe; Unacceptable: ``valid_from`` before the latest
        version's)."""


class ResultStore(Protocol):
    """Results and gap records, stored once each; their session numbers; deletions."""

    def insert_results(self, items: Sequence[NewResult]) -> list[InsertOutcome]: ...

    def insert_gap(self, gap_id: str, probe_name: str, received_at: str, reason: str,
                   dropped: int, first: str, last: str, body_sha256: str,
                   seq_ranges: Sequence[tuple[int, int]] = (),
                   signature: GapSignature | None = None) -> InsertOutcome:
        """Store a gap record once, whole (``signature``: its canonical JSON and, signed,
        its JWS parts); a signed copy of one stored unsigned adds its signature."""

    def gap_evidence(self, probe: str) -> list[GapEvidence]:
        """Every gap record of ``probe``, oldest first: its seq ranges, reason,
        recorded_at, its JWS rebuilt exactly (None: unsigned), status and canonical JSON
        (storage/sql/signatures.py)."""

    def session_seqs(self, probes: Sequence[str] | None, since: str | None,
                     until: str | None) -> list[tuple[str, int, str]]: ...

    def seqs_before(self, probes: Sequence[str] | None,
                    since: str | None) -> dict[str, int]: ...

    def gap_seq_ranges(self, probes: Sequence[str] | None
                       ) -> dict[str, list[tuple[int, int]]]: ...

    def gap_seq_reasons(self, probes: Sequence[str] | None
                        ) -> dict[str, list[tuple[int, int, str]]]:
        """Each gap record's dropped (first, last) session_seq ranges with its reason,
        by probe (deletions apart: ``result_deletions``)."""

    def signing_keys(self, kids: Sequence[str]) -> dict[str, str]:
        """The public JWK (JSON text) of each of ``kids`` bound to any probe, by kid: a
        stored signature's key, whichever probe holds it."""

    def gaps(self, probes: Sequence[str] | None = None, since: str | None = None,
             until: str | None = None) -> list[dict[str, Any]]: ...

    # family: "ipv4"/"ipv6" keeps the sessions measured over it; None: all.
    def results(self, probes: Sequence[str] | None = None, since: str | None = None,
                until: str | None = None, limit: int | None = None,
                family: str | None = None) -> list[StoredResult]: ...

    def result(self, result_id: str) -> StoredResult | None: ...

    def delete_result(self, result_id: str, reason: str, deleted_at: str,
                      deleted_by: str) -> dict[str, Any] | None:
        """Remove a result, its facts and outbox entries; rebuild its day's rollup; keep
        an audit row. None if there is no such result."""

    def result_deletions(self) -> list[dict[str, Any]]: ...

    def count_results(self) -> int: ...

    def result_signatures(self, result_ids: Sequence[str]) -> dict[str, StoredSignature]:
        """How each of ``result_ids`` was signed, by id (an unsigned one is absent);
        ``StoredSignature.jws(canonical body)`` rebuilds its JWS exactly."""

    def chain_links(self, probe: str, since: str | None, until: str | None) -> list[Link]:
        """Probe ``probe``'s numbered results that started in [since, until) as hash
        chain links (agent/evidence.py ``chain_breaks`` finds where it breaks)."""


class ReportStore(Protocol):
    """What reports, plots, certificates and metrics read: the facts, never the bodies."""

    def observations(self, probes: Sequence[str] | None = None, since: str | None = None,
                     until: str | None = None, include_invalid: bool = False,
                     family: str | None = None,
                     extra_speeds: Mapping[str, Sequence[float]] | None = None
                     ) -> Observations: ...

    def facts(self, probes: Sequence[str] | None = None, since: str | None = None,
              until: str | None = None, family: str | None = None) -> list[SessionFacts]: ...

    def hourly(self, probes: Sequence[str] | None = None, since: str | None = None,
               until: str | None = None, include_invalid: bool = False,
               family: str | None = None) -> list[HourRow]: ...

    def coverage_hours(self, probes: Sequence[str] | None = None, since: str | None = None,
                       until: str | None = None, include_invalid: bool = False,
                       family: str | None = None) -> list[tuple[str, int]]:
        """Sessions per UTC hour ("YYYY-MM-DDTHH", sessions), the hours with none left
        out, by hour: the counts of ``hourly`` (a report's coverage), mostly from the
        day rollup."""
        ...

    def latest_sessions(self, probes: Sequence[str]) -> list[SessionFacts]: ...


class OutboxStore(Protocol):
    """The InfluxDB outbox and its dead letters (collector/sinks/influx.py)."""

    def outbox_lease(self, owner: str, limit: int, now: str,
                     until: str) -> list[OutboxRow]: ...

    def outbox_done(self, result_ids: Sequence[str]) -> None: ...

    def outbox_release(self, owner: str) -> None: ...

    def outbox_dead_letter(self, result_id: str, reason: str, failed_at: str) -> None: ...

    def outbox_dead_letters(self) -> list[dict[str, str]]: ...

    def outbox_dead_count(self) -> int: ...

    def outbox_retry_dead(self, queued_at: str) -> int: ...

    def outbox_size(self) -> int: ...

    def outbox_enqueue(self, probes: Sequence[str] | None, since: str | None,
                       until: str | None, queued_at: str) -> int: ...


class AnonymousStore(Protocol):
    """Browser and ndt7 tests of anonymous clients, bounded by their quotas."""

    def add_browser_result(self, received_at: str, client: str, body: str,
                           quota: Quota | None = None) -> int: ...

    def prune_anonymous(self, browser: Quota, ndt7: Quota) -> None: ...

    def browser_results(self, since: str | None = None,
                        until: str | None = None) -> list[dict[str, Any]]: ...

    def browser_result(self, received_at: str, key: str,
                       key_field: str) -> dict[str, Any] | None: ...

    def add_ndt7_test(self, archive: dict[str, Any], started_at: str, ended_at: str,
                      quota: Quota | None = None) -> None: ...

    def ndt7_tests(self, since: str | None = None, until: str | None = None,
                   measurements: bool = False) -> list[dict[str, Any]]: ...

    def customer_speeds(self, since: str | None = None, until: str | None = None,
                        network: str | None = None) -> list[tuple[str, str, float | None]]: ...


class FleetStore(Protocol):
    """Fleet control: instruction rules, suppression windows, health, activity."""

    def instruction_rules(self) -> list[tuple[str, dict[str, Any], str]]: ...

    def update_instruction_rule(
        self, selector: str, change: Callable[[dict[str, Any]], dict[str, Any]],
        updated_at: str,
    ) -> dict[str, Any]: ...

    def suppressions(self, ending_after: str | None = None) -> list[dict[str, Any]]: ...

    def add_suppression(self, selector: str, starts_at: str, ends_at: str, reason: str,
                        created_at: str, max_open: int | None = None,
                        forget_before: str | None = None) -> int | None: ...

    def delete_suppression(self, ident: int) -> bool: ...

    def put_health(self, probe_name: str, received_at: str, clock_skew_s: float | None,
                   body: str) -> None: ...

    def health(self) -> dict[str, tuple[str, float | None, dict[str, Any]]]: ...

    def activity(self, since: str) -> dict[str, dict[str, Any]]: ...


class AlertStore(Protocol):
    """Alerts, raised once each, and their deliveries, leased per notifier."""

    def add_alert(self, key: str, kind: str, probe: str | None, severity: str,
                  created_at: str, subject: str, details: str,
                  notifiers: Sequence[str]) -> int | None: ...

    def alert_keys(self, keys: Sequence[str]) -> set[str]: ...

    def alerts_of_kind(self, kind: str) -> list[tuple[str, str | None, dict[str, Any]]]:
        """(key, probe, details) of every alert of ``kind`` kept, oldest first."""

    def lease_deliveries(self, owner: str, now: str, until: str, limit: int,
                         notifiers: Sequence[str], alert_id: int | None = None
                         ) -> list[AlertDelivery]: ...

    def release_deliveries(self, owner: str) -> int: ...

    def finish_delivery(self, alert_id: int, notifier: str, owner: str, state: str,
                        attempts: int, next_at: str, error: str | None,
                        delivered_at: str | None) -> bool: ...

    def alerts(self, limit: int, since: str | None = None,
               ident: int | None = None) -> list[dict[str, Any]]: ...

    def prune_alerts(self, before: str) -> int: ...


class CopyStore(Protocol):
    """Every table as rows, to copy a whole store into another (storage/migrate.py)."""

    describe: str

    def count(self, table: str) -> int: ...

    def dump(self, table: str, after: Sequence[Any] | None,
             limit: int) -> list[tuple[Any, ...]]: ...

    def load(self, table: str, rows: Sequence[Sequence[Any]]) -> int: ...

    def after_load(self, table: str) -> None: ...


class Store(Housekeeping, ProbeStore, ProbeKeyStore, ContractStore, ResultStore,
            ReportStore, OutboxStore, AnonymousStore, FleetStore, AlertStore, CopyStore,
            Protocol):
    """The collector's master copy of probes, tokens and results: every role at once
    (the web app and the CLI hold one; a module that needs less takes the role it
    uses, so a test can fake it)."""


class ExportStore(Protocol):
    """The analysts' export (collector/export/): a scope's sessions page by page, and the
    distinct (probe, UTC hour) pairs the open-data mode counts probes per cell from."""

    def export_span(self, probes: Sequence[str] | None, since: str | None,
                    until: str | None, family: str | None = None,
                    received_before: str | None = None) -> tuple[str, str] | None:
        """The first and last start time of the sessions in scope (received before
        ``received_before`` when given); None when none."""

    def export_sessions(self, probes: Sequence[str] | None, since: str | None,
                        until: str | None, family: str | None = None, page: int = ...,
                        received_before: str | None = None
                        ) -> Iterator[list[tuple[SessionFacts, StoredResult | None]]]:
        """The sessions in scope, by (probe, start time, result id), in pages of at most
        ``page``: each one's facts and stored row (body without stream samples)."""

    def export_probe_hours(self, probes: Sequence[str] | None, since: str | None,
                           until: str | None, family: str | None = None,
                           page: int = ..., received_before: str | None = None
                           ) -> Iterator[tuple[str, str]]:
        """Each distinct (probe, "YYYY-MM-DDTHH" UTC) with a session in scope."""
