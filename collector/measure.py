"""Measurement endpoints the agent tests against: download source, upload sink, echo.

- ``GET /measure/v1/download?bytes=N`` sends exactly N bytes (Content-Length);
  ``?duration_s=S`` streams for S seconds (chunked). Both: whichever ends first.
- ``POST /measure/v1/upload[?bytes=N][&duration_s=S][&sample_interval_s=I]`` reads the body
  and answers with an ``UploadReport``: bytes received and (t, bytes) samples on the
  server's monotonic clock, so upload rates are computed at the receiver.
- ``GET /measure/v1/echo`` answers at once with a tiny body, for HTTP round-trip times.

Every transfer is bounded by ``measurement.max_bytes`` and ``max_duration_s``, and at
most ``max_concurrent`` run at once (503 + Retry-After beyond), so an open measurement
port cannot be turned into an unbounded load.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from agent import payload
from agent.schema import UploadReport, to_dict
from collector.config import MeasurementConfig
from collector.errors import ApiError

NO_STORE = {"Cache-Control": "no-store", "Content-Encoding": "identity"}
DEFAULT_SAMPLE_INTERVAL_S = 0.1


def _number(request: web.Request, name: str, kind: type[int] | type[float],
            low: float, high: float) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected a number, got {raw!r}", field=name) from None
    if not low <= value <= high:
        raise ApiError(400, f"{name}: must be within {low:g}..{high:g}, got {raw}", field=name)
    return value


class TransferSlots:
    """Counts running transfers; refuses the one above the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.running >= self.limit:
            raise ApiError(503, f"server busy: {self.limit} transfers already running")
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1


CONFIG = web.AppKey("measurement_config", MeasurementConfig)
SLOTS = web.AppKey("transfer_slots", TransferSlots)


async def download(request: web.Request) -> web.StreamResponse:
    cfg = request.app[CONFIG]
    nbytes = _number(request, "bytes", int, 1, cfg.max_bytes)
    duration = _number(request, "duration_s", float, 0.001, cfg.max_duration_s)
    if nbytes is None and duration is None:
        raise ApiError(400, "give bytes=N or duration_s=S (or both)")
    async with request.app[SLOTS].slot():
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (duration if duration is not None else cfg.max_duration_s)
        response = web.StreamResponse(
            headers={**NO_STORE, "Content-Type": "application/octet-stream"}
        )
        if nbytes is not None and duration is None:
            response.content_length = int(nbytes)
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for chunk in payload.chunks(int(nbytes) if nbytes is not None else cfg.max_bytes):
                if loop.time() >= deadline:
                    break
                await response.write(chunk)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading: the normal end of a duration-mode test
        return response


async def upload(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    expected = _number(request, "bytes", int, 1, cfg.max_bytes)
    duration = _number(request, "duration_s", float, 0.001, cfg.max_duration_s)
    interval = _number(request, "sample_interval_s", float, 0.01, 1.0)
    interval = interval if interval is not None else DEFAULT_SAMPLE_INTERVAL_S
    if request.content_length is not None and request.content_length > cfg.max_bytes:
        raise ApiError(413, f"upload of {request.content_length} bytes exceeds the "
                            f"{cfg.max_bytes}-byte limit")
    async with request.app[SLOTS].slot():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        limit_s = duration if duration is not None else cfg.max_duration_s
        samples: list[tuple[float, int]] = [(0.0, 0)]
        total = 0
        last = 0.0
        try:
            async with asyncio.timeout(limit_s):
                while chunk := await request.content.readany():
                    total += len(chunk)
                    now = loop.time() - t0
                    if now - last >= interval:
                        samples.append((now, total))
                        last = now
                    if total > cfg.max_bytes:
                        raise ApiError(413, f"upload exceeds the {cfg.max_bytes}-byte limit")
        except TimeoutError:
            raise ApiError(
                413, f"upload still running after {limit_s:g} s (duration_s limit)"
            ) from None
        end = loop.time() - t0
        if samples[-1][1] != total or samples[-1][0] != end:
            samples.append((end, total))
        if expected is not None and total != expected:
            raise ApiError(400, f"received {total} bytes, expected {int(expected)}")
        report = UploadReport(bytes_received=total, t0_monotonic_s=t0, samples=tuple(samples))
        return web.json_response(to_dict(report), headers={"Cache-Control": "no-store"})


async def echo(request: web.Request) -> web.Response:
    return web.Response(text="ok", headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application, cfg: MeasurementConfig) -> None:
    from agent import spec

    app[CONFIG] = cfg
    app[SLOTS] = TransferSlots(cfg.max_concurrent)
    payload.buffer()  # generate the random buffer now, not during the first test
    app.router.add_get(spec.DOWNLOAD_PATH, download)
    app.router.add_post(spec.UPLOAD_PATH, upload)
    app.router.add_get(spec.ECHO_PATH, echo)
