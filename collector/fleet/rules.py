"""Fleet control, pure: instruction rules and suppression windows over probe selectors,
the effective instruction of one probe, and its version.

A *rule* is a selector (every probe, or the probes whose line metadata matches the
report scopes' fields) with settings. A probe's effective instruction is the rules that
match it, applied from the least to the most specific, so a probe's own rule beats its
region's, which beats the whole fleet's:

1. ``--all``;
2. rules on metadata, fewer fields before more (``--region X`` before
   ``--region X --operator Y``); among equals, the older rule first;
3. rules naming the probe.

Each key records the rule it came from (``instruction show``). The version is the first
16 hex digits of the SHA-256 of the canonical JSON of what the probe receives (settings
and suppressions): equal instructions have equal versions, and it is the ETag.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.schema import acting_char
from collector.lines import canonical_technology
from collector.scope import fold, line_matches
from collector.storage.model import Probe

SELECTOR_FIELDS = ("probe", "operator", "offer", "region", "technology")
MAX_SELECTOR_CHARS = 200


@dataclass(frozen=True, slots=True)
class Selector:
    """Which probes a rule or a suppression applies to; no field set: all of them."""

    probe: str | None = None
    operator: str | None = None
    offer: str | None = None
    region: str | None = None
    technology: str | None = None

    @property
    def every(self) -> bool:
        return all(getattr(self, f) is None for f in SELECTOR_FIELDS)

    def matches(self, probe: Probe) -> bool:
        if self.probe is not None and self.probe != probe.name:
            return False
        # Metadata in any case, as the report scopes match it (collector/scope.py).
        return line_matches(probe.line, {f: getattr(self, f) for f in SELECTOR_FIELDS[1:]
                                         if getattr(self, f) is not None})

    def folded(self) -> tuple[str | None, ...]:
        """The selector as ``matches`` compares it (probe name exact, metadata folded):
        two rules with equal folds select the same probes, so they are one rule to every
        lookup (``instruction set/unset``), whatever case each was stored in."""
        return (self.probe, *(None if getattr(self, f) is None else fold(getattr(self, f))
                              for f in SELECTOR_FIELDS[1:]))

    def rank(self) -> tuple[int, int]:
        """Sort key, least specific first."""
        return (self.probe is not None,
                sum(getattr(self, f) is not None for f in SELECTOR_FIELDS[1:]))

    def key(self) -> str:
        """Canonical text: the rule's identity in the store."""
        return json.dumps({f: getattr(self, f) for f in SELECTOR_FIELDS
                           if getattr(self, f) is not None}, sort_keys=True)

    def describe(self) -> str:
        """As the command line writes it."""
        if self.every:
            return "--all"
        return " ".join(f"--{f} {getattr(self, f)}" for f in SELECTOR_FIELDS
                        if getattr(self, f) is not None)

    def to_dict(self) -> dict[str, str]:
        return {f: getattr(self, f) for f in SELECTOR_FIELDS if getattr(self, f) is not None}


def selector(data: Mapping[str, Any] | None, every: bool = False) -> Selector:
    """A Selector from {"probe": ..., "region": ...} (None values ignored) or ``every``;
    raises ValueError naming the field at fault. Exactly one of the two must be given."""
    given = {k: v for k, v in (data or {}).items() if v is not None}
    unknown = sorted(set(given) - set(SELECTOR_FIELDS) - {"all"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown selector field (use one of all, "
                         f"{', '.join(SELECTOR_FIELDS)})")
    if given.pop("all", False) is True:
        every = True
    for name, value in given.items():
        if not isinstance(value, str) or not value or len(value) > MAX_SELECTOR_CHARS \
                or acting_char(value) is not None:
            # isprintable: no control characters, no NUL (a 500 on PostgreSQL), no lone
            # surrogate: a selector is shown in every listing.
            raise ValueError(f"{name}: expected a non-empty string of at most "
                             f"{MAX_SELECTOR_CHARS} printable characters")
    if every == bool(given):
        raise ValueError("selector: give --all, or one or more of --probe, --operator, "
                         "--offer, --region, --technology")
    if "technology" in given:
        # As lines store it (collector/lines.py): --technology fwa selects the FWA lines.
        given["technology"] = canonical_technology(given["technology"]) or \
            given["technology"]
    return Selector(**given)


def selector_from_key(key: str) -> Selector:
    return Selector(**json.loads(key))


@dataclass(frozen=True, slots=True)
class Rule:
    selector: Selector
    settings: dict[str, Any]
    updated_at: str


@dataclass(frozen=True, slots=True)
class Window:
    """A suppression window (LMAP's suppression): no session starts in [starts_at,
    ends_at) on the probes it selects."""

    id: int
    selector: Selector
    starts_at: str
    ends_at: str
    reason: str
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "selector": self.selector.to_dict(),
                "selects": self.selector.describe(), "starts_at": self.starts_at,
                "ends_at": self.ends_at, "reason": self.reason, "created_at": self.created_at}


@dataclass(frozen=True, slots=True)
class Effective:
    settings: dict[str, Any]
    # key -> the selector (as the command line writes it) of the rule it came from
    sources: dict[str, str]
    suppressions: tuple[Window, ...]

    @property
    def document(self) -> dict[str, Any]:
        """What the probe receives (GET /api/v1/instruction)."""
        body: dict[str, Any] = {
            "settings": dict(sorted(self.settings.items())),
            "suppressions": [{"id": w.id, "starts_at": w.starts_at, "ends_at": w.ends_at,
                              "reason": w.reason} for w in self.suppressions]}
        return {"version": version(body), **body}


def version(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def effective(rules: Iterable[Rule], windows: Iterable[Window], probe: Probe,
              now: str) -> Effective:
    """The instruction ``probe`` runs under at ``now`` (UTC text): matching rules from
    the least specific to the most, and the suppression windows not yet over."""
    settings: dict[str, Any] = {}
    sources: dict[str, str] = {}
    matching = sorted((r for r in rules if r.selector.matches(probe)),
                      key=lambda r: (r.selector.rank(), r.updated_at))
    for rule in matching:
        for key, value in rule.settings.items():
            settings[key] = value
            sources[key] = rule.selector.describe()
    active = tuple(sorted((w for w in windows if w.selector.matches(probe)
                           and w.ends_at > now), key=lambda w: (w.starts_at, w.id)))
    return Effective(settings, sources, active)


def merged(current: Mapping[str, Any], put: Mapping[str, Any],
           remove: Iterable[str]) -> dict[str, Any]:
    """A rule's settings after ``instruction set`` / ``unset``."""
    out = {k: v for k, v in current.items() if k not in set(remove)}
    out.update(put)
    return out
