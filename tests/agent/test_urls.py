"""URLs are checked when a config is read: a malformed IPv6
literal or a port out of range is one line naming the key, at load, for the agent's
collector.url and server.url and for the collector's influxdb.url, never a traceback
from deep inside a probe or the HTTP client."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from agent import config
from agent.errors import ConfigError
from collector import config as collector_config
from collector.cli.main import main as collector_main
from collector.errors import ConfigError as CollectorConfigError

BAD = [
    ("http://[::1", "is not a valid URL (Invalid IPv6 URL), got 'http://[::1'"),
    ("http://127.0.0.1:99999",
     "port must be a number from 1 to 65535, got 'http://127.0.0.1:99999'"),
    ("http://127.0.0.1:0", "port must be a number from 1 to 65535, got 'http://127.0.0.1:0'"),
    ("http://host:eighty", "port must be a number from 1 to 65535, got 'http://host:eighty'"),
    ("http://exa mple.net", "must not contain white space, got 'http://exa mple.net'"),
    ("ftp://x", "must be an http:// or https:// URL with a host, got 'ftp://x'"),
    ("http://::1:8080",
     "an IPv6 address goes in brackets (http://[::1]:8080), got 'http://::1:8080'"),
]


@pytest.mark.parametrize(("url", "problem"), BAD)
@pytest.mark.parametrize("key", ["collector.url", "server.url"])
def test_agent_urls_are_checked_at_load(key: str, url: str, problem: str) -> None:
    """Each malformed collector or server URL is refused at config load with the file, the key
    and the exact problem."""
    section, name = key.split(".")
    with pytest.raises(ConfigError) as info:
        config.parse({section: {name: url}}, "t.toml")
    assert str(info.value) == f"t.toml: {key}: {problem}"


@pytest.mark.parametrize("url", ["http://[::1]:8080", "https://collector.example.net",
                                 "http://127.0.0.1:65535/base",
                                 "https://user:secret@hooks.example.net:8443/x",
                                 "http://user:pw@[::1]:8080"])
def test_good_urls_pass(url: str) -> None:
    """IPv6 literals, HTTPS, a path, a full port range and user info in a URL are accepted and
    kept as written."""
    assert config.url_problem(url) is None
    assert config.parse({"server": {"url": url}}).server.url == url


@pytest.mark.parametrize(("url", "problem"), BAD[:3])
def test_collector_influx_url_is_checked_at_load(url: str, problem: str) -> None:
    """The collector's influxdb.url is checked at load with the same rules as the agent's URLs,
    naming the key."""
    with pytest.raises(CollectorConfigError) as info:
        collector_config.parse({"influxdb": {"enabled": True, "url": url}}, "c.toml")
    assert str(info.value) == f"c.toml: influxdb.url: expected http(s)://host[:port]: {problem}"


def test_collector_check_config_names_a_bad_influx_url(tmp_path: Path) -> None:
    """`bbprobe-collector check-config` with the bad URL: exit 2, one line."""
    path = tmp_path / "collector.toml"
    path.write_text('[influxdb]\nenabled = true\nurl = "http://[::1"\n')
    result = CliRunner().invoke(collector_main, ["--config", str(path), "check-config"],
                                catch_exceptions=False)
    assert (result.exit_code, result.stderr) == (
        2, f"bbprobe-collector: {path}: influxdb.url: expected http(s)://host[:port]: is not "
           "a valid URL (Invalid IPv6 URL), got 'http://[::1'\n")
