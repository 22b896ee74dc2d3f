"""The collector's log: a line per result received and a line per request, in logfmt
(``key=value``, values with spaces quoted) so that ``journalctl -u bbprobe-collector |
grep probe=roma-01`` and log tools (Loki's logfmt parser, lnav) read it.

    event=ingest probe=roma-01 result=3f2a9c1b sha256=9ab1c2d3e4f5 outcome=accepted
      status=201 bytes=48213 ms=12.4 remote=192.0.2.7
    event=access method=GET path=/api/v1/instruction status=200 ms=3.1
      remote=192.0.2.7 role=probe probe=roma-01

A result delivery (POST /api/v1/results, or each result of a batch) is an ``ingest``
line, in place of its request's ``access`` line: one line per result, grep-able by its
id; a delivery refused whole (a bad token, a body that is not a result) is one ingest
line with the reason. Every other request is an ``access`` line ([log] access), but for
the measurement traffic (the transfers, LibreSpeed's and ndt7's endpoints, the speed-test
page and its files; routing.STREAMS): a test is dozens of such requests, a busy server
thousands a minute, which would flood the journal past its rate limit and lose the
warnings with them. Those are counted instead, one ``measurements`` line a minute (at
debug, a line each as well):

    event=measurements period_s=60 requests=48 refused=1 busy_s=412.3
      endpoints="GET /measure/v1/download 24, POST /measure/v1/upload 24"

What is never written: the query string (it may carry a token: server.query_auth's
Basic login aside, a browser may put anything there), any header (Authorization), a
request body, the key of a saved browser result's link (the link is its only credential:
``/speedtest/result/<redacted>``). The path is written, at most PATH_CHARS of it.

Cost on the event loop: one ``Logger.info`` per result delivered (a record and a queue
put); the line is formatted and written by a thread of its own (``Background``), so a
slow journal or a full stderr pipe never makes a request wait: past QUEUE_LINES queued
lines are dropped, and how many is said when writing resumes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import IO, Any

from aiohttp import web

from agent import logline, spec
from collector.routing import STREAMS, role_of

ACCESS = logging.getLogger("bbprobe.collector.access")
INGEST = logging.getLogger("bbprobe.collector.ingest")

INGEST_PATHS = frozenset({spec.RESULTS_PATH, spec.RESULTS_PATH + "/batch"})
PATH_CHARS = 200
VALUE_CHARS = 300
QUEUE_LINES = 4096
# A result id or hash, shortened: 8 hex digits of a UUID4 (32 bits: a collision among a
# probe's results is one in millions), 12 of a SHA-256.
ID_CHARS = 8
HASH_CHARS = 12
# Paths whose rest is a secret (a saved browser result's link opens its page to anyone
# holding it): written up to here.
SECRET_PATHS = ("/speedtest/result/",)
REDACTED = "<redacted>"
SUMMARY_S = 60.0

_PLAIN = re.compile(r'[^\s"=\\\x00-\x1f\x7f]+')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quoted(value: object) -> str:
    """A logfmt value: bare when it has no space, quote, '=' or control character;
    else in double quotes with those escaped (control characters as \\xNN)."""
    if type(value) is int:
        return str(value)
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    if len(text) > VALUE_CHARS:
        text = text[:VALUE_CHARS] + "…"
    if text and _PLAIN.fullmatch(text):
        return text
    escaped = "".join(_ESCAPES.get(c, f"\\x{ord(c):02x}" if c < " " or c == "\x7f" else c)
                      for c in text)
    return f'"{escaped}"'


class Line:
    """A logfmt line made when it is written (by the log's thread): the pairs whose
    value is None are left out."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: Iterable[tuple[str, object]]) -> None:
        self.pairs = tuple(pairs)

    def __str__(self) -> str:
        return " ".join(f"{key}={quoted(value)}" for key, value in self.pairs
                        if value is not None)


class Entry:
    """What a handler tells the log about its request: the probe it authenticated, the
    results it judged (id, body SHA-256, status, refusal) when they differ from the
    request's own status (a batch's items)."""

    __slots__ = ("batch", "probe", "results")

    def __init__(self) -> None:
        self.probe: str | None = None
        self.results: list[tuple[str | None, str | None]] = []
        self.batch: Sequence[Mapping[str, Any]] | None = None


ENTRY = web.RequestKey("bbprobe_access_entry", Entry)


def note_probe(request: web.Request, probe: str) -> None:
    """The probe a handler authenticated."""
    entry = request.get(ENTRY)
    if entry is not None:
        entry.probe = probe


def note_result(request: web.Request, result_id: str, sha256: str) -> None:
    """The result a POST /api/v1/results carries, once decoded: its outcome is the
    request's status (201 accepted, 200 duplicate, else refused)."""
    entry = request.get(ENTRY)
    if entry is not None:
        entry.results.append((result_id, sha256))


def note_batch(request: web.Request, replies: Sequence[Mapping[str, Any]],
               sha256: Sequence[str | None]) -> None:
    """A batch's items as answered ({result_id, status, error}), with each body's hash
    (None: refused before it was hashed)."""
    entry = request.get(ENTRY)
    if entry is not None:
        entry.batch = replies
        entry.results = [(r.get("result_id"), h) for r, h in zip(replies, sha256,
                                                                  strict=True)]


def _outcome(status: int) -> str:
    return "accepted" if status == 201 else "duplicate" if status == 200 else "refused"


def _reason(response: web.StreamResponse | None) -> str | None:
    """A refusal's message, from its JSON body (web/replies.py's {"error": ...})."""
    body = getattr(response, "body", None)
    if not isinstance(body, bytes) or len(body) > 4096:
        return None
    try:
        said = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return said if isinstance(said, str) else None


def _ingest_lines(request: web.Request, entry: Entry, status: int, ms: float,
                  response: web.StreamResponse | None) -> None:
    common = (("status", status), ("bytes", request.content_length), ("ms", ms),
              ("remote", request.remote))
    if entry.batch is not None:  # a batch judged: a line per result
        n = len(entry.batch)
        for index, (reply, (rid, digest)) in enumerate(zip(entry.batch, entry.results,
                                                           strict=True)):
            item = int(reply.get("status") or status)
            _emit(INGEST, Line((
                ("event", "ingest"), ("probe", entry.probe), ("result", _short(rid, ID_CHARS)),
                ("sha256", _short(digest, HASH_CHARS)), ("outcome", _outcome(item)),
                ("batch", f"{index + 1}/{n}" if n > 1 else None), ("status", item),
                ("reason", reply.get("error") if item >= 300 else None), *common[1:])))
        return
    rid, digest = entry.results[0] if entry.results else (None, None)
    refused = status not in (200, 201)
    _emit(INGEST, Line((
        ("event", "ingest"), ("probe", entry.probe), ("result", _short(rid, ID_CHARS)),
        ("sha256", _short(digest, HASH_CHARS)), ("outcome", _outcome(status)),
        ("reason", _reason(response) if refused else None), *common)))


def _emit(logger: logging.Logger, line: Line, level: int = logging.INFO) -> None:
    """``logger.info(line)`` without looking up the caller's file and line (a stack
    walk per request that these lines never show)."""
    logger.handle(logger.makeRecord(logger.name, level, "", 0, line, (), None))


def _short(text: str | None, n: int) -> str | None:
    return text[:n] if text else None


def logged_path(path: str) -> str:
    """``path`` as written: its secret part (SECRET_PATHS) redacted, wherever it starts
    (``//speedtest/result/…`` is not routed, yet may carry a real link), then cut."""
    for secret in SECRET_PATHS:
        at = path.find(secret)
        if at >= 0:
            path = path[:at + len(secret)] + REDACTED
    return path[:PATH_CHARS]


class Tally:
    """The measurement requests since the last ``measurements`` line, said ``period_s``
    after the first one (a timer on the event loop of that request: an idle server
    writes nothing) and by ``flush``. Locked: the loops of tests' collectors run in
    threads of their own."""

    def __init__(self, period_s: float = SUMMARY_S) -> None:
        self.period_s = period_s
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._refused = 0
        self._busy_s = 0.0
        self._since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, endpoint: str, status: int, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            self._counts[endpoint] = self._counts.get(endpoint, 0) + 1
            self._refused += status >= 400
            self._busy_s += seconds
            if self._since is None:
                self._since = time.monotonic()
            # A window opened on a loop that has since closed has no timer left.
            if self._loop is not loop:
                self._loop = loop
                self._timer = loop.call_later(self.period_s, self.say)

    def take(self) -> Line | None:
        """The summary line of the requests counted so far (None: none), and a new
        window."""
        with self._lock:
            counts, since = self._counts, self._since
            refused, busy_s = self._refused, self._busy_s
            self._counts, self._refused, self._busy_s, self._since = {}, 0, 0.0, None
            timer, self._timer, self._loop = self._timer, None, None
        if timer is not None:
            timer.cancel()
        if since is None:
            return None
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return Line((("event", "measurements"),
                     ("period_s", round(time.monotonic() - since)),
                     ("requests", sum(counts.values())), ("refused", refused),
                     ("busy_s", busy_s),
                     ("endpoints", ", ".join(f"{name} {n}" for name, n in ranked))))

    def say(self) -> None:
        line = self.take()
        if line is not None and ACCESS.isEnabledFor(logging.INFO):
            _emit(ACCESS, line)


TALLY = Tally()


def _access_line(request: web.Request, entry: Entry, status: int, ms: float,
                 response: web.StreamResponse | None) -> Line:
    matched = request.match_info.http_exception is None
    return Line((
        ("event", "access"), ("method", request.method), ("path", logged_path(request.path)),
        ("status", status), ("ms", ms), ("remote", request.remote),
        ("role", role_of(request) if matched else None), ("probe", entry.probe),
        ("reason", _reason(response) if status >= 400 else None)))


def _said(request: web.Request, entry: Entry, status: int, started: float,
          response: web.StreamResponse | None) -> None:
    ms = (time.perf_counter() - started) * 1000
    if request.method == "POST" and request.path in INGEST_PATHS:
        if INGEST.isEnabledFor(logging.INFO):
            _ingest_lines(request, entry, status, ms, response)
        return
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    resource = request.match_info.route.resource
    if resource is not None and id(resource) in request.app.get(STREAMS, ()):
        method = "GET" if request.method == "HEAD" else request.method
        TALLY.add(f"{method} {resource.canonical}", status, ms / 1000)
        if ACCESS.isEnabledFor(logging.DEBUG):
            _emit(ACCESS, _access_line(request, entry, status, ms, response), logging.DEBUG)
        return
    _emit(ACCESS, _access_line(request, entry, status, ms, response))


@web.middleware
async def access_log(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Times the request and says it when it is answered (after the error middleware
    turned a refusal into its reply); a client gone mid-request is status 499 (nginx's
    "client closed request"), an unhandled error 500."""
    if not (INGEST.isEnabledFor(logging.INFO) or ACCESS.isEnabledFor(logging.INFO)):
        return await handler(request)
    entry = request[ENTRY] = Entry()
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _said(request, entry, exc.status, started, None)
        raise
    except asyncio.CancelledError:
        _said(request, entry, 499, started, None)
        raise
    except BaseException:
        _said(request, entry, 500, started, None)
        raise
    _said(request, entry, response.status, started, response)
    return response


# --- writing: formatted for journald, off the event loop ------------------------------


class LogfmtFormatter(logging.Formatter):
    """Under journald ``<6>event=...`` (the priority, sd-daemon(3); journald stamps the
    time); elsewhere ``ts=2026-12-07T14:20:00.123Z level=info event=...``. A line not
    made by ``Line`` (a warning from elsewhere) is ``msg="..."``, with its logger's name
    when it is not the collector's."""

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, Line):
            body = str(record.msg)
        else:
            source = None if record.name.startswith("bbprobe") else record.name
            body = str(Line((("logger", source), ("msg", record.getMessage()))))
        if record.exc_info:
            body += "\n" + self.formatException(record.exc_info)
        if self.journald:
            return f"<{logline.PRIORITY.get(record.levelno, 6)}>{body}"
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        return f"ts={stamp.replace('+00:00', 'Z')} level={record.levelname.lower()} {body}"


class Background(logging.Handler):
    """Queues records; a thread of its own formats and writes them, so the event loop
    never waits on the stream. Past ``capacity`` queued records, new ones are dropped
    and counted (said once writing resumes). Started in the process that first logs
    through it: a forked worker (serve --workers) starts its own."""

    def __init__(self, stream: IO[str], capacity: int = QUEUE_LINES) -> None:
        super().__init__()
        self.stream = stream
        self.capacity = capacity
        self.dropped = 0
        self._pid: int | None = None
        self._queue: queue.Queue[logging.LogRecord | None] = queue.Queue(capacity)
        self._thread: threading.Thread | None = None
        self._closed = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._closed:  # no thread any more (flush, exit): written here, not lost
            self._write_now(record)
            return
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._queue = queue.Queue(self.capacity)
            self._thread = threading.Thread(target=self._write, args=(self._queue,),
                                            name="bbprobe-log", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _write(self, source: queue.Queue[logging.LogRecord | None]) -> None:
        while True:
            batch = [source.get()]
            while len(batch) < 256:
                try:
                    batch.append(source.get_nowait())
                except queue.Empty:
                    break
            lines = []
            for record in batch:
                if record is None:
                    continue
                try:
                    lines.append(self.format(record))
                except Exception:  # a bad record costs its line, not the log
                    lines.append("level=error msg=\"a log record could not be formatted\"")
            self.acquire()
            try:
                dropped, self.dropped = self.dropped, 0
            finally:
                self.release()
            if dropped:
                lines.append(self.format(logging.LogRecord(
                    "bbprobe.collector", logging.WARNING, __file__, 0,
                    Line((("event", "log_dropped"), ("lines", dropped),
                          ("reason", "stderr was not read fast enough"))), None, None)))
            try:
                if lines:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed: nothing left to tell
            if any(record is None for record in batch):
                return

    def _write_now(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            self.acquire()
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            finally:
                self.release()
        except (OSError, ValueError):
            pass  # stderr closed: nothing left to tell
        except Exception:  # a bad record costs its line, not the caller
            self.handleError(record)

    def close(self) -> None:
        """Write what is queued (at most a few seconds), then stop the thread; later
        records are written as they come."""
        self._closed = True
        thread = self._thread
        if thread is not None and self._pid == os.getpid() and thread.is_alive():
            try:
                self._queue.put(None, timeout=2.0)
                thread.join(5.0)
            except queue.Full:
                pass
        self._thread = None
        super().close()


def configure(level: str, access: bool, environ: Mapping[str, str] = os.environ,
              stream: IO[str] | None = None) -> Background:
    """The collector process's logging: every logger (aiohttp's errors too) at ``level``
    through one ``Background`` handler on stderr; the access lines only if ``access``."""
    out = stream if stream is not None else sys.stderr
    handler = Background(out)
    handler.setFormatter(LogfmtFormatter(logline.journal_stream(environ, out)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logline.level_of(level))
    ACCESS.setLevel(logging.NOTSET if access else logging.WARNING)
    return handler


def flush() -> None:
    """Say the measurements counted so far and write every queued line now (before a
    process exits without atexit: a forked worker). A line logged afterwards is written
    at once, by its caller."""
    TALLY.say()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, Background):
            handler.close()
