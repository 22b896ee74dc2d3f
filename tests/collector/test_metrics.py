"""The collector's Prometheus metrics, scraped from a real collector on
127.0.0.1 and read with prometheus-client's own parser."""

from __future__ import annotations

import re
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector import metrics as metrics_mod
from collector.compliance.facts import of_result
from collector.config import CollectorConfig, MetricsConfig, ServerConfig
from collector.errors import ApiError
from collector.lines import LineMetadata
from collector.measurement.slots import TransferSlots
from collector.server.testing import running_collector
from collector.web import exposition
from tests import factories
from tests.httpclient import post_json, request


def _cfg(**metrics: Any) -> CollectorConfig:
    return replace(CollectorConfig(), server=ServerConfig(query_auth=True),
                   metrics=replace(MetricsConfig(min_interval_s=0.0), **metrics))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus-client: (name, labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict[Any, float], name: str, **labels: str) -> float | None:
    return parsed.get((name, tuple(sorted(labels.items()))))


def scrape(url: str, token: str | None) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, body, head = request("GET", url + "/metrics", headers=headers, raw=True)
    return status, body.decode(), head.get("content-type", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LINE = LineMetadata(operator="OpX", offer="Fibra 1000", region="Lazio", technology="FTTH")


def test_counters_move_as_results_arrive(tmp_path: Path) -> None:
    """The collector's /metrics counts each ingest outcome (stored, duplicate, conflict once,
    refused by reason), request latency by route template, the fleet's seen and silent
    probes, and per-probe series labelled with the line from the newest session."""
    with running_collector(tmp_path, _cfg()) as c:
        token = c.add_probe("roma-01", LINE)
        c.add_probe("never-01", LineMetadata(region="Lazio", technology="FWA"))
        analyst = c.add_token("grafana")
        status, before_text, ctype = scrape(c.url, analyst)
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        before = samples(before_text)
        assert value(before, "bbprobe_collector_results_total", outcome="stored") == 0
        assert value(before, "bbprobe_fleet_probes") == 2
        assert value(before, "bbprobe_fleet_probes_silent") == 2

        result = factories.session_dict(
            probe_id="roma-01", rtts=(10.0, 14.0, None, 12.0),
            transfers=[factories.attempt("download", bps=80e6),
                       factories.attempt("download", number=2, bps=100e6),
                       factories.attempt("upload", bps=20e6)])
        assert post_json(c.url + "/api/v1/results", result, token)[0] == 201
        assert post_json(c.url + "/api/v1/results", result, token)[0] == 200  # duplicate
        broken = factories.session_dict(probe_id="roma-01")
        broken["ping"]["samples"][0]["rtt_ms"] = -1
        assert post_json(c.url + "/api/v1/results", broken, token)[0] == 422
        assert post_json(c.url + "/api/v1/results", result, "wrong-token")[0] == 401
        other = {**result, "agent_version": "other content, same id"}
        assert post_json(c.url + "/api/v1/results", other, token)[0] == 409
        batch = {"results": [factories.session_dict(probe_id="roma-01",
                                                    started_at="2026-11-20T10:00:00.000000Z"),
                             factories.session_dict(probe_id="someone-else")]}
        status, reply = post_json(c.url + "/api/v1/results/batch", batch, token)
        assert status == 200 and [i["status"] for i in reply["items"]] == [201, 403]

        after = samples(scrape(c.url, analyst)[1])
        assert value(after, "bbprobe_collector_results_total", outcome="stored") == 2
        assert value(after, "bbprobe_collector_results_total", outcome="duplicate") == 1
        # A conflict is counted once, as a conflict (not also as a refusal).
        assert value(after, "bbprobe_collector_results_total", outcome="conflict") == 1
        assert value(after, "bbprobe_collector_results_total", outcome="refused") == 3
        assert value(after, "bbprobe_collector_results_refused_total", reason="conflict") \
            is None
        assert value(after, "bbprobe_collector_results_refused_total", reason="invalid") == 1
        assert value(after, "bbprobe_collector_results_refused_total",
                     reason="unauthorized") == 1
        assert value(after, "bbprobe_collector_results_refused_total", reason="forbidden") == 1
        # Latency by route template: four requests on the results route, by status.
        count = value(after, "bbprobe_collector_http_request_duration_seconds_count",
                      route="/api/v1/results", method="POST")
        assert count == 5
        assert value(after, "bbprobe_collector_http_requests_total",
                     route="/api/v1/results", method="POST", code="422") == 1
        # The fleet: one probe seen now, one never.
        assert value(after, "bbprobe_fleet_probes_silent") == 1
        assert value(after, "bbprobe_fleet_probes_seen") == 1
        assert value(after, "bbprobe_collector_state_up") == 1
        assert value(after, "bbprobe_collector_database_size_bytes") > 0
        # The per-probe series, labelled with the line, from the newest session (not
        # the batch's, which started a day earlier, though it arrived later).
        labels = dict(probe="roma-01", operator="OpX", offer="Fibra 1000", region="Lazio",
                      technology="FTTH")
        assert value(after, "bbprobe_probe_last_session_download_bytes_per_second",
                     **labels) == pytest.approx(90e6 / 8)
        assert value(after, "bbprobe_probe_last_session_jitter_seconds",
                     **labels) == pytest.approx(0.003)
        assert value(after, "bbprobe_probe_silent", **labels) == 0
        assert value(after, "bbprobe_probe_last_session_valid", **labels) == 1
        assert value(after, "bbprobe_probe_silent", probe="never-01", operator="",
                     offer="", region="Lazio", technology="FWA") == 1


def test_per_probe_values_from_raw_samples() -> None:
    """The last session's figures, from the stored facts: speeds are the median of the
    successful tests (80, 100, 30 Mbit/s: 80, where the mean would be 70), jitter the
    mean absolute difference of consecutive answered RTTs, loss the unanswered share."""
    result = factories.session(
        rtts=(10.0, 14.0, None, 12.0),
        transfers=[factories.attempt("download", 0, bps=80e6),
                   factories.attempt("download", 1, bps=100e6),
                   factories.attempt("download", 2, 1, ok=False),
                   factories.attempt("download", 2, 2, bps=30e6),
                   factories.attempt("upload", bps=20e6)])
    got = exposition.session_values(of_result(result, result.started_at))
    assert got["download_bytes_per_second"] == pytest.approx(80e6 / 8)
    assert got["upload_bytes_per_second"] == pytest.approx(20e6 / 8)
    assert got["rtt_seconds"] == pytest.approx(0.012)
    assert got["jitter_seconds"] == pytest.approx(0.003)  # (|14-10| + |12-14|) / 2
    assert got["loss_ratio"] == pytest.approx(0.25)
    assert got["valid"] == 1.0
    silent = exposition.session_values(of_result(
        factories.session(rtts=(), transfers=[factories.attempt("download", ok=False)]),
        result.started_at))
    assert set(silent) == {"timestamp_seconds", "valid"}  # nothing measured, nothing shown


def test_metrics_need_an_analyst_token(tmp_path: Path) -> None:
    """/metrics on the main port needs a token: none is 401, a probe's token 403, an analyst's
    200."""
    with running_collector(tmp_path, _cfg()) as c:
        probe = c.add_probe("p1")
        assert scrape(c.url, None)[0] == 401
        assert scrape(c.url, probe)[0] == 403
        assert scrape(c.url, c.add_token("prom"))[0] == 200


def test_open_listener_serves_only_metrics(tmp_path: Path) -> None:
    """metrics.listen opens a second port serving /metrics without a token and nothing else; the
    main port still asks for one."""
    port = free_port()
    with running_collector(tmp_path, _cfg(listen=f"127.0.0.1:{port}",
                                          min_interval_s=1.0)) as c:
        open_url = f"http://127.0.0.1:{port}"
        status, text, _ = scrape(open_url, None)
        assert status == 200 and "bbprobe_fleet_probes" in text
        assert request("GET", open_url + "/api/v1/probes")[0] == 404
        assert scrape(c.url, None)[0] == 401  # the main port still asks for a token


def test_cardinality_is_bounded(tmp_path: Path) -> None:
    """Per-probe series stop at per_probe_max (the first names in order, the rest counted as
    omitted) or are off entirely; unknown paths and methods never become label values
    (unmatched, other)."""
    with running_collector(tmp_path, _cfg(per_probe_max=2)) as c:
        for name in ("c", "a", "b", "d"):
            c.add_probe(name)
        token = c.add_token("prom")
        # A stranger's paths and methods never become label values.
        request("GET", c.url + "/no/such/path-xyz")
        request("PROPFIND", c.url + "/api/v1/results")
        parsed = samples(scrape(c.url, token)[1])
        probes = {dict(k[1]).get("probe") for k in parsed if k[0] == "bbprobe_probe_silent"}
        assert probes == {"a", "b"}
        assert value(parsed, "bbprobe_fleet_per_probe_series_omitted") == 2
        routes = {dict(k[1])["route"] for k in parsed
                  if k[0] == "bbprobe_collector_http_requests_total"}
        methods = {dict(k[1])["method"] for k in parsed
                   if k[0] == "bbprobe_collector_http_requests_total"}
        assert "unmatched" in routes and not any("xyz" in r for r in routes)
        assert "PROPFIND" not in methods and "other" in methods
    with running_collector(tmp_path / "off", _cfg(per_probe=False)) as c:
        c.add_probe("a")
        parsed = samples(scrape(c.url, c.add_token("prom"))[1])
        assert not [k for k in parsed if k[0].startswith("bbprobe_probe_")]
        assert value(parsed, "bbprobe_fleet_per_probe_series_omitted") == 1


def test_scrapes_within_the_interval_share_one_body(tmp_path: Path) -> None:
    """A flood of scrapes reads the database once per min_interval_s."""
    with running_collector(tmp_path, _cfg(min_interval_s=3600.0)) as c:
        token = c.add_token("prom")
        first = scrape(c.url, token)[1]
        c.add_probe("new")
        assert scrape(c.url, token)[1] == first
        assert value(samples(first), "bbprobe_fleet_probes") == 0


def test_metrics_off(tmp_path: Path) -> None:
    """With metrics disabled, /metrics is a 404."""
    with running_collector(tmp_path, _cfg(enabled=False)) as c:
        assert scrape(c.url, c.add_token("prom"))[0] == 404


def test_transfer_slots_are_counted() -> None:
    """The transfer-slot gauge follows running transfers, and refusals are counted by reason
    (per_client, busy) next to the configured limit."""
    import asyncio

    m = metrics_mod.Metrics()

    async def main() -> None:
        slots = TransferSlots(2, 1, m)
        async with slots.slot("198.18.0.1"):
            assert m.transfers._value.get() == 1
            with pytest.raises(ApiError):
                async with slots.slot("198.18.0.1"):
                    pass
            async with slots.slot("198.18.0.2"):
                with pytest.raises(ApiError):
                    async with slots.slot("198.18.0.3"):
                        pass
        assert m.transfers._value.get() == 0

    asyncio.run(main())
    parsed = samples(_exposition(m))
    assert value(parsed, "bbprobe_collector_measurement_transfers_refused_total",
                 reason="per_client") == 1
    assert value(parsed, "bbprobe_collector_measurement_transfers_refused_total",
                 reason="busy") == 1
    assert value(parsed, "bbprobe_collector_measurement_transfers_limit") == 2


def _exposition(m: metrics_mod.Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry()).decode()


@pytest.mark.parametrize(("metrics", "message"), [
    ({"listen": "9464"}, "metrics.listen: expected host:port"),
    ({"listen": "::1:9464"}, "metrics.listen: an IPv6 address goes in brackets"),
    ({"listen": "[::1:9464"}, "metrics.listen: unbalanced brackets"),
    ({"listen": "host:99999"}, "metrics.listen: port: expected 0..65535"),
    ({"listen": "127.0.0.1:9464", "min_interval_s": 0.5},
     "metrics.min_interval_s: at least 1 s with metrics.listen"),
    ({"listen": "127.0.0.1:9464", "enabled": False}, "metrics.enabled = false"),
    ({"listen": "127.0.0.1:8080"}, "the same address as the server"),
])
def test_config_refuses_a_bad_listener(metrics: dict[str, Any], message: str) -> None:
    """An open listener: a valid address, not the server's, and cached scrapes."""
    from collector.config import parse
    from collector.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse({"metrics": metrics})
    assert parse({"metrics": {"listen": "[::1]:9464"}}).metrics.listen == "[::1]:9464"


def test_a_measurement_server_exposes_its_slots_on_the_open_listener(tmp_path: Path) -> None:
    """Role "measurement" has no store, hence no token check: its metrics only on
    metrics.listen, with the slots and requests and nothing of a fleet."""
    from collector.server import app as app_mod
    from collector.server.testing import serve_in_thread

    port = free_port()
    cfg = replace(_cfg(listen=f"127.0.0.1:{port}", min_interval_s=1.0),
                  server=ServerConfig(host="127.0.0.1", port=0))
    with serve_in_thread(lambda: app_mod.start(cfg, role="measurement")) as url:
        assert request("GET", url + "/measure/v1/download?bytes=100000")[0] == 200
        assert scrape(url, None)[0] == 404
        parsed = samples(scrape(f"http://127.0.0.1:{port}", None)[1])
        assert value(parsed, "bbprobe_collector_measurement_transfers_limit") == 128
        assert value(parsed, "bbprobe_collector_http_requests_total",
                     route="/measure/v1/download", method="GET", code="200") == 1
        assert value(parsed, "bbprobe_fleet_probes") is None
        assert value(parsed, "bbprobe_collector_state_up") is None


def test_the_shipped_scrape_config_matches_a_default_collector() -> None:
    """configs/prometheus/prometheus.yml scrapes the collector as a default install serves
    /metrics: plain HTTP unless TLS is configured (it is not by default), on the default
    port, with a bearer token from a file."""
    text = (Path(__file__).resolve().parents[2] / "configs" / "prometheus"
            / "prometheus.yml").read_text()
    defaults = CollectorConfig()
    job = text.split("job_name: bbprobe-collector", 1)[1].split("job_name:", 1)[0]
    scheme = re.search(r"^\s*scheme:\s*(\S+)", job, re.M)
    assert scheme is not None
    assert scheme.group(1) == ("https" if defaults.server.tls_cert else "http")
    assert f':{defaults.server.port}"' in job
    assert "credentials_file:" in job
