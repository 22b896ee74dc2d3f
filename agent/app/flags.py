"""The options every bbprobe command takes, before or after its name, and the layer of
the config they make: the command line's, applied over the local file and the
collector's instruction (a technician on site decides).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from typing import Any, TypeVar

import click

from agent import config
from agent.app.runner import ConfigSource
from agent.config import AgentConfig
from agent.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


def parse_set(items: tuple[str, ...]) -> dict[str, Any]:
    """``--set section.key=value``; the value is read as TOML, else taken as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def as_url(value: str | None) -> str | None:
    """A --server or --collector value: a URL as given, or ``host:port`` (what iperf3,
    ping and curl users type) read as plain HTTP to it."""
    if value is None or "://" in value:
        return value
    return f"http://{value}"


def source(ctx: click.Context, **overrides: Any) -> ConfigSource:
    """Where the config comes from: defaults < profile < local file < the collector's
    instruction (applied per session) < the command line, ``overrides`` last."""
    given = ctx.ensure_object(dict)
    merged = parse_set(tuple(given.get("set", ())))
    flags = {"collector.url": as_url(given.get("collector")),
             "probe_id": given.get("probe_id"), "server.url": as_url(given.get("server")),
             "server.address_family": family_flag(given.get("ipv4"), given.get("ipv6"))}
    if given.get("server") is not None:
        # --server names the one server: candidates, local or central, give way to it.
        flags["server.candidates"] = []
    if given.get("token") is not None:
        flags.update({"collector.token": given["token"], "collector.token_file": "",
                      "collector.token_credential": ""})
    merged.update({k: v for k, v in {**flags, **overrides}.items() if v is not None})
    return ConfigSource(given.get("config_path"), os.environ, merged)


def load(ctx: click.Context, **overrides: Any) -> AgentConfig:
    """The config without the collector's instruction (commands that measure nothing
    for the collector, and the base a session's config is built from)."""
    return source(ctx, **overrides).load()


def family_flag(ipv4: bool | None, ipv6: bool | None) -> str | None:
    """server.address_family from -4/-6: one of them pins the family; both together
    ask for a dual-stack session (one result per family); neither leaves the config's."""
    if ipv4 and ipv6:
        return "both"
    return "ipv4" if ipv4 else "ipv6" if ipv6 else None


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Collect a shared option into ctx.obj, whether given before or after the command."""
    if value is None or value == ():
        return value
    obj = ctx.ensure_object(dict)
    from_env = ctx.get_parameter_source(str(param.name)) is click.core.ParameterSource.ENVIRONMENT
    if from_env and str(param.name) in obj:
        return value  # an explicit flag before the command wins over the environment
    if param.name == "set_":
        obj.setdefault("set", []).extend(value)
    else:
        obj[str(param.name)] = value
    if param.name == "token":
        obj["token_from"] = "environment" if from_env else "command line"
    return value


# A token on the command line is readable by every local user (ps, /proc/PID/cmdline).
_ON_ARGV = "the command line, which ps shows to every local user"


def token_source(ctx: click.Context, cfg: AgentConfig) -> str:
    """Where the token ``cfg`` holds came from, for check-config and status: --token, the
    BBPROBE_TOKEN variable, --set, the config file's collector.token, token_file or the
    systemd credential; "" when there is none. The config alone cannot tell: --token
    and the variable arrive as collector.token, as the file's own would."""
    given = ctx.ensure_object(dict)
    if given.get("token") is not None:
        return "BBPROBE_TOKEN (the environment)" if given.get("token_from") == "environment" \
            else f"--token ({_ON_ARGV})"
    where = config.token_source(cfg)
    if where != "config":
        return where
    if "collector.token" in parse_set(tuple(given.get("set", ()))):
        return f"--set collector.token ({_ON_ARGV})"
    path = given.get("config_path")
    return f"collector.token in {path}" if path else "collector.token"


_SHARED = (
    click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                 envvar="BBPROBE_CONFIG", expose_value=False, callback=_remember,
                 help="Agent TOML config (default: built-in defaults)."),
    click.option("--collector", expose_value=False, callback=_remember,
                 help="Collector base URL (overrides collector.url)."),
    # The environment, not the command line: argv is readable by every local user (ps).
    click.option("--token", envvar="BBPROBE_TOKEN", show_envvar=True, expose_value=False,
                 callback=_remember,
                 help="Probe bearer token (overrides collector.token); prefer the "
                      "variable or collector.token_file: ps shows a command line."),
    click.option("--probe-id", expose_value=False, callback=_remember,
                 help="Probe identity (default: asked from the collector)."),
    click.option("--server", expose_value=False, callback=_remember,
                 help="Measurement server URL (default: the collector)."),
    click.option("-4", "--ipv4", "ipv4", is_flag=True, default=None, expose_value=False,
                 callback=_remember,
                 help="IPv4 only: resolve and connect over IPv4 (server.address_family)."),
    click.option("-6", "--ipv6", "ipv6", is_flag=True, default=None, expose_value=False,
                 callback=_remember,
                 help="IPv6 only; with -4 too: dual stack, one session over each, each "
                      "its own result."),
    click.option("--set", "set_", multiple=True, metavar="KEY=VALUE", expose_value=False,
                 callback=_remember,
                 help="Override any config key, e.g. --set ping.count=20 (repeatable)."),
)


def shared_options(fn: F) -> F:
    """The connection/config options, accepted before or after the command name."""
    for option in reversed(_SHARED):
        fn = option(fn)
    return fn
