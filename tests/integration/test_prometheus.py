"""Prometheus, with real components: the agent's daemon writing its textfile
and serving its port, the collector's /metrics, both read with prometheus-client's
parser and linted by promtool; Debian's Prometheus scraping both with the shipped alert
rules loaded; and the shipped scrape config and rules checked, and the rules
unit-tested, by promtool. Loopback only."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.server.testing import serve_process, stop
from tests.httpclient import request
from tests.integration.test_fleet import _until, daemon

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "configs" / "prometheus"
IN_CI = os.environ.get("CI", "").lower() == "true"


def _needs(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        if IN_CI:
            pytest.fail(f"CI=true but {tool} is missing (make test installs Debian's "
                        "prometheus when root)")
        pytest.skip(f"needs {tool} (Debian's prometheus package)")
    return found


def parsed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _by_name(samples: dict[Any, float], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _collector_cli(db: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "collector", "--db", str(db), *args],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_shipped_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    """promtool accepts the shipped alert rules and scrape config (with its token file moved
    here), and the rules' unit tests fire each alert when they should and not before."""
    promtool = _needs("promtool")
    rules = subprocess.run([promtool, "check", "rules", str(SHIPPED / "bbprobe-alerts.yml")],
                           capture_output=True, text=True, timeout=60, check=False)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # The example config as shipped, with its token file where this test can make one.
    token = tmp_path / "bbprobe-collector.token"
    token.write_text("an-analyst-token\n")
    config = tmp_path / "prometheus.yml"
    config.write_text((SHIPPED / "prometheus.yml").read_text().replace(
        "/etc/prometheus/bbprobe-collector.token", str(token)))
    shutil.copy(SHIPPED / "bbprobe-alerts.yml", tmp_path)
    checked = subprocess.run([promtool, "check", "config", str(config)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The rules' unit tests: the silent probe, the speed below the contract, refusals
    # and dead letters fire when they should and not before.
    tested = subprocess.run([promtool, "test", "rules", "alerts-test.yml"],
                            cwd=ROOT / "tests" / "data" / "prometheus",
                            capture_output=True, text=True, timeout=120, check=False)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, \
        tested.stdout + tested.stderr


@contextmanager
def _prometheus(tmp_path: Path, config: str) -> Iterator[str]:
    binary = _needs("prometheus")
    port = _free_port()
    (tmp_path / "prometheus.yml").write_text(config)
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        cwd=tmp_path, stdout=log, stderr=log)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    try:
        status, body, _ = request("GET", f"{prom}/api/v1/query?query="
                                  + urllib.parse.quote(expr))
    except OSError:
        return []  # not listening yet
    if status != 200 or not isinstance(body, dict):
        return []
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.mark.slow
def test_agent_and_collector_metrics_scraped_by_prometheus(tmp_path: Path,
                                                           fast_config: Path) -> None:
    """A daemon measuring against a collector: its textfile and its port parse, their
    counters move with its sessions, the collector's counters move as the results
    arrive; a real Prometheus scrapes both (the collector with a bearer token from a
    file, as the shipped config does) and loads the shipped rules."""
    db = tmp_path / "collector.sqlite3"
    config = tmp_path / "collector.toml"
    config.write_text(f'[server]\nhost = "127.0.0.1"\nport = 0\n\n[storage]\npath = "{db}"\n'
                      '\n[metrics]\nmin_interval_s = 0.0\n')
    _collector_cli(db, "init")
    token = _collector_cli(db, "probe", "add", "roma-01", "--operator", "OpX", "--region",
                           "Lazio", "--technology", "FTTH",
                           "--download-min-kbps", "1").strip().splitlines()[-1]
    analyst = _collector_cli(db, "token", "add", "prometheus").strip().splitlines()[-1]
    agent_port = _free_port()
    textfile = tmp_path / "textfile" / "bbprobe.prom"
    with serve_process(config, cwd=ROOT) as (url, _server):
        agent = fast_config.with_name("prom-agent.toml")
        agent.write_text(fast_config.read_text()
                         + f'\n[collector]\nurl = "{url}"\ntoken = "{token}"\n'
                         f'\n[metrics]\ntextfile = "{textfile}"\n'
                         f'listen = "127.0.0.1:{agent_port}"\n')

        def collector_metrics() -> dict[Any, float]:
            status, body, _ = request("GET", url + "/metrics", raw=True,
                                      headers={"Authorization": f"Bearer {analyst}"})
            assert status == 200
            return parsed(body.decode())

        before = collector_metrics()
        assert before[("bbprobe_collector_results_total", (("outcome", "stored"),))] == 0

        with daemon(agent, tmp_path):
            def agent_port_metrics() -> dict[Any, float] | None:
                try:
                    status, body, _ = request("GET", f"http://127.0.0.1:{agent_port}/metrics",
                                              raw=True)
                except OSError:
                    return None
                got = parsed(body.decode()) if status == 200 else {}
                done = got.get(("bbprobe_agent_sessions_total", (("outcome", "complete"),)))
                return got if done and done >= 2 else None

            served = _until(agent_port_metrics, 120, "two complete sessions on the "
                            "agent's metrics port")
            assert served[("bbprobe_agent_last_session_download_bytes_per_second", ())] > 0
            # The agent pings the collector on loopback, where the kernel answers each of
            # the 5 echoes well within their 0.5 s timeout: no loss, and the metric says so.
            assert served[("bbprobe_agent_last_session_loss_ratio", ())] == 0.0
            assert served[("bbprobe_agent_info", (("probe", "roma-01"),
                                                  ("version", _version())))] == 1
            # The textfile: whole, parseable, and of the same daemon.
            written = _until(lambda: textfile.exists() and parsed(textfile.read_text()),
                             30, "the textfile")
            assert written[("bbprobe_agent_sessions_total", (("outcome", "complete"),))] >= 1
            # Only the file node_exporter reads ends in .prom (temp files do not).
            assert [p.name for p in textfile.parent.glob("*.prom")] == ["bbprobe.prom"]

            after = _until(lambda: (m := collector_metrics())[(
                "bbprobe_collector_results_total", (("outcome", "stored"),))] >= 2 and m,
                60, "the daemon's results at the collector")
            line = (("offer", ""), ("operator", "OpX"), ("probe", "roma-01"),
                    ("region", "Lazio"), ("technology", "FTTH"))
            assert after[("bbprobe_probe_last_session_download_bytes_per_second", line)] > 0
            assert after[("bbprobe_probe_contract_download_min_bytes_per_second",
                          line)] == 125.0  # 1 kbit/s
            assert after[("bbprobe_fleet_probes_seen", ())] == 1
            assert after[("bbprobe_collector_health_reports_total", ())] >= 1

            # promtool's lint (names, units, help, types) on both expositions as served.
            promtool = _needs("promtool")
            for body in (request("GET", url + "/metrics", raw=True,
                                 headers={"Authorization": f"Bearer {analyst}"})[1],
                         request("GET", f"http://127.0.0.1:{agent_port}/metrics",
                                 raw=True)[1]):
                lint = subprocess.run([promtool, "check", "metrics"], input=body,
                                      capture_output=True, timeout=60, check=False)
                assert lint.returncode == 0, lint.stdout + lint.stderr

            token_file = tmp_path / "collector.token"
            token_file.write_text(analyst + "\n")
            shutil.copy(SHIPPED / "bbprobe-alerts.yml", tmp_path)
            host = url.removeprefix("http://")
            prom_config = f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [bbprobe-alerts.yml]
scrape_configs:
  - job_name: bbprobe-collector
    authorization: {{type: Bearer, credentials_file: {token_file}}}
    static_configs: [{{targets: ["{host}"]}}]
  - job_name: bbprobe-agents
    static_configs: [{{targets: ["127.0.0.1:{agent_port}"]}}]
"""
            with _prometheus(tmp_path, prom_config) as prom:
                up = _until(lambda: len([r for r in _query(prom, "up == 1")]) == 2 and
                            _query(prom, "up"), 60, "Prometheus scraping both targets")
                assert {r["metric"]["job"] for r in up} == {"bbprobe-collector",
                                                            "bbprobe-agents"}
                stored = _until(lambda: _query(
                    prom, 'bbprobe_collector_results_total{outcome="stored"} > 0'), 30,
                    "the stored counter in Prometheus")
                assert float(stored[0]["value"][1]) >= 2
                assert _query(prom, "bbprobe_agent_sessions_total")
                status, rules, _ = request("GET", prom + "/api/v1/rules")
                assert status == 200
                groups = {g["name"]: g for g in rules["data"]["groups"]}
                assert set(groups) == {"bbprobe-collector", "bbprobe-fleet", "bbprobe-agent"}
                assert all(r["health"] in ("ok", "unknown")
                           for g in groups.values() for r in g["rules"])


def _version() -> str:
    from agent import __version__

    return __version__
