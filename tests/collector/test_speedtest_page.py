"""The browser speed test (/speedtest): its own static files (in the wheel, under a CSP that
allows nothing else), a privacy note that states what the store keeps, a result link that
does not name the row, and, in headless Chromium against a real collector, a live figure
that moves during each phase and a link that opens the same figures."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from collector.config import AnonymousConfig, CollectorConfig
from collector.measurement import page
from collector.server.testing import RunningCollector, running_collector
from collector.storage.store import Store
from tests.httpclient import request

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "collector" / "measurement" / "static"
CONFIG = replace(CollectorConfig(),
                 server=replace(CollectorConfig().server, query_auth=False),
                 anonymous=replace(AnonymousConfig(), retention_days=30, max_rows=500))
RESULT = {"rtt_min_ms": 0.412, "rtt_mean_ms": 0.5, "jitter_ms": 0.1, "rtts_ms": [0.45] * 9,
          "download_bps": 93_414_000.0, "upload_bps": 20_500_000, "download_bytes": 10**8,
          "upload_bytes": 3 * 10**7, "user_agent": "Mozilla/5.0 (X11; Linux) TestBrowser/1",
          "method": {"streams": 4, "warmup_s": 2, "window_s": 8, "ping_count": 9,
                     "upload_counted_at": "server"}}


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[RunningCollector]:
    with running_collector(tmp_path, CONFIG) as running:
        yield running


def _stored(collector: RunningCollector) -> list[dict[str, Any]]:
    with closing(collector.open_store()) as store:
        return store.browser_results()


def _get(url: str) -> tuple[int, str, dict[str, str]]:
    status, body, headers = request("GET", url, raw=True)
    return status, body.decode(), headers


def _post(collector: RunningCollector, doc: dict[str, Any]) -> tuple[int, Any]:
    status, body, _ = request("POST", collector.url + "/api/v1/browser-results",
                              json.dumps(doc).encode(), {"Content-Type": "application/json"})
    return status, body


def test_page_uses_only_its_own_files_under_a_strict_csp(collector: RunningCollector) -> None:
    """The page links a style sheet and a script of its own (nothing inline, no other
    host), served with a CSP that allows nothing else; each is served with its type."""
    status, html, headers = _get(collector.url + "/speedtest")
    assert status == 200
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp
    assert "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert "<style" not in html and "style=" not in html
    assert re.findall(r"<script[^>]*>(.*?)</script>", html, re.S) == [""]  # src only
    assert "http://" not in html and "https://" not in html and "//" not in re.sub(
        r"<!--.*?-->", "", html)
    linked = re.findall(r'(?:href|src)="(speedtest/[^"]+)"', html)
    assert sorted(p.rsplit(".", 1)[1] for p in linked) == ["css", "js"]
    for path in linked:
        status, body, headers = _get(f"{collector.url}/{path}")
        assert status == 200 and "immutable" in headers["cache-control"]
        assert headers["content-type"].startswith(
            "text/css" if path.endswith(".css") else "text/javascript")
        assert body.encode() == (STATIC / ("speedtest." + path.rsplit(".", 1)[1])).read_bytes()
    assert _get(collector.url + "/speedtest/speedtest.000000000000.js")[0] == 404


def test_privacy_note_states_what_the_store_keeps(collector: RunningCollector,
                                                  tmp_path: Path) -> None:
    """The note names every column the anonymous store writes (time, address, body: user
    agent, figures, settings, the link's key) and the configured retention; the store's
    table has no other column (a new one must be added to the note)."""
    _, html, _ = _get(collector.url + "/speedtest")
    note = html[html.index('id="privacy"'):]
    for said in ("the time the server received it", "your IP address",
                 "user-agent string", "9 ping round trips", "download and upload speeds",
                 "the test's settings", "random key",
                 "deleted 30 days after", "more than 500 browser results",
                 "never the address or the browser", "no cookie"):
        assert said in note, said
    assert _post(collector, RESULT)[0] == 201
    with closing(sqlite3.connect(tmp_path / "collector.sqlite3")) as db:
        columns = [r[1] for r in db.execute("PRAGMA table_info(browser_results)")]
        (body,) = db.execute("SELECT body FROM browser_results").fetchone()
    assert columns == ["id", "received_at", "client", "body"]
    assert set(json.loads(body)) == {*RESULT, page.SHARE_KEY}


def test_a_measurement_only_page_says_nothing_is_kept() -> None:
    """Without a store the page does not post, and says it keeps nothing."""
    html = page.page(record=False)
    assert 'data-record="off"' in html and "keeps no results" in html
    assert "IP address" not in html


def test_result_link_opens_the_figures_not_the_row_or_the_address(
        collector: RunningCollector) -> None:
    """A saved result answers with a link that is not its row number; the link's page
    shows its figures (Mbit/s, ms, two decimals), method and time, never the client's
    address or user agent; two results have unrelated links."""
    status, saved = _post(collector, RESULT)
    assert status == 201
    link = saved["link"]
    assert saved["url"] == f"speedtest/result/{link}" and len(link) == 36
    # The key is 128 random bits, not the row number in any spelling (a digit of the id
    # may well occur in it by chance: "not in" would be a coin toss).
    assert not re.fullmatch(rf"0*{saved['id']}", link[14:]) and len(link[14:]) >= 22
    status, html, headers = _get(f"{collector.url}/{saved['url']}")
    assert status == 200 and headers["x-robots-tag"] == "noindex"
    assert headers["referrer-policy"] == "no-referrer"
    assert "content-security-policy" in headers
    for shown in ('id="download">93.41<', 'id="upload">20.50<', 'id="ping">0.41<',
                  'id="jitter">0.10<', "over 9 round trips", "4 parallel streams",
                  "2 s warm-up", "8 s measured", "deleted 30 days after"):
        assert shown in html, shown
    received = _stored(collector)[0]["received_at"]
    assert f'datetime="{received}"' in html and received[11:19] + " UTC" in html
    assert "127.0.0.1" not in html and "TestBrowser" not in html
    # The page's own files, from one level down.
    assert re.search(r'href="\.\./speedtest\.[0-9a-f]{12}\.css"', html)
    other = _post(collector, RESULT)[1]["link"]
    assert other[14:] != link[14:]


@pytest.mark.parametrize("change", ["key", "time", "short", "junk"])
def test_a_wrong_link_is_a_404_page(collector: RunningCollector, change: str) -> None:
    """A link with one character of its key or time changed, cut short or not a link at
    all: an HTML 404 (no such result), never another result."""
    link: str = _post(collector, RESULT)[1]["link"]

    def flipped(i: int) -> str:
        # Another valid character: the last microsecond digit (hex), or a key character.
        c = link[i]
        other = f"{int(c, 16) ^ 1:x}" if i < 14 else ("B" if c == "A" else "A")
        return link[:i] + other + link[i + 1:]

    wrong = {"key": flipped(20), "time": flipped(13), "short": link[:-1],
             "junk": "../../etc/passwd"}[change]
    status, html, headers = _get(f"{collector.url}/speedtest/result/{wrong}")
    assert status == 404
    if change != "junk":  # a path with slashes matches no route: the plain JSON 404
        assert headers["content-type"].startswith("text/html")
        assert "No such result" in html and "deleted 30 days after" in html


def test_a_client_cannot_choose_its_link_key(collector: RunningCollector) -> None:
    """The key is the server's: a result that sends one is refused."""
    status, body = _post(collector, {**RESULT, page.SHARE_KEY: "A" * 22})
    assert (status, body["field"]) == (422, page.SHARE_KEY)


def test_link_names_round_trip() -> None:
    """A link encodes its receipt time (to the microsecond, as stored) and its key."""
    from datetime import UTC, datetime

    from agent.schema import format_utc

    moment = datetime(2026, 12, 7, 14, 17, 7, 123456, tzinfo=UTC)
    key = page.new_key()
    assert page.parse_link(page.share_link(moment, key)) == (format_utc(moment), key)
    assert page.parse_link("f" * 14 + key) is not None  # far future: parsed, not found
    assert page.parse_link("z" * 36) is None and page.parse_link("") is None


def test_the_store_finds_a_result_by_its_link_on_each_backend(store: Store) -> None:
    """SQLite and PostgreSQL: the row received at the link's time with the link's key;
    the same time with another key, or another time, finds nothing; two results in one
    microsecond are told apart by their keys."""
    at = "2026-12-07T14:17:07.123456Z"
    keys = [page.new_key(), page.new_key()]
    for i, key in enumerate(keys):
        store.add_browser_result(at, f"203.0.113.{i}", json.dumps(
            {**RESULT, "download_bps": i, page.SHARE_KEY: key}))
    for i, key in enumerate(keys):
        row = store.browser_result(at, key, page.SHARE_KEY)
        assert row is not None and row["download_bps"] == i and row["received_at"] == at
    assert store.browser_result(at, page.new_key(), page.SHARE_KEY) is None
    assert store.browser_result("2026-12-07T14:17:07.123457Z", keys[0],
                                page.SHARE_KEY) is None


def test_package_data_ships_every_static_file() -> None:
    """pyproject's package data covers every file of the page's static/ folder, and the
    package finds them through importlib.resources (as an installed wheel does)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["collector.measurement"]
    files = sorted(p.name for p in STATIC.iterdir() if p.is_file())
    assert {"speedtest.html", "result.html", "missing.html", "speedtest.css",
            "speedtest.js"} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(f"static/{name}", glob) for glob in data), name
        assert page._static(name) == (STATIC / name).read_bytes()


@pytest.mark.slow
def test_the_wheel_carries_the_static_files(tmp_path: Path) -> None:
    """Built from a copy of the tracked tree (no shared build/ folder), the wheel holds
    the page's static files."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    tree = tmp_path / "src"
    wanted = [f for f in tracked if f.split("/")[0] in (
        "agent", "collector", "configs", "systemd")] + ["pyproject.toml", "README.md"]
    wanted += [str(p.relative_to(ROOT)) for p in STATIC.iterdir()]  # untracked until added
    for rel in set(wanted):
        if (ROOT / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tree / rel)
    for extra in ("LICENSE", "NOTICE"):
        if (ROOT / extra).is_file():
            shutil.copy2(ROOT / extra, tree / extra)
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                           "--outdir", str(tmp_path / "dist"), str(tree)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("bbprobe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for p in STATIC.iterdir():
        assert f"collector/measurement/static/{p.name}" in names, p.name


# ---- headless Chromium, driven over the DevTools protocol --------------------------------

class DevTools:
    """One page of a headless Chromium, over its DevTools WebSocket (aiohttp's client):
    navigate, evaluate, and the console messages seen (CSP refusals land there)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.console: list[str] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        ident = self.next_id
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=30)
            if msg.get("id") == ident:
                assert "error" not in msg, msg
                result: dict[str, Any] = msg["result"]
                return result
            if msg.get("method") == "Log.entryAdded":
                self.console.append(msg["params"]["entry"]["text"])
            elif msg.get("method") == "Runtime.consoleAPICalled":
                self.console.append(str(msg["params"]["args"]))

    async def value(self, expression: str) -> Any:
        reply = await self.call("Runtime.evaluate", expression=expression,
                                returnByValue=True)
        assert "exceptionDetails" not in reply, reply
        return reply["result"].get("value")


async def _page_of(port: int) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                url: str = pages[0]["webSocketDebuggerUrl"]
                return url
            await asyncio.sleep(0.1)
    raise AssertionError("Chromium shows no page")


STATE = """JSON.stringify({state: document.body.dataset.state,
  phase: document.getElementById("phase").textContent,
  live: document.getElementById("live").textContent,
  progress: document.getElementById("progress").value})"""
# Every change of the live figure, with the phase shown and the time (ms), whenever it
# happens (a loopback ping phase lasts a few milliseconds: polling would miss it).
WATCH = """window.__live = [];
document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live"), phase = document.getElementById("phase");
  if (!live) return;
  new MutationObserver(() => window.__live.push(
      [phase.textContent, live.textContent, performance.now()]))
    .observe(live, {childList: true, characterData: true, subtree: true});
});"""
FIGURES = """JSON.stringify(["ping", "jitter", "download", "upload"].map(
  (id) => document.getElementById(id).textContent))"""


async def _drive(port: int, url: str) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(
            await _page_of(port), max_msg_size=0) as ws:
        tools = DevTools(ws)
        await tools.call("Log.enable")
        await tools.call("Runtime.enable")
        await tools.call("Page.enable")
        await tools.call("Page.addScriptToEvaluateOnNewDocument", source=WATCH)
        await tools.call("Page.navigate", url=url)
        progress: dict[str, set[float]] = {"Download": set(), "Upload": set()}
        state: dict[str, Any] = {}
        deadline = asyncio.get_running_loop().time() + 90
        while asyncio.get_running_loop().time() < deadline:
            raw = await tools.value(
                "document.getElementById('phase') ? " + STATE + " : null")
            if raw is not None:
                state = json.loads(raw)
                phase = state["phase"].split(" ")[0]
                if phase in progress:
                    progress[phase].add(state["progress"])
                if state["state"] in ("done", "failed"):
                    break
            await asyncio.sleep(0.05)
        status = await tools.value("document.getElementById('status').textContent")
        assert state.get("state") == "done", (state, status, tools.console)
        seen: dict[str, list[tuple[str, float]]] = {}
        for phase, text, at in await tools.value("window.__live"):
            seen.setdefault(phase.split(" ")[0], []).append((text, at))
        figures = json.loads(await tools.value(FIGURES))
        link = await tools.value("document.getElementById('share-link').href")
        shown = await tools.value("document.getElementById('share-url').value")
        await tools.call("Page.navigate", url=link)
        for _ in range(200):
            ready = await tools.value("document.readyState === 'complete' && "
                                      "document.body.dataset.page")
            if ready == "result" and "your time" in (await tools.value(
                    "document.getElementById('when').textContent") or ""):
                break
            await asyncio.sleep(0.05)
        again = json.loads(await tools.value(FIGURES))
        when = await tools.value("document.getElementById('when').textContent")
        styled = await tools.value(
            "getComputedStyle(document.querySelector('.figure')).borderTopStyle")
        return {"seen": seen, "progress": progress, "figures": figures, "link": link,
                "shown": shown, "again": again, "when": when, "styled": styled,
                "console": tools.console}


@pytest.mark.slow
def test_in_chromium_live_figures_move_and_the_link_shows_the_same_result(
        collector: RunningCollector, tmp_path: Path) -> None:
    """Headless Chromium runs a short test against the collector on 127.0.0.1: the live
    figure changes several times during download and upload (and shows each ping), the
    progress bar advances, the style sheet applies, nothing is refused by the CSP; the
    result is saved, and its link opens a page with the same figures and the time in
    UTC and the reader's own."""
    from tests.browser import chromium

    profile = tmp_path / "profile"
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
            "--remote-debugging-port=0", "about:blank"]
    browser = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HOME": str(tmp_path)})
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.is_file() and port_file.read_text().strip():
                break
            assert browser.poll() is None, "Chromium exited"
            asyncio.run(asyncio.sleep(0.1))
        port = int(port_file.read_text().split()[0])
        url = collector.url + "/speedtest?autostart=1&warmup_s=0.5&window_s=2&streams=2"
        got = asyncio.run(_drive(port, url))
    finally:
        browser.terminate()
        browser.wait(30)
    seen = got["seen"]
    assert len({text for text, _ in seen["Ping"]} - {"—"}) >= 3, seen
    for phase in ("Download", "Upload"):
        figures = [(text, at) for text, at in seen[phase] if text != "—"]
        assert len({text for text, _ in figures}) >= 5, seen
        # Several times a second: over the 2.5 s phase, at least 3 a second.
        span_s = (figures[-1][1] - figures[0][1]) / 1000
        assert span_s > 1.5 and len(figures) / span_s >= 3, (phase, figures)
    assert len(got["progress"]["Download"]) >= 3 and len(got["progress"]["Upload"]) >= 3
    assert not [m for m in got["console"] if "Content Security Policy" in m], got["console"]
    assert got["styled"] == "solid"  # the style sheet loaded and applied
    ping, jitter, download, upload = got["figures"]
    assert float(download) > 1 and float(upload) > 1  # loopback: fast
    assert float(ping) >= 0 and float(jitter) >= 0
    assert got["shown"] == got["link"] and "/speedtest/result/" in got["link"]
    assert got["again"] == got["figures"]
    assert "UTC" in got["when"] and "your time" in got["when"]
    (row,) = _stored(collector)
    assert row["client"] == "127.0.0.1" and "Chrome" in row["user_agent"]
    assert f"{row['download_bps'] / 1e6:.2f}" == download
