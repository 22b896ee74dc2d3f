"""Collector configuration: TOML validated at load, unknown keys rejected, then frozen.

Every key is documented in ``configs/collector.example.toml`` (a test loads it). Relative
paths are relative to the working directory; with no config at all, the database goes to
the per-user data directory (or systemd's StateDirectory) and the targets table is the
one shipped inside the package, so ``serve`` works from any directory.
"""

from __future__ import annotations

import os
import re
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent import credentials, spec
from agent.config import decode_table, listen_problem, split_listen, url_problem, user_dir
from agent.config import read_toml as _read_toml
from agent.decoding import SchemaError, decode
from agent.errors import ConfigError as _AgentConfigError
from agent.schema import bounds
from collector.errors import ConfigError

# The conditions an alert rule may name (collector/alerts/rules.py says what each means):
# configuration is validated against them at load, before any rule runs.
ALERT_KINDS = ("contract_breach", "below_minimum", "probe_silent", "campaign_incomplete",
               "dead_letters", "test")

# A notifier's name (it keys its delivery states in the database).
NOTIFIER_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    # What this process serves (serve --role overrides it): "all"; "ingest" (ingestion,
    # queries, reports, admin; no measurement endpoints); or "measurement" (the HTTP,
    # ndt7 and LibreSpeed endpoints and the speed-test page: no database, no targets).
    role: Literal["all", "ingest", "measurement"] = "all"
    # 0 picks a free port (the bound address is printed and written to addr_file).
    port: int = field(default=8080, metadata=bounds(ge=0, le=65535))
    # Largest accepted result body; larger requests get 413.
    max_body_bytes: int = field(default=1024 * 1024, metadata=bounds(ge=1024, le=64 * 1024**2))
    # If set, the bound "http://host:port" is written here once listening.
    addr_file: str = ""
    # POST /api/v1/results/batch: at most this many results and bytes per request.
    max_batch_results: int = field(default=100, metadata=bounds(ge=1, le=10_000))
    max_batch_bytes: int = field(default=16 * 1024**2,
                                 metadata=bounds(ge=1024, le=256 * 1024**2))
    # A request body must arrive within this many seconds (slow clients get 408).
    body_timeout_s: float = field(default=10.0, metadata=bounds(gt=0, le=600))
    # Per-probe ingestion rate: requests a minute on average, in bursts of up to
    # probe_burst; beyond it 429 with Retry-After. 0 = no limit.
    probe_requests_per_min: float = field(default=120.0, metadata=bounds(ge=0))
    probe_burst: int = field(default=20, metadata=bounds(ge=1, le=100_000))
    # A connection must complete a request's headers within this many seconds of opening
    # (or of its previous response), else it is closed: slow clients cannot pile up.
    header_timeout_s: float = field(default=10.0, metadata=bounds(gt=0, le=3600))
    # Queries, reports and pages need an analyst or admin token (token add). Turn off only
    # behind an authenticating proxy.
    query_auth: bool = True
    # TLS: certificate chain and key (PEM). Both empty: plain HTTP.
    tls_cert: str = ""
    tls_key: str = ""
    # Or the key as a systemd credential (LoadCredential=NAME:PATH in the unit), so the
    # service's dynamic user can read it while the file stays root's: its NAME.
    tls_key_credential: str = ""
    # Client certificates for probes: "off", "optional" or "required", verified against
    # client_ca; a verified certificate's subject CN names the probe (no token needed).
    client_cert: Literal["off", "optional", "required"] = "off"
    client_ca: str = ""


@dataclass(frozen=True, slots=True)
class StorageConfig:
    # "sqlite" (one file, the embedded default) or "postgresql" (one database behind
    # many collector processes).
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    # SQLite: the database file. Empty: $STATE_DIRECTORY/collector.sqlite3 under systemd,
    # else $XDG_DATA_HOME/bbprobe-collector/, else ~/.local/share/bbprobe-collector/.
    path: str = ""
    # PostgreSQL: a libpq connection URI, postgresql://user@host:5432/dbname?sslmode=...
    # Keep the password out of it: password_credential, or libpq's $PGPASSWORD/~/.pgpass.
    url: str = ""
    # PostgreSQL: a second libpq URI, a streaming replica (hot standby) of url, that
    # analysts' reads use (reports, certificates, exports, listings, completeness: the
    # CLI commands and the analyst API routes); ingest, authentication and every write
    # stay on url. Same password handling as url. Empty: everything on url.
    read_url: str = ""
    # The systemd credential holding the password (LoadCredential=NAME:PATH).
    password_credential: str = ""
    # Connections per collector process (and database threads serving requests).
    pool_size: int = field(default=8, metadata=bounds(ge=1, le=100))


@dataclass(frozen=True, slots=True)
class MeasurementConfig:
    # Serve /measure/v1/{download,upload,echo} for agents to test against.
    enabled: bool = True
    # Caps per request, so one client cannot hold the server: bytes and seconds.
    max_bytes: int = field(default=50 * 1000**3, metadata=bounds(ge=1))
    max_duration_s: float = field(default=60.0, metadata=bounds(gt=0, le=3600))
    # Concurrent transfers served at once; more get 503 (Retry-After). 128: with tickets
    # on (the default) ticket_reserved_share keeps half for ticketed probes, so strangers
    # and agents without tickets keep the 64 they had before tickets, and the other 64
    # match one ticket's allowance (tickets.streams).
    max_concurrent: int = field(default=128, metadata=bounds(ge=1, le=10_000))
    # Of those, at most this many from one client (an IPv4 address or an IPv6 /64); more
    # get 429. 20 = the most streams the agent's adaptive rule opens (Ne.Me.Sys table).
    max_concurrent_per_client: int = field(default=20, metadata=bounds(ge=1, le=10_000))
    # Length of an ndt7 subtest (/ndt/v7/*). The protocol's is 10 s and M-Lab's clients
    # assume it; shorter only for tests.
    ndt7_runtime_s: float = field(default=10.0, metadata=bounds(ge=0.5, le=10.0))
    # When this server accepts tickets, this share of max_concurrent is kept
    # for ticketed transfers: anonymous ones together get at most the rest (503 beyond),
    # so strangers cannot starve the fleet's probes. Below 1: strangers always get some.
    ticket_reserved_share: float = field(default=0.5, metadata=bounds(ge=0, le=0.95))


# Origins a ticket may name, and keys a server may trust: a ticket names every server in
# its "aud" claim and must stay under agent.ticket.MAX_TICKET_CHARS (4096).
MAX_TICKET_SERVERS = 32
MAX_TRUSTED_KEYS = 16


@dataclass(frozen=True, slots=True)
class TicketsConfig:
    # Measurement tickets: the collector signs (Ed25519) a short-lived ticket
    # for an authenticated probe; measurement servers verify it offline and count the
    # probe's transfers per ticket instead of per client address, so probes behind one
    # address (carrier-grade NAT) do not share one address's slots. Off: no ticket is
    # issued, and one presented is ignored (the transfer counts per address).
    enabled: bool = True
    # The signing key (PEM, PKCS#8 Ed25519) as a systemd credential (LoadCredential=NAME:
    # PATH) or a file; neither: generated at start (or at need) beside the SQLite database
    # (storage.path's directory) as ticket-signing-key.pem, mode 0600.
    signing_key_credential: str = ""
    signing_key_file: str = ""
    # Public keys (PEM files, from `bbprobe-collector tickets key --out FILE`) whose
    # tickets this server accepts: a measurement-only server needs the collector's here.
    # A collector that issues trusts its own key without it.
    trusted_keys: tuple[str, ...] = ()
    # The origins (scheme://host:port) this server answers to as a measurement server;
    # a ticket is accepted only if it names one of them. Empty: the origin of each
    # request (its scheme and Host header, which the client chooses), so it is required
    # wherever a ticket could be replayed here from another server: with trusted_keys,
    # and on a collector serving measurement that names other servers (servers).
    audience: tuple[str, ...] = ()
    # Measurement servers, besides this collector, that issued tickets name (their URLs).
    servers: tuple[str, ...] = ()
    # A ticket's life: a session plans at most 900 s (the agent's MAX_SESSION_S) and the
    # daemon fetches its ticket as the session's slot starts, so 20 minutes cover it.
    expiry_s: float = field(default=1200.0, metadata=bounds(ge=60, le=86400))
    # Its allowance: transfers at once (64: the most streams an agent's config may fix,
    # transfer.streams; its adaptive rule opens at most 20: a lower allowance would have
    # the fleet's own fixed-stream methods refused), bytes moved in all, and seconds with
    # at least one of its transfers running (the most a session may plan, agent/spec.py
    # MAX_SESSION_BYTES and MAX_SESSION_S).
    streams: int = field(default=spec.MAX_STREAMS, metadata=bounds(ge=1, le=1000))
    bytes: int = field(default=spec.MAX_SESSION_BYTES, metadata=bounds(ge=1, le=10**15))
    duration_s: float = field(default=spec.MAX_SESSION_S, metadata=bounds(gt=0, le=86400))


@dataclass(frozen=True, slots=True)
class AnonymousConfig:
    # What strangers may leave in the database, bounded in rows, age and rate: browser
    # speed-test results and ndt7 subtests. Browser results keep at most max_rows, ndt7 subtests
    # ndt7_max_rows, the newest, and nothing older than retention_days (checked hourly
    # too); a client address posts at most browser_results_per_min results a minute.
    retention_days: float = field(default=365.0, metadata=bounds(gt=0, le=36_500))
    max_rows: int = field(default=200_000, metadata=bounds(ge=100, le=100_000_000))
    # ndt7 subtests are larger (up to ~100 KB: ~40 server measurements and 64 KiB of the
    # client's): fewer of them, about 2 GB at most by default.
    ndt7_max_rows: int = field(default=20_000, metadata=bounds(ge=100, le=100_000_000))
    browser_results_per_min: float = field(default=6.0, metadata=bounds(gt=0, le=6000))


@dataclass(frozen=True, slots=True)
class ComplianceConfig:
    # Target table used by reports (Allegato 2 of the operator's service charter): a TOML
    # file's path, or the name of a table shipped with bbprobe, or "" for the shipped
    # default (bt-italia-2013).
    targets: str = ""


@dataclass(frozen=True, slots=True)
class ReportsConfig:
    # The minimum-sample rule (collector/compliance/uncertainty.py): a figure on fewer
    # samples, or whose 95 % interval does not exist, is shown "not enough data" on
    # reports and certificates instead of a number nobody could defend (Ofcom publishes
    # only figures whose intervals are narrow enough). Verdicts are unchanged by it.
    # The default is uncertainty.DEFAULT_MIN_SAMPLES (not imported: config sits below
    # compliance; test_uncertainty checks they agree).
    min_samples: int = field(default=30,
                             metadata=bounds(ge=1, le=1_000_000))


@dataclass(frozen=True, slots=True)
class InfluxConfig:
    # Copy every stored result to InfluxDB 2.x/3.x (or any InfluxDB v2 write API server)
    # through a durable outbox in SQLite (collector/sinks/influx.py).
    enabled: bool = False
    url: str = ""
    org: str = ""
    bucket: str = "bbprobe"
    # The API token is never in this file: it is the systemd credential named here
    # (LoadCredential=NAME:PATH), or else the environment variable token_env.
    token_credential: str = ""
    token_env: str = "BBPROBE_INFLUX_TOKEN"
    # Results per write (each is ~15 points: summary, attempts, pings).
    batch_results: int = field(default=100, metadata=bounds(ge=1, le=10_000))
    timeout_s: float = field(default=10.0, metadata=bounds(gt=0, le=300))
    # After a failed write: wait retry_min_s, doubling up to retry_max_s (+-50 % jitter).
    retry_min_s: float = field(default=1.0, metadata=bounds(gt=0, le=3600))
    retry_max_s: float = field(default=300.0, metadata=bounds(gt=0, le=86400))
    # How often an idle sink looks at the outbox (new results also wake it at once).
    poll_s: float = field(default=5.0, metadata=bounds(gt=0, le=3600))


@dataclass(frozen=True, slots=True)
class FleetConfig:
    # A probe with no health report and no result for longer than this is silent: in
    # the fleet view, in /metrics and for the probe_silent alert (one threshold: the
    # view and the alert must agree on who is silent). Agents report at every delivery
    # and at least hourly, so the default allows two missed reports.
    silent_after_s: float = field(default=3 * 3600.0, metadata=bounds(gt=0, le=365 * 86400))
    # The fleet view's validity rate counts the sessions of this many days.
    validity_days: int = field(default=7, metadata=bounds(ge=1, le=366))


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # Prometheus metrics at GET /metrics: on the main port for analyst and
    # admin tokens (open only where server.query_auth = false opens every read).
    enabled: bool = True
    # Also serve GET /metrics, with no token, on this "host:port" (IPv6: "[::1]:9464"):
    # for a Prometheus that cannot hold a token, on an address only it reaches. The
    # only way a measurement-only server (role "measurement") exposes its metrics.
    listen: str = ""
    # Per-probe series of each probe's last session, labelled with the probe and its
    # line metadata: at most per_probe_max probes (the first by name); the rest are
    # counted in bbprobe_fleet_per_probe_series_omitted. Each probe adds 11 series at most.
    per_probe: bool = True
    per_probe_max: int = field(default=1000, metadata=bounds(ge=0, le=100_000))
    # A scrape answered less than this many seconds after the last one gets the same
    # body: the database is read, and the text made, at most once per interval however
    # often (and by however many) /metrics is asked.
    min_interval_s: float = field(default=5.0, metadata=bounds(ge=0, le=3600))


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    # A generic webhook: every alert routed to it is POSTed as JSON, signed
    # with HMAC-SHA256 (X-Bbprobe-Signature: sha256=HEX of "TIMESTAMP.BODY", with
    # X-Bbprobe-Timestamp) when a secret is given.
    name: str = ""
    url: str = ""
    # The HMAC key: the systemd credential named here, or the environment variable.
    secret_credential: str = ""
    secret_env: str = ""
    # Which alerts: any of contract_breach, below_minimum, probe_silent,
    # campaign_incomplete, dead_letters, test. Empty: all.
    triggers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AppriseConfig:
    # A notification service through Apprise (email, Telegram, Slack, Matrix, ntfy...; its
    # URL syntax: https://github.com/caronc/apprise/wiki). Apprise URLs carry their
    # secrets, so give the URL as a systemd credential or an environment variable; a
    # plain url is for those without one.
    name: str = ""
    url: str = ""
    url_credential: str = ""
    url_env: str = ""
    triggers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    # Raise alerts and notify people, without Prometheus. Alerts are kept in
    # the database with each notifier's delivery state (`bbprobe-collector alerts list`).
    enabled: bool = False
    # How often the collector looks for alert conditions and due deliveries.
    interval_s: float = field(default=60.0, metadata=bounds(ge=0.1, le=3600))
    # probe_silent: no health report and no result for fleet.silent_after_s (the same
    # threshold as the fleet view's), and a "resolved" notice when the probe is back.
    # below_minimum: at most one alert per probe and direction this often.
    below_minimum_every_s: float = field(default=6 * 3600.0,
                                         metadata=bounds(gt=0, le=30 * 86400))
    # contract_breach: the time zone of the campaign's hourly bands.
    timezone: str = "Europe/Rome"
    # A failed delivery is retried after retry_min_s, doubling up to retry_max_s
    # (+-50 % jitter), at most max_attempts times in all; then it is marked failed.
    retry_min_s: float = field(default=30.0, metadata=bounds(gt=0, le=86400))
    retry_max_s: float = field(default=3600.0, metadata=bounds(gt=0, le=7 * 86400))
    max_attempts: int = field(default=12, metadata=bounds(ge=1, le=1000))
    # Each delivery must finish within this many seconds.
    timeout_s: float = field(default=10.0, metadata=bounds(gt=0, le=300))
    # Alerts (and their delivery states) older than this are deleted (a condition still
    # holding is then announced again).
    keep_days: int = field(default=90, metadata=bounds(ge=1, le=3650))
    webhooks: tuple[WebhookConfig, ...] = ()
    apprise: tuple[AppriseConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class LogConfig:
    # What `serve` logs to stderr (the journal under systemd), in key=value lines
    # (collector/web/accesslog.py): "info" one line per ingest and per request (the
    # measurement traffic: a summary a minute); "warning" problems only; "error";
    # "debug" (a line per measurement request too). serve --log-level overrides it.
    level: Literal["debug", "info", "warning", "error"] = "info"
    # One line per request besides the ingests (method, path, status, ms, client, role),
    # and the measurements' summary line.
    access: bool = True


@dataclass(frozen=True, slots=True)
class EvidenceConfig:
    # Refuse (422) results a probe did not sign: for a collector whose every probe
    # signs (agent 27+ with a probe key), so that an unsigned copy cannot stand in for
    # a signed one. Off: unsigned results are kept, marked "unsigned".
    require_signatures: bool = False


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    measurement: MeasurementConfig = field(default_factory=MeasurementConfig)
    compliance: ComplianceConfig = field(default_factory=ComplianceConfig)
    reports: ReportsConfig = field(default_factory=ReportsConfig)
    anonymous: AnonymousConfig = field(default_factory=AnonymousConfig)
    influxdb: InfluxConfig = field(default_factory=InfluxConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    tickets: TicketsConfig = field(default_factory=TicketsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)


def warn_on_stderr(line: str) -> None:
    print(f"bbprobe-collector: warning: {line}", file=sys.stderr)


def load(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] = os.environ, warn: Callable[[str], None] = warn_on_stderr,
) -> CollectorConfig:
    """Read and validate ``path`` (None: defaults) with {"section.key": value} overrides.
    ``environ`` places the default database (storage.path); ``warn`` gets the one-line
    warnings (a deprecated key)."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = _read_toml(Path(path))
        except _AgentConfigError as exc:
            raise ConfigError(str(exc)) from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    cfg = parse(data, source, warn)
    if not cfg.storage.path:
        cfg = replace(cfg, storage=replace(cfg.storage, path=default_database(environ)))
    return cfg


def resolve_secrets(cfg: CollectorConfig, environ: Mapping[str, str] = os.environ
                    ) -> CollectorConfig:
    """For the commands that use the secrets (serve, check-config): the TLS key's path
    from its credential, and the InfluxDB token checked now rather than at the first
    write. Under systemd ($CREDENTIALS_DIRECTORY) the credential wins; from a shell the
    plain file, when the config names one too. Other commands never need them, so root's
    `probe add` works whatever the service's credentials are."""
    srv = cfg.server
    if srv.tls_key_credential and (environ.get("CREDENTIALS_DIRECTORY") or not srv.tls_key):
        try:
            key_path = credentials.path(srv.tls_key_credential, environ,
                                        "server.tls_key_credential")
        except credentials.CredentialError as exc:
            raise ConfigError(str(exc)) from None
        cfg = replace(cfg, server=replace(srv, tls_key=str(key_path)))
    if cfg.influxdb.enabled:
        influx_token(cfg.influxdb, environ)
    return cfg


def default_database(environ: Mapping[str, str]) -> str:
    """Where the database lives when storage.path is empty: the service's StateDirectory
    under systemd, else the user's data directory (XDG base directories)."""
    return str(user_dir(environ, "XDG_DATA_HOME", ".local/share", "bbprobe-collector")
               / "collector.sqlite3")


def influx_token(cfg: InfluxConfig, environ: Mapping[str, str] = os.environ) -> str:
    """The InfluxDB API token: the named credential under systemd (or when no variable
    is set), else the environment variable token_env."""
    if cfg.token_credential and (environ.get("CREDENTIALS_DIRECTORY") or
                                 not environ.get(cfg.token_env)):
        try:
            return credentials.read(cfg.token_credential, environ, "influxdb.token_credential")
        except credentials.CredentialError as exc:
            raise ConfigError(str(exc)) from None
    return environ.get(cfg.token_env, "")


# Keys that were moved (old -> new place), still read from the old place with a warning:
# a config that names one must not stop the collector after an upgrade (check-config is
# the units' ExecStartPre). alerts.silent_after_s set the probe_silent alert's threshold
# apart from the fleet view's, so the two could disagree on who is silent; its value
# becomes fleet.silent_after_s when that is not set, and the two set to different values
# are refused: only the operator knows which one was meant.
MOVED_KEYS = {("alerts", "silent_after_s"): (
    "fleet", "silent_after_s",
    "one threshold now says who is silent (fleet view, /metrics, probe_silent alert)")}


def _moved(data: Mapping[str, Any], source: str, warn: Callable[[str], None]
           ) -> dict[str, Any]:
    """``data`` with each moved key read into its new place (``MOVED_KEYS``)."""
    out = dict(data)
    for (section, key), (new_section, new_key, why) in MOVED_KEYS.items():
        table, target = out.get(section), out.get(new_section)
        if not isinstance(table, Mapping) or key not in table or \
                not isinstance(target, Mapping | None):
            continue
        kind = typing.get_type_hints(CollectorConfig)[new_section]
        try:
            value = getattr(decode(kind, {new_key: table[key]}), new_key)
        except SchemaError as exc:
            raise ConfigError(f"{source}: {section}.{key}: {exc.message}") from None
        given = (target or {}).get(new_key)
        if isinstance(given, int | float) and not isinstance(given, bool) and given != value:
            raise ConfigError(f"{source}: {section}.{key} = {table[key]!r} and "
                              f"{new_section}.{new_key} = {given!r} differ, and {why}: "
                              f"keep the value you mean in [{new_section}] and delete "
                              f"{section}.{key}")
        warn(f"{source}: {section}.{key} is deprecated: set [{new_section}] {new_key} "
             f"instead (read as {new_section}.{new_key} = {value!r})")
        out[section] = {k: v for k, v in table.items() if k != key}
        out[new_section] = {**(target or {}), new_key: given if given is not None else value}
    return out


def parse(data: Mapping[str, Any], source: str = "<config>",
          warn: Callable[[str], None] = warn_on_stderr) -> CollectorConfig:
    """Validate a config read from ``source``; ``warn`` gets the one-line warnings (a
    deprecated key)."""
    cfg = decode_table(CollectorConfig, _moved(data, source, warn), source, ConfigError)
    srv = cfg.server
    if bool(srv.tls_cert) != bool(srv.tls_key or srv.tls_key_credential):
        raise ConfigError(f"{source}: server.tls_cert and server.tls_key: give both or neither")
    for key, name in (("server.tls_key_credential", srv.tls_key_credential),
                      ("influxdb.token_credential", cfg.influxdb.token_credential),
                      ("storage.password_credential", cfg.storage.password_credential),
                      ("tickets.signing_key_credential",
                       cfg.tickets.signing_key_credential)):
        if name and (problem := credentials.name_problem(name)):
            raise ConfigError(f"{source}: {key}: {problem}")
    if srv.client_cert != "off" and not (srv.tls_cert and srv.client_ca):
        raise ConfigError(f"{source}: server.client_cert = {srv.client_cert!r} needs "
                          "server.tls_cert, server.tls_key and server.client_ca")
    for name in ("tls_cert", "tls_key", "client_ca"):
        value = getattr(srv, name)
        if value and not Path(value).is_file():
            raise ConfigError(f"{source}: server.{name}: no such file {value!r}")
    storage = cfg.storage
    if storage.backend == "postgresql":
        if not storage.url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"{source}: storage.url: backend \"postgresql\" needs a "
                              "connection URI, postgresql://user@host:5432/dbname")
    elif storage.url:
        raise ConfigError(f"{source}: storage.url: only for backend \"postgresql\" "
                          "(SQLite uses storage.path)")
    if storage.read_url and (storage.backend != "postgresql" or not storage.read_url.startswith(
            ("postgresql://", "postgres://"))):
        raise ConfigError(f"{source}: storage.read_url: a replica's connection URI, "
                          "postgresql://user@replica:5432/dbname, only with backend "
                          "\"postgresql\"")
    influx = cfg.influxdb
    if influx.enabled:
        if problem := url_problem(influx.url):
            raise ConfigError(f"{source}: influxdb.url: expected http(s)://host[:port]: "
                              f"{problem}")
        if not influx.bucket:
            raise ConfigError(f"{source}: influxdb.bucket: must not be empty")
    m = cfg.metrics
    if m.listen:
        if problem := listen_problem(m.listen):
            raise ConfigError(f"{source}: metrics.listen: {problem}")
        if m.min_interval_s < 1:
            # Open to anyone who reaches it: a scrape must not read the database each time.
            raise ConfigError(f"{source}: metrics.min_interval_s: at least 1 s with "
                              "metrics.listen (an open listener)")
        if not m.enabled:
            raise ConfigError(f"{source}: metrics.listen: set, but metrics.enabled = false")
        host, port = split_listen(m.listen)
        if port and port == srv.port and host == srv.host:
            raise ConfigError(f"{source}: metrics.listen: the same address as the server "
                              f"({host}:{port}); choose another port")
    _check_alerts(cfg.alerts, source)
    _check_tickets(cfg, source)
    if influx.retry_max_s < influx.retry_min_s:
        raise ConfigError(f"{source}: influxdb.retry_max_s: must be >= retry_min_s")
    return cfg



def _check_tickets(cfg: CollectorConfig, source: str) -> None:
    tickets = cfg.tickets
    for name in ("audience", "servers"):
        urls = getattr(tickets, name)
        if len(urls) > MAX_TICKET_SERVERS:
            raise ConfigError(f"{source}: tickets.{name}: at most {MAX_TICKET_SERVERS} "
                              f"URLs, got {len(urls)}")
        for i, url in enumerate(urls):
            if problem := url_problem(url):
                raise ConfigError(f"{source}: tickets.{name}[{i}]: expected "
                                  f"http(s)://host[:port]: {problem}")
    if len(tickets.trusted_keys) > MAX_TRUSTED_KEYS:
        raise ConfigError(f"{source}: tickets.trusted_keys: at most {MAX_TRUSTED_KEYS} "
                          f"files, got {len(tickets.trusted_keys)}")
    for i, path in enumerate((tickets.signing_key_file, *tickets.trusted_keys)):
        if path and not Path(path).is_file():
            key = "tickets.signing_key_file" if i == 0 else f"tickets.trusted_keys[{i - 1}]"
            raise ConfigError(f"{source}: {key}: no such file {path!r}")
    if not tickets.enabled or tickets.audience:
        return
    # Without an audience a server takes its own origin from each request's Host header,
    # which the client chooses: a ticket for another server trusting the same key would
    # be accepted here with that server's name in Host.
    if tickets.trusted_keys:
        raise ConfigError(f"{source}: tickets.audience: must list this server's URLs when "
                          "tickets.trusted_keys is set (it accepts another issuer's "
                          "tickets, which may name other servers)")
    if tickets.servers and cfg.server.role == "all" and cfg.measurement.enabled:
        raise ConfigError(f"{source}: tickets.audience: must list this collector's "
                          "measurement URLs when tickets.servers is set (its tickets "
                          "name other servers, which may trust the same key)")


def _check_alerts(alerts: AlertsConfig, source: str) -> None:
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key}: {message}")

    if alerts.retry_max_s < alerts.retry_min_s:
        fail("alerts.retry_max_s", "must be >= retry_min_s")
    try:
        ZoneInfo(alerts.timezone)
    except (ValueError, OSError, ZoneInfoNotFoundError):
        fail("alerts.timezone", f"not a known time zone, got {alerts.timezone!r}")
    names: set[str] = set()
    notifiers: list[tuple[str, WebhookConfig | AppriseConfig]] = [
        *((f"alerts.webhooks[{i}]", w) for i, w in enumerate(alerts.webhooks)),
        *((f"alerts.apprise[{i}]", a) for i, a in enumerate(alerts.apprise))]
    for where, notifier in notifiers:
        if not NOTIFIER_NAME_RE.fullmatch(notifier.name):
            fail(f"{where}.name", "must be 1-64 characters of letters, digits, '.', '_', "
                                  f"'-', got {notifier.name!r}")
        if notifier.name in names:
            fail(f"{where}.name", f"{notifier.name!r} is used twice")
        names.add(notifier.name)
        for trigger in notifier.triggers:
            if trigger not in ALERT_KINDS:
                fail(f"{where}.triggers", f"unknown trigger {trigger!r}; expected some of "
                                          f"{', '.join(ALERT_KINDS)}")
        if isinstance(notifier, WebhookConfig):
            if problem := url_problem(notifier.url):
                fail(f"{where}.url", f"expected http(s)://host[:port]/path: {problem}")
            credential = notifier.secret_credential
        else:
            given = [k for k in ("url", "url_credential", "url_env") if getattr(notifier, k)]
            if len(given) != 1:
                fail(f"{where}.url", "give exactly one of url, url_credential and url_env")
            credential = notifier.url_credential
        if credential and (problem := credentials.name_problem(credential)):
            fail(f"{where}", problem)
