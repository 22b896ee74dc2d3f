"""Alerts, pure: which conditions need a person, as plain data; the message each
notifier sends; the webhook's signature; the retry schedule.

Triggers (``KINDS``):

- ``contract_breach``: a line breaches its contract on a completed certification
  campaign (delibera 244/08/CSP, collector/compliance/certify.py): the campaign the
  probe's daemon reports complete is certified here, and a "breach" verdict alerts.
- ``below_minimum``: a session's speed (median of its successful tests) below the
  line's contracted minimum, as an early warning only (one session is no verdict), at
  most once per direction and ``below_minimum_every_s``.
- ``probe_silent``: no report and no result for longer than ``fleet.silent_after_s``
  (the fleet view's threshold); and once the probe is heard again, the same alert
  *resolved* (``status`` "resolved", Alertmanager's word), once per silence.
- ``campaign_incomplete``: the campaign cannot fill its bands before its deadline
  (fewer whole hours left than bands unfilled), or its deadline passed unfilled.
- ``dead_letters``: results the InfluxDB copy refused for good, or a probe's spool holds
  results the collector refused for good.
- ``test``: ``bbprobe-collector alerts test``.

Every alert has a **key**: the same condition makes the same key, and the store keeps
one alert per key (collector/storage), so an alert is raised once however many
collector processes evaluate, and however often. A resolution's key is its alert's with
``RESOLVED_SUFFIX``: resolved once, too.

Durations in subjects are written as a person reads them ("1 min 3 s", "4 h 12 min"),
times to the second in UTC; the details keep the exact values.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from agent.schema import format_utc, parse_utc
from agent.stats import median
from collector.compliance.certify import Certificate
from collector.compliance.facts import SessionFacts
from collector.config import ALERT_KINDS
from collector.fleet.view import elapsed
from collector.lines import LineMetadata
from collector.storage.model import Probe

KINDS = ALERT_KINDS
Severity = Literal["critical", "warning", "info"]

SIGNATURE_HEADER = "X-Bbprobe-Signature"
TIMESTAMP_HEADER = "X-Bbprobe-Timestamp"
ID_HEADER = "X-Bbprobe-Alert-Id"
RESOLVED_SUFFIX = ":resolved"


@dataclass(frozen=True, slots=True)
class Alert:
    kind: str
    key: str
    probe: str | None
    severity: Severity
    subject: str
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """"firing", or "resolved" for the notice that a condition ended."""
        return "resolved" if self.details.get("status") == "resolved" else "firing"


def _line(probe: Probe) -> dict[str, Any]:
    line = probe.line
    return {"operator": line.operator, "offer": line.offer, "region": line.region,
            "technology": line.technology}


def below_minimum(probe: Probe, facts: SessionFacts, every_s: float,
                  contract: tuple[int, LineMetadata] | None = None) -> list[Alert]:
    """An early warning per direction whose median speed in this (valid) session is
    below the contracted minimum; the key's time bucket (``every_s`` long, counted from
    the Unix epoch) limits it to one per bucket. ``contract``: (version, figures) of the
    contract in force when the session started (``contract_at``); without it, the
    line's figures as they are now."""
    if not facts.valid:
        return []
    out = []
    bucket = math.floor(parse_utc(facts.started_at).timestamp() / every_s)
    line = probe.line if contract is None else contract[1]
    version = {} if contract is None else {"contract_version": contract[0]}
    for direction, minimum in (("download", line.download_min_kbps),
                               ("upload", line.upload_min_kbps)):
        speed = median([s for s in facts.speeds(direction) if s is not None])
        if minimum is None or speed is None or speed >= minimum:
            continue
        out.append(Alert(
            "below_minimum", f"below_minimum:{probe.name}:{direction}:{bucket}", probe.name,
            "info",
            f"{probe.name}: {direction} {speed / 1000:.1f} Mbit/s, below the contracted "
            f"minimum of {minimum / 1000:.1f} Mbit/s (one session: an early warning)",
            {"direction": direction, "speed_kbps": speed, "minimum_kbps": minimum,
             "result_id": facts.result_id, "started_at": facts.started_at,
             "method": "median of the session's successful tests", **version,
             **_line(probe)}))
    return out


def _when(moment: str) -> str:
    """A stored time as a subject shows it: UTC, to the second."""
    return format_utc(parse_utc(moment))[:19].replace("T", " ") + " UTC"


def silent(probe: Probe, last_seen: str | None, now: datetime, after_s: float) -> Alert | None:
    """A probe not seen for longer than ``after_s``; one alert per silence (the key is
    the moment it was last seen). A probe never seen is not silent: it was never set up."""
    if last_seen is None:
        return None
    silent_s = (now - parse_utc(last_seen)).total_seconds()
    if silent_s <= after_s:
        return None
    return Alert("probe_silent", f"probe_silent:{probe.name}:{last_seen}", probe.name,
                 "warning",
                 f"{probe.name}: silent for {elapsed(silent_s)} (last seen {_when(last_seen)})",
                 {"status": "firing", "last_seen": last_seen, "silent_s": round(silent_s, 1),
                  **_line(probe)})


def back(probe: Probe, key: str, firing: Mapping[str, Any], last_seen: str | None
         ) -> Alert | None:
    """The silence alert ``key`` (with its ``firing`` details) resolved: the probe has
    been heard since it was last seen before the silence. Only alerts that say they are
    "firing" are resolved (those raised before resolutions existed are not, so an
    upgrade does not announce every silence of the last keep_days as over)."""
    before = firing.get("last_seen")
    if firing.get("status") != "firing" or not isinstance(before, str) or last_seen is None:
        return None
    gap_s = (parse_utc(last_seen) - parse_utc(before)).total_seconds()
    if gap_s <= 0:
        return None
    return Alert("probe_silent", key + RESOLVED_SUFFIX, probe.name, "info",
                 f"{probe.name}: heard again at {_when(last_seen)}, after {elapsed(gap_s)} "
                 f"without word (last seen before: {_when(before)})",
                 {"status": "resolved", "resolves": key, "last_seen_before": before,
                  "last_seen": last_seen, "silent_s": round(gap_s, 1), **_line(probe)})


def _moment(value: Any) -> str:
    """A probe's timestamp in the collector's own spelling (UTC, microseconds): the same
    instant written with an offset or fewer digits is the same text, so it compares
    with stored times and makes the same key; ValueError if it is none."""
    return format_utc(parse_utc(str(value)))


# A campaign lasts its window (the agent's campaign.window_days, at most a month) and is
# judged while it is recent: a probe cannot make the collector certify, or warn about,
# campaigns it dates anywhere it likes, and a report's campaign costs a bounded read of
# the stored sessions.
MAX_CAMPAIGN_DAYS = 31
RECENT_DAYS = 45


def _plausible(started: str, deadline: str, now: datetime) -> bool:
    begun, ends = parse_utc(started), parse_utc(deadline)
    return (begun <= now and ends > begun
            and ends - begun <= timedelta(days=MAX_CAMPAIGN_DAYS)
            and now - ends <= timedelta(days=RECENT_DAYS))


def _day_of(moment: str) -> str:
    """The UTC day a campaign started on: a probe that writes its start 1 µs (or an
    hour) apart in every report does not make a new campaign of each; the daemon starts
    a new campaign only when the last one has ended."""
    return moment[:10]


def open_campaign(report: Mapping[str, Any], now: datetime
                  ) -> tuple[str, datetime, int] | None:
    """(started_at, deadline, bands unfilled) of the report's campaign if not complete
    (and plausible by our clock: see MAX_CAMPAIGN_DAYS)."""
    campaign = report.get("campaign")
    if not isinstance(campaign, Mapping) or campaign.get("complete"):
        return None
    try:
        started, deadline = _moment(campaign["started_at"]), _moment(campaign["deadline_at"])
        if not _plausible(started, deadline, now):
            return None
        return started, parse_utc(deadline), 24 - int(campaign["bands_filled"])
    except (KeyError, ValueError, TypeError, OverflowError):
        return None


def bands_ahead(now: datetime, deadline: datetime, zone: ZoneInfo) -> set[int]:
    """The local hour bands that still occur in [now, deadline) (pure)."""
    bands: set[int] = set()
    moment = now
    while moment < deadline and len(bands) < 24:
        local = moment.astimezone(zone)
        bands.add(local.hour)
        moment = (local.replace(minute=0, second=0, microsecond=0)
                  + timedelta(hours=1)).astimezone(UTC)
    return bands


def campaign_incomplete(probe: Probe, report: Mapping[str, Any], now: datetime,
                        unfilled_bands: set[int] | None = None,
                        zone: ZoneInfo | None = None) -> Alert | None:
    """The campaign of a probe's latest health report cannot complete. Every unfilled
    hourly band needs its own hour before the deadline: fewer hours left than bands
    unfilled is a campaign that will miss (or has missed) its window. With
    ``unfilled_bands`` (which ones, from the stored sessions) and the bands' ``zone``,
    the test is by band: some unfilled band does not come round again before the
    deadline (a band that comes round may still be too short to fill: not caught)."""
    found = open_campaign(report, now)
    if found is None:
        return None
    started, deadline, unfilled = found
    campaign = report["campaign"]
    deadline_text = format_utc(deadline)
    hours_left = max(0.0, (deadline - now).total_seconds() / 3600)
    missed: list[int] = []
    if unfilled_bands is not None and zone is not None:
        missed = sorted(unfilled_bands - bands_ahead(now, deadline, zone))
        if not missed:
            return None
    elif math.floor(hours_left) >= unfilled:
        return None
    return Alert("campaign_incomplete",
                 f"campaign_incomplete:{probe.name}:{_day_of(started)}",
                 probe.name, "warning",
                 f"{probe.name}: the campaign started {_when(started)} cannot complete: "
                 f"{unfilled} band(s) unfilled, {elapsed(hours_left * 3600)} left before "
                 f"{_when(deadline_text)}"
                 + (f" (bands {', '.join(f'{b:02d}h' for b in missed)} do not come round "
                    "again)" if missed else ""),
                 {"campaign_started_at": started, "deadline_at": campaign["deadline_at"],
                  "bands_unfilled": unfilled, "hours_left": round(hours_left, 2),
                  "bands_missed": missed, "rule": campaign.get("rule"), **_line(probe)})


def completed_campaign(report: Mapping[str, Any], now: datetime
                       ) -> tuple[str, str, str] | None:
    """(rule, started_at, deadline_at) of the report's campaign if it is complete (and
    plausible by our clock: see MAX_CAMPAIGN_DAYS), in the collector's spelling."""
    campaign = report.get("campaign")
    if not isinstance(campaign, Mapping) or campaign.get("complete") is not True:
        return None
    try:
        started, deadline = _moment(campaign["started_at"]), _moment(campaign["deadline_at"])
        if not _plausible(started, deadline, now):
            return None
        return str(campaign["rule"]), started, deadline
    except (KeyError, ValueError, TypeError, OverflowError):
        return None


def breach(probe: Probe, started_at: str, cert: Certificate) -> Alert | None:
    """A breach verdict on a completed campaign (delibera 244/08/CSP)."""
    if cert.verdict != "breach":
        return None
    failed = [c for c in cert.checks if c.breach and not c.informational]
    over = f" over {cert.family}" if cert.family else ""
    # Keyed on what the collector derived, never on the probe's spelling of its
    # campaign's start (20 reports each 1 µs apart made 19 identical critical alerts):
    # the window of the rule's length, counted from the epoch, that the first session
    # the certificate counted falls in. A probe moving its start in each report moves
    # the first session within that window, so it makes at most two keys of a
    # campaign, and only of recent ones (completed_campaign).
    slot = math.floor(parse_utc(cert.first or started_at).timestamp()
                      / (cert.rule.window_h * 3600))
    return Alert(
        "contract_breach",
        f"contract_breach:{probe.name}:{cert.rule.name}:{slot}"
        + (f":{cert.family}" if cert.family else ""),
        probe.name, "critical",
        f"{probe.name}: the line breaches its contract{over} over the campaign from "
        f"{cert.first} to {cert.last}: " + "; ".join(
            f"{c.name} {c.observed:g} {c.unit} {c.comparison} {c.threshold:g}"
            for c in failed if c.observed is not None and c.threshold is not None),
        {"campaign_started_at": started_at, "first": cert.first, "last": cert.last,
         "rule": cert.rule.name, "timezone": cert.timezone, "family": cert.family,
         "contract_versions": [v.version for v in cert.contracts],
         "checks": [{"id": c.id, "observed": c.observed, "threshold": c.threshold,
                     "unit": c.unit, "samples": c.samples} for c in failed],
         **_line(probe)})


def agent_dead_letters(probe: Probe, report: Mapping[str, Any]) -> Alert | None:
    """A probe reports dead letters; a new alert when the count first reaches 1, 2, 4,
    8... (a power of two: the count is the probe's to write, and one that changes it in
    every report makes at most some fifty keys, never an alert a report)."""
    count = report.get("dead_letters")
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        return None
    return Alert("dead_letters",
                 f"dead_letters:probe:{probe.name}:{count.bit_length()}", probe.name,
                 "warning",
                 f"{probe.name}: {count} result(s) refused for good wait in its spool "
                 "(bbprobe dead-letter list)",
                 {"source": "spool", "count": count, **_line(probe)})


def influx_dead_letters(count: int, latest: str | None) -> Alert | None:
    """InfluxDB dead letters; keyed by the newest one's time, so each new refusal alerts
    again and a purge does not."""
    if count <= 0:
        return None
    return Alert("dead_letters", f"dead_letters:influx:{latest or count}", None, "warning",
                 f"{count} result(s) InfluxDB refused for good "
                 "(bbprobe-collector influx dead-letters)",
                 {"source": "influxdb", "count": count})


def test_alert(now: str) -> Alert:
    return Alert("test", f"test:{now}", None, "info",
                 "bbprobe test alert: this notifier works", {"sent_at": now})


# --- what is sent ---------------------------------------------------------------------------


def payload(alert_id: int, created_at: str, alert: Alert) -> dict[str, Any]:
    """The webhook's JSON document (and Apprise's body, as text)."""
    return {"id": alert_id, "kind": alert.kind, "status": alert.status,
            "severity": alert.severity, "probe": alert.probe, "subject": alert.subject,
            "created_at": created_at, "details": dict(alert.details)}


def title(alert: Alert) -> str:
    label = "resolved" if alert.status == "resolved" else alert.severity
    return f"[bbprobe {label}] {alert.kind.replace('_', ' ')}" + \
        (f": {alert.probe}" if alert.probe else "")


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 of "timestamp.body" (the timestamp is signed too, so a captured
    request cannot be replayed later under a new one), as "sha256=<hex>"."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, given: str) -> bool:
    """What a receiver checks (constant-time comparison)."""
    return hmac.compare_digest(signature(secret, timestamp, body), given)


def retry_delay_s(attempts: int, low_s: float, high_s: float,
                  rng: random.Random | None = None) -> float:
    """Exponential backoff after ``attempts`` failures: low, 2 low, 4 low... up to high,
    +-50 % jitter so that many alerts failing together do not retry together."""
    base = min(high_s, low_s * 2.0 ** max(0, attempts - 1))
    jitter: float = (rng or random.Random()).uniform(0.5, 1.5)
    return base * jitter


def routed(kind: str, notifiers: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """The notifiers an alert of ``kind`` goes to: each names its triggers (none: all)."""
    return [name for name, triggers in notifiers if not triggers or kind in triggers]
