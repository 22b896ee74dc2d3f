"""The shipped Allegato 2 table, and refusal of broken target files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from collector.compliance import targets
from collector.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_table_is_the_whole_allegato_2() -> None:
    """All 25 rows of the seed's table, the 9 probe-measurable ones with the seed's values."""
    table = targets.load("")
    assert table.year == 2013
    assert table.regulation == ("131/06/CSP", "244/08/CSP")
    assert len(table.indicator) == 25
    values = {i.id: (i.comparison, i.target, i.unit) for i in table.measurable}
    assert values == {
        "download_p95_kbps": (">=", 7000, "kbit/s"),
        "download_p5_kbps": (">=", 2200, "kbit/s"),
        "upload_p95_kbps": (">=", 256, "kbit/s"),
        "upload_p5_kbps": (">=", 150, "kbit/s"),
        "download_failure_ratio": ("<=", 0.005, "ratio"),
        "upload_failure_ratio": ("<=", 0.005, "ratio"),
        "delay_mean_ms": ("<=", 30, "ms"),
        "delay_stdev_ms": ("<=", 10, "ms"),
        "loss_ratio": ("<=", 0.004, "ratio"),
    }


def _table(**indicator: Any) -> dict[str, Any]:
    row = {"id": "loss_ratio", "name": "loss", "measurable": True, "comparison": "<=",
           "target": 0.004, "unit": "ratio", **indicator}
    return {"name": "t", "source": "s", "year": 2013, "regulation": [], "indicator": [row]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_table(id="speed_p50"), "t.toml: indicator[0] (speed_p50): measurable indicator id "
         "must be one of download_p95_kbps, download_p5_kbps, upload_p95_kbps, upload_p5_kbps, "
         "download_failure_ratio, upload_failure_ratio, delay_mean_ms, delay_stdev_ms, "
         "loss_ratio, jitter_mean_ms"),
        (_table(comparison=">="), "t.toml: indicator[0] (loss_ratio): comparison must be '<=' "
         "for this indicator"),
        (_table(comparison="=="), "t.toml: indicator[0].comparison: must be one of '>=', '<=', "
         "got '=='"),
        (_table(target=-1), "t.toml: indicator[0] (loss_ratio): target must be >= 0"),
        (_table(colour="red"), "t.toml: indicator[0].colour: unknown key"),
        ({**_table(), "options": {"delay_basis": "guess"}},
         "t.toml: options.delay_basis: must be one of 'rtt_half', 'rtt', got 'guess'"),
    ],
)
def test_bad_targets(data: dict[str, Any], message: str) -> None:
    """Each broken table is refused with its exact message."""
    with pytest.raises(ConfigError) as info:
        targets.parse(data, "t.toml")
    assert str(info.value) == message


def test_duplicate_ids_rejected() -> None:
    """Two rows with one id would make a report ambiguous."""
    data = _table()
    data["indicator"].append(dict(data["indicator"][0]))
    with pytest.raises(ConfigError, match=r"indicator\[1\] \(loss_ratio\): duplicate id"):
        targets.parse(data, "t.toml")


def test_shipped_tables_by_name_and_default() -> None:
    """"" is the shipped default table, a shipped table loads by name, and an unknown
    name is refused listing what ships."""
    from collector.errors import ConfigError

    assert targets.load("") == targets.load("bt-italia-2013")
    assert targets.load("").name.startswith("BT Italia")
    with pytest.raises(ConfigError) as info:
        targets.load("bt-italia-2099")
    assert str(info.value) == ("targets: 'bt-italia-2099' is neither a file path nor a "
                               "shipped table (bt-italia-2013)")
