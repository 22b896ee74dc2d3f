"""Secrets as systemd credentials: the probe token, the collector's TLS key and
the InfluxDB token come from $CREDENTIALS_DIRECTORY/NAME when a config key names them, and
plain files still work outside systemd. The systemd side itself is proven in
tests/integration/test_deb.py; here the same lookups run against real files."""

from __future__ import annotations

import json
import ssl
from dataclasses import replace
from pathlib import Path

import pytest

from agent import config as agent_config
from agent.errors import ConfigError as AgentConfigError
from collector import config as collector_config
from collector.errors import ConfigError
from collector.server.testing import running_collector


def _creds(tmp_path: Path, **secrets: str) -> dict[str, str]:
    directory = tmp_path / "credentials"
    directory.mkdir()
    for name, value in secrets.items():
        (directory / name).write_text(value + "\n")
    return {"CREDENTIALS_DIRECTORY": str(directory), "HOME": str(tmp_path)}


def test_probe_token_from_credential_then_file(tmp_path: Path) -> None:
    """The shipped agent.toml names both: systemd's copy under the unit, root's file from
    a shell (no $CREDENTIALS_DIRECTORY)."""
    token_file = tmp_path / "token"
    token_file.write_text("bbp_from_file\n")
    cfg = agent_config.parse({"collector": {"token_credential": "token",
                                            "token_file": str(token_file)}})
    env = _creds(tmp_path, token="bbp_from_credential")
    assert agent_config.read_token(cfg, env) == "bbp_from_credential"
    assert agent_config.read_token(cfg, {"HOME": str(tmp_path)}) == "bbp_from_file"


@pytest.mark.parametrize(("secrets", "environ", "message"), [
    ({}, None, "collector.token_credential: credential 'token' asked for, but "
               "$CREDENTIALS_DIRECTORY is not set (it is set by systemd's LoadCredential=; "
               "outside systemd use a file path)"),
    ({"other": "x"}, "creds", "collector.token_credential: no credential 'token' in {dir} "
                              "(is LoadCredential=token:… in the unit?)"),
    ({"token": ""}, "creds", "collector.token_credential: credential 'token' is empty"),
])
def test_missing_token_credential_is_named(tmp_path: Path, secrets: dict[str, str],
                                           environ: str | None, message: str) -> None:
    """A token credential asked for without $CREDENTIALS_DIRECTORY, missing from it, or empty is
    refused with a message naming the key and what to check."""
    env = _creds(tmp_path, **secrets) if environ else {"HOME": str(tmp_path)}
    cfg = agent_config.parse({"collector": {"token_credential": "token"}})
    with pytest.raises(AgentConfigError) as info:
        agent_config.read_token(cfg, env)
    assert str(info.value) == message.format(dir=env.get("CREDENTIALS_DIRECTORY"))


def test_collector_tls_key_from_credential(tmp_path: Path, pki: Path) -> None:
    """The key is read from the credential; the collector serves HTTPS with it."""
    env = _creds(tmp_path, **{"tls-key": (pki / "server.key").read_text()})
    settings = {"server.tls_cert": str(pki / "server.pem"),
                "server.tls_key_credential": "tls-key", "server.query_auth": False}
    loaded = collector_config.load(None, settings, env)
    # Commands that do not serve never look for the credential (root's `probe add`).
    assert loaded.server.tls_key == ""
    cfg = collector_config.resolve_secrets(loaded, env)
    assert cfg.server.tls_key == f"{env['CREDENTIALS_DIRECTORY']}/tls-key"
    with running_collector(tmp_path / "c", cfg) as collector:
        import urllib.request

        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with urllib.request.urlopen(f"{collector.url}/healthz", context=context,
                                    timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "ok"
    with pytest.raises(ConfigError) as info:
        collector_config.resolve_secrets(loaded, {"HOME": str(tmp_path)})
    assert str(info.value).startswith("server.tls_key_credential: credential 'tls-key' asked "
                                      "for, but $CREDENTIALS_DIRECTORY")
    # A key file named too serves the shell; the credential serves the unit.
    both = collector_config.load(None, {**settings, "server.tls_key": str(pki / "server.key")},
                                 env)
    assert collector_config.resolve_secrets(both, {"HOME": "/h"}).server.tls_key == \
        str(pki / "server.key")
    assert collector_config.resolve_secrets(both, env).server.tls_key == \
        f"{env['CREDENTIALS_DIRECTORY']}/tls-key"


def test_influx_token_from_credential_or_environment(tmp_path: Path) -> None:
    """The InfluxDB token comes from the systemd credential before the environment, or from the
    environment without one; a configured credential that is missing is refused by serve and
    check-config only (resolve_secrets), not at load."""
    influx = collector_config.InfluxConfig(enabled=True, url="http://127.0.0.1:8086",
                                           token_credential="influxdb-token")
    env = _creds(tmp_path, **{"influxdb-token": "secret-from-systemd"})
    assert collector_config.influx_token(influx, env | {"BBPROBE_INFLUX_TOKEN": "x"}) == \
        "secret-from-systemd"
    assert collector_config.influx_token(influx, {"BBPROBE_INFLUX_TOKEN": "from-env"}) == \
        "from-env"
    plain = replace(influx, token_credential="")
    assert collector_config.influx_token(plain, env) == ""
    # Enabled with a credential that is not there: serve and check-config refuse, naming
    # the key; loading the config for other commands does not look.
    (tmp_path / "empty").mkdir()
    missing = _creds(tmp_path / "empty")
    loaded = collector_config.load(None, {"influxdb.enabled": True,
                                          "influxdb.url": "http://127.0.0.1:8086",
                                          "influxdb.token_credential": "influxdb-token"},
                                   missing)
    with pytest.raises(ConfigError, match=r"influxdb\.token_credential: no credential "
                                          r"'influxdb-token'"):
        collector_config.resolve_secrets(loaded, missing)


def test_default_database_places(tmp_path: Path) -> None:
    """No storage.path: StateDirectory under systemd, else XDG data, else ~/.local/share."""
    load = collector_config.load
    assert load(None, None, {"STATE_DIRECTORY": "/var/lib/bbprobe-collector"}).storage.path \
        == "/var/lib/bbprobe-collector/collector.sqlite3"
    assert load(None, None, {"XDG_DATA_HOME": "/x", "HOME": "/h"}).storage.path == \
        "/x/bbprobe-collector/collector.sqlite3"
    assert load(None, None, {"HOME": "/h"}).storage.path == \
        "/h/.local/share/bbprobe-collector/collector.sqlite3"
