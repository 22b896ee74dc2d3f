"""Headless Chromium for the tests that render a page (Debian's chromium; make test
installs it): required under CI=true, else skipped with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import IN_CI


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if IN_CI:
            pytest.fail("CI=true but Debian's chromium is not installed (make test installs it)")
        pytest.skip("needs Debian's chromium for the browser rendering test")
    return path


def render_in_chromium(url: str, tmp_path: Path) -> str:
    """Load ``url`` in headless Chromium and return the DOM after scripts ran. Flags keep
    it off the network (no background services, no component updates)."""
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--window-size=1400,2000", "--dump-dom", url]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
