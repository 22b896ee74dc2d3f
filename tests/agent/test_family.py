"""IPv6, properly: the address family asked for (-4/-6, server.address_family),
how a session keeps to it, what it records, and the failures it records instead of
raising."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
from pathlib import Path

import pytest

from agent import config, family, instruction
from agent.app import daemon
from agent.app.flags import family_flag
from agent.decoding import SchemaError, parse_result
from agent.errors import ConfigError, ProbeSetupError
from agent.probes import icmp, session
from agent.schema import SCHEMA_VERSION, to_dict
from tests.factories import session as make_result


@pytest.mark.parametrize(("requested", "sessions", "af"), [
    ("any", ("any",), socket.AF_UNSPEC),
    ("ipv4", ("ipv4",), socket.AF_INET),
    ("ipv6", ("ipv6",), socket.AF_INET6),
    ("both", ("ipv4", "ipv6"), None),
])
def test_requested_families(requested: str, sessions: tuple[str, ...], af: int | None) -> None:
    """"both" is two sessions, IPv4 first; every other request is one, in its family."""
    assert family.session_families(requested) == sessions  # type: ignore[arg-type]
    if af is None:
        with pytest.raises(ValueError, match="no single socket family for 'both'"):
            family.socket_family(requested)
    else:
        assert family.socket_family(requested) == af


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1", "ipv4"), ("::1", "ipv6"), ("2001:2:0:1::1", "ipv6"),
    ("fe80::1%eth0", "ipv6"), ("::ffff:198.18.0.1", "ipv6"), ("example.net", None),
    ("", None), (None, None),
])
def test_family_of(address: str | None, expected: str | None) -> None:
    """family_of: an IPv4 literal is ipv4; IPv6 literals, with a zone or IPv4-mapped, are ipv6;
    a name, empty or missing address is unknown (None)."""
    assert family.family_of(address) == expected


@pytest.mark.parametrize(("host", "af", "problem"), [
    ("127.0.0.1", socket.AF_INET6, "127.0.0.1 is an IPv4 address, and IPv6 was asked for"),
    ("::1", socket.AF_INET, "::1 is an IPv6 address, and IPv4 was asked for"),
    ("::1", socket.AF_INET6, None),
    ("127.0.0.1", socket.AF_UNSPEC, None),
    ("collector.example.net", socket.AF_INET6, None),
])
def test_literal_of_the_other_family(host: str, af: int, problem: str | None) -> None:
    """An address literal of the other family than the one asked for (-4 or -6) is named as the
    problem; a matching literal, no family asked, or a host name passes."""
    assert family.literal_problem(host, af) == problem


@pytest.mark.parametrize(("af", "exc", "message"), [
    (socket.AF_INET6, socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
     "no IPv6 address for 'probe.example' (Name or service not known)"),
    (socket.AF_INET, socket.gaierror(socket.EAI_NODATA, "No address associated"),
     "no IPv4 address for 'probe.example' (No address associated)"),
    (socket.AF_UNSPEC, socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
     "cannot resolve 'probe.example': Name or service not known"),
    (socket.AF_INET6, socket.gaierror(socket.EAI_AGAIN, "Temporary failure"),
     "cannot resolve 'probe.example': Temporary failure"),
])
def test_unresolved_names_the_family(af: int, exc: OSError, message: str) -> None:
    """A name with no address of the family asked says so; other resolver failures keep
    the resolver's words."""
    assert family.unresolved("probe.example", af, exc) == message


def test_endpoints_keep_distinct_addresses_in_order() -> None:
    """Endpoints records each distinct local and remote address once, in first-seen order,
    ignores a missing pair, and gives the family used (None before any connection)."""
    seen = family.Endpoints()
    seen.add(("::1", 40000, 0, 0), ("::1", 8080, 0, 0))
    seen.add(("::1", 40001, 0, 0), ("2001:2:0:1::1", 8080, 0, 0))
    seen.add(("::1", 40002, 0, 0), ("::1", 8080, 0, 0))
    seen.add(None, None)
    assert (list(seen.local), list(seen.remote), seen.family) == (
        ["::1"], ["::1", "2001:2:0:1::1"], "ipv6")
    assert family.Endpoints().family is None


@pytest.mark.parametrize(("ipv4", "ipv6", "expected"), [
    (None, None, None), (True, None, "ipv4"), (None, True, "ipv6"), (True, True, "both"),
])
def test_command_line_flags(ipv4: bool | None, ipv6: bool | None,
                            expected: str | None) -> None:
    """-4 or -6 pins the family; both together ask for dual stack; neither keeps the
    config's."""
    assert family_flag(ipv4, ipv6) == expected


def test_config_key_is_checked_and_instructable() -> None:
    """server.address_family takes the four values, refuses others naming the key, and
    a central instruction may set it (the [server] table is central)."""
    assert config.parse({}).server.address_family == "any"
    for value in ("any", "ipv4", "ipv6", "both"):
        assert config.parse({"server": {"address_family": value}}).server.address_family \
            == value
    with pytest.raises(ConfigError) as info:
        config.parse({"server": {"address_family": "v6"}}, "t.toml")
    assert str(info.value) == ("t.toml: server.address_family: must be one of 'any', "
                               "'ipv4', 'ipv6', 'both', got 'v6'")
    assert instruction.key_problem("server.address_family") is None


def test_schema_v6_round_trip_and_v5_still_accepted() -> None:
    """A v6 result keeps its family and addresses through JSON; a v5 document without
    them still parses, and keeps its canonical form (no new keys appear)."""
    from dataclasses import replace

    result = replace(make_result(), address_family="ipv6", address_family_requested="both",
                     local_addresses=("2001:2::1",), remote_addresses=("2001:2:0:1::1",))
    doc = json.loads(json.dumps(to_dict(result)))
    assert doc["schema_version"] == SCHEMA_VERSION >= 6
    assert parse_result(doc) == result
    old = copy.deepcopy(doc)
    old["schema_version"] = 5
    for key in ("address_family", "address_family_requested", "local_addresses",
                "remote_addresses"):
        del old[key]
    parsed = parse_result(old)
    assert (parsed.address_family, parsed.local_addresses) == (None, ())
    assert json.loads(json.dumps(to_dict(parsed))) == old
    with pytest.raises(SchemaError) as info:
        parse_result({**doc, "address_family": "ipx"})
    assert str(info.value) == "address_family: must be one of 'ipv4', 'ipv6', got 'ipx'"


def test_ping_target_of_the_other_family_is_a_setup_error() -> None:
    """icmp.resolve refuses an address of the other family before opening a socket."""
    with pytest.raises(ProbeSetupError) as info:
        asyncio.run(icmp.resolve("127.0.0.1", socket.AF_INET6))
    assert str(info.value) == ("ping target: 127.0.0.1 is an IPv4 address, and IPv6 was "
                               "asked for")
    assert asyncio.run(icmp.resolve("::1", socket.AF_INET6)) == ("::1", 6)
    assert asyncio.run(icmp.resolve("127.0.0.1", socket.AF_UNSPEC)) == ("127.0.0.1", 4)


def test_no_address_of_the_family_is_a_recorded_failure(tmp_path: Path) -> None:
    """A session asked for IPv6 against an IPv4-only server: a result, not a traceback;
    the ping and every transfer attempt failed, each naming the family."""
    cfg = config.parse({
        "state_dir": str(tmp_path), "profile": "custom",
        "server": {"url": "http://127.0.0.1:9", "address_family": "ipv6"},
        "checks": {"enabled": False},
        "ping": {"count": 2, "interval_s": 0.01, "timeout_s": 0.2},
        "download": {"attempts": 1, "warmup_s": 0.1, "window_s": 0.2, "streams": 1},
        "upload": {"attempts": 1, "warmup_s": 0.1, "window_s": 0.2, "streams": 1},
    })
    (result,) = asyncio.run(session.run_all(cfg, "p1"))
    problem = "127.0.0.1 is an IPv4 address, and IPv6 was asked for"
    assert result.ping is not None
    assert (result.ping.status, result.ping.error) == ("failed", f"ping target: {problem}")
    assert [(a.status, a.failure_reason, a.error) for a in result.transfers] == [
        ("failed", "connect_error", f"cannot connect to 127.0.0.1:9: {problem}")] * 2
    assert (result.address_family, result.address_family_requested,
            result.local_addresses, result.remote_addresses) == ("ipv6", "ipv6", (), ())
    parse_result(json.loads(json.dumps(to_dict(result))))


def test_dual_stack_is_two_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under "both", run_all runs one whole session per family, IPv4 first, each its own
    result marked as asked for "both"."""
    from dataclasses import replace

    cfg = config.parse({"server": {"address_family": "both"}})
    with pytest.raises(ValueError, match="run_all"):
        asyncio.run(session.run(cfg, "p1"))
    seen: list[str] = []

    async def fake_run(cfg: config.AgentConfig, probe_id: str, *args: object,
                       **kwargs: object) -> object:
        seen.append(cfg.server.address_family)
        return replace(make_result(), address_family=cfg.server.address_family,
                       address_family_requested=cfg.server.address_family)

    monkeypatch.setattr(session, "run", fake_run)
    results = asyncio.run(session.run_all(cfg, "p1"))
    assert seen == ["ipv4", "ipv6"]
    assert [(r.address_family, r.address_family_requested) for r in results] == [
        ("ipv4", "both"), ("ipv6", "both")]
    assert len({r.result_id for r in results}) == 2


def test_a_dual_stack_slot_counts_once_when_both_count() -> None:
    """The daemon counts a slot in its band once: when every session of it counts (both
    families under "both"); one failed family leaves the band to be measured again."""
    from dataclasses import replace

    good = make_result()
    assert daemon.session_counts(good)
    bad = replace(good, transfers=())
    assert daemon.slot_counts([good]) is True
    assert daemon.slot_counts([good, good]) is True
    assert daemon.slot_counts([good, bad]) is False
    assert daemon.slot_counts([]) is False


def test_a_session_under_any_runs_in_one_family() -> None:
    """The ping and the transfers share one family: a literal the config names wins,
    else the host's preference; literals of both families pin nothing."""
    from agent.family import pinned_family

    assert pinned_family(None, "collector.example.net", "ipv6") == "ipv6"
    assert pinned_family("198.18.0.1", "collector.example.net", "ipv6") == "ipv4"
    assert pinned_family(None, "::1", None) == "ipv6"
    assert pinned_family("127.0.0.1", "::1", "ipv4") is None
    assert pinned_family("ping.example.net", None, None) is None


def test_preferred_family_follows_the_resolver() -> None:
    """The preferred family of a host is the one its resolver answers with (127.0.0.1 ipv4, ::1
    ipv6), also when a port is given and families are tried in turn."""
    import asyncio

    from agent.probes.session import _preferred_family

    assert asyncio.run(_preferred_family("127.0.0.1")) == "ipv4"
    assert asyncio.run(_preferred_family("::1")) == "ipv6"
    # With a port, a family that does not answer is passed over (happy eyeballs):
    # checked with one family at a time here (no name on this machine has both).
    assert asyncio.run(_preferred_family("127.0.0.1", 9)) == "ipv4"


def test_any_falls_back_when_the_preferred_family_does_not_connect(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A name whose IPv6 address comes first but does not answer (a routed but broken
    IPv6): the session is pinned to IPv4, which does (RFC 8305's fallback). Real TCP on
    loopback; only the resolver's answer is made up (no name here has both families)."""
    import asyncio
    import socket as socket_mod

    from agent.probes import session as session_mod

    with socket_mod.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        answers = [
            (socket_mod.AF_INET6, socket_mod.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
            (socket_mod.AF_INET, socket_mod.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        monkeypatch.setattr(session_mod.socket, "getaddrinfo",
                            lambda *args, **kwargs: answers)
        assert asyncio.run(session_mod._preferred_family("dual.example", port)) == "ipv4"
        # Without a port (a ping-only session) the resolver's order decides.
        assert asyncio.run(session_mod._preferred_family("dual.example")) == "ipv6"
