"""Offline evaluation: `bbprobe-collector evaluate --samples FILE.csv --targets FILE.toml`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "data" / "golden_samples.csv"
TARGETS = ROOT / "configs" / "targets" / "bt-italia-2013.toml"
HEADER = "probe_id,timestamp,kind,value,ok\n"


def _evaluate(samples: Path, *extra: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["evaluate", "--samples", str(samples), "--targets",
                                       str(TARGETS), *extra], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_golden_dataset_hand_checked() -> None:
    """tests/data/golden_samples.csv, every value checked by hand (type 7 percentiles):
    downloads 1000..20000 kbit/s + 1 failed; uploads 100..1000; RTTs 20..38 ms + 1 lost."""
    code, out, err = _evaluate(GOLDEN, "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    got = {i["id"]: i for i in doc["indicators"]}
    expected = {
        # p95: h = 19 * .95 = 18.05 -> 19000 + .05 * 1000;  p5: h = .95 -> 1000 + .95 * 1000
        "download_p95_kbps": (19050.0, 7000, True, 20),
        "download_p5_kbps": (1950.0, 2200, False, 20),
        # p95: h = 8.55 -> 900 + .55 * 100;  p5: h = .45 -> 100 + .45 * 100
        "upload_p95_kbps": (955.0, 256, True, 10),
        "upload_p5_kbps": (145.0, 150, False, 10),
        "download_failure_ratio": (1 / 21, 0.005, False, 21),
        "upload_failure_ratio": (0.0, 0.005, True, 10),
        # one-way = RTT / 2 = 10..19 ms: mean 14.5, sample variance 82.5 / 9
        "delay_mean_ms": (14.5, 30, True, 10),
        "delay_stdev_ms": ((82.5 / 9) ** 0.5, 10, True, 10),
        "loss_ratio": (1 / 11, 0.004, False, 11),
    }
    assert set(got) == set(expected)
    for key, (observed, target, passed, samples) in expected.items():
        item = got[key]
        assert item["observed"] == pytest.approx(observed), key
        assert (item["target"], item["passed"], item["samples"]) == (target, passed, samples)
    assert doc["verdict"] == "fail"
    assert doc["scope"]["probes"] == ["roma-1"]


def test_text_format() -> None:
    """The text report shows each indicator with PASS/FAIL and the verdict."""
    code, out, _ = _evaluate(GOLDEN)
    assert code == 0
    assert "Download, banda minima (p5)              1.95 Mbit/s  >= 2.20 Mbit/s       20  FAIL" \
        in out
    assert "Verdict:  FAIL (5 of 9 measurable indicators met)" in out


@pytest.mark.parametrize(
    ("rows", "messages"),
    [
        ("roma-1,2026-01-01T00:00:00Z,download,fast,true\n",
         ["{f}:2: value: not a number: 'fast'"]),
        ("roma-1,2026-01-01T00:00:00Z,download,,true\n",
         ["{f}:2: value: required when ok is true"]),
        ("roma-1,2026-01-01T00:00:00Z,ping,12.5,false\n",
         ["{f}:2: value: must be empty for a lost ping (ok is false), got '12.5'"]),
        ("roma-1,yesterday,ping,12.5,true\n", ["{f}:2: timestamp: not ISO 8601: 'yesterday'"]),
        ("roma-1,2026-01-01T00:00:00Z,jitter,1,true\n",
         ["{f}:2: kind: must be download, upload or ping, got 'jitter'"]),
        ("roma-1,2026-01-01T00:00:00Z,ping,1,yes\n",
         ["{f}:2: ok: must be true or false, got 'yes'"]),
        ("roma-1,2026-01-01T00:00:00Z,upload,-5,true\n",
         ["{f}:2: value: must be a finite number >= 0, got '-5'"]),
        ("bad id,2026-01-01T00:00:00Z,ping,1,true\n",
         ["{f}:2: probe_id: must be 1-64 characters of letters, digits, '.', '_', '-'"]),
        ("roma-1,2026-01-01T00:00:00Z,ping,1,true\nroma-1,2026-01-01T00:00:00Z,ping\n"
         "roma-1,2026-01-01T00:00:00Z,ping,nan,true\n",
         ["{f}:3: row: expected 5 fields", "{f}:4: value: must be a finite number >= 0, "
          "got 'nan'"]),
    ],
)
def test_bad_rows_reported_by_line(tmp_path: Path, rows: str, messages: list[str]) -> None:
    """Every bad row is named with its line; no verdict is given (exit 2)."""
    samples = tmp_path / "s.csv"
    samples.write_text(HEADER + rows)
    code, out, err = _evaluate(samples)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert lines[:-1] == [m.format(f=samples) for m in messages]
    assert lines[-1] == (f"bbprobe-collector: {len(messages)} bad row(s) in {samples}; "
                         "no verdict given")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("probe_id,timestamp,kind,value\n",
         "{f}:1: header: missing column(s) ok (expected probe_id, timestamp, kind, value, ok, "
         "and optionally unit)"),
        ("probe_id,timestamp,kind,value,ok,colour\n",
         "{f}:1: header: unknown column(s) colour (expected probe_id, timestamp, kind, value, "
         "ok, and optionally unit)"),
    ],
)
def test_bad_header(tmp_path: Path, header: str, message: str) -> None:
    """A wrong header is refused naming the columns."""
    samples = tmp_path / "s.csv"
    samples.write_text(header)
    code, _, err = _evaluate(samples)
    assert code == 2
    assert err.splitlines()[0] == message.format(f=samples)


def test_missing_file(tmp_path: Path) -> None:
    """A missing samples file is one line, exit 2."""
    code, _, err = _evaluate(tmp_path / "none.csv")
    assert (code, err) == (2, f"bbprobe-collector: {tmp_path / 'none.csv'}: no such file\n")


def test_columns_in_any_order_and_naive_timestamps(tmp_path: Path) -> None:
    """Column order is free; a timestamp without offset is UTC."""
    samples = tmp_path / "s.csv"
    samples.write_text("ok,value,kind,timestamp,probe_id\n"
                       "true,15000,download,2026-01-01T10:00:00,p1\n")
    code, out, _ = _evaluate(samples, "--format", "json")
    assert code == 0
    doc = json.loads(out)
    got = {i["id"]: i for i in doc["indicators"]}
    assert got["download_p5_kbps"]["observed"] == 15000
    assert doc["scope"]["since"] == "2026-01-01T10:00:00+00:00"
