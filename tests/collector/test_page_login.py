"""Logging into the collector's pages from a browser: a browser without credentials gets
its login prompt (a Basic challenge) and a page saying what to type there; API clients
keep the JSON refusal; the token as the Basic password opens the page. Real collector."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.config import CollectorConfig
from collector.server.testing import RunningCollector, running_collector
from collector.web.replies import prefers_html
from tests.httpclient import request

# What Chromium and Firefox send when the user opens a page.
BROWSER = ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
           "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7")
PAGES = ["/", "/report", "/fleet"]


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[RunningCollector]:
    """A collector as shipped: queries and pages need a token (server.query_auth)."""
    assert CollectorConfig().server.query_auth
    with running_collector(tmp_path, CollectorConfig()) as running:
        yield running


def _basic(password: str, user: str = "whoever") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("path", PAGES)
def test_a_browser_without_credentials_is_told_what_to_type(collector: RunningCollector,
                                                            path: str) -> None:
    """Accept text/html and no credentials: 401, the Basic challenge (so the browser
    prompts), and an HTML page naming the user name (anything), the password (an analyst
    or admin token), the command that makes one and the API's Bearer header."""
    status, body, headers = request("GET", collector.url + path, headers={"Accept": BROWSER})
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="bbprobe", charset="UTF-8"'
    assert headers["content-type"].startswith("text/html")
    assert "Accept" in headers["vary"]
    page = body.decode()
    assert "You are not logged in." in page
    assert "User name" in page and "anything" in page
    assert "analyst or admin token" in page and "bbp_" in page
    assert "bbprobe-collector token add" in page
    assert "Authorization: Bearer &lt;token&gt;" in page
    assert "<script" not in page  # nothing runs, nothing is fetched


def test_a_browser_with_a_wrong_token_is_told_so(collector: RunningCollector) -> None:
    """A revoked or mistyped token: the page says the token is unknown or revoked, and
    the challenge asks again."""
    status, body, headers = request("GET", collector.url + "/report", headers={
        "Accept": BROWSER, "Authorization": _basic("bbp_not-a-token")})
    assert status == 401 and "www-authenticate" in headers
    assert "unknown or has been revoked" in body.decode()


@pytest.mark.parametrize("accept", [None, "application/json", "*/*",
                                    "application/json, text/html;q=0.5"])
def test_api_clients_keep_the_json_refusal(collector: RunningCollector,
                                           accept: str | None) -> None:
    """No Accept, JSON, a wildcard (curl, fetch) or JSON preferred: the JSON 401 as it
    was, challenge included."""
    headers = {} if accept is None else {"Accept": accept}
    status, body, got = request("GET", collector.url + "/report", headers=headers)
    assert status == 401 and got["content-type"].startswith("application/json")
    assert body == {"error": "this needs an analyst or admin token (Authorization: Bearer "
                             "<token>; `bbprobe-collector token add`)", "field": None}
    assert got["www-authenticate"].startswith("Basic realm=")


@pytest.mark.parametrize("path", PAGES)
def test_the_token_as_basic_password_opens_the_page(collector: RunningCollector,
                                                    path: str) -> None:
    """Any user name, the analyst token as password: the page (200, HTML)."""
    token = collector.add_token("ana")
    status, body, headers = request("GET", collector.url + path, headers={
        "Accept": BROWSER, "Authorization": _basic(token)})
    assert status == 200, body
    assert headers["content-type"].startswith("text/html")
    status, _, _ = request("GET", collector.url + path, headers={
        "Accept": BROWSER, "Authorization": _basic(token, user="")})
    assert status == 200


def test_accept_weighing() -> None:
    """HTML only when named and weighed above JSON (named or through a wildcard)."""
    assert prefers_html(BROWSER)
    assert prefers_html("text/html")
    assert prefers_html("application/json;q=0.5, text/html")
    assert not prefers_html(None) and not prefers_html("")
    assert not prefers_html("*/*") and not prefers_html("application/json")
    assert not prefers_html("text/html;q=0.5, application/json")
    assert not prefers_html("text/html, */*")  # a tie: JSON, as before
    assert not prefers_html("text/html;q=0")
    assert not prefers_html("text/html;q=bogus")
