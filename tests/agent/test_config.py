"""Agent config: the example loads, and each bad config is refused with its exact message."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from agent import budget, config, spec
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ENV = {"HOME": "/home/probe"}


def test_example_config_loads_with_defaults() -> None:
    """Every key in the example is commented out, so it loads to the defaults."""
    cfg = config.load(ROOT / "configs" / "agent.example.toml", ENV)
    assert cfg == config.load(None, ENV)
    assert cfg.ping.count == 10
    assert cfg.download.warmup_s == 2.0
    assert cfg.state_dir == "/home/probe/.local/state/bbprobe"


def test_example_documents_every_key() -> None:
    """Uncommenting the example's keys gives a complete, valid config (no key undocumented)."""
    data = uncommented(ROOT / "configs" / "agent.example.toml")
    del data["collector"]["token"]  # token excludes token_file and token_credential
    config.parse(data)


def test_collector_example_with_every_key_is_valid() -> None:
    """The collector's example, every key switched on (a webhook and an Apprise
    notifier included), is a valid config."""
    from collector import config as collector_config

    data = uncommented(ROOT / "configs" / "collector.example.toml")
    data["storage"].pop("url")  # examples for backend = "postgresql"
    data["storage"].pop("read_url")
    for name in ("tls_cert", "tls_key", "client_ca"):
        data["server"].pop(name, None)
    cfg = collector_config.parse(data)
    assert [w.name for w in cfg.alerts.webhooks] == ["ops"]
    assert cfg.alerts.apprise[0].triggers == ("contract_breach", "probe_silent")


@pytest.mark.parametrize("example", ["agent", "collector"])
def test_example_keys_match_the_dataclasses(example: str) -> None:
    """Every key of the config dataclasses appears in the example file, and every key in
    the example file exists (scan_lan and max_lan_hosts were once missing)."""
    from collector import config as collector_config

    root = {"agent": config.AgentConfig, "collector": collector_config.CollectorConfig}[example]
    documented = flat_keys(uncommented(ROOT / "configs" / f"{example}.example.toml"))
    assert documented == dataclass_keys(root)


def uncommented(path: Path) -> dict[str, Any]:
    """The example with its commented-out settings switched on."""
    setting = re.compile(r"^(?:# )?(\[\[?[a-z.]+\]\]?|[a-z][a-z0-9_]* = .+)$")
    lines = [m.group(1) for line in path.read_text().splitlines() if (m := setting.match(line))]
    return tomllib.loads("\n".join(lines))


def flat_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys; an array of tables ([[a.b]]) as "a.b[].key"."""
    out: set[str] = set()
    for key, value in data.items():
        if isinstance(value, dict):
            out |= flat_keys(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                out |= flat_keys(item, f"{prefix}{key}[].")
        else:
            out.add(prefix + key)
    return out


def dataclass_keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted keys; a field of a tuple of dataclasses as "field[].key"."""
    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        args = typing.get_args(hints[f.name])
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            out |= dataclass_keys(inner, f"{prefix}{f.name}.")
        elif typing.get_origin(hints[f.name]) is tuple and args and \
                dataclasses.is_dataclass(args[0]):
            out |= dataclass_keys(args[0], f"{prefix}{f.name}[].")
        else:
            out.add(prefix + f.name)
    return out


def test_state_dir_from_systemd() -> None:
    """systemd's STATE_DIRECTORY wins over XDG and HOME."""
    cfg = config.load(None, {"STATE_DIRECTORY": "/var/lib/bbprobe", "HOME": "/root"})
    assert cfg.state_dir == "/var/lib/bbprobe"


def test_overrides_are_validated_like_the_file() -> None:
    """A flag override obeys the same rules, names the key and says it came from the
    command line (not from the file, nor "<defaults>"); a mistyped key gets the nearest
    real one, as click does for a mistyped flag."""
    with pytest.raises(ConfigError) as info:
        config.load(None, ENV, {"ping.count": 0})
    assert str(info.value) == "the command line: ping.count: must be >= 1, got 0"
    with pytest.raises(ConfigError) as info:
        config.load(None, ENV, {"downlod.streams": 2})
    assert str(info.value) == "the command line: downlod: unknown key (did you mean download?)"
    with pytest.raises(ConfigError) as info:
        config.parse({"ping": {"cont": 3}}, "agent.toml")
    assert str(info.value) == "agent.toml: ping.cont: unknown key (did you mean ping.count?)"
    with pytest.raises(ConfigError) as info:
        config.parse({"ping": {"zzz": 3}}, "agent.toml")
    assert str(info.value) == "agent.toml: ping.zzz: unknown key"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pingg": {}}, "t.toml: pingg: unknown key (did you mean ping?)"),
        ({"ping": {"cuont": 3}}, "t.toml: ping.cuont: unknown key (did you mean ping.count?)"),
        ({"ping": {"count": "ten"}}, "t.toml: ping.count: expected an integer, got a string"),
        ({"ping": {"interval_s": 0}}, "t.toml: ping.interval_s: must be >= 0.001, got 0"),
        ({"download": {"mode": "forever"}},
         "t.toml: download.mode: must be one of 'duration', 'file', got 'forever'"),
        ({"download": {"streams": 65}}, "t.toml: download.streams: must be <= 64, got 65"),
        ({"upload": {"timeout_s": 3}}, "t.toml: upload.timeout_s: is shorter than warmup_s + "
         "window_s"),
        ({"upload": {"sample_interval_s": 5, "window_s": 2}},
         "t.toml: upload.sample_interval_s: is longer than window_s"),
        ({"collector": {"url": "ftp://x"}},
         "t.toml: collector.url: must be an http:// or https:// URL with a host, got 'ftp://x'"),
        ({"collector": {"token": "a", "token_file": "b"}},
         "t.toml: collector.token: set token, or token_file and/or token_credential, not "
         "both"),
        ({"collector": {"token_credential": "../etc/shadow"}},
         "t.toml: collector.token_credential: must be a credential name (letters, digits, "
         "'.', '_', '-')"),
        ({"probe_id": "has space"},
         "t.toml: probe_id: must be 1-64 characters of letters, digits, '.', '_', '-'"),
        ({"ping": []}, "t.toml: ping: expected an object, got an array"),
    ],
)
def test_bad_configs(data: dict[str, Any], message: str) -> None:
    """One bad config per rule, each with its exact message."""
    with pytest.raises(ConfigError) as info:
        config.parse(data, "t.toml")
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("ping = [", "invalid TOML"),
        (b"\xff\xfe", "not UTF-8 text"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: str | bytes, message: str) -> None:
    """Broken files are refused naming the file and the problem."""
    path = tmp_path / "agent.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        config.load(path, ENV)
    assert str(info.value).startswith(str(path))


def test_missing_file(tmp_path: Path) -> None:
    """A missing config file is named."""
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.toml", ENV)
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: no such file"


def test_token_file(tmp_path: Path) -> None:
    """The token is read from token_file, stripped; an empty file is an error."""
    token_file = tmp_path / "token"
    token_file.write_text("bbp_secret\n")
    cfg = config.parse({"collector": {"token_file": str(token_file)}})
    assert config.read_token(cfg) == "bbp_secret"
    token_file.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        config.read_token(cfg)


def test_server_defaults_to_collector() -> None:
    """With no server.url, transfers and pings go to the collector's host."""
    cfg = config.parse({"collector": {"url": "http://198.18.0.1:8080/"}})
    assert config.measurement_server(cfg) == "http://198.18.0.1:8080"
    assert config.ping_target(cfg) == "198.18.0.1"
    with pytest.raises(ConfigError, match="no measurement server"):
        config.measurement_server(config.parse({}))


class TestProfiles:
    def test_quick_profile_presets(self) -> None:
        """quick: 5 pings 0.2 s apart, 1 s + 4 s each way, one attempt (under 30 s)."""
        cfg = config.parse({"profile": "quick"})
        assert (cfg.ping.count, cfg.ping.interval_s) == (5, 0.2)
        assert (cfg.download.warmup_s, cfg.download.window_s, cfg.download.attempts) == (
            1.0, 4.0, 1)
        m = config.method(cfg)
        worst = (m.ping.count - 1) * m.ping.interval_s + 2 * (m.download.timeout_s)  # type: ignore[union-attr]
        assert worst < 30

    def test_file_profile_is_131_06_file_mode(self) -> None:
        """file-131-06: whole files over one stream, three transfers each way, one
        attempt of at most 120 s each (so the session fits a 15-minute slot)."""
        m = config.method(config.parse({"profile": "file-131-06"}))
        assert (m.download.mode, m.download.streams, m.download.tests) == ("file", 1, 3)
        assert (m.upload.attempts, m.upload.timeout_s) == (1, 120.0)
        assert (m.download.file_size_bytes, m.upload.file_size_bytes) == (
            25_000_000, 1_700_000)
        assert m.download.warmup_s == 0.0

    def test_file_profile_measures_a_line_below_the_shipped_targets_minimum(self) -> None:
        """Each whole file arrives within its deadline on a line at three quarters of
        the banda minima (5th percentile) of configs/targets/bt-italia-2013.toml, and
        far sooner at its banda massima: the slowest line measured, size x 8 / deadline,
        is 1.67 Mbit/s down and 113 kbit/s up (a 5 MB upload needed 333 kbit/s)."""
        targets = tomllib.loads((ROOT / "configs" / "targets" / "bt-italia-2013.toml")
                                .read_text())
        kbps = {i["id"]: i["target"] for i in targets["indicator"]}
        m = config.method(config.parse({"profile": "file-131-06"}))
        for t, name in ((m.download, "download"), (m.upload, "upload")):
            assert t.file_size_bytes is not None
            slowest_bps = t.file_size_bytes * 8 / t.timeout_s
            assert slowest_bps <= 0.76 * kbps[f"{name}_p5_kbps"] * 1000, name
            assert t.file_size_bytes * 8 / (kbps[f"{name}_p95_kbps"] * 1000) < 60, name
        down, up = m.download.file_size_bytes or 0, m.upload.file_size_bytes or 0
        assert (round(down * 8 / 120), round(up * 8 / 120)) == (1_666_667, 113_333)

    def test_rmbt_profile(self) -> None:
        """rmbt: 3 streams, 2 s pre-test, 7 s test."""
        m = config.method(config.parse({"profile": "rmbt"}))
        assert (m.download.streams, m.download.warmup_s, m.download.window_s) == (3, 2.0, 7.0)

    def test_explicit_keys_win_over_the_profile(self) -> None:
        """A key the user sets is never overwritten by the profile's preset."""
        cfg = config.parse({"profile": "rmbt", "download": {"streams": 8}})
        assert (cfg.download.streams, cfg.upload.streams) == (8, 3)

    def test_default_is_agcom_with_adaptive_streams(self) -> None:
        """The default method is the agcom profile: adaptive streams, loaded pings."""
        m = config.method(config.parse({}))
        assert (m.profile, m.download.streams) == ("agcom", 0)
        assert m.ping is not None and m.ping.loaded_interval_s == 0.2

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            ({"profile": "fast"}, "t.toml: profile: must be one of agcom, file-131-06, rmbt, "
             "quick, custom, got 'fast'"),
            ({"download": {"mode": "file", "streams": 0}},
             "t.toml: download.streams: must be >= 1 in file mode (adaptive streams need a "
             "warm-up)"),
        ],
    )
    def test_bad_profile_settings(self, data: dict[str, Any], message: str) -> None:
        """Unknown profiles and adaptive file mode are refused by name."""
        with pytest.raises(ConfigError) as info:
            config.parse(data, "t.toml")
        assert str(info.value) == message


LIMIT = ("over the 900 s limit (one 15-minute slot of a 96-a-day campaign); lower tests, "
         "attempts, window_s, timeout_s or ping.count")
# config.MAX_CANDIDATES servers, each on a host of its own.
SIXTEEN = tuple(f"http://s{i}.example.net" for i in range(16))
BYTES_LIMIT = ("over the 300 GB limit of a session; lower tests, attempts, file_size_bytes "
               "or window_s")


class TestSessionBudget:
    """A session's worst case is bounded in time and bytes (agent/budget.py)."""

    def test_the_default_plan_in_figures(self) -> None:
        """Defaults: ping 9 x 1 s + 2 s; each way 3 attempts x (2 + 10 + 5) s with 1 s
        between them, and 3 x 12 s at 10 Gbit/s; the pings' payload, under load too."""
        plan = budget.plan(config.method(config.parse({})))
        assert [(p.name, p.duration_s) for p in plan.parts] == [
            ("ping", 11.0), ("download", 53.0), ("upload", 53.0)]
        assert plan.duration_s == 117.0
        assert plan.bytes == 2 * 3 * 12 * 1_250_000_000 + 10 * 2 * 56 + 2 * 50 * 2 * 56
        assert budget.plan(config.method(config.parse({})), sessions=2).duration_s == 234.0

    def test_a_train_under_load_can_lengthen_the_first_test(self) -> None:
        """A first test that could end before its train under load ends waits for it:
        warm-up 2 s + 49 x 0.2 s + the 60 s reply timeout."""
        cfg = config.parse({"ping": {"timeout_s": 60.0},
                            "download": {"attempts": 1, "timeout_s": 12.0}})
        download = budget.plan(config.method(cfg)).parts[1]
        assert download.duration_s == pytest.approx(2 + 49 * 0.2 + 60)

    @pytest.mark.parametrize("profile", list(config.PROFILES))
    def test_every_profile_plans_within_the_limits_with_headroom(self, profile: str) -> None:
        """Each shipped profile plans at most 85 % of either limit."""
        plan = budget.plan(config.method(config.parse({"profile": profile})))
        assert plan.duration_s <= 0.85 * spec.MAX_SESSION_S, plan
        assert plan.bytes <= 0.85 * spec.MAX_SESSION_BYTES, plan

    @pytest.mark.parametrize("name", ["example", "system", "demo"])
    def test_shipped_configs_plan_within_the_limits_also_dual_stack(self, name: str) -> None:
        """configs/agent.*.toml, run single or dual stack, plan at most 85 % of either
        limit."""
        cfg = config.load(ROOT / "configs" / f"agent.{name}.toml", ENV)
        plan = budget.plan(config.method(cfg), sessions=2,
                           candidates=cfg.server.candidates,
                           select_pings=cfg.server.select_pings)
        assert plan.duration_s <= 0.85 * spec.MAX_SESSION_S, plan
        assert plan.bytes <= 0.85 * spec.MAX_SESSION_BYTES, plan

    def test_choosing_the_server_is_planned_first(self) -> None:
        """16 candidates x 20 pings, the most both keys allow: 16 hosts x (19 x 0.2 s +
        1 s + 5 s to resolve + 2 s) one after the other, then 16 connects x 3 s: 236.8 s,
        473.6 s dual stack. A host is pinged once however many of its URLs are listed,
        but each URL gets its connect."""
        m = config.method(config.parse({}))
        plan = budget.plan(m, candidates=SIXTEEN, select_pings=20)
        assert [(p.name, round(p.duration_s, 6)) for p in plan.parts] == [
            ("server selection", 236.8), ("ping", 11.0), ("download", 53.0),
            ("upload", 53.0)]
        assert plan.parts[0].bytes == 16 * 20 * 2 * 56
        assert budget.plan(m, 2, candidates=SIXTEEN, select_pings=20).duration_s == \
            pytest.approx(2 * (236.8 + 117))
        same_host = ("http://a.example:8080", "http://A.example:9090", "http://b.example")
        part = budget.plan(m, candidates=same_host, select_pings=3).parts[0]
        assert part.duration_s == pytest.approx(2 * (2 * 0.2 + 8) + 3 * 3)
        assert part.how_long == ("2 hosts x 8.4 s (3 echo requests 0.2 s apart + 1 s + "
                                 "7 s to resolve and start) + 3 TCP connects x 3 s")
        # A session that measures nothing chooses nothing.
        idle = config.method(config.parse({"ping": {"enabled": False},
                                           "download": {"enabled": False},
                                           "upload": {"enabled": False}}))
        assert budget.plan(idle, candidates=SIXTEEN, select_pings=20).parts == ()

    def test_the_selection_figures_are_the_deadlines_select_py_sets(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A host's train and a connect, each run against a peer that never answers, stop
        at the very deadlines the plan counts (so the plan follows select.py)."""
        from agent.probes import icmp, select

        deadlines: list[float] = []
        real_timeout = asyncio.timeout

        def timeout(delay: float | None) -> asyncio.Timeout:
            assert delay is not None
            deadlines.append(delay)
            return real_timeout(0)  # expire at once: no test waits 12 s

        async def never(*_: Any, **__: Any) -> Any:
            await asyncio.sleep(3600)

        monkeypatch.setattr(asyncio, "timeout", timeout)
        monkeypatch.setattr(icmp, "run", never)
        monkeypatch.setattr(asyncio, "open_connection", never)
        assert asyncio.run(select._rtts("a.example", 20)) == (
            (), "ping train exceeded its deadline")
        assert asyncio.run(select._connect("http://a.example:8080")) == (
            "TCP connect to a.example:8080 timed out after 3 s")
        assert deadlines == [budget.select_host_s(20), spec.SELECT_CONNECT_TIMEOUT_S]
        assert budget.select_host_s(20) == pytest.approx(11.8)

    @pytest.mark.parametrize("profile", [p for p in config.PROFILES if p != "file-131-06"])
    def test_every_other_profile_fits_dual_stack_with_the_most_selection(
            self, profile: str) -> None:
        """Dual stack and 16 candidates x 20 pings, both set centrally, on every profile
        but file-131-06: at most 85 % of either limit (the defaults: 707.6 s)."""
        cfg = config.parse({"profile": profile, "server": {
            "candidates": list(SIXTEEN), "select_pings": 20, "address_family": "both"}})
        plan = budget.plan(config.method(cfg), 2, candidates=SIXTEEN, select_pings=20)
        assert plan.duration_s <= 0.85 * spec.MAX_SESSION_S, plan
        assert plan.bytes <= 0.85 * spec.MAX_SESSION_BYTES, plan

    def test_the_file_profile_leaves_room_for_14_candidates(self) -> None:
        """file-131-06 plans 731 s: 14 candidates at the default 3 pings fit (890.6 s),
        a 15th is refused, naming the selection's part and its keys."""
        def server(n: int) -> dict[str, Any]:
            return {"profile": "file-131-06", "server": {"candidates": list(SIXTEEN[:n])}}

        cfg = config.parse(server(14))
        plan = budget.plan(config.method(cfg), candidates=cfg.server.candidates,
                           select_pings=cfg.server.select_pings)
        assert plan.duration_s == pytest.approx(731 + 14 * 11.4)
        with pytest.raises(ConfigError, match=r"would last up to 15\.0 min = 902 s "
                                              r"\(server selection 2\.9 min: 15 hosts x "):
            config.parse(server(15))

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            # The instruction: three weeks a session.
            ({"download": {"tests": 1000, "window_s": 600}, "ping": {"count": 10000}},
             "t.toml: session: would last up to 21.2 days = 1833054 s (ping 2.8 h: 10000 "
             "echo requests 1 s apart + 2 s; download 21.1 days: 1000 tests x 3 attempts x "
             "607 s + 1 s between attempts; upload 53 s: 1 test x 3 attempts x 17 s + 1 s "
             f"between attempts), {LIMIT}"),
            # File mode both ways, 3 attempts of the automatic 300 s.
            ({"download": {"mode": "file", "streams": 1},
              "upload": {"mode": "file", "streams": 1}},
             "t.toml: session: would last up to 30.2 min = 1815 s (ping 11 s: 10 echo "
             "requests 1 s apart + 2 s; download 15.0 min: 1 test x 3 attempts x 300 s + "
             "1 s between attempts; upload 15.0 min: 1 test x 3 attempts x 300 s + 1 s "
             f"between attempts), {LIMIT}"),
            # Choosing among 16 servers with 20 pings each (both keys settable centrally)
            # leaves no room for the file profile's 12 minutes.
            ({"profile": "file-131-06",
              "server": {"candidates": list(SIXTEEN), "select_pings": 20}},
             "t.toml: session: would last up to 16.1 min = 968 s (server selection 3.9 "
             "min: 16 hosts x 11.8 s (20 echo requests 0.2 s apart + 1 s + 7 s to resolve "
             "and start) + 16 TCP connects x 3 s; ping 11 s: 10 echo requests 1 s apart + "
             "2 s; download 6.0 min: 3 tests x 1 attempt x 120 s; upload 6.0 min: 3 tests "
             "x 1 attempt x 120 s), over the 900 s limit (one 15-minute slot of a 96-a-day "
             "campaign); lower tests, attempts, window_s, timeout_s, ping.count, "
             "server.select_pings or the number of server.candidates"),
            # Dual stack runs the session twice in one slot.
            ({"profile": "file-131-06", "server": {"address_family": "both"}},
             "t.toml: session: would last up to 24.4 min = 1462 s (2 sessions, IPv4 then "
             "IPv6, of ping 11 s: 10 echo requests 1 s apart + 2 s; download 6.0 min: 3 "
             "tests x 1 attempt x 120 s; upload 6.0 min: 3 tests x 1 attempt x 120 s), "
             f"{LIMIT}"),
            # Quick enough, but a 100 GB test file three times.
            ({"download": {"mode": "file", "streams": 1, "timeout_s": 60.0,
                           "file_size_bytes": 100_000_000_000}},
             "t.toml: session: would move up to 345 GB (download 300 GB: 1 test x 3 "
             "attempts x a 100 GB file; upload 45 GB: 1 test x 3 attempts x 12 s at 10 "
             f"Gbit/s), {BYTES_LIMIT}"),
            ({"download": {"tests": 3}, "server": {"address_family": "both"}},
             "t.toml: session: would move up to 360 GB (2 sessions, IPv4 then IPv6, of "
             "download 135 GB: 3 tests x 3 attempts x 12 s at 10 Gbit/s; upload 45 GB: 1 "
             f"test x 3 attempts x 12 s at 10 Gbit/s), {BYTES_LIMIT}"),
        ],
    )
    def test_a_session_over_a_limit_is_refused_naming_its_figure(
            self, data: dict[str, Any], message: str) -> None:
        """A plan over either limit is refused at load with the computed figure, each
        part's and the limit."""
        with pytest.raises(ConfigError) as info:
            config.parse(data, "t.toml")
        assert str(info.value) == message

    def test_the_command_line_is_bounded_too(self) -> None:
        """A --set override goes through the same check (a disabled direction plans
        nothing, so turning one off makes room)."""
        with pytest.raises(ConfigError, match=r"would last up to 46\.0 min = 2757 s"):
            config.load(None, ENV, {"download.window_s": 600.0, "upload.window_s": 300.0})
        cfg = config.load(None, ENV, {"download.window_s": 100.0, "download.attempts": 1,
                                      "upload.enabled": False})
        plan = budget.plan(config.method(cfg))
        assert (plan.duration_s, plan.bytes // 10**9) == (11 + 107, 127)


def test_packaged_system_configs_are_valid() -> None:
    """What the .deb installs in /etc/bbprobe loads as it is, and says where state lives."""
    from collector import config as collector_config

    agent_cfg = config.load(ROOT / "configs" / "agent.system.toml", ENV)
    assert agent_cfg.state_dir == "/var/lib/bbprobe"
    assert (agent_cfg.collector.token_credential, agent_cfg.collector.token_file) == \
        ("token", "/etc/bbprobe/token")
    collector_cfg = collector_config.load(ROOT / "configs" / "collector.system.toml",
                                          environ=ENV)
    assert collector_cfg.storage.path == "/var/lib/bbprobe-collector/collector.sqlite3"
    assert collector_cfg.server.host == "127.0.0.1"


def test_check_config_names_the_token_source(tmp_path: Path) -> None:
    """check-config says where the token comes from: the file from a shell, the
    credential under systemd."""
    from click.testing import CliRunner

    from agent.app.cli import main

    (tmp_path / "token").write_text("bbp_x\n")
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "token").write_text("bbp_y\n")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[collector]\nurl = "http://127.0.0.1:9"\ntoken_credential = "token"\n'
                   f'token_file = "{tmp_path / "token"}"\n')
    env = {"HOME": str(tmp_path), "CREDENTIALS_DIRECTORY": ""}
    shell = CliRunner().invoke(main, ["--config", str(cfg), "check-config"], env=env)
    assert f"token: set, from file {tmp_path / 'token'}" in shell.output, shell.output
    env["CREDENTIALS_DIRECTORY"] = str(tmp_path / "creds")
    unit = CliRunner().invoke(main, ["--config", str(cfg), "check-config"], env=env)
    assert "token: set, from credential 'token'" in unit.output, unit.output


def test_far_ends_resolve_to_addresses() -> None:
    """The LAN check leaves out the server and ping target by address, names resolved."""
    from agent.checks import addresses_of

    assert addresses_of(["127.0.0.1", "::1"]) == {"127.0.0.1", "::1"}
    assert "127.0.0.1" in addresses_of(["localhost"])
    assert addresses_of(["no-such-host.invalid"]) == set()
