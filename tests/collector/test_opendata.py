"""Open-data mode's pure parts and its key file (collector/export/opendata.py): keyed
pseudonyms, address and time truncation, local hour bands across DST, k-anonymity."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from collector.errors import BadParameter
from collector.export import opendata
from collector.export.opendata import (
    DEFAULT_K,
    CellCounter,
    OpenDataError,
    Pseudonymiser,
    hour_band,
    load_or_create_key,
    small_cells,
    to_minute,
    truncate_address,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


# --- pseudonyms -------------------------------------------------------------------------


def test_pseudonyms_are_pinned_so_exports_under_one_key_stay_linkable() -> None:
    """The derivation never changes silently: a changed label or length would break every
    analyst's join across exports made with the same key."""
    p = Pseudonymiser(KEY)
    assert p.probe("rome-0042") == "f19e1237c1f4749e"
    assert p.session("rome-0042") == "7039a7d69d241e0eacd33d3b9bb11a96"
    # the documented construction, rebuilt from the standard library alone
    expected = hmac.new(KEY, b"bbprobe open-data v1 probe\x00rome-0042",
                        hashlib.sha256).hexdigest()[:16]
    assert p.probe("rome-0042") == expected


def test_same_key_same_pseudonym_other_key_other_pseudonym() -> None:
    """Two Pseudonymisers with one key agree; another key gives unrelated pseudonyms."""
    a, b, c = Pseudonymiser(KEY), Pseudonymiser(bytes(KEY)), Pseudonymiser(OTHER_KEY)
    names = [f"probe-{i}" for i in range(50)]
    assert [a.probe(n) for n in names] == [b.probe(n) for n in names]
    assert {a.probe(n) for n in names}.isdisjoint({c.probe(n) for n in names})
    assert a.session("0190c6f2-0000-7000-8000-000000000001") != \
        c.session("0190c6f2-0000-7000-8000-000000000001")


def test_pseudonyms_have_their_lengths_and_kinds_do_not_collide() -> None:
    """Probe pseudonyms are 16 hex digits, session ones 32; a probe named like a result id
    gets a pseudonym unrelated to that session's (the domain labels differ)."""
    p = Pseudonymiser(KEY)
    probe, session = p.probe("x"), p.session("x")
    assert len(probe) == 16 and len(session) == 32
    assert set(probe + session) <= set("0123456789abcdef")
    assert not session.startswith(probe)
    assert "x" not in (probe, session)


def test_distinct_names_get_distinct_pseudonyms_and_odd_text_is_accepted() -> None:
    """10,000 probe names, 10,000 pseudonyms; a lone surrogate and an empty name do not
    raise."""
    p = Pseudonymiser(KEY)
    assert len({p.probe(f"p{i}") for i in range(10_000)}) == 10_000
    assert p.probe("\ud800") != p.probe("")


def test_a_short_key_is_refused() -> None:
    """A key under 16 bytes is refused in one line naming the length."""
    with pytest.raises(OpenDataError, match=r"^open-data key: 15 bytes, at least 16 needed$"):
        Pseudonymiser(b"k" * 15)
    Pseudonymiser(b"k" * 16)  # the floor itself is accepted


# --- the key file -----------------------------------------------------------------------


def test_a_new_key_file_is_32_random_bytes_in_hex_mode_0600(tmp_path: Path) -> None:
    """Made at first use in a new directory: 64 hex digits and a newline, mode 0600 under
    a permissive umask, the same key on the next read, no temporary file left over."""
    path = tmp_path / "secret" / "opendata.key"
    old = os.umask(0o022)
    try:
        key = load_or_create_key(path)
    finally:
        os.umask(old)
    assert len(key) == 32
    assert path.read_text() == key.hex() + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(str(path)) == key
    assert load_or_create_key(tmp_path / "other.key") != key
    assert sorted(p.name for p in path.parent.iterdir()) == ["opendata.key"]


def test_a_racing_second_creation_keeps_the_first_key(tmp_path: Path) -> None:
    """Another export that created the file first wins: the link fails quietly, the first
    key stands, and the loser's temporary file is removed."""
    path = tmp_path / "opendata.key"
    key = load_or_create_key(path)
    opendata._create(path, "00" * 32 + "\n")
    assert load_or_create_key(path) == key
    assert [p.name for p in tmp_path.iterdir()] == ["opendata.key"]


def test_an_operator_key_of_16_bytes_with_spaces_around_is_read(tmp_path: Path) -> None:
    """A key the operator wrote (16 bytes, upper case, trailing newline) is accepted."""
    path = tmp_path / "k"
    path.write_text("\n" + "AB" * 16 + "\n")
    path.chmod(0o600)
    assert load_or_create_key(path) == b"\xab" * 16


@pytest.mark.parametrize(("content", "mode", "reason"), [
    ("ab" * 32, 0o640, r"group or others may read it \(mode 0640\); refused: run `chmod 600 "),
    ("ab" * 32, 0o604, r"group or others may read it \(mode 0604\)"),
    ("ab" * 15, 0o600, r"15 bytes, at least 16 needed$"),
    ("", 0o600, r"0 bytes, at least 16 needed$"),
    ("zz" * 32, 0o600, r"not hexadecimal$"),
    ("ab" * 31 + "a", 0o600, r"not hexadecimal$"),
    ("é" * 40, 0o600, r"not hexadecimal$"),
    ("ab" * 5000, 0o600, r"larger than a key file$"),
])
def test_bad_key_files_are_refused_in_one_line(tmp_path: Path, content: str, mode: int,
                                               reason: str) -> None:
    """Each refusal names the path and what is wrong, on one line, and is a BadParameter
    (the CLI's exit 2) and a ValueError."""
    path = tmp_path / "opendata.key"
    path.write_text(content, encoding="utf-8")
    path.chmod(mode)
    with pytest.raises(OpenDataError, match=f"^open-data key {str(path)!r}: {reason}") as info:
        load_or_create_key(path)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, BadParameter) and isinstance(info.value, ValueError)
    assert info.value.field == "key"


def test_a_symlink_a_directory_and_an_unwritable_place_are_refused(tmp_path: Path) -> None:
    """A key path that is a symlink (O_NOFOLLOW), a directory, or one that cannot be
    created are each refused in one line naming the path."""
    real = tmp_path / "real.key"
    real.write_text("ab" * 32)
    real.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(OpenDataError, match=r"link\.key': cannot read: "):
        load_or_create_key(link)
    (tmp_path / "dir.key").mkdir()
    with pytest.raises(OpenDataError, match=r"dir\.key': not a regular file$"):
        load_or_create_key(tmp_path / "dir.key")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OpenDataError, match=r"file/k': cannot create: "):
        load_or_create_key(blocker / "k")


# --- addresses --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.17", "192.0.2.0/24"),
    ("192.0.2.0", "192.0.2.0/24"),
    ("255.255.255.255", "255.255.255.0/24"),
    ("10.1.2.3", "10.1.2.0/24"),
    ("2001:db8:abcd:12::1", "2001:db8:abcd::/48"),
    ("2001:DB8:ABCD:FFFF:FFFF:FFFF:FFFF:FFFF", "2001:db8:abcd::/48"),
    ("::1", "::/48"),
    ("fe80::1%eth0", "fe80::/48"),  # the zone id never survives
    ("fe80::1234%25", "fe80::/48"),
    ("::ffff:192.0.2.17", "192.0.2.0/24"),  # IPv4-mapped: the IPv4 address it is
    ("::ffff:c000:211", "192.0.2.0/24"),
    ("::ffff:192.0.2.17%3", "192.0.2.0/24"),
    ("2002:c000:211::1", "192.0.2.0/24"),  # 6to4: its /48 is the whole IPv4 address
    ("64:ff9b::192.0.2.17", "64:ff9b::/48"),  # NAT64: the /48 holds none of it
])
def test_addresses_are_truncated_to_their_network(text: str, expected: str) -> None:
    """IPv4 to /24, IPv6 to /48, mapped and 6to4 IPv6 as the IPv4 inside."""
    assert truncate_address(text) == expected


@pytest.mark.parametrize("text", [
    "", None, "garbage", "192.0.2.17:443", "[2001:db8::1]", "[2001:db8::1]:443",
    "192.0.2.17/32", "2001:db8::/32", " 192.0.2.17", "192.0.2.017", "192.0.2.256",
    "192.0.2", "1.2.3.4%eth0", "2001:db8::1::1", "unknown",
    "\u0661\u0669\u0662.\u0660.\u0662.\u0661",
])
def test_anything_not_an_address_becomes_empty(text: str | None) -> None:
    """Not an address (a port, brackets, a prefix, spaces, leading zeros, non-ASCII
    digits): "" and never any part of the input."""
    assert truncate_address(text) == ""


def test_no_host_bits_survive_over_many_addresses() -> None:
    """For 1,000 addresses of one /24 and of one /48 there is one published network."""
    v4 = {truncate_address(f"198.51.100.{i % 256}") for i in range(1000)}
    v6 = {truncate_address(f"2001:db8:7:{i:x}::{i:x}") for i in range(1000)}
    assert v4 == {"198.51.100.0/24"}
    assert v6 == {"2001:db8:7::/48"}


# --- minutes ----------------------------------------------------------------------------


@pytest.mark.parametrize(("ts", "expected"), [
    ("2026-05-01T10:00:12.345678Z", "2026-05-01T10:00Z"),
    ("2026-05-01T10:00:59.999999Z", "2026-05-01T10:00Z"),  # truncated, not rounded
    ("2026-05-01T10:59:59Z", "2026-05-01T10:59Z"),
    ("2026-05-01T10:07Z", "2026-05-01T10:07Z"),
    ("2026-05-01T10:00:12.345678+00:00", "2026-05-01T10:00Z"),
    ("2026-05-01T12:00:59.9+02:00", "2026-05-01T10:00Z"),
    ("2026-05-01T00:30:59.999+02:00", "2026-04-30T22:30Z"),  # the day changes too
    ("2026-04-30T19:15:01-05:00", "2026-05-01T00:15Z"),
    ("2026-05-01T15:44:30+05:30", "2026-05-01T10:14Z"),
    ("2026-12-31T23:59:59.999999-01:00", "2027-01-01T00:59Z"),
    ("2028-02-29T10:00:00Z", "2028-02-29T10:00Z"),
])
def test_timestamps_become_the_utc_minute(ts: str, expected: str) -> None:
    """Any offset is converted to UTC first, then seconds are dropped."""
    assert to_minute(ts) == expected


@pytest.mark.parametrize(("ts", "reason"), [
    ("2026-05-01T10:00:12", "no UTC offset"),
    ("2026-13-01T10:00:12Z", "not a real date and hour"),
    ("2027-02-29T10:00:00Z", "not a real date and hour"),
    ("2026-05-01T24:00:00Z", "not a real date and hour"),
    ("yesterday", "Invalid isoformat"),
    ("", "Invalid isoformat"),
])
def test_bad_timestamps_are_refused_in_one_line(ts: str, reason: str) -> None:
    """Not a timestamp with an offset: an OpenDataError naming the value and why."""
    with pytest.raises(OpenDataError, match=reason) as info:
        to_minute(ts)
    assert str(info.value).startswith("timestamp ") and "\n" not in str(info.value)
    with pytest.raises(OpenDataError):
        hour_band(ts)


# --- hour bands -------------------------------------------------------------------------


@pytest.mark.parametrize(("started_at", "band"), [
    # last Sunday of March 2026 (29th): 02:00 CET becomes 03:00 CEST at 01:00 UTC
    ("2026-03-29T00:59:59.999999Z", 1),
    ("2026-03-29T01:00:00Z", 3),  # local 02:xx does not exist that night
    # last Sunday of October 2026 (25th): 03:00 CEST becomes 02:00 CET at 01:00 UTC
    ("2026-10-25T00:30:00Z", 2),
    ("2026-10-25T01:30:00Z", 2),  # the repeated hour: both are band 2
    ("2026-10-25T02:00:00Z", 3),
    ("2026-01-15T23:30:00Z", 0),  # winter: UTC+1, the next local day
    ("2026-07-15T21:59:00Z", 23),  # summer: UTC+2
    ("2026-07-15T23:59:00+02:00", 23),  # an offset given: same instant, same band
])
def test_hour_bands_follow_rome_time_across_dst(started_at: str, band: int) -> None:
    """The local hour in Europe/Rome, by the tz database, on the DST change nights."""
    assert hour_band(started_at) == band
    assert hour_band(started_at, "Europe/Rome") == band


def test_hour_bands_agree_with_zoneinfo_for_every_hour_of_a_year() -> None:
    """At minute 0 and 59 of every UTC hour of 2026 (both DST changes included) the
    cached band equals zoneinfo's own conversion of that instant."""
    rome = ZoneInfo("Europe/Rome")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    wrong = []
    for h in range(365 * 24):
        for minute in (0, 59):
            moment = start + timedelta(hours=h, minutes=minute)
            ts = moment.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
            if hour_band(ts) != moment.astimezone(rome).hour:
                wrong.append(ts)
    assert wrong == []


def test_a_half_hour_zone_is_not_cached_per_utc_hour() -> None:
    """In Asia/Kolkata (UTC+5:30) one UTC hour spans two local hours: the minute
    decides, so the per-hour cache must not answer for it."""
    assert hour_band("2026-05-01T10:15:00Z", "Asia/Kolkata") == 15
    assert hour_band("2026-05-01T10:45:00Z", "Asia/Kolkata") == 16
    assert hour_band("2026-05-01T10:15:00Z", "UTC") == 10


@pytest.mark.parametrize("tz", ["Mars/Olympus_Mons", "", "../etc/passwd"])
def test_an_unknown_time_zone_is_refused(tz: str) -> None:
    """A zone not in the tz database: one line naming it."""
    with pytest.raises(OpenDataError, match=r"^time zone .*: not in the tz database$"):
        hour_band("2026-05-01T10:15:00Z", tz)


# --- k-anonymity ------------------------------------------------------------------------


def _cell(region: str, hour: int = 10) -> opendata.Cell:
    return ("TIM", "Fibra 1000", region, "FTTH", hour)


def test_small_cells_are_those_under_k_distinct_probes() -> None:
    """At k = 5 a cell of 4 probes is suppressed and one of 5 is not; at k = 2 only the
    single-probe cell is."""
    counts = {_cell("Lazio"): 5, _cell("Umbria"): 4, _cell("Molise"): 1,
              _cell("Lazio", 11): 0, _cell("Sicilia"): 100}
    assert DEFAULT_K == 5
    assert small_cells(counts, DEFAULT_K) == {_cell("Umbria"), _cell("Molise"),
                                              _cell("Lazio", 11)}
    assert small_cells(counts, 2) == {_cell("Molise"), _cell("Lazio", 11)}
    assert small_cells(counts, 101) == frozenset(counts)
    assert small_cells({}, 5) == frozenset()


@pytest.mark.parametrize("k", [1, 0, -3, True, 2.5, "5"])
def test_k_under_2_or_not_an_integer_is_refused(k: object) -> None:
    """k = 1 would suppress nothing: refused, as is anything not an integer."""
    with pytest.raises(OpenDataError, match=r"^k = .*: must be an integer of at least 2$"):
        small_cells({}, k)  # type: ignore[arg-type]
    with pytest.raises(OpenDataError):
        CellCounter(k)  # type: ignore[arg-type]


def test_the_cell_counter_counts_distinct_probes_and_suppressed_rows() -> None:
    """Repeated rows of one probe count once; a cell reaching k is published, and its
    probes are forgotten; the rows of small cells are what the dictionary reports."""
    counter = CellCounter(3)
    for probe in ("a", "a", "a", "b"):  # 2 probes, 4 rows: small
        counter.add(_cell("Umbria"), probe)
    for probe in ("a", "b", "c", "c", "d"):  # reaches 3 at the third probe
        counter.add(_cell("Lazio"), probe)
    counter.add(_cell("Molise"), "z")
    for probe in ("x", "y", "z"):  # exactly k: published
        counter.add(_cell("Campania"), probe)
    assert counter.k == 3
    assert counter.probes_per_cell() == {_cell("Umbria"): 2, _cell("Lazio"): 3,
                                         _cell("Molise"): 1, _cell("Campania"): 3}
    assert counter.small_cells() == {_cell("Umbria"), _cell("Molise")}
    assert counter.small_cells() == small_cells(counter.probes_per_cell(), 3)
    assert counter.suppressed_rows() == 5
    assert counter._probes.keys() == {_cell("Umbria"), _cell("Molise")}  # memory: small only
    assert CellCounter().k == DEFAULT_K
