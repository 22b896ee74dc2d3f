"""Third-party clients run inside a lab's client namespace against a bbprobe collector in
its server namespace: M-Lab's ndt7-js under Node (tests/ndt7js), Debian's Chromium on the
/speedtest page, and bbprobe's own ndt7 client. Shared by the interoperability test and
the protocols benchmark; each returns what the client itself reported.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from collector.config import StorageConfig
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from tests.lab.netlab import REPO, Lab

AGENT = [sys.executable, "-m", "agent"]
HARNESS = REPO / "tests" / "ndt7js" / "run.js"


def ndt7js_problem() -> str | None:
    """Why the ndt7-js harness cannot run here, or None."""
    if shutil.which("node") is None:
        return "Node.js is not installed (make test installs Debian's nodejs when root)"
    if not (HARNESS.parent / "node_modules" / "@m-lab" / "ndt7").is_dir():
        return "@m-lab/ndt7 is not installed (make node-deps: npm ci in tests/ndt7js)"
    return None


def ndt7js_argv() -> list[str]:
    node = shutil.which("node")
    assert node is not None
    return [node, "--experimental-websocket", str(HARNESS)]


def chromium_problem() -> str | None:
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        return "Debian's chromium is not installed (make test installs it when root)"
    return None


def browser_argv(profile: Path, url: str) -> list[str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser is not None
    # Kept off every network but the lab's: no background services, no updates, no QUIC.
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
            "--remote-debugging-port=0", url]


def _db(lab: Lab) -> Path:
    return lab.workdir / f"{lab.server}.sqlite3"


def _store(lab: Lab) -> Store:
    """The lab collector's store (its SQLite file), opened as the CLI would."""
    return open_store(StorageConfig(path=str(_db(lab))))


def run_ndt7js(lab: Lab, url: str) -> dict[str, Any]:
    """The harness's JSON: code, errors, last client/server measurement per subtest."""
    host_port = url.split("://", 1)[1]
    out = lab.run(lab.client, [*ndt7js_argv(), host_port, "ws"], timeout=90, check=False)
    if not out.stdout.strip():
        raise RuntimeError(f"ndt7-js harness printed nothing: {out.stderr[-1000:]}")
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def ndt7js_rates(doc: dict[str, Any]) -> tuple[float | None, float | None]:
    """(download, upload) bit/s as M-Lab shows them: download = the client's
    MeanClientMbps; upload = the server's TCPInfo.BytesReceived / ElapsedTime."""
    down = up = None
    if doc.get("download"):
        down = doc["download"]["LastClientMeasurement"]["MeanClientMbps"] * 1e6
    if doc.get("upload") and doc["upload"].get("LastServerMeasurement"):
        info = doc["upload"]["LastServerMeasurement"].get("TCPInfo", {})
        if info.get("ElapsedTime"):
            up = 8 * info["BytesReceived"] / (info["ElapsedTime"] / 1e6)
    return down, up


def run_bbprobe_ndt7(lab: Lab, url: str) -> list[dict[str, Any]]:
    out = lab.run(lab.client, [*AGENT, "--server", url, "ndt7", "--json"], timeout=90,
                  check=False)
    subtests: list[dict[str, Any]] = json.loads(out.stdout)
    return subtests


def browser_results(lab: Lab) -> list[dict[str, Any]]:
    with closing(_store(lab)) as store:
        return store.browser_results()


def run_browser(lab: Lab, url: str, profile: Path, warmup_s: float, window_s: float,
                streams: int, timeout_s: float = 120) -> dict[str, Any] | None:
    """Chromium opens /speedtest with autostart; returns the result the page posted (the
    newest stored), or None if it posted none in time."""
    before = len(browser_results(lab))
    page = (f"{url}/speedtest?autostart=1&warmup_s={warmup_s:g}&window_s={window_s:g}"
            f"&streams={streams}")
    proc = lab.spawn(lab.client, browser_argv(profile, page))
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = browser_results(lab)
            if len(rows) > before:
                return rows[-1]
            time.sleep(0.5)
        return None
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)  # else the lab kills what is left when it closes


def stored_ndt7(lab: Lab) -> list[dict[str, Any]]:
    with closing(_store(lab)) as store:
        return store.ndt7_tests(measurements=True)
