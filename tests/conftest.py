"""Shared fixtures: a real collector on 127.0.0.1:0 with SQLite in tmp_path, fast configs."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.testing import RunningCollector, running_collector

IN_CI = os.environ.get("CI", "").lower() == "true"


def icmp_allowed() -> bool:
    """Raw ICMP (root/CAP_NET_RAW) or unprivileged ICMP sockets are available."""
    for kind in (socket.SOCK_RAW, socket.SOCK_DGRAM):
        try:
            socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP).close()
            return True
        except PermissionError:
            continue
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Privileged tests must run in CI (root); elsewhere they skip, saying why."""
    if icmp_allowed():
        return
    for item in items:
        if "privileged" in item.keywords:
            if IN_CI:
                raise pytest.UsageError(
                    "CI=true requires root/CAP_NET_RAW for privileged tests; refusing to skip"
                )
            item.add_marker(pytest.mark.skip(
                reason="needs root, CAP_NET_RAW or net.ipv4.ping_group_range for ICMP"))


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[RunningCollector]:
    with running_collector(tmp_path / "collector") as running:
        yield running


FAST_AGENT = """
profile = "test-fast"
state_dir = "{state}"

[ping]
count = 5
interval_s = 0.02
timeout_s = 0.5

[download]
streams = 2
warmup_s = 0.2
window_s = 0.6
sample_interval_s = 0.05

[upload]
streams = 2
warmup_s = 0.2
window_s = 0.6
sample_interval_s = 0.05
"""


@pytest.fixture
def fast_config(tmp_path: Path) -> Path:
    """An agent config with short tests (about 3 s a session) and a private state dir."""
    path = tmp_path / "agent.toml"
    path.write_text(FAST_AGENT.format(state=tmp_path / "state"))
    return path
