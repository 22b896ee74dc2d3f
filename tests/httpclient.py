"""A tiny synchronous HTTP client over http.client, for talking to a real collector."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit


def request(method: str, url: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, *, raw: bool = False
            ) -> tuple[int, Any, dict[str, str]]:
    """(status, body, headers): JSON bodies decoded unless ``raw`` (bytes as sent)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        sent = resp.read()
        ctype = resp.getheader("Content-Type", "")
        data: Any = json.loads(sent) if "json" in ctype and sent and not raw else sent
        return resp.status, data, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def post_json(url: str, doc: Any, token: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    status, data, _ = request("POST", url, json.dumps(doc).encode(), headers)
    return status, data
