"""Fleet control, the store's side: set and show instructions, suppression windows,
health reports and the fleet view. The CLI and the web routes both call these;
the rules themselves are pure (collector/fleet/rules.py, collector/fleet/view.py,
agent/instruction.py)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence, Set
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from agent.instruction import MAX_REASON_CHARS, InstructionError, key_problem
from agent.instruction import check as check_settings
from agent.schema import acting_char, format_utc, parse_utc, utc_now
from collector import unreadable
from collector.errors import NotFound, Unacceptable
from collector.fleet import view as fleet
from collector.fleet.rules import (
    Effective,
    Rule,
    Selector,
    Window,
    effective,
    merged,
    selector_from_key,
)
from collector.scope import as_stored, unknown_probe
from collector.storage.model import Probe
from collector.storage.store import FleetStore, ProbeStore, ReportStore


class ProbedFleet(FleetStore, ProbeStore, Protocol):
    """The fleet's rules, windows and health, and the probes they select."""


class Instructing(ProbedFleet, ReportStore, Protocol):
    """A rule's change is checked against the probes it selects and their latest
    sessions (which of them measure dual stack)."""


# Bounds: an admin's typo must not create a year-long or a 10,000-window pause.
MAX_WINDOW_DAYS = 31
MAX_WINDOWS = 100
# Windows that ended this long ago are forgotten when the next is added: a semester and a
# half, longer than any campaign still to be certified (131/06's reports are by semester).
KEEP_ENDED_DAYS = 275


def rules(store: FleetStore) -> list[Rule]:
    """The stored rules; one no reader can interpret (its selector, or a value with a
    lone surrogate, stored before values were checked as Unicode) is left out and
    counted, so the others still reach their probes."""
    out = []
    for key, settings, updated_at in store.instruction_rules():
        try:
            if not _encodable(settings):
                raise ValueError("a value is not valid Unicode (a lone surrogate)")
            out.append(Rule(selector_from_key(key), settings, updated_at))
        except (ValueError, TypeError) as exc:
            unreadable.skipped("instructions", key, exc)
    return out


def windows(store: FleetStore, ending_after: str | None = None) -> list[Window]:
    out = []
    for w in store.suppressions(ending_after):
        try:
            if not _encodable([w["reason"], w["starts_at"], w["ends_at"]]):
                raise ValueError("text that is not valid Unicode (a lone surrogate)")
            out.append(Window(int(w["id"]), selector_from_key(w["selector"]),
                              w["starts_at"], w["ends_at"], w["reason"], w["created_at"]))
        except (ValueError, TypeError, KeyError) as exc:
            unreadable.skipped("suppressions", str(w.get("id")), exc)
    return out


def _encodable(value: Any) -> bool:
    """Whether a stored value can be read out at all (text stored before values were
    checked as Unicode may hold a lone surrogate; anything else that acts on a terminal
    is cleaned on output, collector/safetext.py, so a window with a newline in its reason
    still holds)."""
    return text_problem(value, surrogates_only=True) is None


def text_problem(value: Any, surrogates_only: bool = False) -> str | None:
    """Why text in ``value`` (nested lists and objects too) may not be stored, or None:
    it must be valid Unicode (click reads a Latin-1 terminal's bytes into lone
    surrogates, and one stored made the matching probes' instruction fetch and the fleet
    view fail) without characters that act on a terminal (control characters, bidi
    controls: agent.schema.ACTING_RANGES)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            bad = acting_char(item)
            if bad is not None and (not surrogates_only or "\ud800" <= bad <= "\udfff"):
                return (f"text must be valid Unicode without control characters, "
                        f"got U+{ord(bad):04X} in {item[:40]!a}")
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return None


def set_instruction(store: Instructing, selector: Selector, put: Mapping[str, Any],
                    remove: Sequence[str] = ()) -> dict[str, Any]:
    """Set ``put`` and remove ``remove`` in the rule of ``selector``; every key and value
    is checked first (Unacceptable naming the key). Returns the rule's settings."""
    for key in remove:
        if (problem := key_problem(key)) is not None:
            raise Unacceptable(f"{key}: {problem}", field=key)
    for key, value in put.items():
        if (problem := text_problem([key, value])) is not None:
            raise Unacceptable(f"{str(key)[:80]!a}: {problem}", field=str(key)[:80])
    try:
        check_settings(put)
    except InstructionError as exc:
        raise Unacceptable(str(exc), field=exc.key or None) from None
    selector = stored_selector(store, selector, removing=not put)
    others = [r for r in rules(store) if r.selector != selector]
    affected = [p for p in store.probes() if p.revoked_at is None and selector.matches(p)]
    # Read before the rule's transaction: the probes whose last session ran dual stack.
    dual = {f.probe_id for f in store.latest_sessions([p.name for p in affected])
            if f.dual_stack}

    def change(current: dict[str, Any]) -> dict[str, Any]:
        settings = merged(current, put, remove)
        try:
            # The rule as a whole must hold too (a timeout shorter than its window...).
            check_settings(settings)
        except InstructionError as exc:
            raise Unacceptable(str(exc), field=exc.key or None) from None
        before = [*others, Rule(selector, current, "")] if current else others
        _check_combined([*others, Rule(selector, settings, utc_now())], affected,
                        _own_dual_stack(dual, before, affected))
        return settings

    return store.update_instruction_rule(selector.key(), change, utc_now())


# What a dual-stack last session shows of a probe's own file: its session plan doubles.
_DUAL_STACK: Mapping[str, Any] = {"server.address_family": "both"}


def _own_dual_stack(dual: Set[str], before: Sequence[Rule], probes: Sequence[Probe]
                    ) -> set[str]:
    """The probes of ``dual`` (their last session ran dual stack) that no rule in force
    (``before``) told so: their own file, or their command line, says "both"."""
    return {p.name for p in probes if p.name in dual and not any(
        r.selector.matches(p) and "server.address_family" in r.settings for r in before)}


def _check_combined(all_rules: Sequence[Rule], probes: Sequence[Probe],
                    dual_stack: Set[str] = frozenset()) -> None:
    """Every affected probe's instruction, all its rules together, must hold: two rules
    fine alone (a timeout for all, a longer window for a region) can break together.

    The collector cannot read a probe's own file, so the session's plan (agent/budget.py)
    takes the built-in defaults for the keys no rule sets, with one exception it can see:
    a probe in ``dual_stack`` ran its last session under address_family "both" of its own
    accord, which doubles the plan, so an instruction that does not set the family is
    planned dual stack for it. Whatever else its file sets, the probe plans again and
    keeps its previous instruction if over a limit (its health report says why)."""
    seen: set[str] = set()
    for probe in probes:
        settings = effective(all_rules, [], probe, utc_now()).settings
        assumed = _DUAL_STACK if probe.name in dual_stack else {}
        key = json.dumps([settings, assumed], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_settings(settings, assumed)
        except InstructionError as exc:
            raise Unacceptable(f"{exc} (in probe {probe.name}'s instruction, with the "
                               "other rules it follows)", field=exc.key or None) from None


def effective_for(store: ProbedFleet, name: str, now: str | None = None) -> Effective:
    probe = store.probe(name)
    if probe is None:
        raise unknown_probe(name, [p.name for p in store.probes()])
    moment = now or utc_now()
    return effective(rules(store), windows(store, moment), probe, moment)


def show(store: ProbedFleet, name: str) -> dict[str, Any]:
    """What ``instruction show`` prints: the document and where each key came from."""
    eff = effective_for(store, name)
    return {"probe_id": name, **eff.document, "sources": eff.sources}


def add_window(store: ProbedFleet, selector: Selector, starts_at: str, ends_at: str,
               reason: str) -> Window:
    start, end = _when(starts_at, "from"), _when(ends_at, "until")
    if parse_utc(end) <= parse_utc(start):
        raise Unacceptable("until: must be later than from", field="until")
    if parse_utc(end) - parse_utc(start) > timedelta(days=MAX_WINDOW_DAYS):
        raise Unacceptable(f"until: a window is at most {MAX_WINDOW_DAYS} days",
                           field="until")
    if parse_utc(end) <= datetime.now(UTC):
        raise Unacceptable("until: the window is already over", field="until")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
        raise Unacceptable(f"reason: required, at most {MAX_REASON_CHARS} characters",
                           field="reason")
    if (problem := text_problem(reason)) is not None:
        # A NUL was a 500 on PostgreSQL; a surrogate, every reader's.
        raise Unacceptable(f"reason: {problem}", field="reason")
    selector = _as_stored(store, selector)
    created = utc_now()
    forget = format_utc(datetime.now(UTC) - timedelta(days=KEEP_ENDED_DAYS))
    ident = store.add_suppression(selector.key(), start, end, reason.strip(), created,
                                  max_open=MAX_WINDOWS, forget_before=forget)
    if ident is None:
        raise Unacceptable(f"at most {MAX_WINDOWS} windows not yet over; delete one first")
    return Window(ident, selector, start, end, reason.strip(), created)


def stored_selector(store: ProbedFleet, selector: Selector, removing: bool = False
                    ) -> Selector:
    """The selector whose stored rule a change of ``selector`` changes: the stored rule
    that selects the same probes (``Selector.folded``, the fold matching uses), in the
    spelling it was stored in, or for a new rule ``selector`` spelt as the probes store
    it. Rules stored before selectors ignored case can fold alike (--region lazio beside
    --region Lazio): a change is then refused naming them, except a removal spelt
    exactly as one of them, which is how the operator keeps only one."""
    same = sorted((r for r in rules(store) if r.selector.folded() == selector.folded()),
                  key=lambda r: r.updated_at)
    if len(same) == 1:
        return same[0].selector
    if len(same) > 1:
        if removing and any(r.selector == selector for r in same):
            return selector
        raise Unacceptable(twins_problem(store, same), field="selector")
    return _as_stored(store, selector)


def twins(all_rules: Sequence[Rule]) -> dict[str, list[str]]:
    """Each rule (by its key) that another rule folds alike to, with the others'
    selectors as the command line writes them (``instruction list`` flags them)."""
    by_fold: dict[tuple[str | None, ...], list[Rule]] = {}
    for rule in all_rules:
        by_fold.setdefault(rule.selector.folded(), []).append(rule)
    return {r.selector.key(): [o.selector.describe() for o in group if o is not r]
            for group in by_fold.values() if len(group) > 1 for r in group}


def twins_problem(store: ProbeStore, same: Sequence[Rule]) -> str:
    """One line naming rules that select the same probes, and the command that removes
    one: the one not spelt as the probes spell it (the one that matched nothing before
    selectors ignored case), else the oldest."""
    probes = store.probes()
    drop = next((r for r in same
                 if as_stored(r.selector.to_dict(), probes) != r.selector.to_dict()), same[0])
    names = [r.selector.describe() for r in same]
    words = [w for f, v in drop.selector.to_dict().items() for w in (f"--{f}", v)]
    return (f"rules {', '.join(names[:-1])} and {names[-1]} select the same probes "
            "(selectors ignore case); remove one, spelt exactly as stored: "
            f"`bbprobe-collector instruction unset "
            f"{shlex.join([*words, *sorted(drop.settings)])}`")


def _as_stored(store: ProbeStore, selector: Selector) -> Selector:
    """The selector with its metadata spelt as the probes store it (collector/scope.py:
    matching ignores case, so --region lazio is the rule of --region Lazio); a probe it
    names must be registered (NotFound with the nearest names)."""
    probes = store.probes()
    if selector.probe is not None and selector.probe not in {p.name for p in probes}:
        raise unknown_probe(selector.probe, [p.name for p in probes])
    return replace(selector, **as_stored(selector.to_dict(), probes))


def _when(text: str, name: str) -> str:
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise Unacceptable(f"{name}: expected an ISO 8601 timestamp, got {text!r}",
                           field=name) from None
    if moment.tzinfo is None:
        raise Unacceptable(f"{name}: give the time zone (Z or +01:00), got {text!r}",
                           field=name)
    try:
        return format_utc(moment)
    except OverflowError:
        raise Unacceptable(f"{name}: out of range, got {text!r}", field=name) from None


def delete_window(store: FleetStore, ident: int) -> None:
    if not store.delete_suppression(ident):
        raise NotFound(f"no suppression window {ident}", field="id")


def record_health(store: FleetStore, probe: str, raw: Mapping[str, Any],
                  skew_s: float | None) -> None:
    """A health report the caller validated (agent.decoding.parse_health), as sent."""
    store.put_health(probe, utc_now(), skew_s, json.dumps(raw))


def fleet_rows(store: ProbedFleet, silent_after_s: float, validity_days: int,
               now: datetime | None = None, versions: bool = True) -> list[dict[str, Any]]:
    """One fleet row per active probe. ``versions=False`` skips working out each probe's
    current instruction (most of the cost): the rows' instruction_current, summary and
    settings are then None, and a suppression is known only from the probe's own
    report (the metrics and the alerts need only seen, silent and healthy)."""
    moment = now or datetime.now(UTC)
    health = store.health()
    since = format_utc(moment - timedelta(days=validity_days))
    activity = store.activity(since)
    text_now = format_utc(moment)
    all_rules, all_windows = (rules(store), windows(store, text_now)) if versions else ([], [])
    # Probes on the same line metadata with no rule or window of their own share their
    # instruction: worked out once per such group, not once per probe.
    own = {r.selector.probe for r in all_rules} | {w.selector.probe for w in all_windows}
    known: dict[tuple[str | None, ...], tuple[Effective, str]] = {}
    out = []
    for probe in store.probes():
        if probe.revoked_at is not None:
            continue
        line = probe.line
        group = (probe.name if probe.name in own else None, line.operator, line.offer,
                 line.region, line.technology)
        if versions and group not in known:
            found = effective(all_rules, all_windows, probe, text_now)
            known[group] = (found, found.document["version"])
        eff, version = known.get(group, (None, ""))
        try:
            row = fleet.row(probe, health.get(probe.name), activity.get(probe.name),
                            version, moment, silent_after_s, eff)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            # A health report no reader can interpret costs its own probe's details,
            # never the fleet's view: the row is shown without it.
            unreadable.skipped("health", probe.name, exc)
            row = fleet.row(probe, None, activity.get(probe.name), version, moment,
                            silent_after_s, eff)
        if not versions:
            row["instruction_current"] = None
        out.append(row)
    return out
