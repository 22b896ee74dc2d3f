"""What an installation carries: every code package and data file is in the
wheel, and a non-editable install runs a collector, an agent round and a report from an
empty directory with no config file and no repository at hand."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.server.testing import stop
from tests.conftest import icmp_allowed

ROOT = Path(__file__).resolve().parents[1]


def test_every_code_package_is_listed() -> None:
    """pyproject lists its packages (the data package needs a mapping, so no find):
    each package of the tree must be in that list, or an install would lack it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("agent", "collector") for p in (ROOT / top).rglob("*.py")}
    assert found == {p for p in listed if not p.startswith("bbprobe_share")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                           "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (found,) = out.glob("bbprobe-*.whl")
    return found


def test_wheel_carries_what_a_running_system_needs(wheel: Path) -> None:
    """The wheel holds every shipped data file (targets, example and system configs, Grafana,
    Prometheus, systemd units), the py.typed markers and every tracked Python module."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("bbprobe_share/targets/bt-italia-2013.toml",
                    "bbprobe_share/agent.example.toml", "bbprobe_share/collector.example.toml",
                    "bbprobe_share/agent.system.toml", "bbprobe_share/collector.system.toml",
                    "bbprobe_share/grafana/bbprobe-dashboard.json",
                    "bbprobe_share/prometheus/prometheus.yml",
                    "bbprobe_share/prometheus/bbprobe-alerts.yml",
                    "bbprobe_share/systemd/bbprobe-agent.service",
                    "bbprobe_share/systemd/bbprobe-collector.service",
                    "agent/py.typed", "collector/py.typed"):
        assert shipped in names, shipped
    tracked = subprocess.run(["git", "ls-files", "agent", "collector"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert {f for f in tracked if f.endswith(".py")} <= names


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the wheel installed for real (not editable). Its dependencies
    come from this test environment's site-packages through a .pth path line, so no
    registry is asked; that directory's own .pth files (the editable install) are not
    run, so `agent` and `collector` can only come from the wheel."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                           "--no-deps", "--no-index", "--disable-pip-version-check",
                           "--root-user-action=ignore", str(wheel)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    yield venv


@pytest.mark.slow
def test_installed_wheel_runs_a_round_from_an_empty_directory(installed: Path,
                                                              tmp_path: Path) -> None:
    """No config, no repository: serve, register, measure, report."""
    empty = tmp_path / "empty"
    home = tmp_path / "home"
    empty.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XDG_", "BBPROBE_", "STATE_DIRECTORY", "CREDENTIALS_"))}
    env |= {"HOME": str(home), "PATH": f"{installed / 'bin'}:{env.get('PATH', '')}"}
    bin_ = installed / "bin"

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=empty, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    where = run(str(bin_ / "python"), "-c", "import agent, bbprobe_share; "
                "print(agent.__file__); print(bbprobe_share.__file__)")
    assert where.returncode == 0, where.stderr
    lines = where.stdout.split()
    assert len(lines) == 2 and all(line.startswith(str(installed)) for line in lines), lines
    addr = tmp_path / "addr"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(bin_ / "bbprobe-collector"), "serve", "--port", "0",
                                   "--addr-file", str(addr)], cwd=empty, env=env,
                                  stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while not addr.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert addr.exists(), log.read_text()
        url = addr.read_text().strip()
        added = run(str(bin_ / "bbprobe-collector"), "probe", "add", "wheel-probe",
                    "--download-min-kbps", "1000", "--upload-min-kbps", "500")
        assert added.returncode == 0, added.stderr
        token = added.stdout.strip()
        session = run(str(bin_ / "bbprobe"), "--collector", url, "--token", token,
                      "--set", "profile=quick", "--set", "ping.count=2",
                      "--set", "download.window_s=1.0", "--set", "upload.window_s=1.0",
                      "--set", "checks.max_cpu_percent=100", "run", "--quiet")
        # Without an ICMP socket the ping train is a failed test, recorded and delivered
        # (`bbprobe --help`: exit 6, no measurement; never a crash); with one, exit 0.
        if icmp_allowed():
            assert session.returncode == 0, session.stderr
        else:
            assert session.returncode == 6, session.stderr
            assert "bbprobe: no measurement: ping 127.0.0.1: " in session.stderr
            assert "Traceback" not in session.stderr
        report = run(str(bin_ / "bbprobe-collector"), "report", "--probe", "wheel-probe")
        assert report.returncode == 0, report.stderr
        assert "BT Italia" in report.stdout, report.stdout
        # One session: one speed sample, PASS, and the 95 % interval column says why
        # there is no interval (reports/text.py format_interval; [reports] min_samples).
        assert re.search(r"^Download, banda minima \(p5\) .* 1  PASS +"
                         r"not enough data \(n < 30\)$", report.stdout, re.M), report.stdout
    finally:
        stop(server)
    assert server.returncode == 0, log.read_text()
    assert list(empty.iterdir()) == []  # nothing written where it was run
    assert (home / ".local/share/bbprobe-collector/collector.sqlite3").is_file()
    assert (home / ".local/state/bbprobe").is_dir()


def test_installed_files_command(installed: Path, tmp_path: Path) -> None:
    """`bbprobe-collector files` prints the shipped tables, configs and units."""
    cli = str(installed / "bin" / "bbprobe-collector")
    listing = subprocess.run([cli, "files"], capture_output=True, text=True, cwd=tmp_path,
                             timeout=60, check=True).stdout.split()
    assert {"bt-italia-2013", "bbprobe-agent.service", "agent.example.toml"} <= set(listing)
    unit = subprocess.run([str(installed / "bin" / "bbprobe"), "files",
                           "bbprobe-agent.service"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60, check=True).stdout
    assert unit == (ROOT / "systemd" / "bbprobe-agent.service").read_text()
    assert re.search(r"^LoadCredential=token:/etc/bbprobe/token$", unit, re.M)


@pytest.mark.parametrize("cli", ["bbprobe", "bbprobe-collector"])
def test_unknown_shipped_file_is_named(installed: Path, tmp_path: Path, cli: str) -> None:
    """`files NAME` of an installed CLI with an unknown name exits 2 with one line listing the
    files it ships."""
    done = subprocess.run([str(installed / "bin" / cli), "files", "nope.toml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith(f"{cli}: no shipped file 'nope.toml'; one of: "
                                  "agent.example.toml, ")
    assert done.stderr.count("\n") == 1
