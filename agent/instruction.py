"""Central instructions: which agent settings a collector may set on its probes,
how a value is read and checked, and the instruction document a probe receives. Pure.

The model is LMAP's (RFC 7594): a Controller gives Measurement Agents instructions
(what to measure, the schedule, suppressions) and they report to a Collector. Here the
collector is the controller too. Only measurement settings travel: where a probe
delivers (collector.*), how it delivers and keeps its spool (delivery.*), its name and
its state directory stay in the probe's own file, so no instruction can cut a probe off
from the collector that would have to correct it.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent import config
from agent.errors import AgentError, ConfigError
from agent.schema import INSTRUCTION_VERSION_RE, parse_utc

# The tables of AgentConfig an instruction may set (the measurement settings: the
# profile, ping, download, upload, checks, server and the campaign rule), and the
# top-level keys.
CENTRAL_SECTIONS = ("ping", "download", "upload", "checks", "server", "campaign")
CENTRAL_TOP = ("profile",)
LOCAL = ("probe_id", "state_dir", "collector", "delivery")
# Bounds of what an instruction may hold (it is stored, served and cached on probes).
MAX_KEYS = 200
MAX_VALUE_BYTES = 4096
MAX_SUPPRESSIONS = 100
MAX_REASON_CHARS = 200


class InstructionError(AgentError, ValueError):
    """A key or value an instruction may not hold; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def _section_fields(section: str) -> frozenset[str]:
    table = {f.name: f for f in dataclasses.fields(config.AgentConfig)}[section]
    factory = table.default_factory
    assert callable(factory)
    return frozenset(f.name for f in dataclasses.fields(factory()))


def key_problem(key: str) -> str | None:
    """Why ``key`` (dotted, as the agent's --set) may not be set centrally, or None."""
    head, _, rest = key.partition(".")
    if head in LOCAL:
        return ("stays in the probe's own file: where a probe delivers, keeps its spool "
                "and what it is called are not set centrally")
    if not rest:
        return None if key in CENTRAL_TOP else "unknown key"
    if head not in CENTRAL_SECTIONS or "." in rest or rest not in _section_fields(head):
        return "unknown key"
    return None


def parse_value(text: str) -> Any:
    """A KEY=VALUE value: JSON (lists: ["http://a", "http://b"]), else a TOML value as
    the agent's --set reads it ('text', 1_000), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_pairs(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """KEY=VALUE arguments as {key: value}; raises InstructionError naming a bad one."""
    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InstructionError(item[:60], "expected KEY=VALUE")
        out[key.strip()] = parse_value(raw)
    return out


def check(settings: Mapping[str, Any], assumed: Mapping[str, Any] | None = None
          ) -> dict[str, Any]:
    """``settings`` if every key may be set centrally and every value passes the agent's
    own validation (on top of the built-in defaults, and of ``assumed`` where
    ``settings`` do not set a key: what a probe's last session showed of its own file);
    raises InstructionError naming the first key that does not.

    The collector cannot read a probe's file, so the session's plan (agent/budget.py) is made
    on these defaults: a probe whose file plans longer (more tests, a profile, its own
    candidates) checks the instruction again, and over a limit keeps its previous one
    and says why in its health report. A refusal says what was assumed."""
    if not isinstance(settings, Mapping):
        raise InstructionError("", "settings must be an object of KEY: VALUE")
    if len(settings) > MAX_KEYS:
        raise InstructionError("", f"at most {MAX_KEYS} keys, got {len(settings)}")
    for key, value in settings.items():
        if not isinstance(key, str) or (problem := key_problem(key)) is not None:
            raise InstructionError(str(key)[:80], problem or "unknown key")
        try:
            size = len(json.dumps(value))
        except (TypeError, ValueError):  # a TOML date or time: no JSON for it
            raise InstructionError(key, f"not a JSON value, got {str(value)[:40]!r}") \
                from None
        if size > MAX_VALUE_BYTES:
            raise InstructionError(key, f"value longer than {MAX_VALUE_BYTES} bytes")
    extra = {k: v for k, v in (assumed or {}).items() if k not in settings}
    try:
        config.load(None, {"HOME": "/nonexistent"}, central={**extra, **settings})
    except ConfigError as exc:
        # "<defaults>: ping.count: must be >= 1, got 0" -> key "ping.count"
        text = str(exc).removeprefix("<defaults>: ")
        key = text.partition(":")[0]
        if key in settings or "[" in key:
            raise InstructionError(key, text.partition(": ")[2] or text) from None
        if key == "session":
            # The plan over a limit: say on what it was made.
            but = ", ".join(f"{k} = {json.dumps(v)}" for k, v in sorted(extra.items()))
            text += (" (planned on the built-in defaults for every key the instruction "
                     "does not set" + (f", except {but} as the probe's last session ran"
                                       if but else "")
                     + "; a probe whose own file sets other values plans again, and "
                     "over a limit keeps its previous instruction and reports why)")
        # Not one setting's fault (two that clash, or the session's plan over a limit,
        # agent/budget.py): the message whole, with what it names.
        raise InstructionError("", text) from None
    return dict(settings)


@dataclass(frozen=True, slots=True)
class Suppression:
    """A window in which the probe starts no session (LMAP's suppression)."""

    id: int
    starts_at: datetime
    ends_at: datetime
    reason: str

    def covers(self, moment: datetime) -> bool:
        return self.starts_at <= moment < self.ends_at


@dataclass(frozen=True, slots=True)
class Instruction:
    """What a probe received: the settings, its suppressions, and the version of both."""

    version: str
    settings: dict[str, Any]
    suppressions: tuple[Suppression, ...]
    # Why the settings were refused (then empty): the suppressions still hold, so a
    # maintenance window is honoured even when the settings that came with it are not.
    settings_error: str | None = None

    def suppression_at(self, moment: datetime) -> Suppression | None:
        return next((s for s in self.suppressions if s.covers(moment)), None)


def parse_document(doc: Any) -> Instruction:
    """The collector's instruction document, checked; raises ValueError naming the
    part that is wrong (a probe keeps its last good instruction then)."""
    if not isinstance(doc, dict):
        raise ValueError("the instruction is not a JSON object")
    version = doc.get("version")
    if not isinstance(version, str) or not INSTRUCTION_VERSION_RE.fullmatch(version):
        raise ValueError("the instruction has no valid version")
    settings_error = None
    try:
        settings = check(doc.get("settings") or {})
    except InstructionError as exc:
        settings, settings_error = {}, str(exc)
    raw = doc.get("suppressions") or []
    if not isinstance(raw, list) or len(raw) > MAX_SUPPRESSIONS:
        raise ValueError("suppressions: expected a list of at most "
                         f"{MAX_SUPPRESSIONS}")
    windows = []
    for i, item in enumerate(raw):
        try:
            start, end = parse_utc(item["starts_at"]), parse_utc(item["ends_at"])
            windows.append(Suppression(int(item["id"]), start, end,
                                       str(item.get("reason", ""))[:MAX_REASON_CHARS]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"suppressions[{i}]: expected id, starts_at, ends_at") \
                from None
    return Instruction(version, settings, tuple(windows), settings_error)
