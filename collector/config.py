"""Collector configuration: TOML validated at load, unknown keys rejected, then frozen.

Every key is documented in ``configs/collector.example.toml`` (a test loads it). Relative
paths are relative to the working directory; with no config at all, the database goes to
the per-user data directory (or systemd's StateDirectory) and the targets table is the
one shipped inside the package, so ``serve`` works from any directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from agent import credentials
from agent.config import decode_table, url_problem, user_dir
from agent.config import read_toml as _read_toml
from agent.errors import ConfigError as _AgentConfigError
from agent.schema import bounds
from collector.errors import ConfigError


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
    # Concurrent transfers served at once; more get 503 (Retry-After).
    max_concurrent: int = field(default=64, metadata=bounds(ge=1, le=10_000))
    # Of those, at most this many from one client (an IPv4 address or an IPv6 /64); more
    # get 429. 20 = the most streams the agent's adaptive rule opens (Ne.Me.Sys table).
    max_concurrent_per_client: int = field(default=20, metadata=bounds(ge=1, le=10_000))
    # Length of an ndt7 subtest (/ndt/v7/*). The protocol's is 10 s and M-Lab's clients
    # assume it; shorter only for tests.
    ndt7_runtime_s: float = field(default=10.0, metadata=bounds(ge=0.5, le=10.0))


@dataclass(frozen=True, slots=True)
class AnonymousConfig:
    # What strangers may leave in the database: browser speed-test results and ndt7
    # subtests (issue 12). Browser results keep at most max_rows, ndt7 subtests
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
class InfluxConfig:
    # Copy every stored result to InfluxDB 2.x/3.x (or any InfluxDB v2 write API server)
    # through a durable outbox in SQLite (collector/influx.py).
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
    # A probe with no health report and no result for longer than this is flagged
    # silent (issue 15). Agents report at every delivery and at least hourly, so the
    # default allows two missed reports.
    silent_after_s: float = field(default=3 * 3600.0, metadata=bounds(gt=0, le=365 * 86400))
    # The fleet view's validity rate counts the sessions of this many days.
    validity_days: int = field(default=7, metadata=bounds(ge=1, le=366))


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    measurement: MeasurementConfig = field(default_factory=MeasurementConfig)
    compliance: ComplianceConfig = field(default_factory=ComplianceConfig)
    anonymous: AnonymousConfig = field(default_factory=AnonymousConfig)
    influxdb: InfluxConfig = field(default_factory=InfluxConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)


def load(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> CollectorConfig:
    """Read and validate ``path`` (None: defaults) with {"section.key": value} overrides.
    ``environ`` places the default database (storage.path)."""
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
    cfg = parse(data, source)
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


def parse(data: Mapping[str, Any], source: str = "<config>") -> CollectorConfig:
    cfg = decode_table(CollectorConfig, data, source, ConfigError)
    srv = cfg.server
    if bool(srv.tls_cert) != bool(srv.tls_key or srv.tls_key_credential):
        raise ConfigError(f"{source}: server.tls_cert and server.tls_key: give both or neither")
    for key, name in (("server.tls_key_credential", srv.tls_key_credential),
                      ("influxdb.token_credential", cfg.influxdb.token_credential),
                      ("storage.password_credential", cfg.storage.password_credential)):
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
    influx = cfg.influxdb
    if influx.enabled:
        if problem := url_problem(influx.url):
            raise ConfigError(f"{source}: influxdb.url: expected http(s)://host[:port]: "
                              f"{problem}")
        if not influx.bucket:
            raise ConfigError(f"{source}: influxdb.bucket: must not be empty")
    if influx.retry_max_s < influx.retry_min_s:
        raise ConfigError(f"{source}: influxdb.retry_max_s: must be >= retry_min_s")
    return cfg
