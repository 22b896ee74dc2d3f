"""Operations shared by the CLI and the HTTP API, over a store (synchronous)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, time

from agent.schema import PROBE_ID_RE, SessionResult, format_utc, parse_result, utc_now
from collector import auth
from collector.compliance.evaluate import Report, evaluate, observe
from collector.compliance.targets import Targets
from collector.errors import ApiError, StoreError
from collector.report import Scope, listing_row
from collector.storage.sqlite import LineMetadata, SqliteStore, StoredResult


def register_probe(store: SqliteStore, name: str, line: LineMetadata) -> str:
    """Create a probe and return its token (the only time the token exists in clear)."""
    if not PROBE_ID_RE.match(name):
        raise StoreError(
            f"probe name {name!r} must be 1-64 characters of letters, digits, '.', '_', '-'"
        )
    token = auth.new_token()
    store.add_probe(name, auth.hash_token(token), utc_now(), line)
    return token


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
    except ValueError:
        raise ApiError(
            400, f"{name}: expected an ISO 8601 date or timestamp, got {text!r}", field=name
        ) from None
    return format_utc(moment)


def scope(probes: list[str] | None, since: str | None, until: str | None) -> Scope:
    return Scope(
        probes=tuple(probes) if probes else None,
        since=parse_time(since, "since"),
        until=parse_time(until, "until"),
    )


def stored_results(store: SqliteStore, where: Scope, limit: int | None = None) -> list[
    StoredResult
]:
    return store.results(
        list(where.probes) if where.probes is not None else None, where.since, where.until, limit
    )


def listing(store: SqliteStore, where: Scope, limit: int | None = None) -> list[dict[str, object]]:
    return [
        listing_row(r.result_id, r.probe_name, r.started_at, r.ended_at, r.received_at,
                    json.loads(r.body))
        for r in stored_results(store, where, limit)
    ]


def decoded(rows: list[StoredResult]) -> list[SessionResult]:
    return [parse_result(json.loads(r.body)) for r in rows]


def compliance(store: SqliteStore, where: Scope, targets: Targets) -> Report:
    return evaluate(observe(decoded(stored_results(store, where))), targets)
