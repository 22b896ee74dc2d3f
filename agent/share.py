"""Files every installation carries: targets tables, example configs, the Grafana
dashboard and the systemd units, read from the installed data package ``bbprobe_share``
(the repository's ``configs/`` and ``systemd/``, mapped in pyproject.toml).

Through importlib.resources, so they are found the same way from a wheel, a Debian
package, a zipapp or the source tree, whatever the working directory.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

PACKAGE = "bbprobe_share"

# The Allegato 2 table used when the config names none (compliance.targets = "").
DEFAULT_TARGETS_NAME = "bt-italia-2013"

# What `bbprobe files` and `bbprobe-collector files` print: name -> path inside the
# package (the targets tables are added by their names).
FILES = {
    "agent.example.toml": "agent.example.toml",
    "collector.example.toml": "collector.example.toml",
    # What the Debian package installs as /etc/bbprobe/{agent,collector}.toml.
    "agent.system.toml": "agent.system.toml",
    "collector.system.toml": "collector.system.toml",
    # ...and as /etc/bbprobe/collector-measurement.toml (bbprobe-collector@measurement).
    "collector.measurement.toml": "collector.measurement.toml",
    "grafana-dashboard.json": "grafana/bbprobe-dashboard.json",
    # Prometheus: an example scrape config and the alert rules.
    "prometheus.yml": "prometheus/prometheus.yml",
    "bbprobe-alerts.yml": "prometheus/bbprobe-alerts.yml",
    "bbprobe-agent.service": "systemd/bbprobe-agent.service",
    "bbprobe-collector.service": "systemd/bbprobe-collector.service",
    "bbprobe-collector@.service": "systemd/bbprobe-collector@.service",
}


def path(relative: str) -> Traversable:
    """A shipped file, by its path inside the data package (e.g. ``targets/x.toml``)."""
    parts = relative.split("/")
    # The units are a subpackage of their own (systemd/ in the repository is not inside
    # configs/), so it is opened by its own name.
    if parts[0] == "systemd":
        node, parts = resources.files(f"{PACKAGE}.systemd"), parts[1:]
    else:
        node = resources.files(PACKAGE)
    for part in parts:
        node = node / part
    return node


def targets_tables() -> list[str]:
    """Names of the shipped targets tables (file names without .toml)."""
    return sorted(t.name.removesuffix(".toml") for t in path("targets").iterdir()
                  if t.name.endswith(".toml"))


def names() -> list[str]:
    """Everything ``read`` knows: the FILES and the targets tables."""
    return [*FILES, *targets_tables()]


def read(name: str) -> str:
    """A shipped file's text by its name in ``names()``. LookupError, with a one-line
    message naming the choices, for an unknown name."""
    relative = FILES.get(name) or (f"targets/{name}.toml" if name in targets_tables() else "")
    if not relative:
        raise LookupError(f"no shipped file {name!r}; one of: {', '.join(names())}")
    return path(relative).read_text(encoding="utf-8")


def show(name: str | None) -> str:
    """What `files [NAME]` prints: the list of names, or that file (LookupError as
    ``read``)."""
    return "\n".join(names()) + "\n" if name is None else read(name)
