"""A Debian 12 machine with systemd as PID 1, booted with systemd-nspawn, for tests of the
package and its units (shared/reference/systemd-in-ci.md has the flags and the pitfalls).

The root filesystem is made once by debootstrap from the Debian mirror apt already uses,
and cached in ``/var/cache/bbprobe-tests`` under a key of its package list and the ISO
week (so a week-old root is remade with that week's security updates). Every boot runs
with ``--volatile=overlay``: writes go to a tmpfs layer and the cache stays clean.
``--private-network``: inside there is only loopback, the only place its traffic goes.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

CACHE = Path("/var/cache/bbprobe-tests")
SUITE = "bookworm"
# What the package depends on comes in here: the machine has no network for apt.
PACKAGES = "systemd,systemd-sysv,dbus,python3,iproute2,procps"


class NspawnError(Exception):
    pass


def mirror() -> str:
    """The Debian mirror that apt's own sources name (no other host is reachable)."""
    sources = [*Path("/etc/apt/sources.list.d").glob("*.sources"),
               *Path("/etc/apt/sources.list.d").glob("*.list"), Path("/etc/apt/sources.list")]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for match in re.finditer(r"(?:URIs:\s*|^deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text, re.M):
            url = match.group(1)
            if "security" not in url and url.startswith(("http://", "https://")):
                return url
    raise NspawnError("no Debian mirror found in /etc/apt/sources.list(.d)")


def rootfs() -> Path:
    """The cached Debian root, made with debootstrap when missing (about 70 s)."""
    week = datetime.now(UTC).strftime("%G-W%V")
    key = hashlib.sha256(f"{SUITE} {PACKAGES} {week}".encode()).hexdigest()[:12]
    root = CACHE / f"rootfs-{SUITE}-{key}"
    if (root / ".complete").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.glob(f"rootfs-{SUITE}-*"):
        shutil.rmtree(old, ignore_errors=True)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    done = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(partial),
         mirror()], capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise NspawnError(f"debootstrap failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")
    subprocess.run(["chroot", str(partial), "apt-get", "clean"], check=False, timeout=120,
                   capture_output=True)
    (partial / ".complete").touch()
    partial.rename(root)
    return root


@dataclass
class Machine:
    name: str
    process: subprocess.Popen[bytes]
    pid1: int
    log: Path

    def run(self, command: str, timeout: float = 120, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """``command`` through /bin/sh inside the machine, as root."""
        # A clean environment: nothing of the host's (CI's variables, PATH) leaks in.
        done = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "/usr/bin/env", "-i",
                               "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8",
                               "/bin/sh", "-c", command],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise NspawnError(f"inside {self.name}: {command!r} exited {done.returncode}:\n"
                              f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return done

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run(f"journalctl -u {unit} --no-pager -o cat", check=False).stdout


def _pid1(nspawn_pid: int, deadline: float) -> int:
    """The container's init: the nspawn child whose NSpid ends in 1."""
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split() \
                if Path(f"/proc/{nspawn_pid}").exists() else ():
            try:
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            nspid = re.search(r"^NSpid:\s*(.*)$", status, re.M)
            if nspid and nspid.group(1).split()[-1] == "1":
                return int(child)
        time.sleep(0.1)
    raise NspawnError("the container's PID 1 did not appear")


@contextmanager
def boot(root: Path, binds: dict[str, str], log_dir: Path) -> Iterator[Machine]:
    """Boot ``root`` (read-only binds SRC -> DST) and yield the running machine; power it
    off and clean up however the test ends."""
    name = f"bbp-{uuid.uuid4().hex[:8]}"
    log = log_dir / f"{name}.log"
    args = ["systemd-nspawn", "-D", str(root), "-b", f"--machine={name}", "--register=no",
            "--keep-unit", "--console=passive", "--private-network", "--volatile=overlay",
            *[f"--bind-ro={src}:{dst}" for src, dst in binds.items()]]
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    machine: Machine | None = None
    try:
        deadline = time.monotonic() + 60
        pid1 = _pid1(process.pid, deadline)
        machine = Machine(name, process, pid1, log)
        while time.monotonic() < deadline:
            if machine.run("test -S /run/systemd/private", check=False).returncode == 0:
                break
            if process.poll() is not None:
                raise NspawnError(f"systemd-nspawn exited: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        state = machine.run("systemctl is-system-running --wait", timeout=90,
                            check=False).stdout.strip()
        if state not in ("running", "degraded"):
            raise NspawnError(f"the machine did not boot: {state}")
        yield machine
    finally:
        if machine is not None:
            with suppress(subprocess.TimeoutExpired, OSError):
                machine.run("systemctl poweroff", timeout=30, check=False)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        for hierarchy in ("systemd", "unified"):
            leftover = Path(f"/sys/fs/cgroup/{hierarchy}/payload/init.scope")
            if leftover.is_dir():
                with suppress(OSError):
                    leftover.rmdir()
