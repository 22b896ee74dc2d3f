"""The front page's per-line answers stay cheap however big the fleet: at most
FRONT_PAGE_LINES lines are certified per computation (a fleet of new probes reads no
session, yet each line costs queries), the later ones link to their certificate
unanswered, and the answers are kept for a minute, so repeated loads (anyone's, with
server.query_auth = false) do not certify the fleet again. Real collector on 127.0.0.1,
real SQLite file."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from typing import Any, cast

import pytest

from collector.fleet import probes as admin
from collector.lines import LineMetadata
from collector.reports import service
from collector.server.testing import RunningCollector
from collector.storage.store import Store
from collector.web import analyst_routes
from tests.httpclient import request

UNANSWERED = "not computed on this page (a big fleet): open the certificate"


def _register(collector: RunningCollector, names: list[str]) -> None:
    with closing(collector.open_store()) as store:
        for name in names:
            admin.register_probe(store, name, LineMetadata(download_min_kbps=20_000.0))


def _front(collector: RunningCollector) -> dict[str, str]:
    status, body, _ = request("GET", collector.url + "/", raw=True)
    assert status == 200
    return dict(re.findall(r'<tr><td><a href="report\?probe=([^"]+)"(.*?)</tr>',
                           body.decode()))


def test_a_big_new_fleet_certifies_a_capped_number_of_lines_once_a_minute(
        collector: RunningCollector, monkeypatch: pytest.MonkeyPatch) -> None:
    """105 new probes (no session: the session budget never stops it): one load
    certifies 100 lines and says the other 5 were not computed; a second load computes
    nothing; a changed fleet, or answers older than the minute, are computed again."""
    certified: list[str] = []
    original = service.certificate

    def counting(store: Any, probe: str, *args: Any, **kwargs: Any) -> Any:
        certified.append(probe)
        return original(store, probe, *args, **kwargs)

    monkeypatch.setattr(service, "certificate", counting)
    names = [f"p{i:03d}" for i in range(service.FRONT_PAGE_LINES + 5)]
    _register(collector, names)
    rows = _front(collector)
    assert len(rows) == 105 and len(certified) == service.FRONT_PAGE_LINES
    unanswered = sorted(n for n, row in rows.items() if UNANSWERED in row)
    assert unanswered == names[service.FRONT_PAGE_LINES:]
    assert "INCOMPLETE, no verdict yet: 0 of 24 bands filled" in rows["p000"]

    assert _front(collector) == rows and len(certified) == service.FRONT_PAGE_LINES
    _register(collector, ["a-new-line"])  # first by name: certified, the last one not
    rows = _front(collector)
    assert len(certified) == 2 * service.FRONT_PAGE_LINES
    assert UNANSWERED not in rows["a-new-line"] and UNANSWERED in rows["p099"]
    monkeypatch.setattr(analyst_routes, "FRONT_PAGE_TTL_S", 0.0)
    _front(collector)
    assert len(certified) == 3 * service.FRONT_PAGE_LINES


class _Counting:
    """A store whose calls are counted by method."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.store, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return method(*args, **kwargs)

        return counted


def test_line_answers_stops_at_its_line_cap_and_its_session_budget(store: Store) -> None:
    """30 new probes, a cap of 10 lines: 10 answers, and the store is asked about 10
    lines only (one listing, then a bounded number of queries per line)."""
    for i in range(30):
        admin.register_probe(store, f"p{i:02d}", LineMetadata())
    counting = _Counting(store)
    answers = service.line_answers(cast(Store, counting), lines=10)
    assert list(answers) == [f"p{i:02d}" for i in range(10)]
    assert counting.calls["facts"] == 10 and counting.calls["probe"] == 10
    assert sum(counting.calls.values()) <= 1 + 4 * 10, counting.calls
    assert len(service.line_answers(store, budget=0)) == 0
