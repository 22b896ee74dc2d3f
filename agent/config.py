"""Agent configuration: TOML data validated at load, frozen, passed down explicitly.

Every key is documented in ``configs/agent.example.toml`` (a test loads it). Unknown keys,
wrong types and out-of-range values are rejected with the key's dotted path. CLI flags are
applied as overrides *before* validation, so they obey the same rules.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent import budget, credentials, spec
from agent.decoding import SchemaError, decode
from agent.errors import ConfigError
from agent.schema import (
    PROBE_ID_RE,
    Method,
    PingMethod,
    RequestedFamily,
    TransferMethod,
    TransferMode,
    bounds,
)

# Each candidate is pinged at every session start: a bounded list keeps that short.
MAX_CANDIDATES = 16


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    # Base URL of the collector, e.g. "https://collector.example.net:8443". Empty: no push.
    url: str = ""
    # The probe's bearer token (printed once by `bbprobe-collector probe add`).
    token: str = ""
    # Or a file holding the token (keeps it out of the config)...
    token_file: str = ""
    # ...or, under systemd, the name of a credential holding it (LoadCredential=NAME:PATH
    # in the unit; read from $CREDENTIALS_DIRECTORY/NAME). The shipped unit loads
    # /etc/bbprobe/token as "token", readable by the service's dynamic user only.
    token_credential: str = ""
    timeout_s: float = field(default=spec.PUSH_TIMEOUT_S, metadata=bounds(gt=0, le=600))
    # HTTPS: trust this CA (PEM) for the collector instead of the system's, and/or show
    # this client certificate and key (the collector's server.client_cert), which then
    # identify the probe without a token.
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    # Retry a failed push after retry_min_s, doubling up to retry_max_s (+-50 % jitter);
    # a Retry-After from the collector is honoured up to retry_max_s.
    retry_min_s: float = field(default=1.0, metadata=bounds(gt=0, le=3600))
    retry_max_s: float = field(default=300.0, metadata=bounds(gt=0, le=86_400))
    # How long one `bbprobe run` keeps retrying before leaving the rest to the next run.
    max_wait_s: float = field(default=60.0, metadata=bounds(ge=0, le=86_400))
    # A backlog goes in batches of at most this many results and bytes, at most
    # max_requests_per_s requests a second.
    batch_results: int = field(default=50, metadata=bounds(ge=1, le=1000))
    batch_bytes: int = field(default=512 * 1024, metadata=bounds(ge=1024, le=64 * 1024**2))
    max_requests_per_s: float = field(default=1.0, metadata=bounds(gt=0, le=1000))
    # Spool bounds: at most spool_max_bytes of results, and never below min_free_bytes of
    # free disk; beyond either, the oldest results are dropped and a gap record is sent.
    spool_max_bytes: int = field(default=64 * 1024**2, metadata=bounds(ge=64 * 1024))
    min_free_bytes: int = field(default=16 * 1024**2, metadata=bounds(ge=0))
    # Results older than this are dropped (and reported as a gap): never on time alone.
    max_age_days: float = field(default=30.0, metadata=bounds(gt=0, le=3650))
    # Request bodies compressed: "zstd" (a 20-stream session goes in about a third of
    # its bytes: a slow uplink delivers it sooner), "gzip", or "none". An older
    # collector refuses encodings (415): the agent then sends plain JSON to it for the
    # rest of the run.
    compression: Literal["zstd", "gzip", "none"] = "zstd"


@dataclass(frozen=True, slots=True)
class ChecksConfig:
    # Host checks before and during each session (agent/checks.py); a failed check marks
    # the result invalid with its reasons (it is still measured, stored and shown apart).
    enabled: bool = True
    max_cpu_percent: float = field(default=85.0, metadata=bounds(ge=0, le=100))
    max_memory_used_ratio: float = field(default=0.95, metadata=bounds(ge=0, le=1))
    min_memory_bytes: int = field(default=128 * 1024**2, metadata=bounds(ge=0))
    reject_wireless: bool = True
    # The NIC must link at least this fast (Mbit/s; the contract's guaranteed minimum
    # download). 0: not checked.
    min_link_mbps: float = field(default=0.0, metadata=bounds(ge=0))
    # Other traffic on the interface during the transfers, as a share of its bytes.
    max_cross_traffic_ratio: float = field(default=0.10, metadata=bounds(ge=0, le=1))
    # ARP-scan the LAN (private subnets, at most a /24; needs CAP_NET_RAW) and allow at
    # most this many active hosts besides the gateway.
    scan_lan: bool = True
    max_lan_hosts: int = field(default=0, metadata=bounds(ge=0, le=1000))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    # Measurement server base URL; empty means the collector's URL.
    url: str = ""
    # Host or address for the ping train; empty means the measurement server's host.
    ping_target: str = ""
    # Candidate measurement servers. When set, url is not used: at each
    # session start every candidate's host is pinged select_pings times and the one with
    # the lowest median RTT is used (Ne.Me.Sys measures against the nearest server); one
    # whose TCP connection fails is passed over for the next. All of it is recorded in
    # the result (server_selection). A fleet gets its candidates centrally, by region.
    candidates: tuple[str, ...] = ()
    select_pings: int = field(default=3, metadata=bounds(ge=1, le=20))
    # IP version (the command line's -4/-6): "any" (the host's own choice,
    # getaddrinfo's order), "ipv4", "ipv6", or "both": every session runs once over
    # each, two results per slot (agent/family.py).
    address_family: RequestedFamily = "any"


@dataclass(frozen=True, slots=True)
class CampaignConfig:
    # The daemon's campaign (delibera 244/08 Allegato 1): one of spec.CAMPAIGN_RULES.
    rule: spec.CampaignRuleName = spec.DEFAULT_CAMPAIGN_RULE
    # Local time of the hourly bands.
    timezone: str = "Europe/Rome"
    # Days a campaign may take to fill every band (retries included).
    window_days: int = field(default=3, metadata=bounds(ge=1, le=30))


@dataclass(frozen=True, slots=True)
class PingConfig:
    enabled: bool = True
    count: int = field(default=spec.PING_COUNT, metadata=bounds(ge=1, le=10_000))
    interval_s: float = field(default=spec.PING_INTERVAL_S, metadata=bounds(ge=0.001, le=60))
    payload_bytes: int = field(default=spec.PING_PAYLOAD_BYTES, metadata=bounds(ge=0, le=65_000))
    timeout_s: float = field(default=spec.PING_TIMEOUT_S, metadata=bounds(gt=0, le=60))
    # Also ping during the first download and upload windows (latency under load).
    under_load: bool = True
    loaded_interval_s: float = field(
        default=spec.LOADED_PING_INTERVAL_S, metadata=bounds(ge=0.001, le=60)
    )


@dataclass(frozen=True, slots=True)
class TransferConfig:
    enabled: bool = True
    # "duration": warm-up then a fixed window (Ne.Me.Sys/RMBT); "file": whole test files
    # of file_size_bytes, speed = size / time per transfer (131/06 file mode).
    mode: TransferMode = "duration"
    # Parallel streams; 0 = adaptive: start with 2, then raise the count from the rate
    # seen halfway through the warm-up (Ne.Me.Sys table, duration mode only).
    streams: int = field(default=0, metadata=bounds(ge=0, le=spec.MAX_STREAMS))
    warmup_s: float = field(default=spec.WARMUP_S, metadata=bounds(ge=0, le=60))
    window_s: float = field(default=spec.WINDOW_S, metadata=bounds(gt=0, le=600))
    file_size_bytes: int = field(default=spec.FILE_SIZE_BYTES, metadata=bounds(gt=0))
    tests: int = field(default=1, metadata=bounds(ge=1, le=1000))
    attempts: int = field(default=spec.ATTEMPTS, metadata=bounds(ge=1, le=10))
    sample_interval_s: float = field(
        default=spec.SAMPLE_INTERVAL_S, metadata=bounds(ge=0.01, le=10)
    )
    # Hard deadline per attempt; 0 = automatic (warm-up + window + 5 s in duration mode,
    # 300 s in file mode). A session's worst case must fit spec.MAX_SESSION_S and
    # spec.MAX_SESSION_BYTES (agent/budget.py).
    timeout_s: float = field(default=0.0, metadata=bounds(ge=0, le=3600))


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # Prometheus metrics of this agent: its last session, spool, campaign and
    # health. The daemon writes them after every session and health report, in the
    # node_exporter textfile-collector format, to this file (e.g.
    # /var/lib/prometheus/node-exporter/bbprobe.prom); empty: not written.
    textfile: str = ""
    # The daemon also serves them at GET /metrics on this "host:port" ("127.0.0.1:9465",
    # IPv6 "[::1]:9465"); empty: not served. No token: keep it on loopback or a
    # management network.
    listen: str = ""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    # Probe identity. Empty: the name the collector gives the token in use (whoami), asked
    # at each session; a result measured while the collector was away is spooled without
    # one and named when it is delivered. Never guessed (a wrong name is refused: 403).
    probe_id: str = ""
    # Where results wait until the collector acknowledges them. Empty: $STATE_DIRECTORY
    # (systemd), else $XDG_STATE_HOME/bbprobe, else ~/.local/state/bbprobe.
    state_dir: str = ""
    # Method profile: presets applied under the keys you set (see PROFILES); recorded
    # with every result.
    profile: str = "agcom"
    # What `bbprobe daemon` logs (its --log-level overrides it): "info" says one line per
    # slot; "warning" only problems; "debug" more.
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ping: PingConfig = field(default_factory=PingConfig)
    download: TransferConfig = field(default_factory=TransferConfig)
    upload: TransferConfig = field(default_factory=TransferConfig)
    campaign: CampaignConfig = field(default_factory=CampaignConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# Method profiles: dotted-key presets, applied under whatever the file and flags set.
PROFILES: dict[str, dict[str, Any]] = {
    # Ne.Me.Sys-style default for a 244/08 campaign (methodology.md §2.2-2.5): 10 pings
    # 1 s apart; adaptive streams, 2 s warm-up + 10 s window; 3 attempts.
    "agcom": {},
    # 131/06 "file di prova predefiniti": whole files, speed = size / time, 3 per session.
    # One attempt of at most 120 s each: 3 x 3 attempts of 300 s each way could last 90
    # minutes, over the 15-minute limit of a session (agent/budget.py); this plans
    # 731 s (12.2 min), which leaves 169 s for server selection (14 candidates at 3
    # pings). A whole file either arrives within its deadline or the attempt times out,
    # so size / deadline is the slowest line measured: each file is sized to arrive in
    # 120 s at 76 % of the guaranteed minimum of the shipped targets (configs/targets/
    # bt-italia-2013.toml, banda minima 2200 kbit/s down, 150 kbit/s up): 25 MB down
    # from 1.67 Mbit/s, 1.7 MB up from 113 kbit/s. (A 5 MB upload needed 333 kbit/s,
    # above that line's banda massima of 256: every upload would have timed out.) A
    # retry repeats a transfer too slow for its deadline, so one attempt each.
    "file-131-06": {
        "download.mode": "file", "upload.mode": "file",
        "download.streams": 1, "upload.streams": 1,
        "download.file_size_bytes": 25_000_000, "upload.file_size_bytes": 1_700_000,
        "download.tests": 3, "upload.tests": 3,
        "download.attempts": 1, "upload.attempts": 1,
        "download.timeout_s": 120.0, "upload.timeout_s": 120.0,
    },
    # RTR-NetTest/RMBT defaults (methodology.md §3.1): 3 streams, 2 s pre-test, 7 s.
    "rmbt": {
        "download.streams": 3, "upload.streams": 3,
        "download.window_s": 7.0, "upload.window_s": 7.0,
        "ping.interval_s": 0.1,
    },
    # A technician's check in under 30 s: 5 pings, 1 s + 4 s each way, no retries.
    "quick": {
        "ping.count": 5, "ping.interval_s": 0.2,
        "download.warmup_s": 1.0, "download.window_s": 4.0, "download.attempts": 1,
        "upload.warmup_s": 1.0, "upload.window_s": 4.0, "upload.attempts": 1,
    },
    # Nothing preset: the built-in defaults and your keys.
    "custom": {},
}


def load(
    path: str | os.PathLike[str] | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
    central: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Read ``path`` (None: defaults only; or take ``data``, its contents read before),
    apply the collector's ``central`` instruction and then ``overrides`` (both
    {"section.key": value}), validate everything and return the frozen config. Raises
    ``ConfigError``.

    Precedence: built-in defaults < profile presets < the local file < the
    central instruction < the command line (a technician on site decides)."""
    source = str(path) if path is not None else "<defaults>"
    if data is not None:
        data = copy.deepcopy(dict(data))
    elif path is not None:
        data = read_toml(Path(path))
    else:
        data = {}
    for layer in (central or {}), (overrides or {}):
        for dotted, value in layer.items():
            _set_dotted(data, dotted, value)
    try:
        cfg = parse(data, source)
    except ConfigError as exc:
        # A key the command line set is named as the command line's, not the file's
        # (or "<defaults>"): that is where the technician typed it.
        said = str(exc).removeprefix(f"{source}: ")
        key = said.partition(":")[0]
        if any(key == k or key.startswith(k + ".") or k.startswith(key + ".")
               for k in overrides or {}):
            raise ConfigError(f"the command line: {said}") from None
        raise
    if not cfg.state_dir:
        cfg = replace(cfg, state_dir=default_state_dir(environ))
    return cfg


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


T = TypeVar("T")


def decode_table(
    cls: type[T], data: Mapping[str, Any], source: str,
    error: type[Exception] = ConfigError,
) -> T:
    """Decode a TOML table into dataclass ``cls``; failures raise ``error`` naming the key."""
    try:
        return decode(cls, dict(data))
    except SchemaError as exc:
        message = exc.message
        if message == "unknown field":
            near = _near_key(cls, exc.path)
            message = "unknown key" + (f" (did you mean {near}?)" if near else "")
        raise error(f"{source}: {exc.path}: {message}") from None


def _near_key(cls: type[Any], path: str) -> str | None:
    """The key of ``cls``'s tables closest to a mistyped ``path`` ("download.stream" ->
    "download.streams"), as click suggests for a mistyped flag; None when none is near."""
    *tables, wrong = path.split(".")
    here: Any = cls
    for name in tables:
        hints = typing.get_type_hints(here) if dataclasses.is_dataclass(here) else {}
        here = hints.get(name)
        if here is None:
            return None
    if not dataclasses.is_dataclass(here):
        return None
    names = [f.name for f in dataclasses.fields(here)]
    close = difflib.get_close_matches(wrong, names, n=1, cutoff=0.7)
    return ".".join([*tables, close[0]]) if close else None


def with_profile(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``data`` with its profile's presets filled in wherever ``data`` sets nothing."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    name = merged.get("profile", "agcom")
    if not isinstance(name, str) or name not in PROFILES:
        raise ConfigError(f"{source}: profile: must be one of {', '.join(PROFILES)}, "
                          f"got {name!r}")
    for dotted, value in PROFILES[name].items():
        section, key = dotted.split(".")
        table = merged.setdefault(section, {})
        if isinstance(table, dict):
            table.setdefault(key, value)
    return merged


def parse(data: Mapping[str, Any], source: str = "<config>") -> AgentConfig:
    """Validate a config mapping (pure). Raises ``ConfigError`` naming the key."""
    cfg = decode_table(AgentConfig, with_profile(data, source), source)
    _check(cfg, source)
    return cfg


def _check(cfg: AgentConfig, source: str) -> None:
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key}: {message}")

    if cfg.probe_id and not PROBE_ID_RE.fullmatch(cfg.probe_id):
        fail("probe_id", "must be 1-64 characters of letters, digits, '.', '_', '-'")
    for key, url in (("collector.url", cfg.collector.url), ("server.url", cfg.server.url),
                     *((f"server.candidates[{i}]", u)
                       for i, u in enumerate(cfg.server.candidates))):
        if url and (problem := url_problem(url)):
            fail(key, problem)
    if cfg.metrics.listen and (problem := listen_problem(cfg.metrics.listen)):
        fail("metrics.listen", problem)
    if cfg.metrics.textfile and not cfg.metrics.textfile.endswith(".prom"):
        fail("metrics.textfile", "node_exporter reads only files named *.prom, got "
                                 f"{cfg.metrics.textfile!r}")
    if len(cfg.server.candidates) > MAX_CANDIDATES:
        fail("server.candidates", f"at most {MAX_CANDIDATES} servers, got "
                                  f"{len(cfg.server.candidates)}")
    try:
        ZoneInfo(cfg.campaign.timezone)
    except (ValueError, OSError, ZoneInfoNotFoundError):  # OSError: "Europe" is a directory
        fail("campaign.timezone", f"not a known time zone, got {cfg.campaign.timezone!r}")
    if cfg.collector.token and (cfg.collector.token_file or cfg.collector.token_credential):
        fail("collector.token", "set token, or token_file and/or token_credential, not both")
    if cfg.collector.token_credential and \
            (problem := credentials.name_problem(cfg.collector.token_credential)):
        fail("collector.token_credential", problem)
    for name in ("download", "upload"):
        transfer: TransferConfig = getattr(cfg, name)
        if transfer.timeout_s and transfer.mode == "duration" and (
            transfer.timeout_s < transfer.warmup_s + transfer.window_s
        ):
            fail(f"{name}.timeout_s", "is shorter than warmup_s + window_s")
        if transfer.sample_interval_s > transfer.window_s:
            fail(f"{name}.sample_interval_s", "is longer than window_s")
        if transfer.mode == "file" and transfer.streams == 0:
            fail(f"{name}.streams", "must be >= 1 in file mode (adaptive streams need a "
                                    "warm-up)")
    # Last: the plan's figures assume every key above holds.
    sessions = 2 if cfg.server.address_family == "both" else 1
    plan = budget.plan(method(cfg), sessions, candidates=cfg.server.candidates,
                       select_pings=cfg.server.select_pings)
    if (problem := budget.limit_problem(plan)) is not None:
        fail("session", problem)


def listen_problem(text: str) -> str | None:
    """What is wrong with a "host:port" listen address (IPv6 in brackets), or None."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        return f"expected host:port (IPv6: [::1]:9464), got {text!r}"
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            return f"unbalanced brackets in {text!r}"
    elif ":" in host:
        return f"an IPv6 address goes in brackets, [{host}]:{port}"
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        return f"port: expected 0..65535, got {port!r}"
    return None


def split_listen(text: str) -> tuple[str, int]:
    """("host", port) of a valid listen address (brackets removed)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def url_problem(url: str) -> str | None:
    """What makes ``url`` unusable as an http(s) base URL, as a phrase to follow the key's
    name ("..., got URL"), or None. Pure.

    urlsplit() raises for a bad IPv6 literal, and ``.port`` for a port out of range or
    not a number, only when that part is first read: deep in a probe or the HTTP client,
    as a traceback. Reading every part here, at load, turns them into one line."""
    if any(c.isspace() for c in url):
        return f"must not contain white space, got {url!r}"
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"is not a valid URL ({exc}), got {url!r}"
    hostport = parts.netloc.rpartition("@")[2]  # after any user:password@
    if hostport.count(":") > 1 and "[" not in hostport:
        # RFC 3986 §3.2.2: an IPv6 literal in a URL goes in brackets.
        return f"an IPv6 address goes in brackets (http://[::1]:8080), got {url!r}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// URL with a host, got {url!r}"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:  # None (the scheme's default) is fine; 0 cannot be connected to
        return f"port must be a number from 1 to 65535, got {url!r}"
    return None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{part}: expected a table")
        node = child
    node[leaf] = value


def user_dir(environ: Mapping[str, str], xdg_variable: str, fallback: str, name: str) -> Path:
    """A program's directory: systemd's StateDirectory= when running as a service, else
    the XDG base directory ``xdg_variable`` (fallback ``~/fallback``), then ``name``."""
    if environ.get("STATE_DIRECTORY"):
        # systemd StateDirectory= may list several, colon-separated; the first is ours.
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    if environ.get(xdg_variable):
        return Path(environ[xdg_variable]) / name
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / fallback / name


def default_state_dir(environ: Mapping[str, str]) -> str:
    return str(user_dir(environ, "XDG_STATE_HOME", ".local/state", "bbprobe"))


def token_source(cfg: AgentConfig, environ: Mapping[str, str] = os.environ) -> str:
    """Where ``read_token`` takes the token from: "config", "credential NAME", "file PATH"
    or "" (none). Under systemd ($CREDENTIALS_DIRECTORY) the credential wins; from a shell
    the file, so one config serves the unit, whose dynamic user reads only the
    credential, and root, who reads the file."""
    c = cfg.collector
    if c.token:
        return "config"
    if c.token_credential and (environ.get("CREDENTIALS_DIRECTORY") or not c.token_file):
        return f"credential {c.token_credential!r}"
    return f"file {c.token_file}" if c.token_file else ""


def read_token(cfg: AgentConfig, environ: Mapping[str, str] = os.environ) -> str:
    """The bearer token, from where ``token_source`` says ("" if none)."""
    c = cfg.collector
    source = token_source(cfg, environ)
    if source == "config":
        return c.token
    if source.startswith("credential"):
        try:
            return credentials.read(c.token_credential, environ, "collector.token_credential")
        except credentials.CredentialError as exc:
            raise ConfigError(str(exc)) from None
    if source.startswith("file"):
        path = Path(c.token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"collector.token_file: cannot read {path}: {exc.strerror}"
            ) from None
        if not token:
            raise ConfigError(f"collector.token_file: {path} is empty")
        return token
    return ""


def measurement_server(cfg: AgentConfig) -> str:
    """Base URL of the measurement server (the first candidate, before a session has
    chosen among them); raises ``ConfigError`` when none is configured."""
    url = (cfg.server.candidates[0] if cfg.server.candidates else "") or cfg.server.url \
        or cfg.collector.url
    if not url:
        raise ConfigError(
            "no measurement server: set server.url or collector.url (or pass --server)"
        )
    return url.rstrip("/")


def ping_target(cfg: AgentConfig) -> str:
    if cfg.server.ping_target:
        return cfg.server.ping_target
    host = urlsplit(measurement_server(cfg)).hostname
    assert host is not None  # validated in _check
    return host


def transfer_timeout_s(transfer: TransferConfig) -> float:
    if transfer.timeout_s:
        return transfer.timeout_s
    if transfer.mode == "file":
        return 300.0
    return transfer.warmup_s + transfer.window_s + spec.TRANSFER_GRACE_S


def _transfer_method(transfer: TransferConfig) -> TransferMethod:
    return TransferMethod(
        mode=transfer.mode,
        streams=transfer.streams,
        warmup_s=transfer.warmup_s if transfer.mode == "duration" else 0.0,
        window_s=transfer.window_s,
        file_size_bytes=transfer.file_size_bytes if transfer.mode == "file" else None,
        tests=transfer.tests if transfer.enabled else 0,
        attempts=transfer.attempts,
        sample_interval_s=transfer.sample_interval_s,
        timeout_s=transfer_timeout_s(transfer),
    )


def method(cfg: AgentConfig) -> Method:
    """The method block recorded with every result: every parameter that shapes a number."""
    return Method(
        profile=cfg.profile,
        ping=PingMethod(
            count=cfg.ping.count,
            interval_s=cfg.ping.interval_s,
            payload_bytes=cfg.ping.payload_bytes,
            timeout_s=cfg.ping.timeout_s,
            loaded_interval_s=cfg.ping.loaded_interval_s if cfg.ping.under_load else None,
        )
        if cfg.ping.enabled
        else None,
        download=_transfer_method(cfg.download),
        upload=_transfer_method(cfg.upload),
    )
