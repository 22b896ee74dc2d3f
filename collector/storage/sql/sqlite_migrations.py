"""SQLite's schema, as the numbered migrations that build it: each entry takes the schema
from version i to i + 1 (``PRAGMA user_version``), as SQL statements or as a function
over the migration's transaction. Never edit a shipped migration: add one."""

from __future__ import annotations

from collections.abc import Callable

from collector.storage.sql import refusals, sqlite_backfill
from collector.storage.sql.base import Tx

# Each entry upgrades the schema from version i to i + 1: SQL statements, or a function
# that rewrites data. Never edit a shipped migration.

_METRICS_ROLE = """
    CREATE INDEX IF NOT EXISTS alerts_kind ON alerts (kind, probe_name);
    CREATE TABLE tokens_new (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('analyst', 'admin', 'metrics')),
        token_sha256 TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    INSERT INTO tokens_new (name, role, token_sha256, created_at, revoked_at)
        SELECT name, role, token_sha256, created_at, revoked_at FROM tokens;
    DROP TABLE tokens;
    ALTER TABLE tokens_new RENAME TO tokens;
    """


def _metrics_role_and_rotation(tx: Tx) -> None:
    """Migration 20: the metrics role, the alerts-by-kind index, probes.rotated_at. Safe to
    run again (a database rewound to an earlier version by a repair or a test): SQLite has
    no ADD COLUMN IF NOT EXISTS, so the column is added only when missing."""
    if "rotated_at" not in {row[1] for row in tx.rows("PRAGMA table_info(probes)")}:
        tx.run("ALTER TABLE probes ADD COLUMN rotated_at TEXT")
    for statement in _METRICS_ROLE.split(";"):
        if statement.strip():
            tx.run(statement)


_RESULT_SIGNATURES = """
    CREATE TABLE IF NOT EXISTS result_signatures (
        result_id TEXT PRIMARY KEY REFERENCES results(result_id),
        kid TEXT NOT NULL,
        protected TEXT NOT NULL,
        signature TEXT NOT NULL,
        prev_sha256 TEXT,
        payload BLOB,
        status TEXT NOT NULL CHECK (status IN ('verified', 'unverified')),
        received_at TEXT NOT NULL
    )
    """

# Each gap record's canonical JSON as delivered (zstd; a few hundred bytes) and, when the
# probe signed it, the JWS parts; every record stored from migration 24 has a row.
_GAP_SIGNATURES = """
    CREATE TABLE IF NOT EXISTS gap_signatures (
        gap_id TEXT PRIMARY KEY REFERENCES gaps(gap_id),
        kid TEXT,
        protected TEXT,
        signature TEXT,
        payload BLOB NOT NULL,
        recorded_at TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('verified', 'unverified', 'unsigned'))
    )
    """

_PROBE_KEYS_BY_PROBE = """
    CREATE TABLE probe_keys_new (
        probe_name TEXT NOT NULL REFERENCES probes (name),
        kid TEXT NOT NULL,
        jwk TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('tofu', 'pinned', 'rotation')),
        first_seen_at TEXT NOT NULL,
        first_seen_address TEXT,
        bound_from TEXT NOT NULL,
        bound_until TEXT,
        revoked_at TEXT,
        revoked_reason TEXT,
        rotation_jws TEXT,
        PRIMARY KEY (probe_name, kid)
    );
    INSERT INTO probe_keys_new (probe_name, kid, jwk, source, first_seen_at,
        first_seen_address, bound_from, bound_until, revoked_at, revoked_reason)
        SELECT probe_name, kid, jwk, source, first_seen_at, first_seen_address,
        bound_from, bound_until, revoked_at, revoked_reason FROM probe_keys;
    DROP TABLE probe_keys;
    ALTER TABLE probe_keys_new RENAME TO probe_keys
    """


def _result_signatures(tx: Tx) -> None:
    """Migration 24: each signed result's JWS parts (storage/sql/signatures.py), each gap
    record whole (signed or not: storage/sql/signatures.py), and probe
    keys bound per (probe, kid), with the rotation JWS that introduced a key. Safe to run
    again (a database rewound by a repair or a test): the table is made if missing, and
    probe_keys is rebuilt only while it lacks rotation_jws (SQLite cannot change a
    primary key in place: the small table is copied into one keyed by both columns)."""
    tx.run(_RESULT_SIGNATURES)
    tx.run(_GAP_SIGNATURES)
    if "rotation_jws" not in {row[1] for row in tx.rows("PRAGMA table_info(probe_keys)")}:
        for statement in _PROBE_KEYS_BY_PROBE.split(";"):
            if statement.strip():
                tx.run(statement)
    # The indexes went with the old table; a kid is looked up across probes too.
    tx.run("CREATE INDEX IF NOT EXISTS probe_keys_probe ON probe_keys (probe_name, bound_from)")
    tx.run("CREATE UNIQUE INDEX IF NOT EXISTS probe_keys_current ON probe_keys (probe_name) "
           "WHERE bound_until IS NULL")
    tx.run("CREATE INDEX IF NOT EXISTS probe_keys_kid ON probe_keys (kid)")


def _session_hours(tx: Tx) -> None:
    """Migration 25: each day row's valid sessions per UTC hour (facts.py DAY_COLUMNS,
    rollup.DayRollup.session_hours), which a report's coverage reads instead of every
    session row. Rows already stored keep NULL, "not known": their days' coverage is
    read from their session rows, as before. Safe to run again (a rewound database):
    SQLite has no ADD COLUMN IF NOT EXISTS, so the column is added only when missing."""
    if "session_hours" not in {row[1] for row in tx.rows("PRAGMA table_info(day_facts)")}:
        tx.run("ALTER TABLE day_facts ADD COLUMN session_hours TEXT")


MIGRATIONS: tuple[str | Callable[[Tx], object], ...] = (
    """
    CREATE TABLE probes (
        name TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        revoked_at TEXT,
        operator TEXT,
        offer TEXT,
        region TEXT,
        technology TEXT,
        download_nominal_kbps REAL,
        download_min_kbps REAL,
        upload_nominal_kbps REAL,
        upload_min_kbps REAL,
        max_delay_ms REAL,
        max_loss_ratio REAL
    );
    CREATE TABLE results (
        result_id TEXT PRIMARY KEY,
        probe_name TEXT NOT NULL REFERENCES probes(name),
        schema_version INTEGER NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT NOT NULL,
        received_at TEXT NOT NULL,
        body_sha256 TEXT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX results_probe_started ON results (probe_name, started_at);
    CREATE INDEX results_started ON results (started_at);
    """,
    # 2: per-session facts (collector/compliance/facts.py), clustered by probe and time
    # (WITHOUT ROWID) so a scope reads contiguous rows, and their per-probe UTC-day
    # rollup (valid sessions merged; speeds as packed float64), which evaluates whole days
    # without reading every session; backfilled from the bodies.
    """
    CREATE TABLE session_facts (
        probe_name TEXT NOT NULL,
        started_at TEXT NOT NULL,
        result_id TEXT NOT NULL UNIQUE REFERENCES results(result_id),
        pings_sent INTEGER NOT NULL,
        pings_lost INTEGER NOT NULL,
        rtt_n INTEGER NOT NULL,
        rtt_mean_ms REAL NOT NULL,
        rtt_m2 REAL NOT NULL,
        rtts_ms TEXT NOT NULL,
        valid INTEGER NOT NULL,
        invalid_codes TEXT NOT NULL,
        PRIMARY KEY (probe_name, started_at, result_id)
    ) WITHOUT ROWID;
    CREATE TABLE transfer_facts (
        probe_name TEXT NOT NULL,
        started_at TEXT NOT NULL,
        result_id TEXT NOT NULL REFERENCES results(result_id),
        seq INTEGER NOT NULL,
        direction TEXT NOT NULL,
        ok INTEGER NOT NULL,
        kbps REAL,
        valid INTEGER NOT NULL,
        PRIMARY KEY (probe_name, started_at, result_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE day_facts (
        probe_name TEXT NOT NULL,
        day TEXT NOT NULL,
        sessions INTEGER NOT NULL,
        pings_sent INTEGER NOT NULL,
        pings_lost INTEGER NOT NULL,
        rtt_n INTEGER NOT NULL,
        rtt_mean_ms REAL NOT NULL,
        rtt_m2 REAL NOT NULL,
        download_attempts INTEGER NOT NULL,
        download_failed INTEGER NOT NULL,
        upload_attempts INTEGER NOT NULL,
        upload_failed INTEGER NOT NULL,
        download_kbps BLOB NOT NULL,
        upload_kbps BLOB NOT NULL,
        invalid_sessions INTEGER NOT NULL,
        invalid_codes TEXT NOT NULL,
        PRIMARY KEY (probe_name, day)
    ) WITHOUT ROWID;
    """,
    sqlite_backfill.facts_from_bodies,
    # 3: results waiting to be copied to InfluxDB (collector/sinks/influx.py), in arrival order.
    """
    CREATE TABLE influx_outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        result_id TEXT NOT NULL UNIQUE REFERENCES results(result_id),
        queued_at TEXT NOT NULL
    );
    """,
    # 4: the probe clock's offset from ours at delivery (X-Bbprobe-Sent-At), and the gap
    # records of results probes had to drop.
    """
    ALTER TABLE results ADD COLUMN clock_skew_s REAL;
    CREATE TABLE gaps (
        gap_id TEXT PRIMARY KEY,
        probe_name TEXT NOT NULL REFERENCES probes(name),
        received_at TEXT NOT NULL,
        reason TEXT NOT NULL,
        dropped INTEGER NOT NULL,
        first_started_at TEXT NOT NULL,
        last_started_at TEXT NOT NULL,
        body_sha256 TEXT NOT NULL
    );
    CREATE INDEX gaps_probe ON gaps (probe_name, first_started_at);
    """,
    # 5: analyst and admin tokens (collector/auth.py).
    """
    CREATE TABLE tokens (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('analyst', 'admin')),
        token_sha256 TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    """,
    # 6: anonymous browser speed tests (/speedtest), kept apart from probe results.
    """
    CREATE TABLE browser_results (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        received_at TEXT NOT NULL,
        client TEXT NOT NULL,
        body TEXT NOT NULL
    );
    """,
    # 7: ndt7 subtests served to third-party clients (ndt7-js, ndt7-client-go, bbprobe's
    # own ndt7 mode), in the shape of ndt-server's archive; apart from probe results.
    """
    CREATE TABLE ndt7_tests (
        uuid TEXT PRIMARY KEY,
        test TEXT NOT NULL CHECK (test IN ('download', 'upload')),
        started_at TEXT NOT NULL,
        ended_at TEXT NOT NULL,
        client TEXT NOT NULL,
        end_reason TEXT NOT NULL,
        throughput_bps REAL,
        min_rtt_ms REAL,
        body TEXT NOT NULL
    );
    CREATE INDEX ndt7_tests_started ON ndt7_tests (started_at);
    """,
    # 8: results InfluxDB refused for good (a 4xx for that result alone), or whose points
    # could not be built: taken out of the outbox so the ones after them flow
    # (reliability.md C6), kept with the reason until retried.
    """
    CREATE TABLE influx_dead_letters (
        result_id TEXT PRIMARY KEY REFERENCES results(result_id),
        failed_at TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    -- The anonymous tables are pruned by age (Quota below).
    CREATE INDEX browser_results_received ON browser_results (received_at);
    """,
    # 9: completeness (reliability.md C8): each result's session_seq (schema v4), and the
    # sequence numbers a gap record stands for, as JSON [[first, last], ...].
    """
    ALTER TABLE results ADD COLUMN session_seq INTEGER;
    CREATE INDEX results_probe_seq ON results (probe_name, session_seq)
        WHERE session_seq IS NOT NULL;
    ALTER TABLE gaps ADD COLUMN seq_ranges TEXT NOT NULL DEFAULT '[]';
    """,
    # 10: the InfluxDB outbox is leased: with many collector processes over one
    # database each queued result goes to one sink at a time; a lease that is not
    # finished (the process died) expires and the row is taken again.
    """
    ALTER TABLE influx_outbox ADD COLUMN lease_owner TEXT;
    ALTER TABLE influx_outbox ADD COLUMN leased_until TEXT;
    """,
    # 11: result bodies packed (storage/codec.py): a new row keeps its
    # canonical JSON here, losslessly, in about a seventh of the bytes, and '' in body.
    # Rows stored before keep their text body (``compact`` packs them).
    """
    ALTER TABLE results ADD COLUMN body_packed BLOB;
    """,
    # 12: fleet control: instruction rules (a probe selector, canonical JSON,
    # and its settings as JSON {dotted key: value}); suppression windows; each probe's
    # latest health report, as it sent it.
    """
    CREATE TABLE instruction_rules (
        selector TEXT PRIMARY KEY,
        settings TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE suppressions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        selector TEXT NOT NULL,
        starts_at TEXT NOT NULL,
        ends_at TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE probe_health (
        probe_name TEXT PRIMARY KEY REFERENCES probes(name),
        received_at TEXT NOT NULL,
        clock_skew_s REAL,
        body TEXT NOT NULL
    );
    """,
    # 13: alerts: one row per alert (dedup_key unique: a condition alerts
    # once), and each notifier's delivery state, leased by the collector process that
    # sends it.
    """
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        dedup_key TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        probe_name TEXT,
        severity TEXT NOT NULL,
        created_at TEXT NOT NULL,
        subject TEXT NOT NULL,
        details TEXT NOT NULL
    );
    CREATE TABLE alert_deliveries (
        alert_id INTEGER NOT NULL REFERENCES alerts(id) ON DELETE CASCADE,
        notifier TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_at TEXT NOT NULL,
        lease_owner TEXT,
        leased_until TEXT,
        last_error TEXT,
        delivered_at TEXT,
        PRIMARY KEY (alert_id, notifier)
    );
    CREATE INDEX alert_deliveries_due ON alert_deliveries (state, next_at);
    CREATE INDEX alerts_created ON alerts (created_at);
    """,
    # 14: the KPIs of delibera 156/23/CONS: the offer's normally available
    # speeds on the line; and jitter (the sum of |consecutive answered RTT differences|
    # and the number of such pairs) per session and per day, so a scope's mean jitter
    # merges exactly like the rest; the access technologies spelt as collector/lines.py
    # does (any case was accepted before), so filters and groups find them.
    """
    ALTER TABLE probes ADD COLUMN download_normal_kbps REAL;
    ALTER TABLE probes ADD COLUMN upload_normal_kbps REAL;
    ALTER TABLE session_facts ADD COLUMN jitter_sum_ns INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE session_facts ADD COLUMN jitter_pairs INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE day_facts ADD COLUMN jitter_sum_ns INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE day_facts ADD COLUMN jitter_pairs INTEGER NOT NULL DEFAULT 0;
    UPDATE probes SET technology = 'ADSL' WHERE lower(trim(technology)) = 'adsl';
    UPDATE probes SET technology = 'VDSL' WHERE lower(trim(technology)) = 'vdsl';
    UPDATE probes SET technology = 'FTTC' WHERE lower(trim(technology)) = 'fttc';
    UPDATE probes SET technology = 'FTTB' WHERE lower(trim(technology)) = 'fttb';
    UPDATE probes SET technology = 'FTTH' WHERE lower(trim(technology)) = 'ftth';
    UPDATE probes SET technology = 'FWA' WHERE lower(trim(technology)) = 'fwa';
    UPDATE probes SET technology = 'cable' WHERE lower(trim(technology)) = 'cable';
    UPDATE probes SET technology = 'satellite' WHERE lower(trim(technology)) = 'satellite';
    UPDATE probes SET technology = 'other' WHERE lower(trim(technology)) = 'other';
    """,
    # 15: jitter of the sessions stored before (from the raw RTTs kept in the facts).
    sqlite_backfill.jitter_from_rtts,
    # 16: the IP version each session measured over (schema 6), for reports
    # by family. NULL: unknown. No backfill: a collector refuses results newer than its
    # schema, so every row already stored is of schema 5 or older, which has no family.
    """
    ALTER TABLE session_facts ADD COLUMN address_family TEXT;
    ALTER TABLE session_facts ADD COLUMN dual_stack INTEGER NOT NULL DEFAULT 0;
    """,
    # 17: results an operator removed (`bbprobe-collector result delete`), an
    # audit row each, appended, never changed: which result, whose, its number, hash and
    # start, when, by whom and why.
    """
    CREATE TABLE result_deletions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        result_id TEXT NOT NULL,
        probe_name TEXT NOT NULL,
        started_at TEXT NOT NULL,
        session_seq INTEGER,
        body_sha256 TEXT NOT NULL,
        deleted_at TEXT NOT NULL,
        deleted_by TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX result_deletions_probe ON result_deletions (probe_name);
    """,
    # 18: attempts the measurement server refused (for capacity, HTTP 429 or a
    # bbprobe server's 503, or its refusal of the session's ticket), counted apart from
    # the line's failures: per session, with the server (its origin) that refused them;
    # per day, JSON {server: attempts}. And the audit of migration 19: a row per stored
    # session it reclassified (appended, never changed).
    """
    ALTER TABLE session_facts ADD COLUMN refused_attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE session_facts ADD COLUMN refused_server TEXT;
    ALTER TABLE day_facts ADD COLUMN refused_servers TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE refusal_reclassifications (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        result_id TEXT NOT NULL,
        probe_name TEXT NOT NULL,
        started_at TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        refused_server TEXT,
        migrated_at TEXT NOT NULL
    );
    CREATE INDEX refusal_reclassifications_probe
        ON refusal_reclassifications (probe_name, started_at);
    """,
    # 19: the refusals stored before as failed attempts, taken out of the failure rate
    # (storage/refusals.py): the sessions with a failed transfer fact are decoded again,
    # and their days rebuilt; each session changed is logged in sum and listed in
    # refusal_reclassifications.
    refusals.reclassify,
    # 20: metrics tokens (collector/auth.py): GET /metrics and nothing else, for a
    # Prometheus server. SQLite cannot change a CHECK in place: the small tokens table is
    # copied into one that allows the role. And the alerts of one kind found without a
    # scan (each tick looks for the probe_silent alerts still to resolve). And when a
    # probe's credentials were last replaced (`probe rotate`): a client certificate
    # issued before then is refused (web/probe_routes.py).
    _metrics_role_and_rotation,
    # 22: each line's contract history (collector/lines.py ContractVersion): the
    # figures, from when they apply (valid_from; NULL: since the beginning), who changed
    # them and when; retroactive = 1 for a correction applied from before it was made.
    # Backfill: every probe's metadata as it stands becomes version 1, valid from the
    # probe's creation (what it was before any change made earlier is not known). Safe to
    # run again (a database rewound by a repair or a test): the table is made if missing,
    # and only probes with no version get one.
    """
    CREATE TABLE IF NOT EXISTS line_contracts (
        probe_name TEXT NOT NULL,
        version INTEGER NOT NULL,
        valid_from TEXT,
        changed_at TEXT NOT NULL,
        changed_by TEXT NOT NULL,
        retroactive INTEGER NOT NULL DEFAULT 0,
        operator TEXT,
        offer TEXT,
        region TEXT,
        technology TEXT,
        download_nominal_kbps REAL,
        download_min_kbps REAL,
        upload_nominal_kbps REAL,
        upload_min_kbps REAL,
        max_delay_ms REAL,
        max_loss_ratio REAL,
        download_normal_kbps REAL,
        upload_normal_kbps REAL,
        PRIMARY KEY (probe_name, version)
    );
    INSERT INTO line_contracts (probe_name, version, valid_from, changed_at, changed_by,
        retroactive, operator, offer, region, technology,
        download_nominal_kbps, download_min_kbps, upload_nominal_kbps, upload_min_kbps,
        max_delay_ms, max_loss_ratio, download_normal_kbps, upload_normal_kbps)
        SELECT name, 1, NULLIF(created_at, ''), COALESCE(NULLIF(created_at, ''),
               '1970-01-01T00:00:00Z'), 'schema migration', 0,
        operator, offer, region, technology,
        download_nominal_kbps, download_min_kbps, upload_nominal_kbps, upload_min_kbps,
        max_delay_ms, max_loss_ratio, download_normal_kbps, upload_normal_kbps
        FROM probes
        WHERE NOT EXISTS (SELECT 1 FROM line_contracts WHERE probe_name = probes.name)
    """,
    # 23: the probes' public keys (Ed25519, RFC 8032; storage/sql/probe_keys.py), named
    # by their RFC 7638 thumbprint, with how and when each was bound (trust on first use
    # from an address, or pinned), until when, and its revocation: at most one bound per
    # probe, and replaced or revoked keys kept.
    """
    CREATE TABLE IF NOT EXISTS probe_keys (
        kid TEXT PRIMARY KEY,
        probe_name TEXT NOT NULL REFERENCES probes (name),
        jwk TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('tofu', 'pinned')),
        first_seen_at TEXT NOT NULL,
        first_seen_address TEXT,
        bound_from TEXT NOT NULL,
        bound_until TEXT,
        revoked_at TEXT,
        revoked_reason TEXT
    );
    CREATE INDEX IF NOT EXISTS probe_keys_probe ON probe_keys (probe_name, bound_from);
    CREATE UNIQUE INDEX IF NOT EXISTS probe_keys_current ON probe_keys (probe_name)
        WHERE bound_until IS NULL;
    """,
    # 24: signed results (issue 27): each stored result's JWS as received, its key
    # (kid), the chain link it names (prev_sha256) and whether its signature was
    # checked against a bound key ('verified') or the probe had none yet
    # ('unverified'); the payload bytes (zstd) only when they differ from the stored
    # canonical body (a result spooled before the probe knew its name). Each gap record's
    # canonical JSON and, signed, its JWS parts (gap_signatures). And one key
    # may be bound to several probes (a technician's laptop on several lines): probe_keys
    # keyed by (probe_name, kid), with the rotation JWS by the old key that introduced
    # a key (rotation_jws; its source 'rotation').
    _result_signatures,
    # 25: the valid sessions per UTC hour of each day row (24 comma-separated counts,
    # hour 00 first; NULL for the rows already stored: not known), so a report's
    # coverage reads the day rollup, not every session row.
    _session_hours,
)
