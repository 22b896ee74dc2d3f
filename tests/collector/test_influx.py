"""The InfluxDB sink against a real InfluxDB v2 write API server (VictoriaMetrics, from
Debian's victoria-metrics package, on 127.0.0.1): points as documented, read back through
the server's export API; an outage loses nothing and the outbox catches up."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.schema import TransferAttempt
from collector.cli.main import main
from collector.config import CollectorConfig, InfluxConfig, parse
from collector.errors import ConfigError
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector, running_collector
from collector.sinks.influx import points
from tests.conftest import IN_CI
from tests.factories import attempt, session, session_dict, store_as_before, store_result
from tests.httpclient import post_json, request

LINE = LineMetadata(operator="BT Italia", offer="Fibra 100", region="Lazio",
                    technology="FTTH")


def test_points_carry_units_tags_and_exact_times() -> None:
    """Summary, one point per attempt and per ping; tags for probe and line; unset line
    fields are left out; times to the microsecond."""
    result = session("p1", rtts=[10.5, None], transfers=[
        attempt("download", ok=False), attempt("download", 0, 2, bps=40e6),
        attempt("upload", bps=9e6)])
    got = [p.to_line_protocol() for p in points(result, LineMetadata(operator="BT Italia"))]
    assert len(got) == 1 + 3 + 2
    head = got[0]
    assert head.startswith("bbprobe_session,operator=BT\\ Italia,probe=p1,profile=test ")
    assert "download_bps=40000000" in head and "loss_ratio=0.5" in head
    assert head.endswith(" 1795255200000000000")  # 2026-11-21T10:00:00Z
    assert "failure_reason=connect_error" in got[1] and "status=failed" in got[1]
    assert "throughput_bps" not in got[1] and "ok=0i" in got[1] and "refused=0i" in got[1]
    assert "throughput_bps=40000000" in got[2] and "ok=1i" in got[2] and "refused=0i" in got[2]
    assert got[4].startswith("bbprobe_ping,operator=BT\\ Italia,probe=p1 ")
    assert "rtt_ms=10.5" in got[4] and "lost=0i" in got[4]
    assert "rtt_ms" not in got[5] and "lost=1i" in got[5]
    assert got[5].endswith(" 1795255201000000000")  # sent 1 s after the train started
    assert "region=" not in head


def test_refused_attempts_are_marked_apart_from_failures() -> None:
    """An attempt the measurement server refused (not the line's failure) has ok 0 and refused 1
    (schema 7's reasons, an old agent's 429 or bbprobe 503); a failure of the line, a proxy's 503
    included, has refused 0. The points keep their tags: refused is a field."""
    def failed(reason: str, status: int | None, error: str) -> TransferAttempt:
        return replace(attempt("download", ok=False),
                       failure_reason=reason,  # type: ignore[arg-type]
                       http_status=status, error=error)

    result = session("p1", transfers=[
        failed("server_refused", 503, "refused for capacity: HTTP 503: server busy: ..."),
        failed("ticket_refused", 403, "ticket refused (expired): HTTP 403"),
        failed("http_status", 429, "HTTP 429: too many transfers from 198.51.100.7"),
        failed("http_status", 503, "HTTP 503: server busy: 20 transfers already running"),
        failed("http_status", 503, "HTTP 503: <html>overloaded</html>"),
        attempt("download", ok=False), attempt("upload")])
    got = [p.to_line_protocol() for p in points(result, LINE)][1:8]
    assert [("refused=1i" in line, "ok=0i" in line) for line in got] == [
        (True, True)] * 4 + [(False, True), (False, True), (False, False)]
    assert all("refused=" not in line.split(" ")[0] for line in got)  # not a tag


def test_enabled_sink_needs_a_url() -> None:
    """An enabled InfluxDB sink with a URL that is not http(s)://host, or an unknown influxdb
    key, is refused at load."""
    with pytest.raises(ConfigError, match=r"influxdb.url: expected http\(s\)://host"):
        parse({"influxdb": {"enabled": True, "url": "localhost:8086"}})
    with pytest.raises(ConfigError, match=r"influxdb\.colour: unknown"):
        parse({"influxdb": {"colour": "blue"}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VictoriaMetrics:
    def __init__(self, binary: str, data: Path, port: int) -> None:
        self.binary, self.data, self.port = binary, data, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.data.parent / "victoria-metrics.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"-storageDataPath={self.data}",
                 f"-httpListenAddr=127.0.0.1:{self.port}", "-retentionPeriod=100y"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("victoria-metrics did not become healthy within 30 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    def export(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]:
        """Every bbprobe series: (name, sorted labels) -> values, via /api/v1/export."""
        urllib.request.urlopen(self.url + "/internal/force_flush", timeout=10).close()
        query = urllib.parse.urlencode({"match[]": '{__name__=~"bbprobe_.*"}'})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=10) as resp:
            lines = resp.read().decode().splitlines()
        out = {}
        for line in lines:
            doc = json.loads(line)
            labels = dict(doc["metric"])
            name = labels.pop("__name__")
            out[(name, tuple(sorted(labels.items())))] = doc["values"]
        return out


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    """A VictoriaMetrics of the test's own on 127.0.0.1, not yet started."""
    binary = shutil.which("victoria-metrics")
    if binary is None:
        if IN_CI:
            pytest.fail("CI=true but Debian's victoria-metrics is not installed "
                        "(make test installs it)")
        pytest.skip("needs Debian's victoria-metrics for the InfluxDB sink tests")
    vm = VictoriaMetrics(binary, tmp_path / "vm-data", _free_port())
    try:
        yield vm
    finally:
        vm.stop()


def _influx_collector(tmp_path: Path, url: str) -> Any:
    base = CollectorConfig()
    cfg = replace(base, server=replace(base.server, query_auth=False), influxdb=InfluxConfig(
        enabled=True, url=url, org="bbprobe", bucket="bbprobe", batch_results=3,
        timeout_s=2, retry_min_s=0.2, retry_max_s=0.5, poll_s=0.2))
    return running_collector(tmp_path / "collector", cfg)


def _until(check: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.1)


def _health(collector: RunningCollector) -> dict[str, Any]:
    status, body, _ = request("GET", collector.url + "/api/v1/health")
    assert status == 200
    influx: dict[str, Any] = body["influxdb"]
    return influx


def _post(collector: RunningCollector, token: str, probe: str, hour: int) -> str:
    doc = session_dict(probe_id=probe, started_at=f"2026-11-21T{hour:02d}:00:00.000000Z")
    status, body = post_json(collector.url + "/api/v1/results", doc, token)
    assert status == 201, body
    return str(doc["result_id"])


def test_results_reach_influx_with_tags_and_values(victoria: VictoriaMetrics,
                                                   tmp_path: Path) -> None:
    """Posted results appear in the server with the probe's line as tags; the outbox
    empties; /healthz reports the count written."""
    victoria.start()
    with _influx_collector(tmp_path, victoria.url) as collector:
        token = collector.add_probe("p1", LINE)
        for hour in (8, 9, 10, 11):
            _post(collector, token, "p1", hour)
        _until(lambda: _health(collector)["written_results"] == 4, "4 results written")
        assert _health(collector)["outbox"] == 0
    series = victoria.export()
    tags = (("offer", "Fibra 100"), ("operator", "BT Italia"), ("probe", "p1"),
            ("profile", "test"), ("region", "Lazio"), ("technology", "FTTH"))
    assert series[("bbprobe_session_download_bps", tags)] == [50e6] * 4
    assert series[("bbprobe_session_upload_bps", tags)] == [10e6] * 4
    pings = [v for (name, _), v in series.items() if name == "bbprobe_ping_rtt_ms"]
    assert sorted(x for values in pings for x in values) == sorted([10.0, 11.0, 12.0] * 4)


def test_outage_loses_nothing_and_catches_up(victoria: VictoriaMetrics,
                                             tmp_path: Path) -> None:
    """InfluxDB down while results arrive: every post still succeeds, the outbox holds
    them and /healthz shows the error; once the server is up they all arrive once."""
    with _influx_collector(tmp_path, victoria.url) as collector:
        token = collector.add_probe("p1", LINE)
        for hour in range(7):
            _post(collector, token, "p1", hour)
        _until(lambda: _health(collector)["last_error"] is not None, "a failed write")
        health = _health(collector)
        assert (health["outbox"], health["written_results"]) == (7, 0)
        victoria.start()
        _until(lambda: _health(collector)["outbox"] == 0, "outbox drained")
        assert _health(collector)["written_results"] == 7
    series = victoria.export()
    sessions = [v for (name, _), v in series.items() if name == "bbprobe_session_rtt_mean_ms"]
    assert sum(len(v) for v in sessions) == 7


def test_backfill_queues_stored_results(victoria: VictoriaMetrics, tmp_path: Path) -> None:
    """Results stored before the sink was enabled reach InfluxDB after `influx backfill`;
    results already queued are not queued twice. (`--db` names an SQLite file, the one
    the collector then serves from.)"""
    from contextlib import closing

    from collector.config import StorageConfig
    from collector.fleet.probes import register_probe
    from collector.storage.sql.backends import open_store

    db = tmp_path / "collector" / "collector.sqlite3"
    db.parent.mkdir()
    with closing(open_store(StorageConfig(path=str(db)))) as store:
        register_probe(store, "p1", LINE)
        for hour in range(5):
            store_result(store, session("p1",
                                        started_at=f"2026-11-21T{hour:02d}:00:00.000000Z"))
    env = {"BBPROBE_INFLUX_TOKEN": "unused"}
    result = CliRunner(env=env).invoke(main, ["--db", str(db), "influx", "backfill",
                                              "--until", "2026-11-21T03:00:00Z"])
    assert result.exit_code == 0, result.output
    assert "queued 3 result(s); 3 waiting" in result.output
    result = CliRunner().invoke(main, ["--db", str(db), "influx", "backfill"])
    assert "queued 2 result(s); 5 waiting" in result.output
    victoria.start()
    with _influx_collector(tmp_path, victoria.url) as collector:
        _until(lambda: _health(collector)["outbox"] == 0, "backfill drained")
    sessions = [v for (name, _), v in victoria.export().items()
                if name == "bbprobe_session_download_bps"]
    assert sum(len(v) for v in sessions) == 5


def test_disabled_sink_queues_nothing(collector: RunningCollector) -> None:
    """Without [influxdb] enabled no outbox grows and the health report has no influxdb
    part."""
    token = collector.add_probe("p1")
    _post(collector, token, "p1", 9)
    status, body, _ = request("GET", collector.url + "/api/v1/health")
    assert status == 200 and "influxdb" not in body
    result = CliRunner().invoke(main, ["--db", str(collector.db_path), "influx", "status"])
    assert "influxdb: disabled; 0 result(s) waiting; 0 set apart" in result.output



def test_example_dashboard_matches_the_points() -> None:
    """Every measurement, field and tag the example Grafana dashboard filters on is one
    the sink writes: the dashboard cannot drift from the schema unnoticed."""
    import re

    root = Path(__file__).resolve().parents[2]
    dashboard = json.loads((root / "configs/grafana/bbprobe-dashboard.json").read_text())
    result = session("p1", rtts=[10.0, None], transfers=[attempt("download", ok=False),
                                                         attempt("upload")])
    result = replace(result, summary=replace(result.summary, rtt_download_mean_ms=30.0,
                                             rtt_upload_mean_ms=40.0))  # latency under load
    written: dict[str, set[str]] = {}
    for p in points(result, LINE):
        measurement, rest = p.to_line_protocol().split(",", 1)
        tags, fields_part, _ = rest.rsplit(" ", 2)
        written.setdefault(measurement, set()).update(
            [kv.split("=")[0] for kv in re.split(r"(?<!\\),", tags)]
            + [kv.split("=")[0] for kv in fields_part.split(",")])
    queries = [t["query"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(queries) == 7
    for query in queries:
        (measurement,) = re.findall(r'r\._measurement == "(\w+)"', query)
        used = set(re.findall(r'r\._field == "(\w+)"', query))
        used |= set(re.findall(r"r\.(\w+) (?:==|=~)", query)) - {"_measurement", "_field"}
        assert used <= written[measurement], (measurement, used - written[measurement])


def test_a_result_whose_points_cannot_be_built_is_set_apart(victoria: VictoriaMetrics,
                                                             tmp_path: Path) -> None:
    """A security review found that building a result's points raised outside the sink's error
    handling and the sink task ended for good, silently. A session dated at the end of
    year 9999 is a valid document whose ping times overflow a datetime: it is set apart
    with the reason, and the results after it still arrive."""
    victoria.start()
    with _influx_collector(tmp_path, victoria.url) as collector:
        token = collector.add_probe("p1", LINE)
        doc = session_dict(probe_id="p1", started_at="9999-12-31T23:59:59.000000Z")
        doc["ping"]["started_at"] = "9999-12-31T23:59:59.500000Z"
        # Refused at ingest now (a year 9999 is no measurement); stored as an
        # earlier release stored it, the sink must still set it apart.
        status, body = post_json(collector.url + "/api/v1/results", doc, token)
        assert status == 422 and body["field"] == "started_at", body
        store_as_before(collector, doc)
        for hour in (8, 9, 10):
            _post(collector, token, "p1", hour)
        _until(lambda: _health(collector)["written_results"] == 3, "the good results written")
        health = _health(collector)
        assert (health["outbox"], health["dead_letters_stored"], health["running"]) == \
            (0, 1, True)
        listing = CliRunner().invoke(main, ["--db", str(collector.db_path), "influx",
                                            "status"]).output
    assert f"  {doc['result_id']}  " in listing
    assert "cannot build its points: OverflowError" in listing


class StrictInfluxV2:
    """An InfluxDB 2 write endpoint for the refusal paths: InfluxDB 2 itself is neither in
    Debian nor on PyPI, and VictoriaMetrics (the real server the other tests use) answers
    204 and skips a bad line, so it cannot show a refusal. This parses line protocol as
    InfluxDB does for timestamps (a signed 64-bit count of ns, else 400 "unable to
    parse") and keeps what it accepts."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.refusals = 0
        self.available = False  # 503 until the test has queued everything

    async def write(self, request: Any) -> Any:
        from aiohttp import web

        if not self.available:
            return web.json_response({"code": "unavailable", "message": "starting"},
                                     status=503)
        body = (await request.read()).decode()
        for line in filter(None, body.split("\n")):
            stamp = int(line.rsplit(" ", 1)[1])
            if not -(2**63) <= stamp < 2**63:
                self.refusals += 1
                return web.json_response(
                    {"code": "invalid", "message": f"unable to parse '{line[:60]}': time "
                                                   "outside range"}, status=400)
        self.lines.extend(filter(None, body.split("\n")))
        return web.Response(status=204)


@contextlib.contextmanager
def _strict_influx() -> Iterator[tuple[StrictInfluxV2, str]]:
    from aiohttp import web

    from tests.faultproxy import serve_in_thread

    server = StrictInfluxV2()
    app = web.Application()
    app.router.add_post("/api/v2/write", server.write)
    with serve_in_thread(app) as url:
        yield server, url


def test_a_refused_result_is_set_apart_and_the_rest_flows(tmp_path: Path) -> None:
    """A security review's finding (reliability.md C6): a permanent 4xx (a result dated 2300,
    past InfluxDB's int64 nanoseconds) was retried forever on the same oldest batch. Now
    the batch is halved until the refused result is alone, that one is set apart with
    InfluxDB's reason, every other result is written once, and `influx retry` queues the
    set-apart one again."""
    with _strict_influx() as (server, url), _influx_collector(tmp_path, url) as collector:
        token = collector.add_probe("p1", LINE)
        _post(collector, token, "p1", 7)
        doc = session_dict(probe_id="p1", started_at="2300-01-01T00:00:00.000000Z")
        doc["ping"]["started_at"] = "2300-01-01T00:00:00.500000Z"
        store_as_before(collector, doc)  # refused at ingest now
        for hour in (8, 9, 10, 11):
            _post(collector, token, "p1", hour)
        # Everything queued behind a transient 503 (retried, never set apart); then the
        # server takes writes, in batches of 3: [7, 2300, 8] is refused, halved, and
        # [2300, 8] halved again.
        _until(lambda: _health(collector)["failures_in_a_row"] > 0, "a 503 retried")
        assert _health(collector)["dead_letters_stored"] == 0
        server.available = True
        _until(lambda: _health(collector)["written_results"] == 5, "the other 5 written")
        health = _health(collector)
        assert (health["outbox"], health["dead_letters_stored"]) == (0, 1)
        assert server.refusals == 3  # [7, 2300, 8], then [2300, 8], then [2300] alone
        sessions = [line for line in server.lines if line.startswith("bbprobe_session")]
        assert len(sessions) == 5  # each good result once
        db = ["--db", str(collector.db_path)]
        listing = CliRunner().invoke(main, [*db, "influx", "status"]).output
        assert f"{doc['result_id']}" in listing and "InfluxDB refused it: HTTP 400" in listing
        retried = CliRunner().invoke(main, [*db, "influx", "retry"]).output
        assert retried.startswith("queued 1 result(s) again")
        _until(lambda: _health(collector)["dead_letters_stored"] == 1 and
               _health(collector)["outbox"] == 0, "refused again, set apart again")


def test_public_liveness_says_nothing_more(tmp_path: Path) -> None:
    """A security review found that /healthz showed the InfluxDB error text (with the server's
    reply) and the outbox size to anyone. Now {"status": "ok"} only; the details need an
    analyst token at /api/v1/health."""
    base = CollectorConfig()
    cfg = replace(base, influxdb=InfluxConfig(enabled=True, url="http://127.0.0.1:9",
                                               retry_min_s=0.2, retry_max_s=0.5, poll_s=0.2))
    with running_collector(tmp_path, cfg) as collector:
        token = collector.add_probe("p1", LINE)
        _post(collector, token, "p1", 7)
        analyst = collector.add_token("ana")
        bearer = {"Authorization": f"Bearer {analyst}"}
        _until(lambda: request("GET", collector.url + "/api/v1/health", headers=bearer)[1]
               ["influxdb"]["last_error"] is not None, "the sink to fail")
        status, body, _ = request("GET", collector.url + "/healthz")
        assert (status, body) == (200, {"status": "ok"})
        status, _, _ = request("GET", collector.url + "/api/v1/health")
        assert status == 401


def test_an_influxdb_that_refuses_everything_pauses_the_sink(tmp_path: Path) -> None:
    """When InfluxDB refuses every result (a type conflict, a
    retention cut), the sink sets 10 apart, then backs off as for an outage instead of
    emptying the whole outbox into the dead letters."""
    with _strict_influx() as (server, url), _influx_collector(tmp_path, url) as collector:
        server.available = True
        collector.add_probe("p1", LINE)
        for minute in range(14):
            doc = session_dict(probe_id="p1",
                               started_at=f"2300-01-01T00:{minute:02d}:00.000000Z")
            doc["ping"]["started_at"] = f"2300-01-01T00:{minute:02d}:00.500000Z"
            store_as_before(collector, doc)  # refused at ingest now
        _until(lambda: "pausing before setting more apart" in
               (_health(collector)["last_error"] or ""), "the sink to pause")
        health = _health(collector)
        assert health["dead_letters_stored"] == 10 and health["outbox"] == 4


def test_two_collectors_drain_one_outbox_exactly_once(tmp_path: Path, pg_url: str) -> None:
    """Two collectors over one PostgreSQL database, both copying to InfluxDB.
    Results queue while InfluxDB is away; then both sinks drain the one outbox, leasing
    rows (FOR UPDATE SKIP LOCKED): every result is written once, by one of them."""
    from collector.config import StorageConfig

    base = CollectorConfig()
    with _strict_influx() as (server, url):
        cfg = replace(base, server=replace(base.server, query_auth=False),
                      storage=StorageConfig(backend="postgresql", url=pg_url),
                      influxdb=InfluxConfig(enabled=True, url=url, org="bbprobe",
                                            bucket="bbprobe", batch_results=3, timeout_s=2,
                                            retry_min_s=0.2, retry_max_s=0.5, poll_s=0.2))
        with running_collector(tmp_path / "a", cfg) as a, \
                running_collector(tmp_path / "b", cfg) as b:
            token = a.add_probe("p1", LINE)
            for hour in range(20):
                _post((a, b)[hour % 2], token, "p1", hour)
            server.available = True
            _until(lambda: _health(a)["outbox"] == 0, "the outbox drained")
            _until(lambda: _health(a)["written_results"] + _health(b)["written_results"] == 20,
                   "both sinks account for every result")
        sessions = [line for line in server.lines if line.startswith("bbprobe_session")]
        stamps = [line.rsplit(" ", 1)[1] for line in sessions]
        assert len(sessions) == 20 and len(set(stamps)) == 20
