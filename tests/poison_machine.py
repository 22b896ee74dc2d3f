"""Poison isolation: a Hypothesis state machine in which hostile writers (a
probe's token, an administrator, anonymous clients) interleave with every read surface
of one real collector, and no read about a probe the hostile writer does not own may
change.

The world of one machine run (``World``): a collector on 127.0.0.1 port 0 (SQLite in a
temporary directory, or a fresh PostgreSQL database) with alerts on; probe "victim"
(a contracted line, four recent sessions, one of them invalid, and a health report
mid-campaign) and probe "attacker" (a contracted line and a complete 24-band campaign
below its minimum: a breach waiting to be reported); an admin and an analyst token.
The victim's reads are taken once (the *baseline*) before the first hostile write.

Rules write as the attacker (results, batches, health reports, gap records), as an
administrator (instruction rules and suppression windows for the attacker's selectors,
new probes, the attacker's line) and as anonymous clients (browser results, the
measurement endpoints, hostile queries), with values that mix the valid and the hostile:
timestamps from year 1 to 9999 in every spelling ``datetime.fromisoformat`` takes (and
some it does not), lone surrogates, escape sequences, NUL, CSV formulae, HTML, huge
strings, deep nesting. Other rules read.

The invariants:

1. no write gets a 5xx (nor a CLI command a traceback);
2. every read about the victim answers (2xx, exit 0) with what it answered at baseline,
   once time-varying fields ("last seen 12 s ago", "generated ...") are normalised;
3. reads of the whole fleet answer 2xx (their content includes the attacker's, so only
   the answer is checked);
4. every output is safe for its reader: HTML carries no attacker markup unescaped, no
   CSV cell starts a formula (= + - @, unless a number) or holds a control character,
   terminal output holds no control character but newlines, JSON is UTF-8 with no lone
   surrogate, /metrics parses with Prometheus's own parser and says
   ``bbprobe_collector_state_up 1``;
5. an alerter tick (collector/alerts/worker.py, run in-process against the store) does not
   raise, raises nothing about the victim, and an alert is raised once: at most one
   alert of a kind (contract_breach, campaign_incomplete) per probe, campaign instant
   and IP version, however the campaign's start is spelled.

tests/collector/test_poison.py runs it on both backends: briefly in CI, for a time budget
with BBPROBE_POISON_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import difflib
import io
import json
import re
import shutil
import tempfile
import time
import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, NamedTuple
from urllib.parse import quote

from click.testing import CliRunner
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule
from prometheus_client.parser import text_string_to_metric_families

from agent import spec
from agent.schema import SCHEMA_VERSION, parse_utc
from collector.alerts.worker import Alerter
from collector.cli.main import main as cli_main
from collector.config import (
    AlertsConfig,
    AnonymousConfig,
    CollectorConfig,
    MeasurementConfig,
    MetricsConfig,
    ServerConfig,
    StorageConfig,
)
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector, running_collector
from collector.storage.store import Store
from tests.factories import attempt, session_dict
from tests.httpclient import request

VICTIM, ATTACKER = "victim", "attacker"
VICTIM_LINE = LineMetadata(operator="Victim Telecom", offer="Fibra 100", region="Lazio",
                           technology="FTTH", download_min_kbps=30_000.0,
                           download_normal_kbps=60_000.0, download_nominal_kbps=100_000.0,
                           upload_min_kbps=5_000.0, upload_normal_kbps=8_000.0,
                           upload_nominal_kbps=10_000.0, max_delay_ms=100.0,
                           max_loss_ratio=0.5)
# The factory's sessions run at 50 Mbit/s: below this minimum, so the attacker's
# complete campaign is a breach (a contract_breach alert once it reports it complete).
ATTACKER_LINE = LineMetadata(operator="Attacker Net", offer="Cheap", region="Umbria",
                             technology="FWA", download_min_kbps=100_000.0)
# The attacker's campaign: 24 sessions, one an hour from midnight in Rome (every hourly
# band once: rule 24in72h), long enough ago to be over.
CAMPAIGN_START = datetime(2026, 3, 1, 23, 0, tzinfo=UTC)

# Small transfers and no rate limits: generated requests reach the handlers, not the
# limiters. Metrics made at every scrape (min_interval_s 0), so a scrape shows the state
# of the moment. Alerts on (no notifier: recorded, never sent), the background alerter
# asleep between the ticks the machine runs itself.
BASE_CONFIG = replace(
    CollectorConfig(),
    server=replace(ServerConfig(), probe_requests_per_min=0, body_timeout_s=5),
    measurement=replace(MeasurementConfig(), max_bytes=100_000, max_duration_s=0.5),
    anonymous=replace(AnonymousConfig(), browser_results_per_min=6000),
    metrics=replace(MetricsConfig(), min_interval_s=0),
    alerts=replace(AlertsConfig(), enabled=True, interval_s=3600),
)

# --- hostile values -------------------------------------------------------------------

# Markup a page must escape: each contains < or ", so seeing one verbatim in HTML means
# it went out unescaped.
HTML_PAYLOADS = ("<script>alert('bbp-poison')</script>", '"><img src=x onerror=bbp()>',
                 "</script><svg onload=bbp()>", "<!--bbp", "' onmouseover='bbp()")
FRAGMENTS = (
    "\ud800", "\udfff", "a\udc80b",            # lone surrogates (JSON "\\ud800")
    "\x1b[2J", "\x1b]0;owned\x07", "\x1b[31m",  # terminal escapes
    "\x00", "\r", "\n", "\t", "\x7f", "\x9b",   # NUL, controls, C1 CSI
    "\u202e", "\u2028", "\ufeff", "\u0301",     # bidi override, line separator, BOM
    "=HYPERLINK(\"http://x\",\"y\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)",
    *HTML_PAYLOADS,
    "' OR 1=1 --", "\\", "\"", "%s%n", "${jndi:ldap://x/a}", "{{7*7}}", "🦄", "Ω",
    "victim", "Victim Telecom",
)


class Huge(str):
    """A long string that prints short in a failing example."""

    __slots__ = ("part",)
    part: str

    def __new__(cls, part: str, times: int = 20_000) -> Huge:
        made = super().__new__(cls, part * times)
        made.part = part
        return made

    def __repr__(self) -> str:
        return f"Huge({self.part!r}, {len(self) // max(len(self.part), 1)})"


def _huge(parts: list[str]) -> str:
    return Huge("".join(parts))


hostile_text = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), min_size=1,
             max_size=5).map("".join),
    st.sampled_from(FRAGMENTS),
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=2).map(_huge),
    st.text(min_size=1, max_size=40),
)
# Text an identifier field might hold (<= 64 characters: what the schema lets through
# where it bounds a field, so the write reaches the store).
short_text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), min_size=1,
                      max_size=4).map("".join).filter(lambda s: 0 < len(s) <= 60)

EDGE_TIMESTAMPS = (
    "0999-06-01T10:00:00.000000Z", "0999-06-01T10:00:00Z", "0001-01-01T00:00:00.000000Z",
    "0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00-14:00", "9999-12-31T23:59:59.999999Z",
    "9999-12-31T23:59:59-14:00", "9999-12-31T23:59:59+14:00", "2999-01-01T00:00:00Z",
    "2100-02-28T12:00:00+05:45", "2016-12-31T23:59:60Z", "2026-02-30T00:00:00Z",
    "2026-12-01T24:00:00Z", "2026-12-01T10:00:00", "2026-12-01", "20261201T100000Z",
    "2026-W49-1T10:00:00Z", "2026-12-01T10:00:00.1234567Z", "2026-12-01T10:00:00+01:00:30",
    "2026-12-01 10:00:00+00:00", "2026-12-01t10:00:00z", "+002026-12-01T10:00:00Z",
    "1970-01-01T00:00:00Z", "1969-12-31T23:59:59.999999Z", "2026-12-01T10:00:00\x00Z",
    "2026-12-01T10:00:00Z\n", "\uff12\uff10\uff12\uff16-12-01T10:00:00Z",
)
STYLES = ("canonical", "seconds", "millis", "offset", "space", "basic", "offset_seconds",
          "nanos", "lower")


def spell(moment: datetime, style: str, offset_min: int = 0) -> str:
    """``moment`` (aware) written in one of the ISO 8601 spellings fromisoformat reads
    (most of them), in local time at ``offset_min`` where the style carries an offset.
    Written by hand: strftime writes year 999 as "999"."""
    local = moment.astimezone(UTC).replace(tzinfo=None)
    if style in ("offset", "offset_seconds", "space"):
        try:
            local += timedelta(minutes=offset_min)
        except OverflowError:
            offset_min = 0
    else:
        offset_min = 0
    date = f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
    clock = f"{local.hour:02d}:{local.minute:02d}:{local.second:02d}"
    sign = "-" if offset_min < 0 else "+"
    zone = f"{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"
    micro = f"{local.microsecond:06d}"
    return {
        "canonical": f"{date}T{clock}.{micro}Z",
        "seconds": f"{date}T{clock}Z",
        "millis": f"{date}T{clock}.{micro[:3]}Z",
        "offset": f"{date}T{clock}.{micro}{zone}",
        "space": f"{date} {clock}{zone}",
        "basic": f"{date.replace('-', '')}T{clock.replace(':', '')}Z",
        "offset_seconds": f"{date}T{clock}{zone}:00",
        "nanos": f"{date}T{clock}.{micro}000Z",
        "lower": f"{date}t{clock}z",
    }[style]


def _recent(seconds: int) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


instants = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                 timezones=st.just(UTC)),
    st.integers(-40 * 86400, 40 * 86400).map(_recent),  # inside the fleet's windows
)
timestamps = st.one_of(
    st.sampled_from(EDGE_TIMESTAMPS),
    st.builds(spell, instants, st.sampled_from(STYLES), st.integers(-14 * 60, 14 * 60)),
)


# --- the world of one run -----------------------------------------------------------------


class Ran(NamedTuple):
    """A CLI command's exit code, stdout, stderr, and exception other than SystemExit."""

    code: int
    out: str
    err: str
    crash: BaseException | None


@dataclass
class World:
    """One collector with its two probes and tokens, and a store of its own for the
    in-process alerter."""

    collector: RunningCollector
    db: str  # the CLI's --db: the SQLite path or the PostgreSQL URI
    tokens: dict[str, str]
    victim_result_ids: list[str]
    store: Store
    alerter: Alerter
    # The start of a campaign that cannot complete any more (70 h of its 72 gone, 5 of
    # its 24 bands filled): the attacker may report it, for a campaign_incomplete alert.
    late_start: datetime = field(default_factory=lambda: datetime.now(UTC).replace(
        microsecond=0) - timedelta(hours=70))

    def http(self, method: str, path: str, body: bytes | None = None,
             token: str | None = None, headers: dict[str, str] | None = None
             ) -> tuple[int, bytes, dict[str, str]]:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        status, data, got = request(method, self.collector.url + path, body, sent, raw=True)
        return status, data, got

    def post(self, path: str, doc: Any, token: str | None, *, ascii_only: bool = True
             ) -> int:
        """POST ``doc`` as JSON; ``ascii_only=False`` writes it as UTF-8 with lone
        surrogates as their (invalid) three bytes. Returns the status."""
        if ascii_only:
            raw = json.dumps(doc).encode()
        else:
            raw = json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
        return self.http("POST", path, raw, token, {"Content-Type": "application/json"})[0]

    def cli(self, *args: str) -> Ran:
        """A CLI command against this collector's database, run in-process."""
        done = CliRunner().invoke(cli_main, ["--db", self.db, *args])
        crash = done.exception if not isinstance(done.exception, SystemExit) else None
        return Ran(done.exit_code, done.stdout, done.stderr, crash)

    def tick(self) -> None:
        """One alerter tick, in-process: evaluate, record, deliver (to no notifier)."""
        asyncio.run(self.alerter.tick())


def health_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "agent_version": "1.2.3",
        "reported_at": spell(datetime.now(UTC), "canonical"), "mode": "daemon",
        "instruction_version": None, "instruction_error": None, "campaign": None,
        "spool_results": 0, "spool_bytes": 0, "dead_letters": 0, "gaps_waiting": 0,
        "dropped_total": 0, "clock": {"synchronized": True, "max_error_ms": 4.0,
                                      "source": "adjtimex"},
        "last_error": None, "failing_checks": [], "suppressed_until": None,
        "next_session_at": None}
    doc.update(changes)
    return doc


def campaign_doc(started: str, deadline: str, *, complete: bool, bands: int,
                 rule_name: str = "24in72h") -> dict[str, Any]:
    return {"rule": rule_name, "started_at": started, "deadline_at": deadline,
            "bands_filled": bands, "sessions_counted": bands, "sessions_needed": 24,
            "complete": complete, "sessions_suppressed": 0}


def _session(probe: str, started: datetime, **kwargs: Any) -> dict[str, Any]:
    doc = session_dict(probe_id=probe, started_at=spell(started, "canonical"), **kwargs)
    doc["ended_at"] = spell(started + timedelta(seconds=40), "canonical")
    return doc


@contextlib.contextmanager
def world(storage: StorageConfig | None) -> Iterator[World]:
    """A collector set up as the module docstring says; removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="bbprobe-poison-"))
    cfg = BASE_CONFIG if storage is None else replace(BASE_CONFIG, storage=storage)
    try:
        with running_collector(tmp, cfg) as collector:
            db = storage.url if storage is not None else str(collector.db_path)
            tokens = {VICTIM: collector.add_probe(VICTIM, VICTIM_LINE),
                      ATTACKER: collector.add_probe(ATTACKER, ATTACKER_LINE),
                      "admin": collector.add_token("ops", "admin"),
                      "analyst": collector.add_token("ana", "analyst")}
            store = collector.open_store()
            try:
                made = _populate(collector, db, tokens, store)
                yield made
            finally:
                store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _populate(collector: RunningCollector, db: str, tokens: dict[str, str],
              store: Store) -> World:
    async def run(fn: Callable[[Store], Any]) -> Any:
        return fn(store)

    alerter = Alerter(collector.config, {}, run)
    now = datetime.now(UTC).replace(microsecond=0)
    victim = [_session(VICTIM, now - timedelta(hours=h)) for h in (1, 2, 3)]
    victim.append(_session(VICTIM, now - timedelta(hours=4), invalid=("wifi",)))
    made = World(collector, db, tokens, [d["result_id"] for d in victim], store, alerter)
    status, body, _ = made.http("POST", spec.RESULTS_PATH + "/batch",
                                json.dumps({"results": victim}).encode(), tokens[VICTIM],
                                {"Content-Type": "application/json"})
    assert status == 200 and all(i["status"] == 201 for i in json.loads(body)["items"]), body
    started = now - timedelta(hours=3)
    report = health_doc(campaign=campaign_doc(
        spell(started, "canonical"), spell(started + timedelta(hours=72), "canonical"),
        complete=False, bands=3))
    assert made.post(spec.HEALTH_PATH, report, tokens[VICTIM]) == 200
    campaign = [_session(ATTACKER, CAMPAIGN_START + timedelta(hours=h, minutes=20))
                for h in range(24)]
    status, body, _ = made.http("POST", spec.RESULTS_PATH + "/batch",
                                json.dumps({"results": campaign}).encode(),
                                tokens[ATTACKER], {"Content-Type": "application/json"})
    assert status == 200 and all(i["status"] == 201 for i in json.loads(body)["items"]), body
    made.tick()
    return made


# --- reading, normalising, judging ----------------------------------------------------


class Unsafe(AssertionError):
    """An output a reader cannot take safely (an injection, a control character)."""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_csv(name: str, text: str) -> list[list[str]]:
    """The rows of a CSV body, after checking each cell (OWASP CSV injection: a cell
    starting with = + - @ runs as a formula; a control character breaks a row)."""
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:  # a bare carriage return, say: the rows after it are lost
        raise Unsafe(f"{name}: CSV does not parse: {exc}") from None
    for row in rows:
        for cell in row:
            if cell[:1] in ("=", "+", "-", "@") and not _is_number(cell):
                raise Unsafe(f"{name}: CSV cell starts a formula: {cell[:80]!r}")
            if any(unicodedata.category(c) == "Cc" for c in cell):
                raise Unsafe(f"{name}: CSV cell holds a control character: {cell[:80]!r}")
    return rows


def check_terminal(name: str, text: str) -> None:
    for c in text:
        if c != "\n" and unicodedata.category(c) == "Cc":
            at = text.index(c)
            raise Unsafe(f"{name}: terminal output holds {c!r}: "
                         f"{text[max(0, at - 40):at + 40]!r}")


def check_html(name: str, text: str) -> None:
    for payload in HTML_PAYLOADS:
        if payload in text:
            raise Unsafe(f"{name}: attacker markup unescaped in the page: {payload!r}")


def _surrogates(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(_surrogates(k) or _surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_surrogates(v) for v in value)
    return False


def check_json(name: str, raw: bytes) -> Any:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Unsafe(f"{name}: not UTF-8 JSON: {exc}") from None
    if _surrogates(doc):
        raise Unsafe(f"{name}: JSON holds a lone surrogate (not Unicode text)")
    return doc


def _text(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unsafe(f"{name}: not UTF-8: {exc}") from None


class ReadFailed(AssertionError):
    """A read answered other than 2xx (or exit 0), or raised."""


class ReadChanged(AssertionError):
    """A read about the victim answered other than at baseline."""


class WriteFailed(AssertionError):
    """A write got a 5xx, or a CLI command raised."""


_KINDS: dict[tuple[type[AssertionError], str], type[AssertionError]] = {}


def distinct(where: str, exc: AssertionError) -> AssertionError:
    """``exc`` as an exception type of its own for ``where`` (a surface, an endpoint):
    Hypothesis tells failures apart by type and place, so each surface's failure is
    shrunk and reported on its own, not merged with the first one raised at that line."""
    key = (type(exc), where)
    if key not in _KINDS:
        _KINDS[key] = type(f"{type(exc).__name__}[{where}]", (type(exc),),
                           {"__module__": __name__})
    return _KINDS[key](*exc.args)


def _ok(name: str, status: int, body: bytes) -> None:
    if not 200 <= status < 300:
        raise ReadFailed(f"{name}: answered {status}: {body[:300]!r}")


# UTC in machine output ("...T12:00:00Z"), local time on pages ("12:00:00 CET").
GENERATED = re.compile(r"generated \d{4}-\d\d-\d\d[T ][\d:.]+(?:Z| [A-Z]{2,5}|[+-]\d\d)")
# The customer tests of the report's period (see _report).
CUSTOMER_HTML = re.compile(r'<p class="customer">.*?</p>', re.S)
CUSTOMER_TEXT = re.compile(r"^Customer: .*$", re.M)
VICTIM_TR = re.compile(r'<tr class="[^"]*" data-probe="victim">.*?</tr>', re.S)
INDEX_TR = re.compile(r'<tr><td><a href="report\?probe=victim">.*?</tr>', re.S)


def _row(name: str, rows: list[list[str]]) -> dict[str, str]:
    if not rows:
        raise ReadFailed(f"{name}: empty CSV")
    found = [dict(zip(rows[0], r, strict=False)) for r in rows[1:]
             if r and r[0] == VICTIM]
    if len(found) != 1:
        raise ReadFailed(f"{name}: {len(found)} rows for the victim")
    found[0].pop("silent_s", None)
    return found[0]


def _victim_row(doc: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in doc["probes"] if r["probe_id"] == VICTIM]
    if len(rows) != 1:
        raise ReadFailed(f"/api/v1/fleet: {len(rows)} rows for the victim")
    return {k: v for k, v in rows[0].items() if k != "silent_s"}


def _metrics(w: World) -> Any:
    status, raw, _ = w.http("GET", "/metrics", token=w.tokens["analyst"])
    _ok("/metrics", status, raw)
    text = _text("/metrics", raw)
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # any parser error: Prometheus would refuse the scrape
        raise Unsafe(f"/metrics: Prometheus's parser refuses it: {exc!r}") from None
    up = [s.value for f in families for s in f.samples
          if s.name == "bbprobe_collector_state_up"]
    if up != [1.0]:
        raise ReadFailed(f"/metrics: bbprobe_collector_state_up is {up}")
    return sorted((s.name, s.value, sorted(s.labels.items())) for f in families
                  for s in f.samples if s.labels.get("probe") == VICTIM)


def _get_json(w: World, name: str, path: str, token: str = "analyst") -> Any:
    status, raw, _ = w.http("GET", path, token=w.tokens[token])
    _ok(name, status, raw)
    return check_json(name, raw)


def _get_csv(w: World, name: str, path: str) -> list[list[str]]:
    status, raw, _ = w.http("GET", path, token=w.tokens["analyst"])
    _ok(name, status, raw)
    return check_csv(name, _text(name, raw))


def _get_html(w: World, name: str, path: str) -> str:
    status, raw, _ = w.http("GET", path, token=w.tokens["analyst"])
    _ok(name, status, raw)
    page = _text(name, raw)
    check_html(name, page)
    return page


def _one(pattern: re.Pattern[str], name: str, page: str) -> str:
    found = pattern.findall(page)
    if len(found) != 1:
        raise ReadFailed(f"{name}: {len(found)} rows for the victim")
    return str(found[0])


def _cli(w: World, name: str, *args: str) -> str:
    ran = w.cli(*args)
    if ran.crash is not None:
        raise ReadFailed(f"{name}: raised {ran.crash!r}") from ran.crash
    if ran.code != 0:
        raise ReadFailed(f"{name}: exit {ran.code}: {ran.err[:300]!r}")
    check_terminal(name, ran.out)
    check_terminal(f"{name} (stderr)", ran.err)
    return ran.out


def _cli_fleet_text(w: World) -> str:
    out = _cli(w, "cli fleet", "fleet")
    lines = [ln for ln in out.splitlines() if ln.split(" ", 1)[0] == VICTIM]
    if len(lines) != 1:
        raise ReadFailed(f"cli fleet: {len(lines)} lines for the victim")
    # "last seen" is the second column ("12 s", "3 min"...); the columns' widths are the
    # widest cell's, whoever's it is.
    return " ".join(re.sub(r"^victim\s+\S+ (s|min|h|d)\s+", "victim <ago> ",
                           lines[0]).split())


def _alerts(w: World) -> Any:
    try:
        w.tick()
    except Exception as exc:
        raise ReadFailed(f"alerter tick raised {exc!r}") from exc
    rows = w.store.alerts(100_000)
    campaigns: Counter[tuple[Any, ...]] = Counter()
    for row in rows:
        details = row["details"] if isinstance(row["details"], dict) else \
            json.loads(row["details"])
        if "campaign_started_at" in details:
            instant = parse_utc(details["campaign_started_at"])
            campaigns[(row["kind"], row["probe"], instant, details.get("family"))] += 1
    twice = {k: n for k, n in campaigns.items() if n > 1}
    if twice:
        raise ReadFailed(f"alerts: raised more than once for one campaign: {twice}")
    return sorted((r["kind"], r["key"], r["subject"]) for r in rows if r["probe"] == VICTIM)


def _attacker_certificates(w: World) -> None:
    """The attacker's certificate; once it has sent a dual-stack session, one per IP
    version (a campaign each): asked for one, the collector answers 400 naming family."""
    name = "attacker's certificate"
    path = f"/api/v1/certificate?probe={ATTACKER}&rule=24in72h"
    status, raw, _ = w.http("GET", path, token=w.tokens["analyst"])
    if status == 400 and check_json(name, raw).get("field") == "family":
        for family in ("ipv4", "ipv6"):
            _get_json(w, f"{name} ({family})", f"{path}&family={family}")
        return
    _ok(name, status, raw)
    check_json(name, raw)


def _cli_certify_attacker(w: World) -> None:
    """As _attacker_certificates, with the CLI (exit 2 naming --family)."""
    args = ("certify", "--probe", ATTACKER, "--rule", "24in72h")
    ran = w.cli(*args)
    if ran.crash is None and ran.code == 2 and "family" in ran.err:
        for family in ("ipv4", "ipv6"):
            _cli(w, f"cli certify attacker ({family})", *args, "--family", family)
        return
    _cli(w, "cli certify attacker", *args)


def _report(doc: dict[str, Any]) -> dict[str, Any]:
    """A report without its count of customer tests: anonymous browser and ndt7 tests
    have no probe, so every report of their period counts them, as ones an analyst may
    include (collector/reports/service.py observations), by design."""
    doc["customer"].pop("tests", None)
    return doc


V = f"probe={VICTIM}"
# Every read about the victim: name -> what it answers, normalised (raises ReadFailed or
# Unsafe when it does not answer, or answers unsafely).
VICTIM_READS: dict[str, Callable[[World], Any]] = {
    "report json": lambda w: _report(_get_json(w, "report json", f"/api/v1/report?{V}")),
    "report csv": lambda w: _get_csv(w, "report csv", f"/api/v1/report?{V}&format=csv"),
    "report html": lambda w: CUSTOMER_HTML.sub("<customer>", GENERATED.sub(
        "generated <t>", _get_html(w, "report html", f"/report?{V}"))),
    "certificate json": lambda w: _get_json(w, "certificate json",
                                            f"/api/v1/certificate?{V}"),
    "certificate html": lambda w: GENERATED.sub("generated <t>", _get_html(
        w, "certificate html", f"/api/v1/certificate?{V}&format=html")),
    "completeness": lambda w: _get_json(w, "completeness", f"/api/v1/completeness?{V}"),
    "results json": lambda w: _get_json(w, "results json", f"/api/v1/results?{V}"),
    "results csv": lambda w: _get_csv(w, "results csv", f"/api/v1/results?{V}&format=csv"),
    "result by id": lambda w: _get_json(
        w, "result by id", f"{spec.RESULTS_PATH}/{w.victim_result_ids[0]}"),
    "samples csv": lambda w: _get_csv(w, "samples csv", f"/api/v1/samples?{V}&format=csv"),
    "gaps": lambda w: _get_json(w, "gaps", f"/api/v1/gaps?{V}"),
    "certificate 24in72h": lambda w: _get_json(w, "certificate 24in72h",
                                               f"/api/v1/certificate?{V}&rule=24in72h"),
    "effective instruction (admin)": lambda w: _get_json(
        w, "effective instruction", f"/api/v1/instructions/effective?{V}", token="admin"),
    "instruction (victim's token)": lambda w: _get_json(
        w, "instruction", spec.INSTRUCTION_PATH, token=VICTIM),
    "metrics": _metrics,
    "fleet json": lambda w: _victim_row(_get_json(w, "fleet json", "/api/v1/fleet")),
    "fleet csv": lambda w: _row("fleet csv", _get_csv(w, "fleet csv",
                                                      "/api/v1/fleet?format=csv")),
    # The row's second cell is "last seen" ("12 s ago"); the first, the name and links.
    "fleet page": lambda w: re.sub(r"^(<tr[^>]*><td>.*?</td><td>)[^<]*", r"\1<ago>",
                                   _one(VICTIM_TR, "fleet page",
                                        _get_html(w, "fleet page", "/fleet"))),
    "index page": lambda w: _one(INDEX_TR, "index page", _get_html(w, "index page", "/")),
    "cli fleet": _cli_fleet_text,
    "cli fleet csv": lambda w: _row("cli fleet csv", check_csv(
        "cli fleet csv", _cli(w, "cli fleet csv", "fleet", "--format", "csv"))),
    "cli report": lambda w: CUSTOMER_TEXT.sub("Customer: <n>", _cli(
        w, "cli report", "report", "--probe", VICTIM)),
    "cli instruction show": lambda w: _cli(w, "cli instruction show", "instruction",
                                           "show", "--probe", VICTIM),
    "cli certify": lambda w: _cli(w, "cli certify", "certify", "--probe", VICTIM),
    "cli results csv": lambda w: check_csv("cli results csv", _cli(
        w, "cli results csv", "results", "--probe", VICTIM, "--format", "csv")),
    "cli completeness": lambda w: _cli(w, "cli completeness", "completeness", "--probe",
                                       VICTIM),
    "alerter tick": _alerts,
}

# Reads of the whole fleet: the attacker's data is part of them, so only the answer (2xx,
# exit 0) and its safety are checked.
FLEET_READS: dict[str, Callable[[World], Any]] = {
    "fleet report json": lambda w: _get_json(w, "fleet report json", "/api/v1/report"),
    "fleet report csv": lambda w: _get_csv(w, "fleet report csv",
                                           "/api/v1/report?format=csv"),
    "fleet report html": lambda w: _get_html(w, "fleet report html", "/report"),
    "fleet report by region": lambda w: _get_csv(
        w, "fleet report by region", "/api/v1/report?format=csv&by=region"),
    "fleet results csv": lambda w: _get_csv(w, "fleet results csv",
                                            "/api/v1/results?format=csv"),
    "fleet results json": lambda w: _get_json(w, "fleet results json", "/api/v1/results"),
    "fleet completeness": lambda w: _get_json(w, "fleet completeness",
                                              "/api/v1/completeness"),
    "fleet samples csv": lambda w: _get_csv(w, "fleet samples csv",
                                            "/api/v1/samples?format=csv"),
    "probes csv": lambda w: _get_csv(w, "probes csv", "/api/v1/probes?format=csv"),
    "fleet gaps": lambda w: _get_json(w, "fleet gaps", "/api/v1/gaps"),
    "browser results": lambda w: _get_json(w, "browser results",
                                           "/api/v1/browser-results"),
    "suppressions": lambda w: _get_json(w, "suppressions", "/api/v1/suppressions"),
    "instructions (admin)": lambda w: _get_json(w, "instructions", "/api/v1/instructions",
                                                token="admin"),
    "attacker's certificate": _attacker_certificates,
    "cli fleet json": lambda w: check_json("cli fleet json", _cli(
        w, "cli fleet json", "fleet", "--format", "json").encode()),
    "cli report (fleet)": lambda w: _cli(w, "cli report (fleet)", "report"),
    "cli probe list": lambda w: _cli(w, "cli probe list", "probe", "list"),
    "cli instruction list": lambda w: _cli(w, "cli instruction list", "instruction",
                                           "list"),
    "cli suppress --list": lambda w: _cli(w, "cli suppress --list", "suppress", "--list"),
    "cli alerts list": lambda w: _cli(w, "cli alerts list", "alerts", "list"),
    "cli certify attacker": _cli_certify_attacker,
}


def baseline(w: World) -> dict[str, Any]:
    return {name: read(w) for name, read in VICTIM_READS.items()}


def difference(before: Any, after: Any) -> str:
    """A short unified diff of two normalised reads."""
    def lines(value: Any) -> list[str]:
        text = value if isinstance(value, str) else json.dumps(value, indent=1, default=str,
                                                               sort_keys=True)
        return text.splitlines()

    diff = list(difflib.unified_diff(lines(before), lines(after), "baseline", "now",
                                     lineterm="", n=1))
    return "\n".join(diff[:40])[:3000]


# --- figures ------------------------------------------------------------------------


@dataclass
class Figures:
    """What a run did, for its report: machine runs (examples), steps (states), rules
    and surfaces exercised, write outcomes, elapsed time."""

    started: float = field(default_factory=time.monotonic)
    examples: int = 0
    steps: int = 0
    rules: Counter[str] = field(default_factory=Counter)
    reads: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)

    def summary(self, backend: str) -> str:
        elapsed = time.monotonic() - self.started
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return (f"poison isolation [{backend}]: {self.examples} examples, {self.steps} "
                f"steps (states), {len(self.rules)} distinct rules, {len(self.reads)} of "
                f"{len(VICTIM_READS) + len(FLEET_READS)} read surfaces, {elapsed:.0f} s "
                f"({self.steps / max(elapsed, 1e-9):.1f} steps/s)\n"
                f"  rules: {dict(sorted(self.rules.items()))}\n"
                f"  write outcomes: {statuses}")


# --- the machine ------------------------------------------------------------------------


# Query values sent as they are: percent-encoded bytes that are not UTF-8 (a lone
# surrogate's three bytes, NUL, 0xFF), and a number no integer type holds.
PRE_ENCODED = ("%ED%A0%80", "%00", "%FF", "99999999999999999999")
RESULT_FIELDS = ("agent_version", "server.url", "server.ping_target", "ping.target",
                 "ping.error", "validity.detail", "transfer.error", "context.os")


def _put_text(doc: dict[str, Any], where: str, text: str) -> None:
    if where == "agent_version":
        doc["agent_version"] = text
    elif where.startswith("server."):
        doc["server"][where.split(".")[1]] = text
    elif where == "ping.target" and doc.get("ping"):
        doc["ping"]["target"] = text
    elif where == "ping.error" and doc.get("ping"):
        doc["ping"]["error"] = text
    elif where == "validity.detail":
        doc["validity"] = {"valid": False, "reasons": [{"code": "wifi", "detail": text}]}
    elif where == "transfer.error" and doc["transfers"]:
        doc["transfers"][0]["error"] = text
    elif where == "context.os":
        doc["context"] = {"interface": text[:200], "addresses": [], "gateway": None,
                          "mtu": 1500, "link_speed_mbps": None, "wireless": False,
                          "loopback": False, "public_address": None, "os": text,
                          "kernel": "6.1", "cpu_percent": 3.0, "memory_used_ratio": 0.2,
                          "memory_total_bytes": 1 << 30}


def _shape(name: str) -> dict[str, Any]:
    """A valid session at an edge of what is measurable (made by the factory, so its
    summary agrees with its samples)."""
    shapes: dict[str, dict[str, Any]] = {
        "usual": {},
        "all lost": {"rtts": (None, None, None)},
        "no ping": {"rtts": ()},
        "slowest rtt": {"rtts": (9.9e6, 9.9e6)},
        "all failed": {"transfers": [attempt("download", ok=False),
                                     attempt("upload", ok=False)]},
        "no transfers": {"transfers": []},
        "fastest": {"transfers": [attempt("download", bps=9.9e12),
                                  attempt("upload", bps=9.9e12)]},
        "slowest": {"transfers": [attempt("download", bps=1.0), attempt("upload", bps=1.0)]},
        "invalid": {"invalid": ("wifi", "cpu_busy")},
    }
    return shapes[name]


SHAPES = ("usual", "all lost", "no ping", "slowest rtt", "all failed", "no transfers",
          "fastest", "slowest", "invalid", "dual stack", "last seq")


@dataclass(frozen=True, slots=True)
class Hostile:
    """What makes one of the attacker's results hostile (a real session otherwise): its
    start and end, its ping's and first transfer's starts, one text field, its shape (a
    measurement at an edge). Kept small, so that a failing example prints what matters."""

    started: str
    ended: str | None = None  # None: as started
    nested: str | None = None  # the ping's and the first transfer's started_at
    field: str | None = None
    text: str | None = None
    shape: str = "usual"

    def doc(self, probe: str = ATTACKER) -> dict[str, Any]:
        kwargs = {} if self.shape in ("dual stack", "last seq") else _shape(self.shape)
        doc = session_dict(probe_id=probe, **kwargs)
        if self.shape == "dual stack":
            doc.update(address_family="ipv6", address_family_requested="both")
        elif self.shape == "last seq":
            doc["session_seq"] = 2**53
        doc["started_at"] = self.started
        doc["ended_at"] = self.ended if self.ended is not None else self.started
        if self.nested is not None:
            for part in (doc["ping"], *doc["transfers"][:1]):
                if part:
                    part["started_at"] = self.nested
        if self.field is not None and self.text is not None:
            _put_text(doc, self.field, self.text)
        return doc


# Starts near now, in any spelling: what a probe whose clock is right (or nearly) sends,
# and what the collector takes; the fleet's windows (validity, last session) see them.
near_now = st.builds(spell, st.integers(-40 * 86400, 40 * 86400).map(_recent),
                     st.sampled_from(STYLES), st.integers(-14 * 60, 14 * 60))
hostile_results = st.builds(
    Hostile, near_now | timestamps, st.none() | timestamps, st.none() | timestamps,
    st.none() | st.sampled_from(RESULT_FIELDS), st.none() | hostile_text,
    st.sampled_from(SHAPES))


@st.composite
def selectors(draw: st.DrawFn) -> dict[str, Any]:
    """A selector that never matches the victim: the attacker's name, its line, or
    hostile text."""
    kind = draw(st.sampled_from(("probe", "operator", "region", "technology", "offer",
                                 "hostile")))
    if kind == "hostile":
        name = draw(st.sampled_from(("operator", "region", "offer")))
        value = draw(short_text.filter(
            lambda s: s.strip().lower() not in ("victim telecom", "lazio", "fibra 100")))
        return {name: value}
    if kind == "probe":
        return {"probe": ATTACKER}
    return {kind: getattr(ATTACKER_LINE, kind)}


class PoisonMachine(RuleBasedStateMachine):
    """Hostile writes and every read, on one collector (see the module docstring)."""

    make_storage: ClassVar[Callable[[], tuple[StorageConfig | None, Callable[[], None]]]]
    figures: ClassVar[Figures]

    def __init__(self) -> None:
        super().__init__()
        self._stack = contextlib.ExitStack()
        try:
            storage, drop = type(self).make_storage()
            self._stack.callback(drop)
            self.w = self._stack.enter_context(world(storage))
            self.base = baseline(self.w)
        except BaseException:  # no teardown() for a machine that was never made
            self._stack.close()
            raise
        self.figures.examples += 1

    def teardown(self) -> None:
        self._stack.close()

    def _count(self, name: str) -> None:
        self.figures.steps += 1
        self.figures.rules[name] += 1

    def _no_5xx(self, what: str, status: int) -> None:
        self.figures.statuses[f"{status // 100}xx"] += 1
        if status >= 500:
            raise distinct(what, WriteFailed(f"{what}: a hostile write got {status}"))

    def _command(self, args: list[str]) -> None:
        """Run an administrator's command: no traceback, and nothing it echoes (the
        hostile value, say) acts on the terminal."""
        ran = self.w.cli(*args)
        self.figures.statuses[f"cli exit {ran.code}"] += 1
        where = " ".join(args[:2])
        if ran.crash is not None:
            raise distinct(where, WriteFailed(
                f"bbprobe-collector {args}: raised {ran.crash!r}")) from ran.crash
        try:
            check_terminal(where, ran.out + ran.err)
        except Unsafe as exc:
            raise distinct(where, exc) from None

    def _victim(self, surface: str) -> None:
        self.figures.reads[surface] += 1
        try:
            now = VICTIM_READS[surface](self.w)
            if now != self.base[surface]:
                raise ReadChanged(f"{surface}: the victim's read changed:\n"
                                  f"{difference(self.base[surface], now)}")
        except AssertionError as exc:
            raise distinct(surface, exc) from exc

    def _fleet(self, surface: str) -> None:
        self.figures.reads[surface] += 1
        try:
            FLEET_READS[surface](self.w)
        except AssertionError as exc:
            raise distinct(surface, exc) from exc

    # --- the attacker's token -----------------------------------------------------------

    @rule(result=hostile_results, as_victim=st.booleans(), reuse_id=st.booleans(),
          ascii_only=st.booleans())
    def attacker_posts_a_result(self, result: Hostile, as_victim: bool, reuse_id: bool,
                                ascii_only: bool) -> None:
        """A result from the attacker's token (claiming to be the victim, or reusing one
        of the victim's result ids, sometimes)."""
        self._count("attacker result")
        doc = result.doc()
        if as_victim:
            doc["probe_id"] = VICTIM
        if reuse_id:
            doc["result_id"] = self.w.victim_result_ids[0]
        status = self.w.post(spec.RESULTS_PATH, doc, self.w.tokens[ATTACKER],
                             ascii_only=ascii_only)
        self._no_5xx("POST /api/v1/results", status)

    @rule(results=st.lists(hostile_results, min_size=1, max_size=4),
          extra=st.sampled_from(("none", "oversized", "not an object", "deep", "victim's")))
    def attacker_posts_a_batch(self, results: list[Hostile], extra: str) -> None:
        """A batch of hostile results, with one item that is too big, not a result,
        nested too deep or the victim's."""
        self._count("attacker batch")
        items: list[Any] = [r.doc() for r in results]
        if extra == "oversized":
            big = session_dict(probe_id=ATTACKER)
            big["agent_version"] = "x" * 1_200_000
            items.append(big)
        elif extra == "not an object":
            items.append("\ud800")
        elif extra == "victim's":
            items.append(session_dict(probe_id=VICTIM))
        raw = json.dumps({"results": items}).encode()
        if extra == "deep":  # deeper than any encoder of ours writes
            raw = raw[:-2] + b", " + b"[" * 50_000 + b"]" * 50_000 + b"]}"
        status, _, _ = self.w.http("POST", spec.RESULTS_PATH + "/batch", raw,
                                   self.w.tokens[ATTACKER],
                                   {"Content-Type": "application/json"})
        self._no_5xx("POST /api/v1/results/batch", status)

    @rule(body=st.sampled_from(("deep", "surrogate escape", "nul", "huge string",
                                "nan", "bom")))
    def attacker_posts_a_raw_body(self, body: str) -> None:
        """Bodies no JSON encoder makes: 100,000 levels deep, a NUL inside a string..."""
        self._count("attacker raw body")
        doc = json.dumps(session_dict(probe_id=ATTACKER))
        raw = {"deep": b"[" * 100_000 + b"]" * 100_000,
               "surrogate escape": doc.replace('"test"', '"\\ud800\\udbff"').encode(),
               "nul": doc.replace('"test"', '"a\\u0000b"').encode(),
               "huge string": b'{"agent_version": "' + b"x" * 900_000 + b'"}',
               "nan": doc.replace('"duration_s": 40.0', '"duration_s": NaN').encode(),
               "bom": b"\xef\xbb\xbf" + doc.encode()}[body]
        status, _, _ = self.w.http("POST", spec.RESULTS_PATH, raw, self.w.tokens[ATTACKER],
                                   {"Content-Type": "application/json"})
        self._no_5xx(f"POST /api/v1/results ({body})", status)

    @rule(agent_version=st.none() | short_text | hostile_text,
          last_error=st.none() | hostile_text, instruction_error=st.none() | hostile_text,
          reported_at=near_now | timestamps,
          suppressed_until=st.none() | near_now | timestamps,
          next_session_at=st.none() | near_now | timestamps,
          campaign=st.none() | st.builds(lambda s, d, c, b: campaign_doc(
              s, d, complete=c, bands=b), near_now | timestamps, near_now | timestamps,
              st.booleans(), st.integers(0, 24)),
          failing=st.lists(st.sampled_from(("wireless", "cpu_busy", "Not A Code", "a\n")),
                           max_size=3),
          ascii_only=st.booleans())
    def attacker_reports_health(self, agent_version: str | None, last_error: str | None,
                                instruction_error: str | None, reported_at: str,
                                suppressed_until: str | None, next_session_at: str | None,
                                campaign: dict[str, Any] | None, failing: list[str],
                                ascii_only: bool) -> None:
        self._count("attacker health report")
        doc = health_doc(agent_version=agent_version if agent_version is not None else "1",
                         last_error=last_error, instruction_error=instruction_error,
                         reported_at=reported_at, suppressed_until=suppressed_until,
                         next_session_at=next_session_at, campaign=campaign,
                         failing_checks=failing)
        status = self.w.post(spec.HEALTH_PATH, doc, self.w.tokens[ATTACKER],
                             ascii_only=ascii_only)
        self._no_5xx("POST /api/v1/reported-state", status)

    @rule(late=st.booleans(),
          spellings=st.lists(st.tuples(st.sampled_from(STYLES),
                                       st.integers(-14 * 60, 14 * 60)), min_size=1,
                             max_size=3))
    def attacker_reports_its_campaign(self, late: bool, spellings: list[tuple[str, int]]
                                      ) -> None:
        """The attacker's campaign reported again and again, its start spelled one way
        or another: complete (a breach) or late (it cannot fill its bands in time). One
        instant, one alert."""
        self._count("attacker campaign")
        start = self.w.late_start if late else CAMPAIGN_START
        for style, offset in spellings:
            doc = health_doc(campaign=campaign_doc(
                spell(start, style, offset), spell(start + timedelta(hours=72), style, offset),
                complete=not late, bands=5 if late else 24))
            status = self.w.post(spec.HEALTH_PATH, doc, self.w.tokens[ATTACKER])
            self._no_5xx("POST /api/v1/reported-state (campaign)", status)

    @rule(first=timestamps, last=timestamps, recorded=timestamps,
          reason=st.sampled_from(("spool_full", "disk_full", "too_old", "\x1b[2J")),
          dropped=st.integers(-1, 2**63),
          ranges=st.lists(st.tuples(st.integers(0, 2**62), st.integers(0, 2**62)),
                          max_size=3))
    def attacker_posts_a_gap(self, first: str, last: str, recorded: str, reason: str,
                             dropped: int, ranges: list[tuple[int, int]]) -> None:
        self._count("attacker gap")
        doc = {"schema_version": SCHEMA_VERSION, "gap_id": str(uuid.uuid4()),
               "probe_id": ATTACKER, "recorded_at": recorded, "reason": reason,
               "dropped": dropped, "first_started_at": first, "last_started_at": last,
               "dropped_seq_ranges": [list(r) for r in ranges]}
        status = self.w.post("/api/v1/gaps", doc, self.w.tokens[ATTACKER])
        self._no_5xx("POST /api/v1/gaps", status)

    # --- anonymous clients --------------------------------------------------------------

    @rule(user_agent=hostile_text,
          method=st.dictionaries(short_text, st.none() | short_text | st.integers(),
                                 max_size=3),
          speed=st.none() | st.floats(allow_nan=False, allow_infinity=False))
    def anonymous_posts_a_browser_result(self, user_agent: str, method: dict[str, Any],
                                         speed: float | None) -> None:
        self._count("anonymous browser result")
        doc = {"user_agent": user_agent, "method": method, "download_bps": speed,
               "rtts_ms": [12.5, 13.0]}
        status = self.w.post("/api/v1/browser-results", doc, None)
        self._no_5xx("POST /api/v1/browser-results", status)

    @rule(path=st.sampled_from((
        "/measure/v1/download?bytes={}", "/measure/v1/download?duration_s={}",
        "/backend/garbage.php?ckSize={}", "/backend/empty.php?r={}", "/backend/getIP.php",
        "/api/v1/results/{}", "/report?probe={}", "/api/v1/certificate?probe={}",
        "/api/v1/report?since={}", "/api/v1/report?{}=1", "/api/v1/instruction?probe={}",
        "/api/v1/fleet?format={}", "/api/v1/results?limit={}", "/api/v1/report?by={}",
        "/api/v1/certificate?probe=victim&timezone={}",
        "/api/v1/certificate?probe=victim&since={}", "/api/v1/suppressions/{}/delete")),
          value=timestamps | hostile_text | st.sampled_from(PRE_ENCODED),
          who=st.sampled_from(("anonymous", "analyst", ATTACKER)))
    def hostile_query(self, path: str, value: str, who: str) -> None:
        """Requests with hostile paths and parameters (percent-encoded invalid UTF-8,
        huge numbers, timestamps out of range) from anyone."""
        self._count("hostile query")
        encoded = value if value in PRE_ENCODED else quote(
            value.encode("utf-8", "surrogatepass"), safe="")
        method = "POST" if path.endswith("/delete") else "GET"
        token = None if who == "anonymous" else self.w.tokens[who]
        status, _, _ = self.w.http(method, path.format(encoded)[:8000], b"" if method ==
                                   "POST" else None, token,
                                   {"Content-Type": "application/json"})
        self._no_5xx(f"{method} {path}", status)

    @rule(victim_name=st.booleans())
    def anonymous_posts_a_result(self, victim_name: bool) -> None:
        """A result with no token (or a made-up one), naming the victim."""
        self._count("anonymous result")
        doc = session_dict(probe_id=VICTIM if victim_name else ATTACKER)
        token = None if victim_name else "not-a-token"
        self._no_5xx("POST /api/v1/results (anonymous)",
                     self.w.post(spec.RESULTS_PATH, doc, token))

    # --- an administrator ----------------------------------------------------------------

    @rule(selector=selectors(),
          settings=st.dictionaries(
              st.sampled_from(("server.ping_target", "campaign.timezone", "profile",
                               "server.url", "server.candidates", "ping.count",
                               "checks.max_cpu_percent")),
              st.one_of(hostile_text.filter(lambda s: len(s) < 4000), st.integers(),
                        st.lists(short_text, max_size=2),
                        st.floats(allow_nan=False)), min_size=1, max_size=3))
    def admin_sets_an_instruction(self, selector: dict[str, Any],
                                  settings: dict[str, Any]) -> None:
        self._count("admin instruction")
        status = self.w.post("/api/v1/instructions", {"selector": selector, "set": settings},
                             self.w.tokens["admin"])
        self._no_5xx("POST /api/v1/instructions", status)

    @rule(selector=selectors(), starts=timestamps, ends=timestamps, reason=hostile_text)
    def admin_adds_a_suppression(self, selector: dict[str, Any], starts: str, ends: str,
                                 reason: str) -> None:
        self._count("admin suppression")
        doc = {"selector": selector, "from": starts, "until": ends, "reason": reason}
        status = self.w.post("/api/v1/suppressions", doc, self.w.tokens["admin"])
        self._no_5xx("POST /api/v1/suppressions", status)

    @rule(name=st.one_of(st.from_regex(r"\A[a-z][a-z0-9_-]{0,10}\n\Z"), short_text,
                         st.from_regex(r"\A[a-z][a-z0-9]{0,8}\Z")),
          line=st.dictionaries(st.sampled_from(("operator", "offer", "region",
                                                "technology", "download_min_kbps")),
                               hostile_text | st.floats() | st.integers(), max_size=3),
          via_cli=st.booleans())
    def admin_adds_a_probe(self, name: str, line: dict[str, Any], via_cli: bool) -> None:
        """A new probe, named "x\\n" or worse, with a hostile line (never the victim)."""
        self._count("admin probe add")
        if name in (VICTIM, ATTACKER):
            return
        if via_cli:
            opts = [f"--{k.replace('_', '-')}={v}" for k, v in line.items()
                    if isinstance(v, str) and "\x00" not in v and not _surrogates(v)]
            if "\x00" in name or _surrogates(name):
                return  # no process argument holds these
            args = ["probe", "add", name, *opts]
            self._command(args)
            return
        status = self.w.post("/api/v1/probes", {"probe_id": name, **line},
                             self.w.tokens["admin"])
        self._no_5xx("POST /api/v1/probes", status)

    @rule(option=st.sampled_from(("--operator", "--offer", "--region")), value=short_text,
          command=st.sampled_from(("probe set", "instruction set", "suppress")))
    def admin_runs_a_command(self, option: str, value: str, command: str) -> None:
        """The CLI with hostile values: the attacker's line, a rule, a window."""
        self._count("admin cli")
        if "\x00" in value or _surrogates(value):
            return  # no process argument holds these
        if command == "probe set":
            args = ["probe", "set", ATTACKER, f"{option}={value}"]
        elif command == "instruction set":
            args = ["instruction", "set", "--probe", ATTACKER,
                    f"server.ping_target={value}"]
        else:
            now = datetime.now(UTC)
            args = ["suppress", "--probe", ATTACKER, "--from", spell(now, "seconds"),
                    "--until", spell(now + timedelta(hours=1), "seconds"),
                    f"--reason={value}"]
        self._command(args)

    # --- reads ------------------------------------------------------------------------

    @rule(surface=st.sampled_from(sorted(VICTIM_READS)))
    def read_about_the_victim(self, surface: str) -> None:
        """One read about the victim: it answers as at baseline."""
        self._count("read victim")
        self._victim(surface)

    @rule(surface=st.sampled_from(sorted(FLEET_READS)))
    def read_the_fleet(self, surface: str) -> None:
        """One read of the whole fleet: it answers, safely."""
        self._count("read fleet")
        self._fleet(surface)

    @rule()
    def read_everything(self) -> None:
        """Every surface at once (so that a run looks everywhere)."""
        self._count("read everything")
        for surface in VICTIM_READS:
            self._victim(surface)
        for surface in FLEET_READS:
            self._fleet(surface)


def machine(backend: str, storage: Callable[[], tuple[StorageConfig | None,
                                                      Callable[[], None]]],
            figures: Figures) -> type[PoisonMachine]:
    """The machine for one backend: ``storage`` makes a fresh store's config (None:
    SQLite in the run's own directory) and the function that drops it."""
    return type(f"PoisonMachine_{backend}", (PoisonMachine,), {
        "make_storage": staticmethod(storage), "figures": figures})

