"""What the daemon writes to its log, and how a log line reaches journald.

The daemon's log answers one question for whoever runs ``journalctl -u bbprobe-agent``:
is this probe measuring? So every slot ends in one INFO line (``session_line``): its band,
its verdict (valid, or invalid with the reasons' codes), the figures a line is judged on
(Mbit/s and ms, agent/units.py), whether its result reached the collector or waits in the
spool (and how many wait there), and when the next slot is, in the campaign's local time
(the hourly bands are local) and in UTC. Delivery failures and recoveries, and
instruction changes, are a line each when they change, never once per retry.

The formatters are pure. ``configure`` is the edge: Python logging to stderr; under
systemd (stderr connected to the journal, $JOURNAL_STREAM, systemd.exec(5)) a line
carries no timestamp (journald stamps every entry) and starts with its syslog priority,
``<6>`` for INFO and ``<4>`` for WARNING (sd-daemon(3): journald strips the prefix and
keeps the priority, so ``journalctl -p warning`` finds the problems).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from typing import IO, Any

from agent import units
from agent.schema import SessionResult

# The level names a config and --log-level accept (Python logging's, lower case).
LEVELS = ("debug", "info", "warning", "error")

# syslog(3) priorities (RFC 5424 §6.2.1) for Python's levels.
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}


def verdict(result: SessionResult) -> str:
    """``valid``, or ``invalid (cross_traffic, wifi)``: the reasons' codes, short (the
    details are in the result and on the collector)."""
    if result.valid:
        return "valid"
    codes = [r.code for r in result.validity.reasons] if result.validity else []
    return f"invalid ({', '.join(dict.fromkeys(codes)) or 'no reason given'})"


def missing(result: SessionResult) -> list[str]:
    """What a valid session lacks to fill its band: a direction whose every attempt
    failed, a ping train that sent nothing (daemon.session_counts)."""
    ok = {t.direction for t in result.transfers if t.status == "ok"}
    gone = [d for d in ("download", "upload") if d not in ok]
    ping = result.ping
    if ping is None or ping.summary.packets_sent == 0:
        gone.append("ping")
    return gone


def figures(result: SessionResult) -> str:
    """The figures a line is judged on: ``down 93.41 Mbit/s, up 19.80 Mbit/s, rtt 12.30
    ms, loss 0.0 %`` (a figure not measured: a dash)."""
    s = result.summary
    return (f"down {units.speed(s.download_bps)}, up {units.speed(s.upload_bps)}, "
            f"rtt {units.latency(s.rtt_mean_ms)}, loss {units.percent(s.loss_ratio)}")


def result_text(result: SessionResult, labelled: bool) -> str:
    """One session: verdict, what it lacks, figures; ``labelled``: its address family
    first (a dual-stack slot has two)."""
    said = verdict(result)
    gone = missing(result) if result.valid else []
    if gone:
        said += f" but no {' and no '.join(gone)}"
    family = (result.address_family or "").replace("ipv", "IPv")
    return f"{family + ' ' if labelled and family else ''}{said}, {figures(result)}"


def when(moment: datetime, zone: tzinfo, now: datetime | None = None) -> str:
    """A time in the campaign's local time and in UTC: ``15:07 CET (14:07 UTC)``; with
    its date when it is not on ``now``'s local day."""
    local = moment.astimezone(zone)
    same_day = now is not None and now.astimezone(zone).date() == local.date()
    shown = local.strftime("%H:%M %Z" if same_day else "%a %d %b %H:%M %Z")
    return f"{shown} ({moment.astimezone(UTC):%H:%M} UTC)"


def delivery_text(delivered: bool, spooled: int, why: str | None = None) -> str:
    """``delivered, spool empty`` or ``spooled, 3 in the spool (connection refused)``."""
    depth = "spool empty" if spooled == 0 else f"{spooled} in the spool"
    if delivered:
        return f"delivered, {depth}"
    return f"spooled, {depth}" + (f" ({why})" if why else "")


def session_line(results: Sequence[SessionResult], *, band: tuple[int, int, int] | None,
                 counted: bool, delivery: str, next_slot: str) -> str:
    """The slot's one line. ``band``: (local hour, sessions counted in it, needed per
    band) after this one; None for a session outside the campaign (--first-now)."""
    where = "outside the campaign" if band is None else \
        f"band {band[0]:02d}h {band[1]}/{band[2]}"
    if not results:
        body = "no result"
    else:
        body = "; ".join(result_text(r, len(results) > 1) for r in results)
    counts = "" if band is None else ("" if counted else " (not counted: retried in its "
                                                          "band)")
    return f"session done, {where}: {body}{counts}; {delivery}; next slot {next_slot}"


def progress(rule: str, per_band: int, counted: Sequence[int], started: str) -> str:
    """``campaign 96in24h started Mon 07 Dec 15:00 CET (14:00 UTC), 12/96 sessions
    counted``."""
    done = sum(min(c, per_band) for c in counted)
    return f"campaign {rule} started {started}, {done}/{24 * per_band} sessions counted"


def instruction_text(version: str, settings: Sequence[str], windows: int) -> str:
    """An instruction taking effect: its version, the keys it sets, its windows."""
    keys = ", ".join(sorted(settings)) or "nothing"
    return (f"running under central instruction {version}: sets {keys}; {windows} "
            "suppression window(s)")


# --- the edge: Python logging to stderr, journald-aware -------------------------------


def journal_stream(environ: Mapping[str, str], stream: IO[Any]) -> bool:
    """Whether ``stream`` is the journal's: $JOURNAL_STREAM names the device and inode
    of the stream systemd connected (systemd.exec(5)); a child whose stderr was
    redirected elsewhere inherits the variable but not the stream."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


class LineFormatter(logging.Formatter):
    """Under journald ``<6>message`` (the priority, no timestamp); elsewhere
    ``2026-12-07 15:04:05 message``, and ``warning:``/``error:`` before a problem's."""

    def __init__(self, journald: bool) -> None:
        super().__init__("%(message)s", "%Y-%m-%d %H:%M:%S")
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journald:
            return f"<{PRIORITY.get(record.levelno, 6)}>{text}"
        level = record.levelname.lower()
        said = f"{level}: " if record.levelno >= logging.WARNING and \
            not text.startswith(f"{level}:") else ""
        return f"{self.formatTime(record, self.datefmt)} {said}{text}"


def level_of(name: str) -> int:
    """A LEVELS name as Python logging's number."""
    return int(logging.getLevelName(name.upper()))


def configure(level: str, environ: Mapping[str, str] = os.environ,
              stream: IO[Any] | None = None, name: str = "bbprobe") -> logging.Logger:
    """Send the ``name`` logger's lines at ``level`` and above to ``stream`` (stderr),
    formatted for journald when it is the journal's; returns the logger."""
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(LineFormatter(journal_stream(environ, out)))
    logger = logging.getLogger(name)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level_of(level))
    logger.propagate = False
    return logger
