"""What a report, listing or export is about: which probes, over which time, of which IP
version (``Scope``), and the pure parsing of the parameters that say so (ISO bounds, the
131/06 calendar periods, families, time zones, customer networks).

Refusals are ``BadParameter`` naming the parameter at fault (the web edge answers 400,
the CLI exits 2). Selecting probes reads the store: the caller passes the registered
probes in as ``known``, so this module knows no store.

A selector names what exists, or it is refused (``NotFound``: a 404, exit 2) with the
nearest names: a typo in ``--probe`` or ``--operator`` must not look like a line with no
data. Line metadata matches whatever its case and spacing (``fold``): operators, offers
and regions are proper names that people capitalise differently ("BT italia", "lazio"),
and no two real ones differ only so; stored values stay as the admin typed them."""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time
from typing import Any, Protocol

from agent.family import FAMILIES
from agent.schema import format_utc
from collector.errors import BadParameter, NotFound


@dataclass(frozen=True, slots=True)
class Scope:
    probes: tuple[str, ...] | None  # None: all probes
    since: str | None
    until: str | None
    # "ipv4"/"ipv6": only sessions measured over that IP version (a dual-stack line is
    # measured over each, and the two are different services); None: all.
    family: str | None = None

    def describe(self) -> str:
        if self.probes is None:
            who = "all probes"
        elif not self.probes:
            who = "no probe matches the selection"
        else:
            who = "probe " + ", ".join(self.probes)
        over = {"ipv4": "; IPv4 sessions only", "ipv6": "; IPv6 sessions only"}.get(
            self.family or "", "")
        return (f"{who}; from {self.since or 'the first result'} to "
                f"{self.until or 'now'}{over}")


# Years 1000 to 9000 hold every question about a measurement, and keep a day's arithmetic
# on a bound (the next midnight, a campaign's window) clear of datetime's year 1 and 9999.
SCOPE_YEARS = (1000, 9000)

# Scope filters on the probes' line metadata (delibera 156/23/CONS publishes results by
# operator, offer, region and technology).
METADATA_FILTERS = ("operator", "offer", "region", "technology")
# Scope filters on the sessions themselves: the IP version measured over.
SESSION_FILTERS = ("family",)


class KnownProbe(Protocol):
    """A registered probe as the store gives it (collector.storage.model.Probe): its
    name and its line metadata (``operator``, ``offer``, ``region``, ``technology``)."""

    @property
    def name(self) -> str: ...

    @property
    def line(self) -> Any: ...


# The registered probes, revoked ones too (their history is still reported): read only
# when a selector needs them.
Known = Callable[[], Sequence[KnownProbe]]

# Names a refusal suggests, at most; difflib's ratio from which a name is "near". Above
# difflib's 0.6: probe names follow a scheme (city-technology-number), and at 0.6 every
# probe sharing "-ftth-01" would be suggested for a typo in one.
SUGGESTED = 3
NEAR = 0.75


def fold(text: str) -> str:
    """The form metadata is matched in: case folded, spaces collapsed."""
    return " ".join(text.split()).casefold()


def line_matches(line: Any, filters: Mapping[str, str]) -> bool:
    """Whether a line's metadata has every ``filters`` value (case-insensitive, ``fold``);
    an unset field matches nothing."""
    return all(getattr(line, key) is not None and fold(getattr(line, key)) == fold(value)
               for key, value in filters.items())


def nearest(word: str, choices: Iterable[str]) -> list[str]:
    """The choices nearest ``word`` (difflib, compared folded), best first."""
    by_fold: dict[str, str] = {}
    for choice in choices:
        by_fold.setdefault(fold(choice), choice)
    return [by_fold[f] for f in difflib.get_close_matches(fold(word), list(by_fold),
                                                          SUGGESTED, NEAR)]


def shown(text: str) -> str:
    """A value as a refusal quotes it: at most 80 characters (a query may be 8 KiB)."""
    return repr(text if len(text) <= 80 else text[:80] + "…")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the nearest choices, or ``""``."""
    near = nearest(word, choices)
    if not near:
        return ""
    return " (did you mean " + " or ".join(shown(n) for n in near) + "?)"


def unknown_probe(name: str, known: Iterable[str]) -> NotFound:
    """The refusal of a probe name that is not registered, with the nearest names."""
    return NotFound(f"no probe named {shown(name)}{did_you_mean(name, known)}",
                    field="probe")


def check_probes(names: Sequence[str], known: Sequence[KnownProbe]) -> None:
    """Every name is a registered probe, or NotFound naming the first that is not."""
    registered = {p.name for p in known}
    for name in names:
        if name not in registered:
            raise unknown_probe(name, sorted(registered))


def spelled(field: str, known: Iterable[KnownProbe]) -> list[str]:
    """The values of a metadata field the probes have, as stored, sorted."""
    return sorted({getattr(p.line, field) for p in known} - {None})


def no_match(filters: Mapping[str, str], known: Sequence[KnownProbe],
             among: Sequence[str] | None = None) -> tuple[str, str]:
    """Why ``filters`` (over the probes ``among``, when named) select no probe: the
    field at fault and a one-line message, naming the nearest values there are."""
    for key, value in filters.items():
        if not any(line_matches(p.line, {key: value}) for p in known):
            return key, (f"no probe has {key} {shown(value)}"
                         f"{did_you_mean(value, spelled(key, known))}")
    wanted = " and ".join(f"{k} {shown(v)}" for k, v in filters.items())
    if among is not None:
        return "probe", f"none of the probes {', '.join(among)} has {wanted}"
    return next(iter(filters)), f"no probe has {wanted} together"


def as_stored(filters: Mapping[str, str], known: Iterable[KnownProbe]) -> dict[str, str]:
    """``filters`` with each metadata value spelt as the probes store it, when every
    probe it matches spells it one way (--region lazio is kept as Lazio: the rule is
    shown as the fleet writes it, and a later --region Lazio is the same rule)."""
    out = dict(filters)
    probes = list(known)
    for key, value in filters.items():
        if key not in METADATA_FILTERS:
            continue
        found = {getattr(p.line, key) for p in probes
                 if line_matches(p.line, {key: value})}
        if len(found) == 1:
            out[key] = found.pop()
    return out


def parse_time(text: str | None, name: str) -> str | None:
    """A ``since``/``until`` bound: ISO date (midnight UTC) or timestamp -> normalised UTC."""
    if text is None or text == "":
        return None
    try:
        if len(text) == 10:
            moment = datetime.combine(datetime.fromisoformat(text).date(), time(), UTC)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
    except (ValueError, OverflowError):  # overflow: before year 1 once in UTC
        raise BadParameter(
            f"{name}: expected an ISO 8601 date or timestamp, got {text!r}", field=name
        ) from None
    # The last day of year 9999 would overflow the next midnight: refused here, never a
    # server error later.
    if not SCOPE_YEARS[0] <= moment.year <= SCOPE_YEARS[1]:
        raise BadParameter(f"{name}: expected a year from {SCOPE_YEARS[0]} to "
                           f"{SCOPE_YEARS[1]}, got {text[:40]!r}", field=name)
    return format_utc(moment)


def period_bounds(period: str) -> tuple[str, str]:
    """Calendar periods of the regulations (131/06: semesters and the year), pure:
    "2026" -> [2026-01-01, 2027-01-01); "2026-H1" -> [01-01, 07-01); "2026-H2" ->
    [07-01, next 01-01). Bounds in UTC, ``until`` exclusive."""
    text = period.strip().upper()
    year_text, _, half = text.partition("-")
    if not (year_text.isascii() and year_text.isdigit() and len(year_text) == 4) or \
            half not in ("", "H1", "H2"):
        raise BadParameter(f"period: expected YYYY, YYYY-H1 or YYYY-H2, got {period!r}",
                           field="period")
    year = int(year_text)
    if not 1 <= year <= 9998:
        raise BadParameter(f"period: year must be within 0001..9998, got {year_text}",
                           field="period")
    start_month = 7 if half == "H2" else 1
    end = datetime(year + 1, 1, 1, tzinfo=UTC) if half in ("", "H2") else \
        datetime(year, 7, 1, tzinfo=UTC)
    return format_utc(datetime(year, start_month, 1, tzinfo=UTC)), format_utc(end)


def semesters(since: str | None, until: str | None, most: int) -> list[tuple[str, str, str]]:
    """(label "YYYY-H1", since, until) of each calendar semester [since, until) touches,
    clipped to it (UTC, as period_bounds); at most ``most`` + 1, so a caller refusing more
    than ``most`` groups sees the excess without walking eight millennia."""
    if since is None or until is None:
        raise BadParameter("by semester: give a period (YYYY, YYYY-H1, YYYY-H2) or both "
                           "since and until", field="by")
    out = []
    year, half = int(since[:4]), 1 if since[5:7] < "07" else 2
    while True:
        lo, hi = period_bounds(f"{year}-H{half}")
        if lo >= until:
            break
        out.append((f"{year}-H{half}", max(lo, since), min(hi, until)))
        year, half = (year, 2) if half == 1 else (year + 1, 1)
        if len(out) > most:
            break
    return out


def check_family(family: str | None) -> None:
    """A family filter is one of agent.family.FAMILIES (or none)."""
    if family is not None and family not in FAMILIES:
        raise BadParameter(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}",
                           field="family")


def check_timezone(timezone: str) -> str:
    """An IANA time zone name (the local time of the hourly bands), as given."""
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(timezone)
    except (ValueError, KeyError, OSError):
        raise BadParameter(f"timezone: unknown time zone {timezone!r}",
                           field="timezone") from None
    return timezone


def parse_network(text: str | None, name: str = "customer_network") -> str | None:
    """A client network (CIDR; host bits allowed) in its canonical form, or None."""
    if not text:
        return None
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise BadParameter(f"{name}: expected a network such as 203.0.113.0/24, got "
                           f"{text!r}", field=name) from None


def resolve_scope(probes: Sequence[str] | None, since: str | None, until: str | None,
                  period: str | None = None, *, filters: Mapping[str, str] | None = None,
                  known: Known | None = None) -> Scope:
    """Resolve a scope: named probes and/or probes selected by metadata (operator, offer,
    region, technology, case-insensitive), over ``period`` or [since, until);
    ``filters["family"]`` ("ipv4"/"ipv6") keeps the sessions measured over that IP
    version. With ``known`` (the registered probes), a name that is not registered and
    metadata that selects no probe are refused (NotFound, with the nearest names);
    metadata filters need it."""
    since_text: str | None
    until_text: str | None
    if period:
        if since or until:
            raise BadParameter("period: give either period or since/until, not both",
                               field="period")
        since_text, until_text = period_bounds(period)
    else:
        since_text, until_text = parse_time(since, "since"), parse_time(until, "until")
    selected = list(probes) if probes else None
    active = {k: v for k, v in (filters or {}).items() if v}
    family = active.pop("family", None)
    check_family(family)
    registered = known() if known is not None and (selected or active) else ()
    if selected and known is not None:
        check_probes(selected, registered)
    if active:
        assert known is not None, "metadata filters need the store's probes"
        found = [p.name for p in registered if line_matches(p.line, active)]
        chosen = found if selected is None else [p for p in selected if p in found]
        if not chosen:
            field, message = no_match(active, registered, selected)
            raise NotFound(message, field=field)
        selected = chosen
    return Scope(probes=tuple(selected) if selected is not None else None,
                 since=since_text, until=until_text, family=family)
