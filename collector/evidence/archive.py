"""Reading an evidence bundle that may be hostile: a directory or a .zip of the same
members (issue 27, design 6-7).

A bundle comes from whoever hands it over (an operator contesting a certificate, a
customer), so everything about it is bounded before it is believed:

- at most ``MAX_MEMBERS`` members, ``MAX_MEMBER_BYTES`` a member and ``MAX_TOTAL_BYTES``
  in all, counted *while* reading or inflating, never taken from the sizes a zip declares
  (a zip bomb declares small sizes and inflates to gigabytes);
- a member name is a relative POSIX path of plain components: no absolute name, no
  ``..``, no backslash, no drive, no NUL (APPNOTE 4.4.17: names are relative, "/"
  separated), and no name twice;
- no symbolic link is followed (a directory's links and a zip's link members are refused:
  a link could point at any file of the verifier's machine), nor any file that is not a
  regular file (a FIFO would block the reader);
- JSON is read with duplicate names refused (RFC 8259 §4: their meaning is undefined, and
  two readers may each see another value), NaN/Infinity refused, and a depth bound.

Every failure is an ``ArchiveError`` with one line naming the member and what is wrong.
The members are read lazily, so a bundle's memory is about its largest member.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

MAX_MEMBERS = 10_000
MAX_TOTAL_BYTES = 200 * 1024 * 1024
MAX_MEMBER_BYTES = 16 * 1024 * 1024
# A result document nests about 8 deep; a certificate payload about 6.
MAX_JSON_DEPTH = 64
_CHUNK = 64 * 1024
# End of central directory record (APPNOTE 4.3.16): signature, then at offset 10 the
# total number of entries (2 bytes); a comment of at most 65535 bytes may follow it.
_EOCD = b"PK\x05\x06"
_EOCD_LEN = 22


class ArchiveError(ValueError):
    """A bundle that cannot be read safely; the message is one line naming the member."""


def check_name(name: str) -> str:
    """``name`` if it is a safe relative member name (see the module docstring)."""
    shown = repr(name[:80])
    if not name or "\x00" in name or "\\" in name:
        raise ArchiveError(f"member {shown}: not a plain relative name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"member {shown}: absolute name refused")
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ArchiveError(f"member {shown}: a '..', '.' or empty path component is "
                           "refused (path traversal)")
    return name


class Bundle:
    """The members of a bundle by name (``names``), each read on demand (``read``,
    ``read_json``) under the bounds; the total is counted over every read."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._read_total = 0
        self._known: frozenset[str] | None = None

    def names(self) -> list[str]:
        raise NotImplementedError

    def _open_read(self, name: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Release the archive (a directory holds nothing open)."""

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, name: str) -> bool:
        if self._known is None:
            self._known = frozenset(self.names())
        return name in self._known

    def read(self, name: str) -> bytes:
        if not self.has(name):
            raise ArchiveError(f"{name}: missing from the bundle")
        data = self._open_read(name)
        self._read_total += len(data)
        if self._read_total > MAX_TOTAL_BYTES:
            raise ArchiveError(f"{name}: the bundle holds more than {MAX_TOTAL_BYTES} "
                               "bytes in all")
        return data

    def read_text(self, name: str) -> str:
        try:
            return self.read(name).decode("utf-8")
        except UnicodeDecodeError as bad:
            raise ArchiveError(f"{name}: not UTF-8 text (byte {bad.start})") from None

    def read_json(self, name: str) -> Any:
        return loads_bounded(self.read(name), name)

    def _bounded(self, name: str, chunks: Iterator[bytes]) -> bytes:
        out = bytearray()
        for chunk in chunks:
            out += chunk
            if len(out) > MAX_MEMBER_BYTES:
                raise ArchiveError(f"{name}: larger than {MAX_MEMBER_BYTES} bytes")
            if self._read_total + len(out) > MAX_TOTAL_BYTES:
                raise ArchiveError(f"{name}: the bundle holds more than "
                                   f"{MAX_TOTAL_BYTES} bytes in all")
        return bytes(out)


class DirBundle(Bundle):
    """A bundle directory, walked without following links."""

    def __init__(self, root: Path) -> None:
        super().__init__(str(root))
        self._root = root
        self._names = sorted(self._walk())

    def _walk(self) -> list[str]:
        found: list[str] = []
        pending: list[tuple[Path, str]] = [(self._root, "")]
        while pending:
            where, prefix = pending.pop()
            try:
                entries = list(os.scandir(where))
            except OSError as exc:
                raise ArchiveError(f"{prefix or '.'}: cannot be listed "
                                   f"({exc.strerror or exc})") from None
            for entry in entries:
                name = check_name(prefix + entry.name)
                if entry.is_symlink():
                    raise ArchiveError(f"member {name!r}: a symbolic link (refused: "
                                       "links are not followed)")
                if entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), name + "/"))
                elif entry.is_file(follow_symlinks=False):
                    found.append(name)
                else:
                    raise ArchiveError(f"member {name!r}: not a regular file")
                if len(found) + len(pending) > MAX_MEMBERS:
                    raise ArchiveError(f"the bundle holds more than {MAX_MEMBERS} members")
        return found

    def names(self) -> list[str]:
        return self._names

    def _open_read(self, name: str) -> bytes:
        path = self._root.joinpath(*PurePosixPath(name).parts)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ArchiveError(f"{name}: a symbolic link (refused)") from None
            raise ArchiveError(f"{name}: cannot be read ({exc.strerror or exc})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ArchiveError(f"{name}: not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as handle:
                return self._bounded(name, iter(lambda: handle.read(_CHUNK), b""))
        except OSError as exc:
            raise ArchiveError(f"{name}: cannot be read ({exc.strerror or exc})") from None
        finally:
            os.close(fd)


class ZipBundle(Bundle):
    """A bundle .zip, its members inflated under the bounds as they are read."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        _check_entry_count(path)
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError,
                EOFError, NotImplementedError) as exc:
            raise ArchiveError(f"{path.name}: not a readable zip archive "
                               f"({_one_line(exc)})") from None
        try:
            self._infos = self._check_members()
        except ArchiveError:
            self._zip.close()
            raise
        self._names = sorted(self._infos)

    def _check_members(self) -> dict[str, zipfile.ZipInfo]:
        infos = self._zip.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ArchiveError(f"the bundle holds more than {MAX_MEMBERS} members")
        out: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = check_name(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"member {name!r}: a symbolic link (refused: links "
                                   "are not followed)")
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise ArchiveError(f"member {name!r}: encrypted (refused)")
            if name in out:
                raise ArchiveError(f"member {name!r}: appears twice in the archive")
            if info.file_size > MAX_MEMBER_BYTES:
                raise ArchiveError(f"{name}: larger than {MAX_MEMBER_BYTES} bytes "
                                   f"(declares {info.file_size})")
            out[name] = info
        return out

    def names(self) -> list[str]:
        return self._names

    def _open_read(self, name: str) -> bytes:
        info = self._infos[name]
        try:
            with self._zip.open(info) as handle:
                # The declared size is not trusted: what is inflated is counted.
                return self._bounded(name, iter(lambda: handle.read(_CHUNK), b""))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError,
                zlib.error, RuntimeError) as exc:
            raise ArchiveError(f"{name}: cannot be inflated ({_one_line(exc)})") from None

    def close(self) -> None:
        self._zip.close()


def _check_entry_count(path: Path) -> None:
    """Refuse an archive whose end record announces more than MAX_MEMBERS entries before
    ``zipfile`` reads its whole central directory into memory."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(0, size - (_EOCD_LEN + 65535))
            handle.seek(start)
            tail = handle.read()
    except OSError as exc:
        raise ArchiveError(f"{path.name}: cannot be read ({exc.strerror or exc})") from None
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < _EOCD_LEN:
        raise ArchiveError(f"{path.name}: not a zip archive (no end of central directory)")
    (entries,) = struct.unpack_from("<H", tail, at + 10)
    if entries == 0xFFFF:
        raise ArchiveError(f"{path.name}: a ZIP64 archive (more than 65534 entries) is "
                           f"refused: a bundle has at most {MAX_MEMBERS} members")
    if entries > MAX_MEMBERS:
        raise ArchiveError(f"the bundle holds more than {MAX_MEMBERS} members "
                           f"({entries} announced)")


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """The bundle at ``path``: a directory, or a zip archive (by its content, whatever
    its name). ArchiveError if it is neither or cannot be read."""
    where = Path(path)
    try:
        info = where.stat()
    except OSError as exc:
        raise ArchiveError(f"{where}: {exc.strerror or 'cannot be read'}") from None
    if stat.S_ISDIR(info.st_mode):
        return DirBundle(where)
    if stat.S_ISREG(info.st_mode):
        return ZipBundle(where)
    raise ArchiveError(f"{where}: neither a directory nor a zip archive")


# --- bounded JSON -----------------------------------------------------------------------------


class _Duplicate(Exception):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:30]} is out of range")
    return value


def loads_bounded(data: bytes, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON text (UTF-8) -> data, refusing duplicate names, NaN/Infinity, a number out of
    float range and nesting deeper than ``max_depth``; ArchiveError naming ``what``."""
    if len(data) > MAX_MEMBER_BYTES:
        raise ArchiveError(f"{what}: larger than {MAX_MEMBER_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise ArchiveError(f"{what}: not UTF-8 (byte {bad.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_unique, parse_constant=_constant,
                           parse_float=_finite)
    except _Duplicate as dup:
        raise ArchiveError(f"{what}: member {str(dup.args[0])[:40]!r} appears twice in "
                           "one object") from None
    except RecursionError:
        raise ArchiveError(f"{what}: nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, int digits limit, our refusals
        raise ArchiveError(f"{what}: not valid JSON ({_one_line(exc)})") from None
    if depth_of(value) > max_depth:
        raise ArchiveError(f"{what}: nested deeper than {max_depth} levels")
    return value


def depth_of(value: Any) -> int:
    """How deep arrays and objects nest in ``value`` (a scalar is 0); iterative."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
        else:
            deepest = max(deepest, level)
            continue
        deepest = max(deepest, level + 1)
    return deepest


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
