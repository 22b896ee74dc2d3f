"""bbprobe's exit codes, defined once: every command exits with one of these, and
``bbprobe --help`` prints their ``table()``.

As iperf3, ping and speedtest-cli do, a measurement that could not be made is not a
success. The codes already documented keep their meaning (2 usage, 3 kept in the spool,
5 a host check fails, 6 a measurement failed, first ndt7's); a session that is both
failed and not delivered exits with the code that matters most to the line's evidence
(``worst``): a failed measurement must be made again, an invalid one is not evidence, an
undelivered one is safe in the spool and goes with ``bbprobe push``. Pure.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.schema import PingTest, SessionResult


class ExitCode(IntEnum):
    """A command's outcome (shell ``$?``); signals are 128 + the signal's number."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_DELIVERED = 3
    INVALID = 5
    FAILED = 6


# As `bbprobe --help` shows them, wrapped there (``table``).
MEANINGS: dict[int, str] = {
    ExitCode.OK: "done: every test measured (run: and delivered, or --no-push; push: "
                 "nothing left to send)",
    ExitCode.ERROR: "an error stopped the command (the message says which)",
    ExitCode.USAGE: "usage or configuration error: a flag, a key, a value",
    ExitCode.NOT_DELIVERED: "kept in the spool, not delivered: the collector did not take "
                            "it yet (bbprobe push or the next run sends it); verify: "
                            "every check passed, but the issuer's key is not anchored "
                            "(--trust)",
    ExitCode.INVALID: "measured, but invalid: a host check failed (cross traffic, Wi-Fi, "
                      "CPU...); check: a check fails",
    ExitCode.FAILED: "no measurement: a test failed (the server refused or did not "
                     "answer, every ping was lost, an ndt7 subtest failed); check: the "
                     "server does not answer",
    130: "stopped by Ctrl-C (143: by SIGTERM); results not yet delivered stay in the spool",
}

# Most telling first: what the line's evidence needs done about it.
_SEVERITY = (ExitCode.USAGE, ExitCode.ERROR, ExitCode.FAILED, ExitCode.INVALID,
             ExitCode.NOT_DELIVERED, ExitCode.OK)


def table(width: int = 78) -> str:
    """The codes for --help's epilog, wrapped to ``width`` under their meaning; click
    keeps a paragraph that starts with \\b as written."""
    lines = ["\b", "Exit codes (a session that fails more than one way: the first of "
             "6, 5, 3):"]
    for code, meaning in MEANINGS.items():
        lines += textwrap.wrap(meaning, width, initial_indent=f"  {code:<4d}",
                               subsequent_indent=" " * 6)
    return "\n".join(lines)


def worst(codes: Iterable[int]) -> int:
    """The one code for several outcomes (a session's measurement, its validity, its
    delivery): the first of ``_SEVERITY`` among them; OK for none."""
    given = set(codes)
    return next((code for code in _SEVERITY if code in given), ExitCode.OK)


def ping_failed(ping: PingTest) -> bool:
    """Whether a ping train measured nothing: it could not start (a target that does not
    resolve, no ICMP permission) or not one echo reply came back. Some loss is a
    measurement (ping(8) exits 0 when any reply arrives); all lost is not."""
    return ping.status == "failed" or ping.summary.packets_received == 0


def transfer_failed(result: SessionResult) -> bool:
    """Whether some test of the session ended with no successful attempt (each test
    is up to ``attempts`` attempts; one that succeeds measures the test)."""
    tests: dict[tuple[str, int], bool] = {}
    for a in result.transfers:
        key = (a.direction, a.test_index)
        tests[key] = tests.get(key, False) or a.status == "ok"
    return not all(tests.values())


def for_session(result: SessionResult) -> ExitCode:
    """FAILED when a test of the session measured nothing, INVALID when the host checks
    flag it, else OK (the RTT trains under load are a part of their transfer: they do
    not decide alone)."""
    if (result.ping is not None and ping_failed(result.ping)) or transfer_failed(result):
        return ExitCode.FAILED
    if result.validity is not None and not result.validity.valid:
        return ExitCode.INVALID
    return ExitCode.OK


def for_sessions(results: Iterable[SessionResult]) -> int:
    """A command's code for its session(s) (a dual-stack slot has two): the worst."""
    return worst(for_session(r) for r in results)


def failures(results: Iterable[SessionResult]) -> list[str]:
    """One line per test that measured nothing, with why (its last attempt's error), for
    the command's closing line on stderr. Pure."""
    lines: list[str] = []
    for result in results:
        if result.ping is not None and ping_failed(result.ping):
            p = result.ping
            why = p.error or f"no echo reply ({p.summary.packets_sent} sent)"
            lines.append(f"ping {p.target}: {why}")
        last: dict[tuple[str, int], tuple[bool, str]] = {}
        for a in result.transfers:
            key = (a.direction, a.test_index)
            ok = last.get(key, (False, ""))[0] or a.status == "ok"
            last[key] = (ok, a.error or a.failure_reason or "failed")
        lines += [f"{direction} test {index + 1}: {why}"
                  for (direction, index), (ok, why) in last.items() if not ok]
    return lines
