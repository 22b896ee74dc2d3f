"""What stays on the primary when analysts read from a replica (storage.read_url), and
how a replica's cancelled read is said: the health route's outbox comes from the store
itself, and PostgreSQL's recovery conflict is a one-line error naming the setting."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from psycopg import errors as pg_errors

from collector.errors import StoreFault, StoreUnavailable
from collector.sinks.influx import SinkState
from collector.storage.sql import postgres
from collector.web.analyst_routes import collector_health
from collector.web.app_keys import DB_THREADS, READER, SINK, STORE


class Outbox:
    """A store as the health route reads it: its outbox and dead letters (stand-ins, so
    that the primary and the replica answer differently, as a lagging standby would)."""

    def __init__(self, size: int, dead: int) -> None:
        self.size, self.dead = size, dead

    def outbox_size(self) -> int:
        return self.size

    def outbox_dead_count(self) -> int:
        return self.dead


class Sink:
    state = SinkState(running=True)


def test_health_reports_the_primarys_outbox() -> None:
    """With a replica configured, /api/v1/health's outbox and dead letters are the
    primary's (the operational state), not the replica's stale copy."""
    app = web.Application()
    app[STORE] = Outbox(7, 2)  # type: ignore[assignment]
    app[READER] = Outbox(0, 0)  # type: ignore[assignment]
    app[SINK] = Sink()  # type: ignore[assignment]
    with ThreadPoolExecutor(1) as threads:
        app[DB_THREADS] = threads

        async def ask() -> Any:
            reply = await collector_health(make_mocked_request("GET", "/api/v1/health",
                                                               app=app))
            assert isinstance(reply, web.Response) and reply.text is not None
            return json.loads(reply.text)

        doc = asyncio.run(ask())
    assert (doc["influxdb"]["outbox"], doc["influxdb"]["dead_letters_stored"]) == (7, 2)


def _translate(exc: psycopg.Error) -> None:
    with postgres._translated("postgresql://bbprobe@replica/bbprobe"):
        raise exc


def test_a_recovery_conflict_names_hot_standby_feedback() -> None:
    """The hot standby's cancellation (SQLSTATE 40001, "canceling statement due to
    conflict with recovery", the text PostgreSQL sends) is the database unavailable for
    now, said in one line naming the settings that prevent it; any other serialization
    failure keeps the driver's own words."""
    conflict = pg_errors.SerializationFailure(
        "canceling statement due to conflict with recovery\nDETAIL:  User query might "
        "have needed to see row versions that must be removed.")
    with pytest.raises(StoreUnavailable) as caught:
        _translate(conflict)
    text = str(caught.value)
    assert "\n" not in text and "conflict with recovery" in text
    assert "hot_standby_feedback = on" in text and "storage.read_url" in text
    with pytest.raises(StoreUnavailable, match=r"^database error: could not serialize"):
        _translate(pg_errors.SerializationFailure("could not serialize access"))
    with pytest.raises(StoreFault, match=r"^database error: syntax"):
        _translate(pg_errors.SyntaxError("syntax error at or near"))
