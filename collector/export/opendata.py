"""Open-data mode: what turns an export into something a regulator can publish.

Pure functions, except ``load_or_create_key`` (the one file this module reads or writes).
H1's export (run.py, rows.py) calls them row by row, so each is cheap at hundreds of
millions of rows.

**Pseudonyms** (``Pseudonymiser``). A probe's name and a session's result id become
HMAC-SHA256 (RFC 2104, FIPS 198-1) under the operator's secret key, with a domain label
per kind, so a probe name and a result id that happened to be equal never share a
pseudonym. The same key gives the same pseudonym in every export (an analyst follows one
probe across semesters); another key gives unrelated ones (rotating the key is how an
operator breaks that continuity on purpose).

What an attacker holding the published data and a list of candidate probe names (the
fleet's naming scheme, a leaked inventory) can and cannot do:

- cannot, while the key stays secret, test a candidate: without the key HMAC is a
  pseudorandom function, so hashing "rome-0042" gives nothing to compare. A plain hash
  (SHA-256 of the name) would fall to exactly this dictionary attack in a second, which
  is why the key is there;
- can, with the key, test every candidate: the key is as sensitive as the raw ids and
  stays with the operator (file mode 0600, never in an export or a log);
- can still link rows to each other: one pseudonym is one probe's whole time series, and
  a time series with its /24, operator, offer and region may single out a household.
  That is why pseudonymised data stays personal data (GDPR art. 4(5), recital 26), and
  why open-data mode also truncates addresses and times and suppresses small cells.

Lengths: a probe pseudonym keeps 64 bits (16 hex digits). By the birthday bound the odds
that any two of n probes collide are about n^2 / 2^65: 2.7e-10 at 100,000 probes, 2.7e-6
at ten million. A session pseudonym keeps 128 bits (32 hex digits), because sessions are
the join key between the tables and there are billions of them: (1e10)^2 / 2^129 is about
1.5e-19.

**Addresses** (``truncate_address``): IPv4 to its /24, IPv6 to its /48 (at most one end
site's allocation, RFC 6177: a customer's site, not a device). An
IPv4-mapped (RFC 4291 2.5.5.2) or 6to4 (RFC 3056, whose /48 *is* the full IPv4 address)
IPv6 address is truncated as the IPv4 address it carries. A zone id never survives.
Anything that is not an address becomes "", never the input.

**Times** (``to_minute``): UTC, truncated (not rounded) to the minute.

**Cells** (k-anonymity, Sweeney 2002): a row's cell is (operator, offer, region,
technology, local hour 0..23 in Europe/Rome). A cell holding fewer than ``k`` distinct
probes is suppressed (``small_cells``, ``CellCounter``); the export's data dictionary
states k and how many rows were suppressed. The export counts and suppresses per UTC
month, its publication unit (run.py): each month's files may be published alone.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Hashable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.schema import parse_utc
from collector.errors import BadParameter

# k of k-anonymity: issue 28's default, a threshold common in statistical disclosure
# control; the CLI may raise it (2 is the floor: k = 1 suppresses nothing).
DEFAULT_K = 5
DEFAULT_TZ = "Europe/Rome"  # AGCOM's hour bands are Italian local time

# A fresh key is 32 bytes: L, SHA-256's output length, under which RFC 2104 sec. 3
# discourages keys. A key the operator brings may be 16..31 bytes (still 128 bits or
# more of secret); a shorter one is refused.
KEY_BYTES = 32
MIN_KEY_BYTES = 16
MAX_KEY_FILE_BYTES = 4096  # a key file is 65 bytes; anything far larger is a wrong path

PROBE_HEX = 16  # 64 bits; collision odds in the module docstring
SESSION_HEX = 32  # 128 bits
_PROBE_LABEL = b"bbprobe open-data v1 probe\x00"
_SESSION_LABEL = b"bbprobe open-data v1 session\x00"

IPV4_PREFIX = 24
IPV6_PREFIX = 48
_V6_MASK = ((1 << IPV6_PREFIX) - 1) << (128 - IPV6_PREFIX)

Cell = tuple[str, str, str, str, int]  # operator, offer, region, technology, local hour

# The store's own form (agent.schema.format_utc), matched without parsing: the export
# meets it on every row. ASCII digits only (re's \d would take Arabic-Indic ones).
_STORE_FORM = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}):([0-5][0-9])"
                         r"(?::[0-5][0-9](?:\.[0-9]{1,6})?)?Z")


class OpenDataError(BadParameter, ValueError):
    """A key file, time zone, k or timestamp that open-data mode refuses: one line that
    names it. A BadParameter (the CLI prints it, exit 2) and a ValueError (for callers
    that parse)."""


# --- pseudonyms ------------------------------------------------------------------------


class Pseudonymiser:
    """Keyed pseudonyms for probes and sessions (HMAC-SHA256, lowercase hex)."""

    __slots__ = ("_probe", "_session")

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise OpenDataError(f"open-data key: {len(key)} bytes, at least "
                                f"{MIN_KEY_BYTES} needed", "key")
        # The label is fed once here; copy() per value saves rehashing key and label.
        self._probe = hmac.new(key, _PROBE_LABEL, hashlib.sha256)
        self._session = hmac.new(key, _SESSION_LABEL, hashlib.sha256)

    def probe(self, name: str) -> str:
        """The probe's pseudonym: 16 hex digits."""
        return _digest(self._probe, name)[:PROBE_HEX]

    def session(self, result_id: str) -> str:
        """The session's pseudonym: 32 hex digits."""
        return _digest(self._session, result_id)[:SESSION_HEX]


def _digest(base: hmac.HMAC, value: str) -> str:
    mac = base.copy()
    # surrogatepass: a stored lone surrogate still gets a pseudonym, not a traceback
    mac.update(value.encode("utf-8", "surrogatepass"))
    return mac.hexdigest()


# --- the key file (the I/O edge) ------------------------------------------------------


def load_or_create_key(path: Path | str) -> bytes:
    """The operator's open-data key at ``path`` (hex, one line), made at first use: 32
    random bytes (``secrets``), written to a temporary file opened with O_EXCL and mode
    0600 and hard-linked to its name, so racing exports end up with one key and nobody
    ever reads a half-written one. Refused with a one-line OpenDataError: a file group or
    others may read, not a regular file, not hex, or a key under 16 bytes."""
    path = Path(path)
    if not os.path.lexists(path):
        try:
            _create(path, secrets.token_bytes(KEY_BYTES).hex() + "\n")
        except OSError as exc:
            raise OpenDataError(f"open-data key {str(path)!r}: cannot create: "
                                f"{exc.strerror or exc}", "key") from None
    return _read(path)


def _create(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # another export won: its key stands
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> bytes:
    where = f"open-data key {str(path)!r}"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise OpenDataError(f"{where}: cannot read: {exc.strerror or exc}", "key") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OpenDataError(f"{where}: not a regular file", "key")
        if st.st_mode & 0o077:
            raise OpenDataError(
                f"{where}: group or others may read it (mode {stat.S_IMODE(st.st_mode):04o});"
                f" refused: run `chmod 600 {path}`", "key")
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise OpenDataError(f"{where}: cannot read: {exc.strerror or exc}", "key") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise OpenDataError(f"{where}: larger than a key file", "key")
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise OpenDataError(f"{where}: not hexadecimal", "key") from None
    if len(key) < MIN_KEY_BYTES:
        raise OpenDataError(f"{where}: {len(key)} bytes, at least {MIN_KEY_BYTES} needed",
                            "key")
    return key


# --- addresses and times --------------------------------------------------------------


@functools.lru_cache(maxsize=65536)  # a probe keeps its address: ipaddress costs ~6 us
def truncate_address(text: str | None) -> str:
    """``text``'s network: "a.b.c.0/24" for IPv4 (also IPv4-mapped and 6to4 IPv6), the
    /48 for IPv6 ("2001:db8:1::/48"), "" for anything else (never the input)."""
    if not text:
        return ""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return ""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = addr.ipv4_mapped or addr.sixtofour
        if inner is None:
            # via int: the scope (zone id) does not survive, and the host bits are gone
            return f"{ipaddress.IPv6Address(int(addr) & _V6_MASK)}/{IPV6_PREFIX}"
        addr = inner
    net = ipaddress.IPv4Network((int(addr) & 0xFFFFFF00, IPV4_PREFIX))
    return str(net)


def to_minute(ts: str) -> str:
    """An ISO 8601 timestamp with an offset (the store's "2026-05-01T10:00:12.345678Z",
    or "+02:00") as UTC "YYYY-MM-DDTHH:MMZ", truncated. OpenDataError if it is not one."""
    m = _STORE_FORM.fullmatch(ts)
    if m is not None:
        _utc_hour(m[1])  # the date and hour are real ones (cached per hour)
        return f"{m[1]}:{m[2]}Z"
    moment = _parse(ts)
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
            f"{moment.hour:02d}:{moment.minute:02d}Z")


def hour_band(started_at: str, tz: str = DEFAULT_TZ) -> int:
    """The local hour (0..23) in ``tz`` at which ``started_at`` (ISO 8601 with an offset)
    falls, by the tz database (so DST-correct). Cached per UTC hour: millions of rows
    cost a few thousand zone conversions."""
    m = _STORE_FORM.fullmatch(started_at)
    if m is not None:
        hour_text = m[1]
    else:
        moment = _parse(started_at)
        hour_text = f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}"
    local = _local_hour(hour_text, tz)
    if local is not None:
        return local
    # A zone whose offset is not whole hours (Asia/Kolkata) or changes inside this UTC
    # hour: the minute matters, so convert this instant itself.
    return _parse(started_at).astimezone(_zone(tz)).hour


@functools.lru_cache(maxsize=65536)
def _local_hour(hour_text: str, tz: str) -> int | None:
    """The local hour of every instant of the UTC hour ``hour_text``, or None when it
    is not the same for all of them."""
    start = _utc_hour(hour_text)
    zone = _zone(tz)
    first = start.astimezone(zone).utcoffset()
    last = (start + timedelta(seconds=3599, microseconds=999999)).astimezone(zone).utcoffset()
    if first is None or first != last or first.total_seconds() % 3600:
        return None
    return start.astimezone(zone).hour


@functools.lru_cache(maxsize=65536)
def _utc_hour(hour_text: str) -> datetime:
    try:
        return datetime.fromisoformat(hour_text + ":00:00+00:00")
    except ValueError:
        raise OpenDataError(f"timestamp {hour_text[:40]!r}...: not a real date and hour",
                            "started_at") from None


@functools.lru_cache(maxsize=64)
def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise OpenDataError(f"time zone {tz[:60]!r}: not in the tz database", "tz") from None


def _parse(ts: str) -> datetime:
    try:
        return parse_utc(ts)
    except (TypeError, ValueError) as exc:
        raise OpenDataError(f"timestamp {str(ts)[:40]!r}: {exc}", "started_at") from None


# --- k-anonymity ----------------------------------------------------------------------


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        # k = 1 suppresses nothing: a "k-anonymous" export that is not
        raise OpenDataError(f"k = {k!r}: must be an integer of at least 2", "k")
    return k


def small_cells(probes_per_cell: Mapping[Cell, int], k: int) -> frozenset[Cell]:
    """The cells holding fewer than ``k`` (>= 2) distinct probes: those suppressed."""
    _check_k(k)
    return frozenset(cell for cell, n in probes_per_cell.items() if n < k)


class CellCounter:
    """Distinct probes per cell, counted in one pass over the sessions, with memory
    bounded by cells x k: a cell's set of probes is dropped once it reaches k (it is
    then published whatever else comes), so only small cells keep their probes. Also
    counts the rows added per cell, for the dictionary's "rows suppressed"."""

    __slots__ = ("_big", "_k", "_probes", "_rows")

    def __init__(self, k: int = DEFAULT_K) -> None:
        self._k = _check_k(k)
        self._probes: dict[Cell, set[Hashable]] = {}
        self._big: set[Cell] = set()
        self._rows: dict[Cell, int] = {}

    @property
    def k(self) -> int:
        return self._k

    def add(self, cell: Cell, probe: Hashable) -> None:
        """One row of ``probe`` in ``cell``."""
        self._rows[cell] = self._rows.get(cell, 0) + 1
        if cell in self._big:
            return
        seen = self._probes.setdefault(cell, set())
        seen.add(probe)
        if len(seen) >= self._k:
            self._big.add(cell)
            del self._probes[cell]

    def probes_per_cell(self) -> dict[Cell, int]:
        """Distinct probes per cell, capped at k (a cell at k holds k or more)."""
        return {cell: (self._k if cell in self._big else len(self._probes[cell]))
                for cell in self._rows}

    def small_cells(self) -> frozenset[Cell]:
        """The cells under k distinct probes."""
        return frozenset(self._probes)

    def suppressed_rows(self) -> int:
        """Rows added in the small cells."""
        return sum(self._rows[cell] for cell in self._probes)
