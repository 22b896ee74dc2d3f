"""A fault-injecting HTTP proxy in front of a real collector (in the spirit of toxiproxy):
each request takes the next fault from a script, then the default is to forward.

Faults:
- ``("status", code, retry_after[, field])``: answer ``code`` without forwarding (naming
  ``field`` of the document, as the collector does when the document is at fault);
- ``("drop_reply",)``: forward (the collector commits) but close the connection instead
  of replying: the agent sees a network error for a stored result (reliability.md A7);
- ``("drop",)``: close without forwarding;
- ``("refuse_encoding",)``: a compressed body gets 415, as a collector from before issue
  14 answered; a plain one is forwarded.

A request with a Content-Encoding is logged with it, e.g. ``POST /path [zstd] -> 200``.

Runs on 127.0.0.1:0 in a thread of its own, like ``collector.server.testing``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from collector.server.testing import serve_in_thread as threaded


@dataclass
class FaultProxy:
    url: str
    script: list[tuple[Any, ...]]
    seen: list[str] = field(default_factory=list)  # "METHOD path -> outcome"


@contextmanager
def serve_in_thread(app: web.Application) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1:0 in a thread of its own (collector.testing's server
    thread); yields its base URL."""
    async def start() -> tuple[web.AppRunner, str]:
        # auto_decompress=False: a compressed body is forwarded as it came.
        runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        return runner, f"http://{host}:{port}"

    with threaded(start) as url:
        yield url


@contextmanager
def fault_proxy(upstream: str, script: list[tuple[Any, ...]],
                rewrite: Callable[[dict[str, Any]], dict[str, Any]] | None = None
                ) -> Iterator[FaultProxy]:
    """``rewrite``, if given, is applied to the JSON reply of every forwarded batch POST
    (a collector answering out of order, or wrongly)."""
    proxy = FaultProxy(url="", script=list(script))

    async def handle(request: web.Request) -> web.StreamResponse:
        fault = proxy.script.pop(0) if proxy.script else ("forward",)
        body = await request.read()
        encoding = request.headers.get("Content-Encoding")
        label = f"{request.method} {request.path}" + (f" [{encoding}]" if encoding else "")
        if fault[0] == "refuse_encoding" and encoding:
            proxy.seen.append(f"{label} -> 415")
            return web.json_response({"error": f"Content-Encoding {encoding!r} is not "
                                      "accepted; send identity", "field": None}, status=415)
        if fault[0] == "status":
            proxy.seen.append(f"{label} -> {fault[1]}")
            headers = {"Retry-After": str(fault[2])} if fault[2] is not None else {}
            named = fault[3] if len(fault) > 3 else None  # a document field, as a 422 names
            return web.json_response({"error": "injected", "field": named}, status=fault[1],
                                     headers=headers)
        if fault[0] == "drop":
            proxy.seen.append(f"{label} -> dropped")
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "content-type", "content-encoding",
                                    "x-bbprobe-sent-at")}
        async with aiohttp.ClientSession() as session, session.request(
                request.method, upstream + request.path_qs, data=body,
                headers=headers) as resp:
            payload = await resp.read()
            status = resp.status
        if fault[0] == "drop_reply":
            proxy.seen.append(f"{label} -> {status} then dropped")
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if rewrite is not None and request.path.endswith("/batch") and status == 200:
            payload = json.dumps(rewrite(json.loads(payload))).encode()
        proxy.seen.append(f"{label} -> {status}")
        return web.Response(body=payload, status=status, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    with serve_in_thread(app) as url:
        proxy.url = url
        yield proxy
