"""Regulatory targets loaded from TOML (``configs/targets/*.toml``), validated, frozen.

The tables in ``configs/targets/`` ship inside the package (agent/share.py): a config
names one by file path, or a shipped one by name (``bt-italia-2013``), or none ("") for
the default table.

A targets file holds a whole table (e.g. Allegato 2 of an operator's service charter):
indicators a probe can measure carry an ``id`` the evaluator knows; the others
(activation time, repair time, call-centre answer time...) are kept with
``measurable = false`` so reports can show the whole table.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent import share
from agent.config import decode_table, read_toml
from agent.errors import ConfigError as AgentConfigError
from collector.errors import ConfigError

Comparison = Literal[">=", "<="]

# Indicator ids the evaluator computes, with the comparison they need.
MEASURABLE: dict[str, Comparison] = {
    "download_p95_kbps": ">=",
    "download_p5_kbps": ">=",
    "upload_p95_kbps": ">=",
    "upload_p5_kbps": ">=",
    "download_failure_ratio": "<=",
    "upload_failure_ratio": "<=",
    "delay_mean_ms": "<=",
    "delay_stdev_ms": "<=",
    "loss_ratio": "<=",
    # Delibera 156/23/CONS publishes jitter beside delay and loss: a table may give it a
    # target; without one it is reported as information (evaluate.py).
    "jitter_mean_ms": "<=",
}


@dataclass(frozen=True, slots=True)
class Indicator:
    id: str
    name: str
    measurable: bool
    comparison: Comparison
    target: float
    unit: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class Options:
    # How a one-way delay is derived from ICMP echo: "rtt_half" (RTT / 2, symmetric path)
    # or "rtt" (the round trip itself, as Ne.Me.Sys stores it; stricter).
    delay_basis: Literal["rtt_half", "rtt"] = "rtt_half"
    # "plain": lost / sent (the seed's Allegato 2 definition); "pair": 1 - sqrt(1 - R),
    # the per-packet reading of 244/08/CSP Allegato 4.
    loss_formula: Literal["plain", "pair"] = "plain"
    # Percentile definition: Hyndman-Fan type 7 ("linear") or type 1 ("nearest_rank").
    percentile_method: Literal["linear", "nearest_rank"] = "linear"


@dataclass(frozen=True, slots=True)
class Targets:
    name: str
    source: str
    year: int
    regulation: tuple[str, ...]
    indicator: tuple[Indicator, ...]
    options: Options = field(default_factory=Options)

    @property
    def measurable(self) -> tuple[Indicator, ...]:
        return tuple(i for i in self.indicator if i.measurable)


def load(path: str | Path) -> Targets:
    """A table from a file path, a shipped table's name, or "" for the default table."""
    text = str(path)
    if not text or ("/" not in text and not text.endswith(".toml")):
        return _load_shipped(text)
    try:
        data = read_toml(Path(path))
    except AgentConfigError as exc:
        raise ConfigError(f"targets: {exc}") from None
    return parse(data, text)


def _load_shipped(name: str) -> Targets:
    try:
        text = share.read(name or share.DEFAULT_TARGETS_NAME)
    except LookupError:
        raise ConfigError(f"targets: {name!r} is neither a file path nor a shipped table "
                          f"({', '.join(share.targets_tables())})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # a damaged installation
        raise ConfigError(f"targets: shipped {name!r}: invalid TOML: {exc}") from None
    return parse(data, f"<shipped {name or share.DEFAULT_TARGETS_NAME}>")


def parse(data: dict[str, Any], source: str = "<targets>") -> Targets:
    targets = decode_table(Targets, data, source, ConfigError)
    seen: set[str] = set()
    for n, ind in enumerate(targets.indicator):
        where = f"{source}: indicator[{n}] ({ind.id})"
        if ind.id in seen:
            raise ConfigError(f"{where}: duplicate id")
        seen.add(ind.id)
        if ind.measurable:
            if ind.id not in MEASURABLE:
                raise ConfigError(
                    f"{where}: measurable indicator id must be one of "
                    f"{', '.join(MEASURABLE)}"
                )
            if ind.comparison != MEASURABLE[ind.id]:
                raise ConfigError(
                    f"{where}: comparison must be {MEASURABLE[ind.id]!r} for this indicator"
                )
        if ind.target < 0:
            raise ConfigError(f"{where}: target must be >= 0")
    return targets
