"""The collector's log: one logfmt line per result received (probe, short id and hash,
accepted/duplicate/refused with the reason, bytes, ms) and one per other request
(method, path without its query, status, ms, client, role, probe); tokens never; a
level switch ([log] level, serve --log-level) and [log] access."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import spec
from collector import config
from collector.fleet import probes
from collector.lines import LineMetadata
from collector.server.testing import bound_url, running_collector, stop
from collector.storage.sql.backends import open_store
from collector.web import accesslog
from tests.factories import session_dict
from tests.httpclient import post_json, request

ROOT = Path(__file__).resolve().parents[2]


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(r.msg) for r in caplog.records
            if r.name in ("bbprobe.collector.ingest", "bbprobe.collector.access")]


def test_each_ingest_and_request_is_one_line(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Accepted, duplicate, refused (a bad token, a wrong probe), a batch line per result,
    an access line with the probe and no query; the token appears nowhere."""
    caplog.set_level(logging.INFO, logger="bbprobe.collector")
    with running_collector(tmp_path) as c:
        token = c.add_probe("p1")
        doc = session_dict(probe_id="p1")
        url = c.url + spec.RESULTS_PATH
        assert post_json(url, doc, token)[0] == 201
        assert post_json(url, doc, token)[0] == 200
        assert post_json(url, doc, token + "x")[0] == 401
        assert post_json(url, session_dict(probe_id="p2"), token)[0] == 403
        good, bad = session_dict(probe_id="p1"), session_dict(probe_id="p1")
        bad["duration_s"] = -1
        assert post_json(url + "/batch", {"results": [good, bad]}, token)[0] == 200
        status, _, _ = request("GET", f"{c.url}{spec.WHOAMI_PATH}?token={token}",
                               headers={"Authorization": f"Bearer {token}"})
        assert status == 200
    lines = _lines(caplog)
    rid, ms = doc["result_id"][:8], r"ms=\d+\.\d"
    size = len(json.dumps(doc).encode())
    accepted = (rf"event=ingest probe=p1 result={rid} sha256=[0-9a-f]{{12}} "
                rf"outcome=accepted status=201 bytes={size} {ms} remote=127\.0\.0\.1")
    assert re.fullmatch(accepted, lines[0]), lines[0]
    assert re.fullmatch(accepted.replace("accepted status=201", "duplicate status=200"),
                        lines[1]), lines[1]
    assert re.fullmatch(rf'event=ingest outcome=refused reason="unknown or revoked token" '
                        rf"status=401 bytes=\d+ {ms} remote=127\.0\.0\.1", lines[2]), lines[2]
    assert lines[3].startswith("event=ingest probe=p1 result=")
    assert "outcome=refused reason=\"result is for probe 'p2' but the token belongs to " \
           "'p1'\" status=403" in lines[3]
    assert re.fullmatch(rf"event=ingest probe=p1 result={good['result_id'][:8]} "
                        rf"sha256=[0-9a-f]{{12}} outcome=accepted batch=1/2 status=201 "
                        rf"bytes=\d+ {ms} remote=127\.0\.0\.1", lines[4]), lines[4]
    assert lines[5].startswith(f"event=ingest probe=p1 result={bad['result_id'][:8]} "
                               "outcome=refused batch=2/2 status=422 reason=\"")
    assert re.fullmatch(rf"event=access method=GET path={spec.WHOAMI_PATH} status=200 "
                        rf"{ms} remote=127\.0\.0\.1 role=probe probe=p1", lines[6]), lines[6]
    assert len(lines) == 7
    assert all(token not in r.getMessage() for r in caplog.records)


def test_values_are_logfmt() -> None:
    """Spaces, quotes, '=' and control characters are quoted and escaped; None is
    left out."""
    line = accesslog.Line((("a", "plain"), ("b", 'say "hi"=\n'), ("c", None), ("d", 2.25),
                           ("e", "")))
    assert str(line) == 'a=plain b="say \\"hi\\"=\\n" d=2.2 e=""'


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure() takes over the root logger: put it back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        accesslog.ACCESS.setLevel(logging.NOTSET)


@pytest.mark.usefixtures("root_logging")
def test_configure_journald_and_the_access_switch(tmp_path: Path) -> None:
    """Under journald: "<6>" and no timestamp; elsewhere ts= and level=; access = false
    keeps the ingests; a full queue drops lines, then says how many."""
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        accesslog.configure("info", False, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
                            stream)
        accesslog.INGEST.info(accesslog.Line((("event", "ingest"), ("probe", "p1"))))
        accesslog.ACCESS.info(accesslog.Line((("event", "access"),)))
        logging.getLogger("bbprobe.collector").warning("database unavailable: %s", "x")
        accesslog.flush()
    assert path.read_text() == ('<6>event=ingest probe=p1\n'
                                '<4>msg="database unavailable: x"\n')
    out = io.StringIO()
    handler = accesslog.configure("warning", True, {}, out)
    accesslog.INGEST.info(accesslog.Line((("event", "ingest"),)))
    logging.getLogger("aiohttp.server").error("Error handling request")
    handler.close()
    assert re.fullmatch(r'ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=error '
                        r'logger=aiohttp\.server msg="Error handling request"\n',
                        out.getvalue()), out.getvalue()


def test_a_full_queue_drops_and_says_so() -> None:
    """Lines past the queue's capacity are dropped and counted, never waited for."""
    out = io.StringIO()
    handler = accesslog.Background(out, capacity=2)
    handler.setFormatter(accesslog.LogfmtFormatter(journald=True))
    handler.dropped = 5
    handler.emit(logging.LogRecord("bbprobe.collector.ingest", logging.INFO, __file__, 0,
                                   accesslog.Line((("event", "ingest"),)), None, None))
    handler.close()
    assert out.getvalue() == ('<6>event=ingest\n<4>event=log_dropped lines=5 '
                              'reason="stderr was not read fast enough"\n')


def test_log_keys_are_validated() -> None:
    """[log] level is one of the level names; access a boolean."""
    assert config.parse({"log": {"level": "warning", "access": False}}).log.access is False
    with pytest.raises(config.ConfigError, match=r"log\.level: must be one of"):
        config.parse({"log": {"level": "loud"}})


def test_serve_logs_at_its_level(tmp_path: Path) -> None:
    """``serve --log-level`` beats [log] level: at info with access = false the ingest
    line is there and no access line; at warning neither; the token never."""
    db = tmp_path / "c.sqlite3"
    cfg = tmp_path / "collector.toml"
    cfg.write_text(f'[server]\nhost = "127.0.0.1"\nport = 0\n\n[storage]\npath = "{db}"\n\n'
                   '[log]\nlevel = "warning"\naccess = false\n')
    store = open_store(config.load(cfg).storage)
    try:
        token = probes.register_probe(store, "p1", LineMetadata())
    finally:
        store.close()
    said = {}
    for level in ("info", "warning"):
        addr = tmp_path / f"{level}.addr"
        server = subprocess.Popen(
            [sys.executable, "-m", "collector", "--config", str(cfg), "serve",
             "--log-level", level, "--addr-file", str(addr)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            url = bound_url(server, addr)
            assert post_json(url + spec.RESULTS_PATH, session_dict(probe_id="p1"),
                             token)[0] == 201
            assert request("GET", url + "/healthz")[0] == 200
        finally:
            said[level] = stop(server)[1] or ""
        assert server.returncode == 0, said[level]
    ingest = re.compile(r"ts=\S+ level=info event=ingest probe=p1 result=[0-9a-f]{8} ")
    assert ingest.search(said["info"]), said["info"]
    assert "event=access" not in said["info"]
    assert "event=" not in said["warning"], said["warning"]
    assert token not in said["info"] + said["warning"]


def test_measurement_traffic_is_counted_not_lined(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A download, the speed-test page and its HEAD write no access line at info, but
    one event=measurements line with the counts per endpoint (at debug, a line each
    too); an API request beside them keeps its line."""
    caplog.set_level(logging.INFO, logger="bbprobe.collector")
    accesslog.TALLY.take()  # what earlier tests left
    with running_collector(tmp_path) as c:
        for _ in range(2):
            assert request("GET", f"{c.url}{spec.DOWNLOAD_PATH}?bytes=1000", raw=True)[0] \
                == 200
        assert request("HEAD", c.url + "/speedtest", raw=True)[0] == 200
        assert request("GET", c.url + "/healthz")[0] == 200
        assert not [line for line in _lines(caplog) if "/measure/" in line
                    or "/speedtest" in line]
        caplog.set_level(logging.DEBUG, logger="bbprobe.collector")
        assert request("GET", f"{c.url}{spec.DOWNLOAD_PATH}?bytes=1000", raw=True)[0] \
            == 200
    accesslog.flush()
    lines = _lines(caplog)
    assert re.fullmatch(r"event=access method=GET path=/healthz status=200 ms=\S+ "
                        r"remote=127\.0\.0\.1 role=public", lines[0]), lines
    assert re.fullmatch(rf"event=access method=GET path={spec.DOWNLOAD_PATH} status=200 "
                        r"ms=\S+ remote=127\.0\.0\.1 role=public", lines[1]), lines
    assert [r.levelname for r in caplog.records if r.msg is not None
            and "path=/measure" in str(r.msg)] == ["DEBUG"]
    assert re.fullmatch(rf'event=measurements period_s=\d+ requests=4 refused=0 '
                        rf'busy_s=\d+\.\d endpoints="GET {spec.DOWNLOAD_PATH} 3, '
                        rf'GET /speedtest 1"', lines[2]), lines
    assert len(lines) == 3


def test_the_summary_comes_a_period_after_the_first_request(
        caplog: pytest.LogCaptureFixture) -> None:
    """The tally's timer says the window on its own; an idle one says nothing."""
    caplog.set_level(logging.INFO, logger="bbprobe.collector")
    tally = accesslog.Tally(period_s=0.05)

    async def traffic() -> None:
        tally.add("GET /ndt/v7/download", 101, 10.0)
        tally.add("GET /ndt/v7/download", 503, 0.001)
        await asyncio.sleep(0.3)

    asyncio.run(traffic())
    assert _lines(caplog) == ['event=measurements period_s=0 requests=2 refused=1 '
                              'busy_s=10.0 endpoints="GET /ndt/v7/download 2"']
    assert tally.take() is None


def test_a_result_link_is_never_written(tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """The saved browser result's link is its page's only credential: its path is
    written /speedtest/result/<redacted>, even when not routed (//…, a trailing /)."""
    caplog.set_level(logging.INFO, logger="bbprobe.collector")
    doc = {"rtt_min_ms": 0.4, "rtt_mean_ms": 0.5, "jitter_ms": 0.1, "rtts_ms": [0.45] * 9,
           "download_bps": 9e7, "upload_bps": 2e7, "download_bytes": 10**8,
           "upload_bytes": 3 * 10**7, "user_agent": "TestBrowser/1",
           "method": {"streams": 4, "warmup_s": 2, "window_s": 8, "ping_count": 9,
                      "upload_counted_at": "server"}}
    with running_collector(tmp_path) as c:
        status, saved, _ = request("POST", c.url + "/api/v1/browser-results",
                                   json.dumps(doc).encode(),
                                   {"Content-Type": "application/json"})
        assert status == 201, saved
        link = saved["link"]
        assert request("GET", f"{c.url}/speedtest/result/{link}", raw=True)[0] == 200
        assert request("GET", f"{c.url}//speedtest/result/{link}/", raw=True)[0] == 404
    paths = [line.split(" path=")[1].split()[0] for line in _lines(caplog)]
    assert paths == ["/api/v1/browser-results", "/speedtest/result/<redacted>",
                     "//speedtest/result/<redacted>"]
    assert all(link not in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("root_logging")
def test_a_line_logged_after_flush_is_written() -> None:
    """After flush (a worker's end, exit) the writing thread is gone: a later line is
    written by its caller, not queued for nobody."""
    out = io.StringIO()
    accesslog.configure("info", True, {}, out)
    accesslog.INGEST.info(accesslog.Line((("event", "ingest"), ("probe", "p1"))))
    accesslog.flush()
    accesslog.INGEST.info(accesslog.Line((("event", "ingest"), ("probe", "p2"))))
    logging.getLogger("bbprobe.collector").warning("stopping")
    said = out.getvalue().splitlines()
    assert [line.split(" ", 2)[2] for line in said] == [
        "event=ingest probe=p1", "event=ingest probe=p2", 'msg=stopping']
