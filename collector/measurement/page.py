"""The browser speed test the collector serves at ``/speedtest``, and the page a saved
result's link opens (``/speedtest/result/<link>``). Markup, style sheet and script are the
package's own files (collector/measurement/static/), served by the collector under a
Content-Security-Policy that allows this origin's files only: no CDN, nothing inline.

Method (stated on the page and recorded with each result):
- ping: 10 HTTP GETs of ``empty``, the first discarded (connection set-up); min, mean
  and jitter (mean absolute difference of consecutive RTTs);
- download: ``streams`` parallel GETs of ``garbage``, re-issued until the end; bytes read
  counted as they arrive; rate = bytes in the window after ``warmup_s`` / ``window_s``,
  the cumulative count interpolated at both edges (the tail after the window, while
  streams finish one by one, is not counted);
- upload: ``streams`` parallel XHR POSTs of a random 1 MiB body to bbprobe's upload sink
  (``/measure/v1/upload``), which answers with its own receive samples; rate = bytes the
  server received in the window (on the server's clock), as the agent's uploads are
  measured: a browser's own "sent" count includes what is still queued in its socket;
- during each phase a live figure, redrawn five times a second: the rate over the last
  second of the bytes the browser has received or handed to the network so far.
The result goes to ``POST /api/v1/browser-results``: kept apart from probe results, never
in compliance. Its link names it by when it was received and a random key stored with
it (``share_link``), never by its row number.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from html import escape
from importlib import resources
from typing import Any

from agent.schema import format_utc
from collector import __version__
from collector.config import AnonymousConfig

ASSETS = {"speedtest.css": "text/css", "speedtest.js": "text/javascript"}
# Only this origin's files and requests; no inline script or style, no framing, no forms.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                # A result's link is its only key: not sent on to any other site.
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
# The body key that holds a result's random link key (public_routes adds it: a client
# cannot send it, an unknown field is refused).
SHARE_KEY = "share_key"
# A link: the receipt time in microseconds since 1970 (14 hex digits, up to year 4253),
# then 128 random bits (RFC 4648 §5 base64url, 22 characters). The time lets the store
# find the row by its indexed received_at; the key makes the link unguessable.
_LINK = re.compile(r"([0-9a-f]{14})([A-Za-z0-9_-]{22})")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The test's settings when the address gives none (speedtest.js reads the same).
_DEFAULTS = {"streams": 4, "warmup": 2, "window": 8}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    name: str  # with a digest of its content, so a new version is never a stale cache


@cache
def _static(name: str) -> bytes:
    """A file of static/, read once (the package's files do not change while it runs)."""
    return resources.files("collector.measurement").joinpath("static", name).read_bytes()


@cache
def _by_file() -> dict[str, Asset]:
    out = {}
    for name, kind in ASSETS.items():
        body = _static(name)
        stem, _, ext = name.rpartition(".")
        out[name] = Asset(body, kind, f"{stem}.{hashlib.sha256(body).hexdigest()[:12]}.{ext}")
    return out


def assets() -> dict[str, Asset]:
    """The style sheet and the script, by their served names (the page links those)."""
    return {asset.name: asset for asset in _by_file().values()}


def _fill(template: str, values: dict[str, str]) -> str:
    """``{{name}}`` replaced by its value (already HTML); every name must be given."""
    def one(match: re.Match[str]) -> str:
        return values[match.group(1)]
    return re.sub(r"\{\{(\w+)\}\}", one, template)


def _common() -> dict[str, str]:
    files = _by_file()
    return {"css": files["speedtest.css"].name, "js": files["speedtest.js"].name,
            "version": escape(__version__)}


def retention(anonymous: AnonymousConfig) -> str:
    """How long a browser result stays, from the collector's [anonymous] settings (the
    store applies them: storage/sql/anonymous.py prunes by age and by row count)."""
    return (f"Results are deleted {anonymous.retention_days:g} days after they are "
            f"received, and sooner once more than {anonymous.max_rows:,} browser results "
            "are stored (the oldest go first).")


def privacy(record: bool, anonymous: AnonymousConfig) -> str:
    """What this server keeps of a test, as the anonymous store keeps it (one row of
    browser_results: received_at, client, body; storage/sql/anonymous.py)."""
    if not record:
        return ("<p>Nothing. This measurement server keeps no results: the figures stay in "
                "this page and are gone when you close it.</p>")
    return (
        "<p>When the test ends, this page sends its result to this server, which stores "
        "it apart from the operator's probe measurements (it never counts in their "
        "compliance). Stored with each result:</p><ul>"
        "<li>the time the server received it;</li>"
        "<li>your IP address as this server saw it (behind a NAT, a VPN or a proxy, "
        "theirs);</li>"
        "<li>your browser's user-agent string (browser, version, operating system);</li>"
        "<li>the figures: the 9 ping round trips and their lowest, mean and jitter, the "
        "download and upload speeds and the bytes each moved, and the test's settings;"
        "</li><li>a random key that makes the result's link.</li></ul>"
        "<p>Nothing else: no cookie, no name, no location or provider lookup. "
        f"{escape(retention(anonymous))} The server's analysts can read stored results, "
        "address included, and may count them, apart from the probes', as customer tests "
        "in a report. The result's link shows its figures and time to whoever has it, "
        "never the address or the browser. Like any web server, this one may also log "
        "requests (address, time, path) in its service log, which is not kept with the "
        "results.</p>")


def page(record: bool = True, anonymous: AnonymousConfig | None = None) -> str:
    """The test page; ``record=False`` on a measurement-only server (no database): the
    page measures and shows the result, and says it was not recorded."""
    quota = anonymous or AnonymousConfig()
    d = _DEFAULTS
    total = round(2 * (d["warmup"] + d["window"]) + 1)
    return _fill(_static("speedtest.html").decode(), {
        **_common(), "record": "on" if record else "off",
        "privacy": privacy(record, quota), "seconds": str(total),
        "streams": str(d["streams"]), "warmup": str(d["warmup"]),
        "window": str(d["window"])})


def share_link(received: datetime, key: str) -> str:
    """The link name of a result received at ``received`` with random key ``key``."""
    micros = (received - _EPOCH) // timedelta(microseconds=1)
    return f"{micros:014x}{key}"


def new_key() -> str:
    return secrets.token_urlsafe(16)


def parse_link(link: str) -> tuple[str, str] | None:
    """(received_at as stored, key) of a link name, or None if it is not one."""
    match = _LINK.fullmatch(link)
    if match is None:
        return None
    try:
        received = _EPOCH + timedelta(microseconds=int(match.group(1), 16))
    except OverflowError:
        return None
    return format_utc(received), match.group(2)


def _number(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(
        value, bool) else None


def _mbit(bps: float | None) -> str:
    return "—" if bps is None else f"{bps / 1e6:.2f}"


def _ms(ms: float | None) -> str:
    return "—" if ms is None else f"{ms:.2f}"


def _moved(n: float | None) -> str:
    return "" if n is None else f"{n / 1e6:.1f} MB moved"


def _method(row: dict[str, Any]) -> str:
    method = row.get("method")
    if not isinstance(method, dict):
        return "—"
    parts = []
    if isinstance(method.get("streams"), int | float):
        parts.append(f"{method['streams']:g} parallel streams")
    if isinstance(method.get("warmup_s"), int | float):
        parts.append(f"{method['warmup_s']:g} s warm-up")
    if isinstance(method.get("window_s"), int | float):
        parts.append(f"{method['window_s']:g} s measured")
    if method.get("upload_counted_at") == "server":
        parts.append("upload counted by the server")
    return ", ".join(parts) or "—"


def result_page(row: dict[str, Any], anonymous: AnonymousConfig | None = None) -> str:
    """A stored browser result as its link shows it: the figures, the method and the
    time; never the client's address or user agent (stored, not shown)."""
    received = str(row["received_at"])
    rtts = row.get("rtts_ms") if isinstance(row.get("rtts_ms"), list) else []
    return _fill(_static("result.html").decode(), {
        **_common(), "iso": escape(received), "utc": escape(
            received[:10] + " " + received[11:19] + " UTC"),
        "ping": _ms(_number(row, "rtt_min_ms")), "ping_mean": _ms(_number(row, "rtt_mean_ms")),
        "jitter": _ms(_number(row, "jitter_ms")), "ping_count": str(len(rtts or [])),
        "download": _mbit(_number(row, "download_bps")),
        "upload": _mbit(_number(row, "upload_bps")),
        "download_bytes": _moved(_number(row, "download_bytes")),
        "upload_bytes": _moved(_number(row, "upload_bytes")),
        "method": escape(_method(row)),
        "retention": escape(retention(anonymous or AnonymousConfig()))})


def missing_page(anonymous: AnonymousConfig | None = None) -> str:
    """What a link to no stored result opens (a 404)."""
    return _fill(_static("missing.html").decode(), {
        **_common(), "retention": escape(retention(anonymous or AnonymousConfig()))})
