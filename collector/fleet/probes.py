"""Probe and token administration over a store: register a probe with its line metadata
(checked as the offer declares it, delibera 156/23/CONS), change that metadata, create
analyst and admin tokens, and revoke either. Shared by the CLI and the admin API.

A secret exists in clear only in the return value of the call that creates it: the store
keeps its SHA-256 digest (collector/auth.py). Refusals are domain errors naming the field
at fault (``Unacceptable`` 422, ``NotFound`` 404 at the web edge)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Literal, Protocol

from agent.schema import PROBE_ID_RE, format_utc, parse_utc, utc_now
from collector import auth
from collector.errors import NotFound, Unacceptable
from collector.lines import TECHNOLOGIES, ContractVersion, LineMetadata, canonical_technology
from collector.storage.store import ContractStore, ProbeStore

# Who holds a secret: a probe (it delivers results) or a token (role analyst reads;
# admin also administers probes; metrics reads GET /metrics and nothing else, so the
# Prometheus server that holds it cannot read a report or a result).
Holder = Literal["probe", "token"]
ROLES = ("analyst", "admin", "metrics")


def register_probe(store: ProbeStore, name: str, line: LineMetadata,
                   by: str = "unknown") -> str:
    """Create a probe and return its token (the only time the token exists in clear).
    ``line`` is version 1 of its contract, valid from now; ``by``: who registered it
    (the OS user of the CLI, the admin token's name of the API)."""
    if not PROBE_ID_RE.fullmatch(name):
        raise Unacceptable(
            f"probe name {name!r} must be 1-64 characters of letters, digits, '.', '_', '-'",
            "probe_id")
    token = auth.new_token()
    store.add_probe(name, auth.hash_token(token), utc_now(), line, by)
    return token


def rotate_probe(store: ProbeStore, name: str,
                 at: str | None = None) -> tuple[str, str | None]:
    """Give probe ``name`` a new token and return it (the only time it exists in clear),
    with when the probe had been revoked (None: it was live). The old token is refused
    from the next request, and so is a client certificate issued before ``at`` (now if
    not given): a certificate is the device's other credential, and the lost or leaked
    device holds it too, so the replacement gets one issued after the rotation. The
    probe keeps its name, line metadata and results, so a replaced SD card or a leaked
    token does not split a line's history. A revoked probe is live again: revoking is
    the emergency stop for a lost device, and rotating is how its replacement comes
    back under the same name."""
    token = auth.new_token()
    found, revoked_at = store.rotate_probe(name, auth.hash_token(token), at or utc_now())
    if not found:
        raise NotFound(f"no probe named {name!r} (`probe add` registers one)", "probe_id")
    return token, revoked_at


def add_token(store: ProbeStore, name: str, role: str) -> str:
    """Create an analyst, admin or metrics token and return it (the only time it exists
    in clear)."""
    if role not in ROLES:
        raise Unacceptable(f"role must be one of {', '.join(ROLES)}, got {role!r}", "role")
    if not PROBE_ID_RE.fullmatch(name):
        raise Unacceptable(f"token name {name!r} must be 1-64 characters of letters, "
                           "digits, '.', '_', '-'", "name")
    token = auth.new_token()
    store.add_token(name, role, auth.hash_token(token), utc_now())
    return token


def revoke(store: ProbeStore, holder: Holder, name: str) -> bool:
    """Revoke the active probe or token ``name`` at once (a probe's results stay): its
    next request is refused. False if there is no active one of that name."""
    revoking = store.revoke_probe if holder == "probe" else store.revoke_token
    return revoking(name, utc_now())


def technology(text: str) -> str:
    """The canonical spelling of an access technology (any case); Unacceptable if it is
    none of TECHNOLOGIES."""
    known = canonical_technology(text)
    if known is None:
        raise Unacceptable(f"technology: expected one of {', '.join(TECHNOLOGIES)}, got "
                           f"{text[:40]!r}", "technology")
    return known


def _checked_fields(given: Mapping[str, Any]) -> dict[str, Any]:
    """Each given line field checked alone: known, numbers finite within 0..1e12,
    strings 1-200 printable characters (an empty one unsets), the technology one of
    TECHNOLOGIES."""
    names = {f.name for f in fields(LineMetadata)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise Unacceptable(f"{unknown[0][:40]}: unknown field", unknown[0][:40])
    values: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        if key.endswith(("_kbps", "_ms", "_ratio")):
            number = isinstance(value, int | float) and not isinstance(value, bool)
            # NaN and the infinities fail the range (comparisons with NaN are false);
            # a huge int is compared exactly, never converted.
            if not number or not 0 <= value < 1e12:
                raise Unacceptable(f"{key}: expected a number within 0..1e12, got "
                                   f"{str(value)[:40]}", key)
            values[key] = float(value)
        elif not isinstance(value, str) or len(value) > 200 or \
                not all(c.isprintable() for c in value):
            raise Unacceptable(f"{key}: expected text of at most 200 printable characters",
                               key)
        else:
            values[key] = value.strip() or None
    if values.get("technology"):
        values["technology"] = technology(values["technology"])
    if (values.get("max_loss_ratio") or 0) > 1:
        raise Unacceptable("max_loss_ratio: expected a ratio within 0..1", "max_loss_ratio")
    return values


def _declared_in_order(values: Mapping[str, Any], changed: set[str] | None = None) -> None:
    """Each direction's declared speeds in order, minimum <= normally available <=
    maximum, where given (only the directions ``changed`` touches, if given)."""
    for d in ("download", "upload"):
        keys = (f"{d}_min_kbps", f"{d}_normal_kbps", f"{d}_nominal_kbps")
        if changed is not None and not changed & set(keys):
            continue
        declared = [(k, values[k]) for k in keys if values.get(k) is not None]
        for (low_key, low), (high_key, high) in itertools.pairwise(declared):
            if low > high:
                raise Unacceptable(f"{high_key}: {high:g} is below {low_key} ({low:g}): "
                                   "an offer declares minimum <= normally available <= "
                                   "maximum", high_key)


def line_metadata(given: Mapping[str, Any]) -> LineMetadata:
    """Line metadata from options or a request's fields, checked (``_checked_fields``,
    and each direction's declared speeds in order)."""
    values = _checked_fields(given)
    _declared_in_order(values)
    return LineMetadata(**values)


class Contracted(ProbeStore, ContractStore, Protocol):
    """A probe's line metadata and its contract history."""


def valid_from(text: str | None, now: str) -> str:
    """When a contract change applies: ``text`` (``--from``, an ISO 8601 time with its UTC
    offset) or ``now``, as UTC text. A time in the future is refused: the change is made
    when it applies (the line's current figures are those in force now)."""
    if text is None:
        return now
    try:
        moment = parse_utc(text.strip())
    except ValueError as e:
        raise Unacceptable(f"from: expected an ISO 8601 time with its UTC offset, e.g. "
                           f"2026-03-01T00:00:00Z, got {text[:40]!r} ({e})", "from") from None
    if moment > parse_utc(now):
        raise Unacceptable(f"from: {text[:40]} is in the future: change the contract when "
                           "the change applies", "from")
    return format_utc(moment)


def set_line(store: Contracted, name: str, changes: Mapping[str, Any],
             by: str = "unknown", since: str | None = None) -> ContractVersion:
    """Change some of a probe's line metadata, as a new version of its contract valid
    from ``since`` (``--from``; default now), changed by ``by``: the fields given are
    checked, and the declared speeds of the directions they touch against the ones
    stored (what was stored before the checks existed is left as it is). A change
    applied from the past is a correction, recorded as retroactive; it may not begin
    before the line was registered, nor before the version in force began (the history
    is appended, never reordered)."""
    probe = store.probe(name)
    if probe is None:
        raise NotFound(f"no probe named {name!r}", "probe_id")
    checked = _checked_fields(changes)
    given = {k for k, v in changes.items() if v is not None}
    merged = {**{f.name: getattr(probe.line, f.name) for f in fields(LineMetadata)},
              **{k: checked.get(k) for k in given}}
    _declared_in_order(merged, given)
    now = utc_now()
    start = valid_from(since, now)
    if probe.created_at and parse_utc(start) < parse_utc(probe.created_at):
        raise Unacceptable(f"from: {start} is before {name!r} was registered "
                           f"({probe.created_at}): no session of it can be judged then",
                           "from")
    return store.change_contract(name, {k: checked.get(k) for k in given}, start, now, by)
