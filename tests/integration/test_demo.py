"""The README's main command, ``make demo`` (scripts/demo.sh), run as a newcomer runs it:
twice on one machine, each run ending with a filled report about one demo line."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _demo(var: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VAR": str(var), "BIN": str(Path(sys.executable).parent)}
    return subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, text=True,
                          capture_output=True, timeout=300, check=False)


@pytest.mark.slow
def test_repeated_demos_add_up_to_one_line(tmp_path: Path) -> None:
    """Two demos: one probe (its token kept beside the database, 0600, and reused), so the
    second report covers both sessions of the same line; each ends with a report (text
    and HTML), and the agent's state stays under the demo's folder."""
    var = tmp_path / "demo"
    first = _demo(var)
    assert first.returncode == 0, first.stderr[-2000:]
    second = _demo(var)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Scope:    probe demo-probe; from the first result to now; 1 session(s)" \
        in first.stdout
    assert "Scope:    probe demo-probe; from the first result to now; 2 session(s)" \
        in second.stdout, second.stdout[-3000:]
    token = var / "demo-probe.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "bbprobe-collector"), "--db",
         str(var / "collector.sqlite3"), "probe", "list"],
        text=True, capture_output=True, check=True).stdout
    assert re.findall(r"^demo-probe\S*", listed, re.M) == ["demo-probe"]
    assert "Download, banda massima (p95)" in second.stdout
    assert (var / "report.html").stat().st_size > 0
    assert (var / "agent-state").is_dir()
