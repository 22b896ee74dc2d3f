"""A short run of the ingest fuzzer in CI: atheris (libFuzzer) on the result
decoder and the ingest path for 20 s from real documents; any 5xx-class exception, any
stored document that does not read back the same, or any crash fails it. The long run is
`make fuzz` (10 min); its figures are in docs/reliability.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ingest_survives_a_short_fuzzing_run(tmp_path: Path) -> None:
    """20 s of atheris on the decoder and ingest path (tests/fuzz_ingest.py) end with
    libFuzzer's closing line and leave no crash file."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("atheris missing under CI=true: make test installs the test extras")
        pytest.skip("atheris not installed (pip install -e '.[test]')")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz_ingest.py"), "-max_total_time=20",
         "-rss_limit_mb=2048", "-timeout=10", f"-artifact_prefix={tmp_path}/",
         str(tmp_path / "corpus")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120, check=False)
    tail = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, tail
    assert "Done " in tail and "runs in" in tail, tail  # libFuzzer's closing line
    assert not list(tmp_path.glob("crash-*")), tail
