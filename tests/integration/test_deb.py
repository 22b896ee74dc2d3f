"""The Debian package under a real systemd: a clean Debian 12 booted with
systemd-nspawn (systemd is PID 1), the freshly built .deb installed, a collector and a
probe started from their units exactly as docs/operator.md tells an operator, then reload,
stop, hardening scores, an upgrade that keeps every stored and spooled result, remove
and purge. Root only; under CI=true it must run (tests/conftest.py refuses to skip)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import nspawn
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
COLLECTOR = "bbprobe-collector --config /etc/bbprobe/collector.toml"
AGENT = "bbprobe --config /etc/bbprobe/agent.toml"

pytestmark = [pytest.mark.privileged, pytest.mark.slow]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, debootstrap)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "dpkg-buildpackage", "dpkg-deb"):
        if shutil.which(tool) is None:
            return f"{tool} missing (make test installs systemd-container, debootstrap, " \
                   "debhelper)"
    return None


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    """The package as `make deb` builds it, then the same package with two higher versions
    (repacked with dpkg-deb: same files and maintainer scripts) to upgrade to."""
    if (why := _missing()) is not None:
        if IN_CI:
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)
    built = subprocess.run(["make", "-s", "deb"], cwd=ROOT, capture_output=True, text=True,
                           timeout=900, check=False)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    deb = Path(built.stdout.strip().splitlines()[-1].split()[0])
    assert deb.is_file() and re.fullmatch(r"bbprobe_[0-9][^_]*_[a-z0-9]+\.deb", deb.name)
    out = tmp_path_factory.mktemp("debs")
    shutil.copy(deb, out / deb.name)
    tree = out / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, timeout=120)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    version = re.search(r"^Version: (.+)$", text, re.M)
    assert version
    made = [out / deb.name]
    for n in (1, 2):
        newer = f"{version.group(1)}+upgrade{n}"
        control.write_text(text.replace(f"Version: {version.group(1)}", f"Version: {newer}"))
        made.append(out / deb.name.replace(version.group(1), newer))
        subprocess.run(["dpkg-deb", "-Zgzip", "-b", str(tree), str(made[-1])], check=True,
                       timeout=300, capture_output=True)
    shutil.rmtree(tree)
    yield made


def _wait(what: str, check: Callable[[], bool], timeout_s: float = 150.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def _stored_ids(m: nspawn.Machine) -> set[str]:
    out = m.run(f"{COLLECTOR} results --probe lab-probe --format csv").stdout
    return {row["result_id"] for row in csv.DictReader(io.StringIO(out))}


def _spooled_ids(m: nspawn.Machine) -> set[str]:
    out = m.run("ls /var/lib/bbprobe/spool/ 2>/dev/null || true").stdout.split()
    return {name.split("_", 1)[1].removesuffix(".json") for name in out
            if name.endswith(".json") and "_" in name}


def _restart_measuring(m: nspawn.Machine) -> None:
    """Restart the agent so that its --first-now session runs at once: on a fresh
    campaign. Restarted with its campaign, the daemon takes a session now only where the
    campaign could have put a slot (agent/schedule.py why_not_now): not in the quarter
    hour of the session it just ran, so a restart loop never stacks sessions."""
    m.run("timeout 60 systemctl stop bbprobe-agent", timeout=90)
    m.run("rm -f /var/lib/bbprobe/campaign.json")
    m.run("timeout 60 systemctl start bbprobe-agent", timeout=90)


def _exposure(m: nspawn.Machine, unit: str) -> float:
    out = m.run(f"systemd-analyze security {unit}", check=False).stdout
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert match, out[-800:]
    return float(match.group(1))


# The method a probe in this test measures with: a short session (about 10 s) on
# loopback; everything else as packaged. CPU use of a busy CI host says nothing here.
TEST_METHOD = """
[checks]
max_cpu_percent = 100.0
[ping]
count = 3
interval_s = 0.2
[download]
streams = 2
warmup_s = 0.5
window_s = 1.0
attempts = 1
[upload]
streams = 2
warmup_s = 0.5
window_s = 1.0
attempts = 1
"""


def test_package_under_systemd(debs: list[Path], tmp_path: Path) -> None:
    """The .deb on a booted Debian: installed units stay off, the agent refuses to start without
    its token credential, the collector and a measurement-only instance start as
    docs/operator.md says, the agent delivers, reloads (refusing a broken file), scores
    within the hardening limits, keeps its spool and the database across two upgrades,
    stops cleanly, and purge removes the data that remove keeps."""
    deb, upgrade1, upgrade2 = debs
    with nspawn.boot(nspawn.rootfs(), {str(deb.parent): "/mnt/debs"}, tmp_path) as m:
        # -- install: nothing starts, nothing is enabled, the conffiles are in place.
        m.run(f"dpkg -i /mnt/debs/{deb.name}", timeout=300)
        for unit in ("bbprobe-agent", "bbprobe-collector"):
            state = m.show(unit, "ActiveState", "UnitFileState")
            assert state == {"ActiveState": "inactive", "UnitFileState": "disabled"}, state
        conffiles = m.run("dpkg-query -W -f='${Conffiles}' bbprobe").stdout
        assert "/etc/bbprobe/agent.toml" in conffiles
        assert "/etc/bbprobe/collector.toml" in conffiles
        # Without a token the probe cannot start: systemd finds no credential to load
        # (exit status 243, EXIT_CREDENTIALS), before any of our code runs.
        m.run("timeout 60 systemctl start bbprobe-agent", check=False)
        refused = m.show("bbprobe-agent", "ActiveState", "ExecMainStatus")
        assert refused["ActiveState"] != "active", refused
        assert "Failed to set up credentials" in m.journal("bbprobe-agent") or \
            refused["ExecMainStatus"] == "243", refused
        m.run("systemctl stop bbprobe-agent && systemctl reset-failed bbprobe-agent",
              check=False)  # no automatic restart pending while we set it up

        # -- the collector host, as docs/operator.md says.
        m.run("systemctl enable --now bbprobe-collector", timeout=120)
        _wait("the collector to listen",
              lambda: m.run("python3 -c \"import urllib.request as u; "
                            "u.urlopen('http://127.0.0.1:8080/healthz', timeout=2)\"",
                            check=False).returncode == 0, 60)
        init = m.run(f"{COLLECTOR} init")
        assert re.fullmatch(r"bbp_\S+\n", init.stdout), init.stdout
        assert "next steps" in init.stderr
        token = m.run(f"{COLLECTOR} probe add lab-probe --operator Lab --offer Loopback "
                      "--technology FTTH").stdout.strip()
        assert token.startswith("bbp_")

        # -- a measurement server on the same host: the packaged instance
        # bbprobe-collector@measurement, no database, port 8081; the probe's tools
        # measure against it.
        m.run("systemctl enable --now bbprobe-collector@measurement", timeout=120)
        _wait("the measurement server to listen",
              lambda: m.run("python3 -c \"import urllib.request as u; "
                            "u.urlopen('http://127.0.0.1:8081/speedtest', timeout=2)\"",
                            check=False).returncode == 0, 60)
        assert "(measurement only: no database)" in m.journal(
            "bbprobe-collector@measurement")
        assert m.run("ls -A /var/lib/private/bbprobe-collector-measurement",
                     check=False).stdout.strip() == ""
        speed = m.run("bbprobe --server http://127.0.0.1:8081 --set checks.enabled=false "
                      + " ".join(f"--set {d}.{k}" for d in ("download", "upload")
                                 for k in ("warmup_s=0.5", "window_s=1.0", "attempts=1",
                                           "streams=2"))
                      + " speed --json --quiet", timeout=120)
        measured = json.loads(speed.stdout)
        assert measured["server"]["url"] == "http://127.0.0.1:8081"
        assert all(t["status"] == "ok" for t in measured["transfers"]), \
            [(t["direction"], t["failure_reason"], t["error"]) for t in measured["transfers"]]
        assert _exposure(m, "bbprobe-collector@measurement.service") <= 1.5

        # -- the probe: token (root's, 0600), collector URL, a short method; enable.
        m.run(f"umask 077 && printf '%s\\n' '{token}' > /etc/bbprobe/token")
        m.run("sed -i 's|^url = \"\"|url = \"http://127.0.0.1:8080\"|' /etc/bbprobe/agent.toml")
        m.run(f"cat >> /etc/bbprobe/agent.toml <<'EOF'\n{TEST_METHOD}\nEOF")
        # Measure once at start instead of at a random offset within the quarter hour.
        m.run("mkdir -p /etc/systemd/system/bbprobe-agent.service.d && printf '%s\\n' "
              "'[Service]' 'ExecStart=' "
              f"'ExecStart=/usr/bin/{AGENT} daemon --first-now' "
              "> /etc/systemd/system/bbprobe-agent.service.d/first-now.conf "
              "&& systemctl daemon-reload")
        m.run("timeout 120 systemctl enable --now bbprobe-agent", timeout=150)
        agent = m.show("bbprobe-agent", "ActiveState", "SubState", "Type", "MainPID")
        # Type=notify: "active (running)" is reached only once the daemon said READY=1.
        assert agent["Type"] == "notify"
        assert (agent["ActiveState"], agent["SubState"]) == ("active", "running"), agent
        _wait("the daemon's start line",
              lambda: "daemon running as probe lab-probe" in m.journal("bbprobe-agent"), 30)
        # The dynamic user read its token from the credential, not from /etc.
        assert "token: set, from credential 'token'" in m.journal("bbprobe-agent")
        _wait("the first session in the collector", lambda: len(_stored_ids(m)) >= 1)
        first = _stored_ids(m)

        # -- systemctl reload: SIGHUP, the configuration is read again, same process; a
        # broken file is refused and the old configuration kept.
        pid = agent["MainPID"]
        m.run("sed -i 's/^count = 3$/count = 4/' /etc/bbprobe/agent.toml")
        m.run("timeout 60 systemctl reload bbprobe-agent")
        _wait("the reload", lambda: "configuration reloaded" in m.journal("bbprobe-agent"), 30)
        m.run("echo 'nonsense_key = 1' >> /etc/bbprobe/agent.toml")
        m.run("timeout 60 systemctl reload bbprobe-agent")
        _wait("the refused reload", lambda: "reload refused, keeping the old configuration"
              in m.journal("bbprobe-agent"), 30)
        m.run("sed -i '/^nonsense_key/d' /etc/bbprobe/agent.toml")
        after = m.show("bbprobe-agent", "ActiveState", "MainPID")
        assert after == {"ActiveState": "active", "MainPID": pid}, after

        # -- hardening, scored by the systemd that runs the units.
        assert _exposure(m, "bbprobe-agent.service") <= 2.0
        assert _exposure(m, "bbprobe-collector.service") <= 1.5

        # -- a result waits in the spool while the collector is down...
        m.run("systemctl stop bbprobe-collector", timeout=60)
        _restart_measuring(m)
        _wait("a spooled result", lambda: len(_spooled_ids(m)) >= 1)
        spooled = _spooled_ids(m)
        assert not spooled & first
        agent_pid = m.show("bbprobe-agent", "MainPID")["MainPID"]

        # ...and through an upgrade: the running agent restarts on the new version, the
        # stopped collector stays stopped, the spool and the database are kept.
        out = m.run(f"dpkg -i /mnt/debs/{upgrade1.name}", timeout=300).stdout
        assert "restarting bbprobe-agent.service" in out
        assert "restarting bbprobe-collector@measurement.service" in out
        assert "restarting bbprobe-collector.service" not in out
        now = m.show("bbprobe-agent", "ActiveState", "MainPID")
        assert now["ActiveState"] == "active" and now["MainPID"] != agent_pid, now
        assert m.show("bbprobe-collector", "ActiveState")["ActiveState"] == "inactive"
        assert spooled <= _spooled_ids(m)
        m.run("systemctl start bbprobe-collector", timeout=60)
        assert first <= _stored_ids(m)
        # The next session delivers the backlog.
        _restart_measuring(m)
        _wait("the spooled results delivered after the upgrade",
              lambda: spooled <= _stored_ids(m))

        # -- an upgrade with both services running restarts both; nothing stored is lost.
        stored = _stored_ids(m)
        before = {u: m.show(u, "MainPID")["MainPID"]
                  for u in ("bbprobe-agent", "bbprobe-collector")}
        out = m.run(f"dpkg -i /mnt/debs/{upgrade2.name}", timeout=300).stdout
        for unit, old in before.items():
            assert f"restarting {unit}.service" in out
            now = m.show(unit, "ActiveState", "MainPID")
            assert now["ActiveState"] == "active" and now["MainPID"] != old, (unit, now)
        assert m.run("dpkg-query -W -f='${Version}' bbprobe").stdout.endswith("+upgrade2")
        assert stored <= _stored_ids(m)

        # -- systemctl stop: SIGTERM, a clean exit within TimeoutStopSec.
        invocation = m.show("bbprobe-agent", "InvocationID")["InvocationID"]
        m.run("timeout 60 systemctl stop bbprobe-agent", timeout=90)
        stopped = m.show("bbprobe-agent", "ActiveState", "Result")
        assert stopped == {"ActiveState": "inactive", "Result": "success"}, stopped
        last_run = m.run(f"journalctl _SYSTEMD_INVOCATION_ID={invocation} --no-pager -o cat",
                         check=False).stdout
        assert "daemon stopped; unacknowledged results stay in the spool" in last_run

        # -- remove keeps the data; purge deletes it.
        m.run("dpkg -r bbprobe", timeout=120)
        assert m.run("test -s /var/lib/private/bbprobe-collector/collector.sqlite3",
                     check=False).returncode == 0
        assert m.run("test -d /var/lib/private/bbprobe/spool", check=False).returncode == 0
        m.run("dpkg -P bbprobe", timeout=120)
        assert m.run("ls /var/lib/private/", check=False).stdout.split() == []
